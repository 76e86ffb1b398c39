"""End-to-end training throughput: the real `res2net train` command against timm's own
`train.py`, on a folder of ImageNet-sized JPEGs, same model, batch, augmentations and workers.

timm's `train.py` is not part of the timm package; pass the path of a copy of it from timm's
repository (huggingface/pytorch-image-models) with `--timm_train`.

The corpus is the one of benchmarks/data_pipeline.py (crops of scikit-image's and
scikit-learn's sample photos re-encoded as JPEG at typical ImageNet sizes, one class per
photo). Each trainer runs one epoch of Res2Net-50 (26w_4s) at 224x224 from scratch: random
resized crop (0.08-1, 3/4-4/3, bilinear), horizontal flip 0.5, color jitter 0.4, no random
erasing, mixup or cutmix, label smoothing 0.1, SGD with momentum (not Nesterov's) and weight
decay on weights only (not biases or norm parameters), cosine schedule without warm-up, then validates on one image per class and saves a checkpoint, as both do at an
epoch's end. Images/s over the steady state is measured from the outside, independent of
either trainer's own logging: each trainer runs on a small and a large training folder, and

    img/s = (large steps - small steps) * batch / (large run's seconds - small run's seconds)

so start-up (imports, model creation, worker start, validation, checkpoint) cancels out. Runs
take turns (every row on the small folder, then every row on the large one, per round) so that
load from other processes hits all alike.

Precision is set explicitly in both trainers, one row per precision: fp32 (ours
`--amp_level O0`, whatever the recipe says; timm without `--amp`) and bf16 autocast (ours
`--amp_level O2`; timm `--amp --amp-dtype bfloat16`). timm runs with and without
`--channels-last` (ours computes in channels_last on CPU by default). Before anything runs,
both command lines are read back the way each trainer reads them (ours through the package's
config loader, recipe file included) and the benchmark refuses to start when any setting in
COMPARED differs. The JSON records every flag, each trainer's effective settings and command,
and the load average before and after every run; a run whose load exceeded QUIET_LOAD per
core is marked `"quiet": false`, and its figures are not results.

timm's script (the repository's version indexed here, which has no --device option) assumes
CUDA: timm's `init_distributed_device` picks `cuda` when `args.device` is unset, and
`validate` calls `torch.cuda.synchronize()` through its `device=torch.device('cuda')`
default. When no GPU is present, a short launcher sets `args.device = "cpu"` and makes
`torch.cuda.synchronize` a no-op; the script itself runs unchanged.

    python benchmarks/train_e2e.py --timm_train /path/to/timm/train.py --large 32 --rounds 3 \\
        --out benchmarks/results/train-e2e-cpu2.json
    # one GPU (ours picks CUDA by itself, timm's script too): larger batch, more workers, bf16
    python benchmarks/train_e2e.py --timm_train train.py --batch_size 128 --workers 15 \\
        --precision bf16 --small 64 --large 64 --large_copies 80 --timm_compile \\
        --out benchmarks/results/train-e2e-gpu.json
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
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

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
# The 1-minute load average, per core, up to which a run counts as quiet: the trainers' own
# DataLoader workers and main processes bring it to about 0.85 per core on 2 cores.
QUIET_LOAD = 0.85


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


PRECISIONS = ("fp32", "bf16")
# The settings both trainers must share for a row to compare like with like.
COMPARED = (
    "precision",
    "val_precision",
    "batch_size",
    "workers",
    "epochs",
    "lr",
    "momentum",
    "weight_decay",
    "opt",
    "nesterov",
    "weight_decay_filter",
    "label_smoothing",
    "scale",
    "ratio",
    "hflip",
    "color_jitter",
    "re_prob",
    "mixup",
    "cutmix",
    "interpolation",
)


def timm_command(
    args: argparse.Namespace,
    data: Path,
    out: Path,
    num_classes: int,
    precision: str,
    channels_last: bool = False,
    compile: bool = False,
) -> list[str]:
    flags = ["--amp", "--amp-dtype", "bfloat16"] if precision == "bf16" else []
    if channels_last:
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
        "momentum",  # timm's "sgd" is Nesterov's
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
        "--mixup",
        "0",
        "--cutmix",
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


def ours_command(
    args: argparse.Namespace, data: Path, out: Path, num_classes: int, precision: str
) -> list[str]:
    # The recipe says amp_level O3 (bf16): the level is always given, so fp32 means fp32.
    level = "O2" if precision == "bf16" else "O0"
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
        "--weight_decay_filter",
        "norm_and_bias",  # as timm's filter_bias_and_bn
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
        "--mixup",
        "0",
        "--cutmix",
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
        "--amp_level",
        level,
        "--val_amp_level",
        level,
    ]


def ours_settings(command: list[str], device_type: str) -> dict:
    """What `res2net train` will really do with `command`: its recipe file merged with the
    command line, read by the package's own config loader (so a recipe default such as
    `amp_level: O3` cannot slip past)."""
    from res2net.cli.train import config_from_argv
    from res2net.engine.train import amp_dtype, use_compile

    cfg = config_from_argv(None, command[4:])
    dtypes = {None: "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}

    def precision(validation: bool) -> str:
        dtype = amp_dtype(cfg, device_type, validation=validation)
        return dtypes[None if dtype is None else str(dtype)]

    return {
        "precision": precision(False),
        "val_precision": precision(True),
        "batch_size": cfg.batch_size,
        "workers": cfg.num_parallel_workers,
        "epochs": cfg.epoch_size,
        "lr": cfg.lr,
        "momentum": cfg.momentum,
        "weight_decay": cfg.weight_decay,
        "opt": "sgd" if cfg.opt in ("sgd", "momentum", "nesterov") else cfg.opt,
        "nesterov": cfg.use_nesterov,
        "weight_decay_filter": cfg.weight_decay_filter,
        "label_smoothing": cfg.label_smoothing,
        "scale": list(cfg.scale),
        "ratio": list(cfg.ratio),
        "hflip": cfg.hflip,
        "color_jitter": cfg.color_jitter,
        "re_prob": cfg.re_prob,
        "mixup": cfg.mixup,
        "cutmix": cfg.cutmix,
        "interpolation": cfg.interpolation,
        # on CPU the model computes in channels_last whatever the flag (create_model's hook)
        "channels_last": cfg.channels_last or device_type == "cpu",
        "compile": use_compile(cfg, device_type),
    }


def timm_settings(command: list[str]) -> dict:
    """What timm's `train.py` will do with `command`, with train.py's own defaults for the
    options not given (timm 1.0's train.py)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("-j", "--workers", type=int, default=4)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=2e-5)
    p.add_argument("--opt", default="sgd")
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0])
    p.add_argument("--ratio", type=float, nargs=2, default=[3.0 / 4.0, 4.0 / 3.0])
    p.add_argument("--hflip", type=float, default=0.5)
    p.add_argument("--color-jitter", type=float, default=0.4)
    p.add_argument("--reprob", type=float, default=0.0)
    p.add_argument("--mixup", type=float, default=0.0)
    p.add_argument("--cutmix", type=float, default=0.0)
    p.add_argument("--train-interpolation", default="random")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--amp-dtype", default="float16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--torchcompile", nargs="?", const="inductor")
    a, _ = p.parse_known_args(command[4:])
    precision = {"bfloat16": "bf16", "float16": "fp16"}[a.amp_dtype] if a.amp else "fp32"
    return {
        "precision": precision,
        "val_precision": precision,  # validate() runs under the same autocast
        "batch_size": a.batch_size,
        "workers": a.workers,
        "epochs": a.epochs,
        "lr": a.lr,
        "momentum": a.momentum,
        "weight_decay": a.weight_decay,
        "opt": "sgd" if a.opt in ("sgd", "momentum", "nesterov") else a.opt,
        "nesterov": a.opt in ("sgd", "nesterov"),  # timm's "sgd" is Nesterov's, "momentum" not
        # train.py always leaves biases and norm parameters undecayed (filter_bias_and_bn)
        "weight_decay_filter": "norm_and_bias",
        "label_smoothing": a.smoothing,
        "scale": a.scale,
        "ratio": a.ratio,
        "hflip": a.hflip,
        "color_jitter": a.color_jitter,
        "re_prob": a.reprob,
        "mixup": a.mixup,
        "cutmix": a.cutmix,
        "interpolation": a.train_interpolation,
        "channels_last": a.channels_last,
        "compile": a.torchcompile is not None,
    }


