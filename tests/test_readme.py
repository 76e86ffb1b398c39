"""The README is executable: every shell and Python block runs, against tiny data and settings.

Blocks come from README.md in order: fenced ```shell / ```python blocks and indented (4-space)
command blocks. A block preceded by `<!-- readme-test skip: REASON -->` (a GPU, a cluster, the
internet) is skipped with that reason. Shell lines keep their commands and arguments; the test
only adds what makes them tiny (one epoch, a few images, 32 px, no workers), points the
placeholder paths of what a user downloads (/data/imagenet, MindCV's .ckpt, the DUTS folders) at
small stand-ins, and runs `make X` as `make -n X` (the target exists; building a venv is not a
test's job). Every other file a block uses is the demo's output (made by the demo's own
functions; its digits folder keeps a few images per class and the ones the README names) or
written by an earlier block, as in a clone after `make demo`. Everything runs in one Python
process (tests/readme_runner.py). The commands that take a minute or more on 2 CPU cores (the
demo's training, ONNX and OpenVINO export of Res2Net-50, benchmark --compile, int8 calibration)
run under `-m slow`; their blocks' other lines run here (`make -n demo`, and the demo's output
made by its own functions for the blocks after it), and tests/test_export.py and
tests/test_lowprec.py check ONNX export (one quiet file, dynamic size), OpenVINO export (dynamic
size, in OpenVINO's runtime) and int8 on a tiny net. The workspace (gigabytes of Res2Net-50
checkpoints) is removed when the module's tests are done.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SKIP_MARK = re.compile(r"<!--\s*readme-test skip:\s*(.+?)\s*-->")
SLOW_MARK = re.compile(r"<!--\s*readme-test slow:\s*(.+?)\s*-->")


def _free_port() -> int:
    """A loopback port no one listens on now: a fixed one would collide with another run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `res2net serve` runs in the background for the curl lines after it, then is stopped
SERVE_PORT = _free_port()
SERVE_START = (
    f"{sys.executable} -m res2net.cli.main {{args}} > serve.log 2>&1 < /dev/null & "
    "echo $! > serve.pid; "
    f"for i in $(seq 300); do curl -sf http://127.0.0.1:{SERVE_PORT}/health > /dev/null && exit 0; "
    "sleep 0.2; done; cat serve.log; exit 1"
)
PATHS = {
    "/path/to/imagenet": "imagenet",
    "/data/imagenet-wds": "imagenet-wds",
    "/data/imagenet": "imagenet",
}
# the workspace's ImageNet stand-in has 3 classes
TRAIN_TINY = [
    "--num_classes",
    "3",
    "--epoch_size",
    "1",
    "--batch_size",
    "2",
    "--image_resize",
    "32",
    "--num_parallel_workers",
    "0",
    "--log_interval",
    "100",
    # At batch 2 and 32 px, BatchNorm over two values at 1x1 in layer4 makes a Res2Net whose
    # residual branches start at full scale diverge within a few steps (loss 1 -> 1e6 -> nan at
    # the recipes' lr; how soon depends on the thread count); timm's Res2Net-50 does the same
    # with zero_init_last=False. Its default, branches starting at zero, keeps the tiny run sane.
    "--zero_init_last",
    "True",
]
DEMO_TINY = [
    "--epoch_size",
    "1",
    "--num_samples",
    "32",
    "--batch_size",
    "16",
    "--warmup_epochs",
    "0",
    "--decay_epochs",
    "1",
    "--num_parallel_workers",
    "0",
]


@dataclass
class Block:
    line: int  # 1-based line of README.md where the block starts
    kind: str  # "shell" or "python"
    code: str
    skip: str | None = None
    slow: str | None = None  # a Python block that takes minutes: run under -m slow only

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.kind}"


def readme_blocks(text: str) -> list[Block]:
    """The shell and Python blocks of a Markdown text, with their skip markers."""
    blocks: list[Block] = []
    lines = text.splitlines()
    skip: str | None = None
    slow: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        mark = SKIP_MARK.search(line)
        slow_mark = SLOW_MARK.search(line)
        if mark:
            skip = mark.group(1)
        elif slow_mark:
            slow = slow_mark.group(1)
        elif line.startswith("```"):
            lang = line[3:].strip()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if lang in ("shell", "bash", "sh", "python"):
                kind = "python" if lang == "python" else "shell"
                blocks.append(Block(i + 1, kind, "\n".join(lines[i + 1 : end]) + "\n", skip, slow))
            skip = slow = None
            i = end
        elif line.startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            body = [ln[4:] for ln in lines[i:end]]
            blocks.append(Block(i + 1, "shell", "\n".join(body).strip() + "\n", skip))
            skip = None
            i = end - 1
        elif line.strip() and not line.startswith("<!--"):
            skip = slow = None
        i += 1
    return blocks


