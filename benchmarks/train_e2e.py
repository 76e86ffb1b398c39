"""End-to-end training throughput: the real `res2net train` command against timm's own
`train.py`, on a folder of ImageNet-sized JPEGs, same model, batch, augmentations and workers.

timm's `train.py` is not part of the timm package; pass the path of a copy of it from timm's
repository (huggingface/pytorch-image-models) with `--timm_train`.

The corpus is the one of benchmarks/data_pipeline.py (crops of scikit-image's and
scikit-learn's sample photos re-encoded as JPEG at typical ImageNet sizes, one class per
photo). Each trainer runs one epoch of Res2Net-50 (26w_4s) at 224x224 from scratch: random
resized crop (0.08-1, 3/4-4/3, bilinear), horizontal flip 0.5, color jitter 0.4, no random
erasing or mixup, label smoothing 0.1, SGD with momentum, cosine schedule without warm-up,
fp32, then validates on one image per class and saves a checkpoint, as both do at an epoch's
end. Images/s over the steady state is measured from the outside, independent of either
trainer's own logging: each trainer runs on a small and a large training folder, and

    img/s = (large steps - small steps) * batch / (large run's seconds - small run's seconds)

so start-up (imports, model creation, worker start, validation, checkpoint) cancels out. Runs
take turns (timm small, ours small, timm large, ours large, per round) so that load from other
processes hits both alike.

timm's script (the repository's version indexed here, which has no --device option) assumes
CUDA: timm's `init_distributed_device` picks `cuda` when `args.device` is unset, and
`validate` calls `torch.cuda.synchronize()` through its `device=torch.device('cuda')`
default. When no GPU is present, a short launcher sets `args.device = "cpu"` and makes
`torch.cuda.synchronize` a no-op; the script itself runs unchanged.

    python benchmarks/train_e2e.py --timm_train /path/to/timm/train.py \\
        --out benchmarks/results/train-e2e-cpu2.json
    # one GPU (ours picks CUDA by itself, timm's script too): larger batch, more workers, bf16
    python benchmarks/train_e2e.py --timm_train train.py --batch_size 128 --workers 15 --bf16 \\
        --small 64 --large 64 --large_copies 80 --out benchmarks/results/train-e2e-gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from data_pipeline import build_corpus

from res2net.profile import machine_info

LAUNCH_TIMM = """
import runpy, sys, torch, timm.utils
init_device = timm.utils.init_distributed_device
def init_on_cpu(args):
    args.device = "cpu"
    return init_device(args)
if not torch.cuda.is_available():
    torch.cuda.synchronize = lambda *a, **k: None
    timm.utils.init_distributed_device = init_on_cpu
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
REPO = Path(__file__).resolve().parent.parent


def build_folder(root: Path, per_photo: int, copies: int = 1) -> int:
    """`root/train/<photo>/*.jpg` with `per_photo` crops each, each file there `copies` times
    (hard links: a GPU-sized epoch without encoding tens of thousands of JPEGs), `root/val`
    with one each."""
    build_corpus(root / "val-src", per_photo=1, seed=1)
    (root / "val-src" / "train").rename(root / "val")
    (root / "val-src").rmdir()
    count = build_corpus(root, per_photo=per_photo, seed=0)
    for image in list((root / "train").glob("*/*.jpg")):
        for k in range(1, copies):
            os.link(image, image.with_name(f"{image.stem}-{k}.jpg"))
    return count * copies


def timm_command(
    args: argparse.Namespace,
    data: Path,
    out: Path,
    num_classes: int,
    channels_last: bool = False,
    compile: bool = False,
) -> list[str]:
    flags = ["--amp", "--amp-dtype", "bfloat16"] if args.bf16 else []
    if args.bf16 or channels_last:
        flags.append("--channels-last")
    if compile:
        flags.append("--torchcompile")
    return [
        sys.executable,
        "-c",
        LAUNCH_TIMM,
        str(args.timm_train),
        str(data),
        "--model",
        "res2net50_26w_4s",
        "--num-classes",
        str(num_classes),
        "-b",
        str(args.batch_size),
        "--epochs",
        "1",
        "--sched",
        "cosine",
        "--warmup-epochs",
        "0",
        "--opt",
        "sgd",
        "--lr",
        "0.1",
        "--momentum",
        "0.9",
        "--weight-decay",
        "1e-4",
        "--smoothing",
        "0.1",
        "--scale",
        "0.08",
        "1.0",
        "--ratio",
        "0.75",
        "1.333",
        "--hflip",
        "0.5",
        "--color-jitter",
        "0.4",
        "--reprob",
        "0",
        "--train-interpolation",
        "bilinear",
        "--workers",
        str(args.workers),
        "--val-split",
        "val",
        "--output",
        str(out),
        "--experiment",
        "run",
        "--log-interval",
        "1000",
        "--checkpoint-hist",
        "1",
        "--seed",
        "0",
    ] + flags


