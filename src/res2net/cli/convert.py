"""`res2net convert SRC DST`: between MindSpore .ckpt, torch .pth and .safetensors."""

from __future__ import annotations

import argparse

HELP = (
    "convert weights between formats (.ckpt <-> .pth <-> .safetensors); the output format follows DST's "
    "extension and holds float32 values"
)


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint to read (format detected from its content)")
    p.add_argument("dst", help="file to write: .safetensors, .ckpt (MindSpore/MindCV) or .pth")
    p.add_argument("--model", help="architecture name (needed unless SRC stores it)")
    p.add_argument("--source", help="where the weights come from, stored in .safetensors metadata (mindcv, official, timm...)")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ..weights.convert import convert

    out = convert(args.src, args.dst, args.model, args.source)
    print(f"wrote {out}")
    return 0