def command_lines(code: str) -> list[list[str]]:
    """A shell block's commands as argv lists (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n", " ", code)
    return [argv for argv in (shlex.split(ln, comments=True) for ln in joined.splitlines()) if argv]


def heavy(argv: list[str]) -> bool:
    """A minute or more on 2 CPU cores: run under -m slow only."""
    if argv[:2] == ["res2net", "demo"] or (
        argv[:2] == ["res2net", "benchmark"] and ("--compile" in argv or "int8" in argv)
    ):
        return True
    return argv[:2] == ["res2net", "export"] and any(
        a in ("onnx", "openvino") or a.endswith((".onnx", ".xml")) for a in argv
    )


def tiny(argv: list[str], n: int) -> list[list[str]]:
    """The commands that run for one README command line: its own, made small."""
    argv = [
        next((a.replace(k, v, 1) for k, v in PATHS.items() if a.startswith(k)), a) for a in argv
    ]
    if argv[0] == "make":
        steps = [["make", "-n", "-C", str(REPO), *argv[1:]]]
        if argv[1:] == ["demo"]:  # and the demo itself, tiny
            steps.append(["res2net", "demo", *DEMO_TINY])
        return steps
    script = argv[1] if len(argv) > 1 else ""
    if script in ("train.py", "train"):
        demo = any("configs/demo/" in a for a in argv)  # the digits: 10 classes, as the recipe says
        # 16 of the 1,437 training digits (at batch 2 all of them took 718 steps of Res2Net-50)
        small = [*TRAIN_TINY[2:], "--num_samples", "16"] if demo else TRAIN_TINY
        return [argv + small + ["--ckpt_save_dir", f"runs/readme-{n}"]]
    if script in ("validate.py", "validate"):
        return [argv + ["--num_parallel_workers", "0"]]
    if argv[:2] == ["res2net", "benchmark"]:
        i = argv.index("--batch_size")
        return [
            argv[: i + 1]
            + ["2"]
            + argv[i + 2 :]
            + ["--image_resize", "32", "--warmup", "1", "--repeats", "1"]
        ]
    if argv[:2] == ["res2net", "export"]:
        return [argv + ["--image_resize", "64"]]
    if argv[:3] == ["res2net", "saliency", "train"]:
        return [
            argv + ["--epochs", "1", "--image_size", "64", "--batch_size", "2", "--workers", "0"]
        ]
    if argv[:3] == ["res2net", "data", "check"]:
        return [argv + ["--workers", "1"]]
    if argv[:2] == ["res2net", "serve"]:
        args = shlex.join(
            [a if a != "8000" else str(SERVE_PORT) for a in argv[1:]] + ["--max_batch", "1"]
        )
        return [["sh", "-c", SERVE_START.format(args=args)]]
    if argv[0] == "curl":
        calls = [[a.replace(":8000/", f":{SERVE_PORT}/") for a in argv]]
        if any(a.endswith("/metrics") for a in argv):  # the block's last line: stop the server
            calls.append(["sh", "-c", "kill $(cat serve.pid)"])
        return calls
    return [argv]


def _image(path: Path, seed: int, size: tuple[int, int] = (40, 36), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)


def _workspace(root: Path) -> Path:
    """What the README says to download, under its names: the ImageNet stand-in (3 classes),
    DUTS-style image/mask folders and MindCV's Res2Net-50 checkpoint (random weights). Every
    other file a block uses is the demo's output (`_demo_output`) or made by an earlier block."""
    from res2net import create_model
    from res2net.weights.mindspore import ours_to_mindcv, write_mindspore_checkpoint

    for name in ("configs", "src"):  # copies: nothing a command writes can reach the repository
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("train.py", "validate.py", "hubconf.py"):
        shutil.copy(REPO / name, root / name)
    for c in range(3):
        for i in range(4):
            _image(root / "imagenet" / "train" / f"class{c}" / f"{i}.png", seed=10 * c + i)
        for i in range(3):
            _image(root / "imagenet" / "val" / f"class{c}" / f"{i}.png", seed=100 + 10 * c + i)
    for folder, n in (("DUTS-TR", 4), ("ECSSD", 2)):
        for i in range(n):
            _image(root / folder / "images" / f"{i}.jpg", seed=300 + i, size=(48, 40))
            _image(root / folder / "masks" / f"{i}.png", seed=400 + i, size=(48, 40), mode="L")
    torch.manual_seed(0)
    small = create_model("res2net50", num_classes=3)  # for the 3-class images
    path = root / "res2net50-aa758355-910v2.ckpt"
    write_mindspore_checkpoint(path, ours_to_mindcv(small.state_dict(), small))
    return root


def _run(root: Path, steps: list[dict]) -> dict[str, dict]:
    plan, result = root / "plan.json", root / "result.json"
    plan.write_text(json.dumps({"workdir": str(root), "steps": steps}))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "2",
        "PYTHONPATH": os.pathsep.join(
            [str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]
        ),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tests.readme_runner", str(plan), str(result)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    done = json.loads(result.read_text()) if result.is_file() else []
    if len(done) != len(steps):
        raise AssertionError(
            f"the runner stopped after {len(done)} of {len(steps)} steps:\n{proc.stderr[-3000:]}"
        )
    return {r["id"]: r for r in done}


README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCKS = readme_blocks(README)