def check_like_for_like(ours: dict, peer: dict, peer_name: str) -> None:
    """SystemExit naming every setting in COMPARED where the two trainers differ: such a row
    would compare different work, not different trainers."""
    differ = [
        f"{k}: ours {ours[k]!r}, {peer_name} {peer[k]!r}" for k in COMPARED if ours[k] != peer[k]
    ]
    if differ:
        sys.exit(
            f"refusing to compare res2net train with {peer_name}: settings differ "
            f"({'; '.join(differ)}); fix the commands in benchmarks/train_e2e.py"
        )


def trainers(
    args: argparse.Namespace, device_type: str
) -> dict[str, tuple[Callable[..., list[str]], dict]]:
    """Every trainer to time, by row name ('<precision>: <trainer>'), with its command maker
    and effective settings; refuses (SystemExit) any timm row that is not like for like."""
    dummy = Path("data"), Path("out"), 9
    rows: dict[str, tuple[Callable[..., list[str]], dict]] = {}
    for precision in args.precision:
        ours = partial(ours_command, precision=precision)
        ours_set = ours_settings(ours(args, *dummy), device_type)
        rows[f"{precision}: res2net train"] = (ours, ours_set)
        variants = {  # name: (channels_last, compile)
            "timm train.py": (False, False),
            "timm train.py --channels-last": (True, False),
        }
        if args.timm_compile:
            variants["timm train.py --channels-last --torchcompile"] = (True, True)
        for name, (channels_last, compile) in variants.items():
            make = partial(
                timm_command, precision=precision, channels_last=channels_last, compile=compile
            )
            peer_set = timm_settings(make(args, *dummy))
            check_like_for_like(ours_set, peer_set, name)
            rows[f"{precision}: {name}"] = (make, peer_set)
    return rows


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


