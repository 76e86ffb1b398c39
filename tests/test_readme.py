"""The README is executable: every shell and Python block runs as printed.

Blocks come from README.md in order: fenced ```shell / ```python blocks and indented (4-space)
command blocks. A block preceded by `<!-- readme-test skip: REASON -->` (a GPU, a cluster, the
internet) is skipped with that reason; a Python block preceded by `<!-- readme-test slow: REASON
-->` runs under `-m slow` only. Every command line runs exactly as printed, from a workspace laid
out as a clone after `make demo` (tests/readme_runner.py runs them all in one Python process).
The only substitutions, each covered by the README's note under Quick start:

- the placeholders of what a user downloads: `/path/to/imagenet`, `/data/imagenet` and
  `/data/imagenet-wds` name the workspace's ImageNet stand-in (3 classes, a few 40x36 images);
  MindCV's `.ckpt` and the DUTS-TR / ECSSD folders are stand-ins under the same names (random
  weights, a few image/mask pairs);
- port 8000 is a free port (a fixed one collides with other runs), and `res2net serve` runs in
  the background, stopped after the block's last `curl`, as a user runs it in a second terminal;
- `make X` runs as `make -n X` (`make test` would run this test again; building a venv is not a
  test's job); the demo itself, `res2net demo` as the Makefile runs it, runs under `-m slow`.

Training with an ImageNet recipe (`configs/res2net/`: 200 epochs of batch 32 at 224 px) cannot
be made quick as printed by any stand-in: it runs with the placeholder path kept, and the test
checks what a user without ImageNet sees at once: exit code 2 and one error line naming the
missing folder, no traceback (the training itself is tested tiny: MindCV's res2net_50_gpu recipe
and shards in tests/test_train.py, every recipe shape in tests/test_recipes.py). A command
that costs more than about 5 s of CPU as printed (`heavy`: the demo, digits training, benchmarks
of Res2Net-50 at 224 px, ONNX and OpenVINO export, saliency training for its 30 epochs) runs as
printed under `-m slow` only; the blocks after it read its output, made here by the project's
own functions (`_demo_output`: the demo's digits, fewer images per class, and best weights of an
untrained model; `_saliency_output`: `sal.pth`). The workspace (gigabytes of Res2Net-50
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
# README placeholder -> the workspace's stand-in (longest first: /data/imagenet-wds before
# /data/imagenet)
PLACEHOLDERS = {
    "/path/to/imagenet": "imagenet",
    "/data/imagenet-wds": "imagenet-wds",
    "/data/imagenet": "imagenet",
}
IMAGENET_RECIPES = "configs/res2net/"


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
    """A shell block's commands as argv lists: continuations joined, comments dropped, `a; b`
    two commands, as the shell runs them. Pipes, redirections, `&&` and `&` are refused: each
    command runs by itself (tests/readme_runner.py)."""
    commands: list[list[str]] = []
    for line in re.sub(r"\\\n", " ", code).splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split = True
        argv: list[str] = []
        for token in lexer:
            if token == ";":
                commands.append(argv)
                argv = []
            elif set(token) <= set(";&|<>"):
                raise ValueError(f"README line `{line}`: {token!r} cannot run as printed here")
            else:
                argv.append(token)
        commands.append(argv)
    return [argv for argv in commands if argv]


def _placeholder(arg: str) -> str | None:
    """The README placeholder `arg` starts with, if any."""
    return next((k for k in PLACEHOLDERS if arg.startswith(k)), None)


def trains(argv: list[str]) -> bool:
    """`python train.py ...` or `res2net train ...`."""
    script = argv[1] if len(argv) > 1 else ""
    return argv[0] in ("python", "res2net") and script in ("train.py", "train")


def missing_dataset(argv: list[str]) -> str | None:
    """The placeholder a training with an ImageNet recipe names: no stand-in makes 200 epochs of
    224 px quick, so the line runs with it kept and must fail at once naming it."""
    if not (trains(argv) and any(a.startswith(IMAGENET_RECIPES) for a in argv)):
        return None
    return next((k for k in map(_placeholder, argv) if k), None)


def heavy(argv: list[str]) -> bool:
    """More than about 5 s of CPU as printed: run under -m slow only. Measured with one thread:
    `benchmark --batch_size 32 --mode train` 95 s, `saliency train` 186 s (4 image pairs),
    ONNX and OpenVINO export of the digits model 15 s each; training the digits takes as long
    as the demo's (140 s). The costliest line left in the fast run, pt2 export, takes 5.3 s."""
    if argv[:2] in (["res2net", "demo"], ["res2net", "benchmark"]):  # Res2Net-50 at 224 px
        return True
    if trains(argv):  # the digits: 6 epochs; an ImageNet recipe without ImageNet answers at once
        return missing_dataset(argv) is None
    if argv[:3] == ["res2net", "saliency", "train"]:  # 30 epochs at 352 px
        return True
    return argv[:2] == ["res2net", "export"] and any(
        a in ("onnx", "openvino") or a.endswith((".onnx", ".xml")) for a in argv
    )