def _steps(include_heavy: bool) -> list[dict]:
    steps, n = [], 0
    for block in BLOCKS:
        if block.skip:
            continue
        if block.kind == "python":
            if bool(block.slow) == include_heavy:
                steps.append({"id": f"{block.id}#0", "kind": "python", "code": block.code})
            continue
        for argv in command_lines(block.code):
            for cmd in tiny(argv, n):
                if heavy(cmd) == include_heavy:
                    steps.append(
                        {"id": f"{block.id}#{n}", "kind": "shell", "code": shlex.join(cmd)}
                    )
                n += 1
    return steps


def _demo_output(root: Path) -> None:
    """What `make demo` leaves (the digits, runs/digits/best.safetensors) for the blocks after
    it, made by the demo's own functions from an untrained model; the demo itself runs under
    -m slow (test_readme_heavy_commands)."""
    from res2net import create_model
    from res2net.cli.demo import DEMO_RECIPE, keep_best_weights
    from res2net.config import load_config
    from res2net.data import write_digits_folder

    cfg = load_config(DEMO_RECIPE)
    write_digits_folder(root / cfg.data_dir, upscale=cfg.image_resize)
    _keep_few(root / cfg.data_dir, per_class={"train": 8, "val": 4})
    run = root / cfg.ckpt_save_dir
    run.mkdir(parents=True)
    model = create_model(cfg.model, num_classes=10)
    torch.save(
        {
            "format": "res2net-train",
            "arch": cfg.model,
            "num_classes": 10,
            "classes": [str(i) for i in range(10)],
            "model": model.state_dict(),
            "ema": None,
            "config": cfg.to_dict(),
        },
        run / "best.pt",
    )
    keep_best_weights(run, run / "best.pt", prefix=cfg.model)


def _keep_few(data_dir: Path, per_class: dict[str, int]) -> None:
    """Keep the first few images of each class folder of the digits, and every one the README
    names: the blocks that read the whole folder (cam, predict, validate with TTA, training)
    run the same code on 80 + 40 images instead of 1,437 + 360."""
    for split, keep in per_class.items():
        for folder in sorted((data_dir / split).iterdir()):
            for i, image in enumerate(sorted(folder.iterdir())):
                named = f"{data_dir.name}/{split}/{folder.name}/{image.name}" in README
                if i >= keep and not named:
                    image.unlink()


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> Iterator[tuple[Path, dict[str, dict]]]:
    root = tmp_path_factory.mktemp("readme")
    try:
        _workspace(root)
        _demo_output(root)
        yield root, _run(root, _steps(include_heavy=False))
    finally:  # the checkpoints the commands wrote; each step's output is in its result
        shutil.rmtree(root, ignore_errors=True)


def _check(step: dict) -> None:
    out = step["output"]
    assert step["rc"] == 0, f"{step['id']} exited {step['rc']}:\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    noise = [
        ln
        for ln in out.splitlines()
        if re.search(r"\w+Warning:|worker processes in total|Grad strides", ln)
    ]
    assert not noise, f"{step['id']} printed warnings the reader did not cause: {noise}"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs(block: Block, readme_run: tuple[Path, dict[str, dict]]) -> None:
    if block.skip:
        pytest.skip(f"README line {block.line}: {block.skip}")
    mine = [r for k, r in readme_run[1].items() if k.split("#")[0] == block.id]
    heavy_only = block.slow or all(heavy(a) for a in command_lines(block.code))
    assert mine or heavy_only, f"nothing ran for {block.id}"
    for step in mine:
        _check(step)


def test_readme_blocks_are_found() -> None:
    kinds = {b.kind for b in BLOCKS}
    assert kinds == {"shell", "python"} and len(BLOCKS) >= 15
    skipped = [b.skip for b in BLOCKS if b.skip]
    assert skipped and all(any(w in s for w in ("GPU", "cluster", "internet")) for s in skipped)


@pytest.mark.slow
def test_readme_heavy_commands(tmp_path: Path) -> None:
    """The demo (tiny), ONNX export of Res2Net-50, benchmark --compile and the Python blocks
    marked slow (int8); the demo keeps only the best weights, validated with the transform they
    carry."""
    steps = _steps(include_heavy=True)
    shell = [s for s in steps if s["kind"] == "shell"]
    assert {s["code"].split()[1] for s in shell} == {"demo", "export", "benchmark"}
    root = tmp_path / "readme"
    root.mkdir()
    try:
        results = _run(_workspace(root), steps)  # the demo's output serves the slow Python blocks
        for step in results.values():
            _check(step)
        demo = next(r for r in results.values() if "best weights:" in r["output"])
        path = root / re.search(r"best weights: (\S+)", demo["output"]).group(1)
        files = sorted(p.name for p in path.parent.iterdir())
        assert files == ["best.safetensors", "metrics.jsonl", "training.png"], files
        assert (
            "(checkpoint best.safetensors)" in demo["output"]
        )  # validated with the weights' transform
    finally:  # a failed run's outputs are in the message, not worth its checkpoints on disk
        shutil.rmtree(root, ignore_errors=True)
