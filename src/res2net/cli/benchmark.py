"""`res2net benchmark --model NAME --mode train|infer`: ms/step and img/s, as in the seed table."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os

from ..errors import ConfigError
from ..schema import PRECISIONS

HELP = "measure a training step or an inference pass: ms/step and img/s (Markdown and JSON)"


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="architecture name, e.g. res2net50")
    p.add_argument(
        "--batch_size", "--batch-size", type=int, default=32, help="images per card and step"
    )
    p.add_argument(
        "--image_resize", "--image-resize", type=int, default=224, help="square input size"
    )
    p.add_argument("--mode", choices=("train", "infer"), default="train")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the model (compile time is reported)"
    )
    p.add_argument(
        "--optimize",
        action="store_true",
        help="infer: use res2net.optimize_for_inference (with --compile: frozen weights)",
    )
    p.add_argument("--amp", action="store_true", help="autocast to bfloat16")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="infer: optimize_for_inference(precision=...) (int8 calibrated on random "
        "batches, always compiled); train: bf16 = --amp",
    )
    p.add_argument(
        "--channels_last",
        "--channels-last",
        action="store_true",
        help="channels_last weights and inputs",
    )
    p.add_argument(
        "--cards", type=int, default=1, help="devices; > 1 needs `torchrun --nproc_per_node N`"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed steps first (compilation happens in the first)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed steps; ms/step is their median")
    p.add_argument("--num_classes", "--num-classes", type=int, default=1000)


def format_markdown(rows: list[dict], machine: dict) -> str:
    """The seed table's columns, plus mode, precision and layout, and a line on the machine."""
    lines = [
        "| model name | params(M) | cards | batch size | resolution | jit level | graph compile | "
        "ms/step | img/s "
        "| mode | precision | layout |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.0f}s"
        lines.append(
            f"| {r['model']} | {r['params_m']:.2f} | {r['cards']} | {r['batch_size']} | "
            f"{r['resolution']}x{r['resolution']} | {r['jit_level']} | {compile_s} | "
            f"{r['ms_per_step']:.2f} | "
            f"{r['img_per_s']:.2f} | {r['mode']} | {r['precision']} | {r['layout']} |"
        )
    described = ", ".join(f"{k} {v}" for k, v in machine.items())
    return "\n".join(lines) + f"\n\nMachine: {described}."


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ..engine import distributed
    from ..factory import create_model
    from ..profile import benchmark_model, machine_info
    from ..weights.formats import MAX_CLASSES

    if (
        args.cards < 1
        or args.batch_size < 1
        or args.image_resize < 8
        or args.repeats < 1
        or args.warmup < 1
    ):
        raise ConfigError(
            "--cards, --batch_size, --repeats and --warmup must be >= 1, --image_resize >= 8"
        )
    if not 1 <= args.num_classes <= MAX_CLASSES:  # 0 would time a headless model
        raise ConfigError(f"--num_classes {args.num_classes}: give 1 to {MAX_CLASSES}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.cards != world:
        raise ConfigError(
            f"--cards {args.cards} but {world} process(es) run: start one process per card, "
            f"e.g. `torchrun --nproc_per_node {args.cards} -m res2net.cli.main benchmark ...`"
        )
    if args.cards > 1 and args.mode != "train":
        raise ConfigError("--cards > 1 measures data-parallel training: use --mode train")
    info = distributed.setup(args.cards > 1, args.device)
    if info.device.type != "cuda":  # Inductor's CUDA probe warns of CUDA_HOME on CPU-only runs
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        timing = benchmark_model(
            create_model(args.model, num_classes=args.num_classes),
            args.model,
            batch_size=args.batch_size,
            image_size=args.image_resize,
            mode=args.mode,
            device=info.device,
            compile=args.compile,
            optimize=args.optimize,
            amp=args.amp,
            channels_last=args.channels_last,
            precision=args.precision,
            cards=args.cards,
            warmup=args.warmup,
            repeats=args.repeats,
        )
    finally:
        distributed.teardown(info)
    if info.is_main:
        machine = machine_info(info.device)
        rows = [dataclasses.asdict(timing)]
        print(format_markdown(rows, machine))
        print()
        print(json.dumps({"machine": machine, "rows": rows}))
    return 0