def as_run(argv: list[str]) -> list[list[str]]:
    """The commands that run for one README command line: the line as printed, with only the
    substitutions of the module's docstring."""
    if argv[0] == "make":
        steps = [["make", "-n", "-C", str(REPO), *argv[1:]]]
        if argv[1:] == ["demo"]:  # what the target runs, once its venv is there
            steps.append(["res2net", "demo"])
        return steps
    if not missing_dataset(argv):
        argv = [a.replace(k, PLACEHOLDERS[k], 1) if (k := _placeholder(a)) else a for a in argv]
    if argv[:2] == ["res2net", "serve"]:
        args = shlex.join(str(SERVE_PORT) if a == "8000" else a for a in argv[1:])
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
            for cmd in as_run(argv):
                missing = missing_dataset(cmd)
                if heavy(cmd) == include_heavy and not _present(missing):
                    step = {"id": f"{block.id}#{n}", "kind": "shell", "code": shlex.join(cmd)}
                    steps.append({**step, "missing": missing} if missing else step)
                n += 1
    return steps


def _present(placeholder: str | None) -> bool:
    """A placeholder that names a real dataset on this machine: the line would train for days."""
    return placeholder is not None and Path(placeholder).exists()


def _saliency_output(root: Path) -> None:
    """What the README's `saliency train` line leaves (its --out, for its backbone, weights and
    --image_size), written by `save_saliency_model` from an untrained decoder; the line itself
    runs under -m slow."""
    from res2net.cli.main import build_parser
    from res2net.saliency import saliency_res2net, save_saliency_model

    for block in BLOCKS:
        for argv in command_lines(block.code) if block.kind == "shell" and not block.skip else []:
            if argv[:3] == ["res2net", "saliency", "train"]:
                args = build_parser().parse_args(argv[1:])
                model = saliency_res2net(
                    args.model,
                    decoder_channels=args.decoder_channels,
                    checkpoint_path=root / args.ckpt_path,
                )
                save_saliency_model(root / args.out, model, args.model, args.image_size)


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
    names: the blocks that read the whole folder (predict, cam, validate with TTA, saliency)
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
        _saliency_output(root)
        yield root, _run(root, _steps(include_heavy=False))
    finally:  # the checkpoints the commands wrote; each step's output is in its result
        shutil.rmtree(root, ignore_errors=True)


def _check(step: dict) -> None:
    out = step["output"]
    if step.get("missing"):
        _check_missing_dataset(step)
        return
    assert step["rc"] == 0, f"{step['id']} exited {step['rc']}:\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    noise = [
        ln
        for ln in out.splitlines()
        if re.search(r"\w+Warning:|worker processes in total|Grad strides", ln)
    ]
    assert not noise, f"{step['id']} printed warnings the reader did not cause: {noise}"


def _check_missing_dataset(step: dict) -> None:
    """What a user without ImageNet sees: exit code 2 and one error line naming the folder (the
    expected layout below it), no traceback, no missing module."""
    out, path = step["output"], step["missing"]
    assert step["rc"] == 2, f"{step['id']} exited {step['rc']}, not 2:\n{out[-3000:]}"
    errors = [ln for ln in step["stderr"].splitlines() if ": error: " in ln]
    assert len(errors) == 1 and f"'{path}'" in errors[0], out[-3000:]
    assert "Traceback" not in out and "ModuleNotFoundError" not in out, out[-3000:]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs(block: Block, readme_run: tuple[Path, dict[str, dict]]) -> None:
    if block.skip:
        pytest.skip(f"README line {block.line}: {block.skip}")
    mine = [r for k, r in readme_run[1].items() if k.split("#")[0] == block.id]
    heavy_only = block.slow or all(heavy(a) for a in command_lines(block.code))
    present = [k for a in command_lines(block.code) if _present(k := missing_dataset(a))]
    if not mine and present:
        pytest.skip(f"README line {block.line}: {present[0]} exists here, training would take days")
    assert mine or heavy_only, f"nothing ran for {block.id}"
    for step in mine:
        _check(step)


def test_readme_blocks_are_found() -> None:
    kinds = {b.kind for b in BLOCKS}
    assert kinds == {"shell", "python"} and len(BLOCKS) >= 15
    skipped = [b.skip for b in BLOCKS if b.skip]
    assert skipped and all(any(w in s for w in ("GPU", "cluster", "internet")) for s in skipped)