def ours_command(args: argparse.Namespace, data: Path, out: Path, num_classes: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "res2net.cli.main",
        "train",
        "-c",
        str(REPO / "configs/res2net/res2net_50_ascend.yaml"),
        "--data_dir",
        str(data),
        "--num_classes",
        str(num_classes),
        "--batch_size",
        str(args.batch_size),
        "--epoch_size",
        "1",
        "--scheduler",
        "cosine_decay",
        "--warmup_epochs",
        "0",
        "--lr",
        "0.1",
        "--opt",
        "momentum",
        "--momentum",
        "0.9",
        "--weight_decay",
        "1e-4",
        "--label_smoothing",
        "0.1",
        "--scale",
        "[0.08, 1.0]",
        "--ratio",
        "[0.75, 1.333]",
        "--hflip",
        "0.5",
        "--color_jitter",
        "0.4",
        "--re_prob",
        "0",
        "--interpolation",
        "bilinear",
        "--num_parallel_workers",
        str(args.workers),
        "--val_while_train",
        "True",
        "--ckpt_save_dir",
        str(out),
        "--log_interval",
        "1000",
        "--keep_checkpoint_max",
        "1",
        "--seed",
        "0",
    ] + (["--amp_level", "O2", "--val_amp_level", "O2"] if args.bf16 else [])


def run_once(command: list[str], log: Path) -> float:
    """Seconds the command takes; its output goes to `log`, and a failure ends the benchmark."""
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        sys.exit(f"{tail}\n{' '.join(command[3:5])}... failed with exit code {done.returncode}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--timm_train", type=Path, required=True, help="timm's train.py (from its repository)"
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--small", type=int, default=4, help="images per class in the small training folder"
    )
    parser.add_argument(
        "--large", type=int, default=16, help="images per class in the large training folder"
    )
    parser.add_argument(
        "--large_copies",
        type=int,
        default=1,
        help="each image of the large folder this many times (hard links), for GPU-sized epochs",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 autocast in both (timm: --amp --amp-dtype bfloat16 --channels-last), as on GPUs",
    )
    parser.add_argument(
        "--timm_channels_last",
        action="store_true",
        help="also run timm's script with --channels-last (ours uses channels_last on CPU)",
    )
    parser.add_argument(
        "--timm_compile",
        action="store_true",
        help="also run timm's script with --torchcompile (ours compiles on CUDA: the recipe's "
        "mode 0)",
    )
    parser.add_argument(
        "--keep_logs", type=Path, help="copy each run's output here (ours shows its data wait)"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not args.timm_train.is_file():
        sys.exit(
            f"--timm_train {args.timm_train}: no such file (a copy of timm's repository train.py)"
        )

    with tempfile.TemporaryDirectory(prefix="train-e2e-") as tmp_name:
        tmp = Path(tmp_name)
        images = {
            "small": build_folder(tmp / "data-small", args.small),
            "large": build_folder(tmp / "data-large", args.large, args.large_copies),
        }
        num_classes = len(list((tmp / "data-small" / "train").iterdir()))
        steps = {
            size: n // args.batch_size for size, n in images.items()
        }  # both drop the last partial batch
        commands = {"timm train.py": timm_command, "res2net train": ours_command}
        if args.timm_channels_last:
            commands["timm train.py --channels-last"] = partial(timm_command, channels_last=True)
        if args.timm_compile:
            commands["timm train.py --torchcompile"] = partial(timm_command, compile=True)
        seconds: dict[str, dict[str, list[float]]] = {
            name: {"small": [], "large": []} for name in commands
        }
        load = [os.getloadavg()]
        for r in range(args.rounds):
            for size in ("small", "large"):
                for i, (name, make) in enumerate(commands.items()):
                    out = tmp / f"out-{r}-{size}-{i}"
                    shutil.rmtree(out, ignore_errors=True)
                    log = tmp / f"{out.name}.log"
                    seconds[name][size].append(
                        run_once(make(args, tmp / f"data-{size}", out, num_classes), log)
                    )
                    if args.keep_logs:
                        args.keep_logs.mkdir(parents=True, exist_ok=True)
                        shutil.copy(log, args.keep_logs / f"{out.name}.log")
                    print(f"round {r}: {name} {size}: {seconds[name][size][-1]:.1f} s", flush=True)
            load.append(os.getloadavg())

    result: dict = {
        "machine": machine_info(),
        "load": load,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "train_images": images,
        "steps": steps,
        "seconds": seconds,
        "img_s": {},
    }
    extra_images = (steps["large"] - steps["small"]) * args.batch_size
    for name, runs in seconds.items():
        per_round = [
            extra_images / (large - small) for small, large in zip(runs["small"], runs["large"])
        ]
        best = extra_images / (min(runs["large"]) - min(runs["small"]))
        result["img_s"][name] = {"per_round": per_round, "best_runs": best}
    ours = result["img_s"]["res2net train"]
    result["ratio"] = {
        f"res2net train / {name}": {
            "best_runs": ours["best_runs"] / peer["best_runs"],
            "per_round": [o / t for o, t in zip(ours["per_round"], peer["per_round"])],
        }
        for name, peer in result["img_s"].items()
        if name.startswith("timm")
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["img_s"], indent=1), json.dumps(result["ratio"]))


if __name__ == "__main__":
    main()