def bf16_available(device_type: str) -> bool:
    from res2net.lowprec import bf16_supported

    return bf16_supported(device_type)


def img_s_and_ratios(
    seconds: dict[str, dict[str, list[float]]], extra_images: int
) -> tuple[dict, dict]:
    """Steady-state images/s of each row (per round and from the best runs), and ours over each
    timm row of the same precision."""
    img_s: dict[str, dict[str, Any]] = {}
    for name, runs in seconds.items():
        per_round = [
            extra_images / (large - small) for small, large in zip(runs["small"], runs["large"])
        ]
        best = extra_images / (min(runs["large"]) - min(runs["small"]))
        img_s[name] = {"per_round": per_round, "best_runs": best}
    ratio = {}
    for name, peer in img_s.items():
        precision, trainer = name.split(": ", 1)
        if not trainer.startswith("timm"):
            continue
        ours = img_s[f"{precision}: res2net train"]
        ratio[f"{precision}: res2net train / {trainer}"] = {
            "best_runs": ours["best_runs"] / peer["best_runs"],
            "per_round": [o / t for o, t in zip(ours["per_round"], peer["per_round"])],
        }
    return img_s, ratio


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--timm_train", type=Path, required=True, help="timm's train.py (from its repository)"
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=PRECISIONS,
        default=list(PRECISIONS),
        help="rows to run, each like for like: fp32 (ours --amp_level O0, timm without --amp) "
        "and bf16 autocast (ours O2, timm --amp --amp-dtype bfloat16)",
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
        "--timm_compile",
        action="store_true",
        help="also run timm's script with --channels-last --torchcompile (ours compiles on "
        "CUDA: the recipe's mode 0)",
    )
    parser.add_argument(
        "--keep_logs", type=Path, help="copy each run's output here (ours shows its data wait)"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.timm_train = args.timm_train.resolve()  # timm runs from a temporary folder
    if not args.timm_train.is_file():
        sys.exit(
            f"--timm_train {args.timm_train}: no such file (a copy of timm's repository train.py)"
        )
    import torch

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if "bf16" in args.precision and not bf16_available(device_type):
        sys.exit(
            f"--precision bf16: this {device_type} has no native bf16 math (emulated bf16 is "
            "slower than fp32 and says nothing about either trainer): use --precision fp32"
        )
    rows = trainers(args, device_type)

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
        seconds: dict[str, dict[str, list[float]]] = {
            name: {"small": [], "large": []} for name in rows
        }
        runs: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for size in ("small", "large"):
                for i, (name, (make, _)) in enumerate(rows.items()):
                    out = tmp / f"out-{r}-{size}-{i}"
                    shutil.rmtree(out, ignore_errors=True)
                    log = tmp / f"{out.name}.log"
                    load_before = os.getloadavg()
                    took = run_once(make(args, tmp / f"data-{size}", out, num_classes), log)
                    seconds[name][size].append(took)
                    runs.append(
                        {
                            "round": r,
                            "size": size,
                            "trainer": name,
                            "seconds": took,
                            "load_before": load_before,
                            "load_after": os.getloadavg(),
                        }
                    )
                    if args.keep_logs:
                        args.keep_logs.mkdir(parents=True, exist_ok=True)
                        shutil.copy(log, args.keep_logs / f"{out.name}.log")
                    print(f"round {r}: {name} {size}: {took:.1f} s", flush=True)

    img_s, ratio = img_s_and_ratios(seconds, (steps["large"] - steps["small"]) * args.batch_size)
    max_load = max(max(run["load_before"][0], run["load_after"][0]) for run in runs)
    result: dict = {
        "machine": machine_info(),
        "device": device_type,
        "flags": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "max_load_1min": max_load,
        "quiet": max_load <= QUIET_LOAD * (os.cpu_count() or 1),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "train_images": images,
        "steps": steps,
        "trainers": {
            name: {"settings": settings, "command": make(args, Path("DATA"), Path("OUT"), 9)[3:]}
            for name, (make, settings) in rows.items()
        },
        "runs": runs,
        "seconds": seconds,
        "img_s": img_s,
        "ratio": ratio,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["img_s"], indent=1), json.dumps(result["ratio"], indent=1))
    if not result["quiet"]:
        print(
            f"load average reached {max_load:.1f} on {os.cpu_count()} cores: not a quiet run, "
            "so these figures are not results to publish"
        )


if __name__ == "__main__":
    main()