def test_command_lines_split_as_the_shell_does() -> None:
    code = "a --x 'p; q' ; b -y  # comment\nc \\\n  --z 1\n"
    assert command_lines(code) == [["a", "--x", "p; q"], ["b", "-y"], ["c", "--z", "1"]]
    for line in ("a | b", "a && b", "a > out", "a &"):
        with pytest.raises(ValueError, match="cannot run as printed"):
            command_lines(line)


def test_imagenet_training_keeps_its_placeholder() -> None:
    train = shlex.split(
        "python train.py -c configs/res2net/res2net_50_gpu.yaml --data_dir /data/imagenet-wds"
    )
    assert missing_dataset(train) == "/data/imagenet-wds" and not heavy(train)
    assert as_run(train) == [train]
    validate = shlex.split(
        "python validate.py -c configs/res2net/res2net_50_ascend.yaml --data_dir /path/to/imagenet/"
    )
    assert missing_dataset(validate) is None and not heavy(validate)
    assert as_run(validate) == [[*validate[:-1], "imagenet/"]]
    digits = shlex.split("res2net train -c configs/demo/res2net_digits.yaml --log mlflow")
    assert missing_dataset(digits) is None and heavy(digits) and as_run(digits) == [digits]


def _substituted(printed: str, run: str) -> bool:
    """`run` is `printed`, or `printed` with one substitution of the module's docstring."""
    port = str(SERVE_PORT)
    key = _placeholder(printed)
    return (
        run in (printed, printed.replace(":8000/", f":{port}/"))
        or (printed, run) == ("8000", port)
        or (key is not None and run == PLACEHOLDERS[key] + printed[len(key) :])
    )


def test_readme_commands_run_as_printed() -> None:
    """Each command line of the README runs as printed, up to the docstring's substitutions."""
    for block in BLOCKS:
        for argv in command_lines(block.code) if block.kind == "shell" and not block.skip else []:
            run = as_run(argv)
            if argv[0] == "make":
                assert run[0] == ["make", "-n", "-C", str(REPO), *argv[1:]], argv
                continue
            if argv[:2] == ["res2net", "serve"]:  # in the background, until the last curl
                args = shlex.split(run[0][2].split(" > serve.log")[0])[3:]
                run = [["res2net", *args]]
            assert len(run[0]) == len(argv), (argv, run[0])
            assert all(map(_substituted, argv, run[0])), (argv, run[0])


def test_heavy_lines_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lines that run under -m slow only still meet the real parser (and training's recipe
    and overrides) in every run: a wrong flag there fails here."""
    from res2net.cli.main import COMMANDS, build_parser
    from res2net.cli.train import config_from_argv

    monkeypatch.chdir(REPO)
    lines = [a for b in BLOCKS if b.kind == "shell" and not b.skip for a in command_lines(b.code)]
    heavy_lines = [cmd for argv in lines for cmd in as_run(argv) if heavy(cmd)]
    assert len(heavy_lines) >= 10
    for argv in heavy_lines:
        args, extra = build_parser().parse_known_args(argv[1:])
        if getattr(COMMANDS[args.command], "ACCEPTS_EXTRA", False):
            config_from_argv(args.config, extra)
        else:
            assert not extra, argv


@pytest.mark.slow
def test_readme_heavy_commands(tmp_path: Path) -> None:
    """The heavy command lines as printed (the demo, digits training, benchmarks, ONNX and
    OpenVINO export, saliency training) and the Python blocks marked slow (int8), after the demo
    as in a clone; the demo keeps only the best weights, validated with the transform they
    carry."""
    steps = _steps(include_heavy=True)
    shell = [s for s in steps if s["kind"] == "shell"]
    assert shell[0]["code"] == "res2net demo"
    assert {s["code"].split()[1] for s in shell} == {
        "demo",
        "train",
        "export",
        "benchmark",
        "saliency",
    }
    root = tmp_path / "readme"
    root.mkdir()
    try:
        results = _run(_workspace(root), steps)  # the demo's output serves the slow Python blocks
        for step in results.values():
            _check(step)
        demo = next(r for r in results.values() if "best weights:" in r["output"])
        path = root / re.search(r"best weights: (\S+)", demo["output"]).group(1)
        # and the run's lock file, `.res2net.lock` (README, "One run per folder")
        files = sorted(p.name for p in path.parent.iterdir() if not p.name.startswith("."))
        assert files == ["best.safetensors", "metrics.jsonl", "training.png"], files
        assert (
            "(checkpoint best.safetensors)" in demo["output"]
        )  # validated with the weights' transform
    finally:  # a failed run's outputs are in the message, not worth its checkpoints on disk
        shutil.rmtree(root, ignore_errors=True)
