"""`res2net validate -c RECIPE --data_dir DIR --ckpt_path FILE`: top-1/top-5 of any checkpoint."""

from __future__ import annotations

import argparse
import json
import os

from ..config import given_keys, load_config

HELP = "validate a checkpoint of any format (MindSpore .ckpt, .pth, .safetensors) on the val split"
ACCEPTS_EXTRA = True


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="recipe YAML (MindCV keys)")
    p.add_argument("--per_class_csv", "--per-class-csv", help="write per-class top-1 to this CSV file")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ..engine.validate import validate

    cfg = load_config(args.config, extra)
    if not cfg.ckpt_path:
        raise ValueError("give the checkpoint to validate with --ckpt_path FILE")
    result = validate(cfg, cfg.ckpt_path, args.per_class_csv, given=given_keys(args.config, extra))
    if int(os.environ.get("RANK", "0")) != 0:  # distributed: rank 0 reports
        return 0
    if args.json:
        print(json.dumps({"model": cfg.model, "ckpt_path": cfg.ckpt_path, **result.as_dict()}))
    else:
        print(f"{cfg.model}  {cfg.ckpt_path}: top-1 {result.top1:.2f}  top-5 {result.top5:.2f}  "
              f"loss {result.loss:.4f}  ({result.n} images)")
    return 0
