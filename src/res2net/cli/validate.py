"""`res2net validate -c RECIPE --data_dir DIR --ckpt_path FILE`: top-1/top-5 of any checkpoint."""

from __future__ import annotations

import argparse
import json
import os

from ..config import KEYS
from ..errors import ConfigError
from ..guards import check_regular_file
from .train import config_from_argv, given_keys

HELP = "validate a checkpoint of any format (MindSpore .ckpt, .pth, .safetensors) on the val split"
ACCEPTS_EXTRA = True
# the recipe keys a validation reads, shown by --help (every key works: `res2net train --help`)
VALIDATE_KEYS = (
    "ckpt_path",
    "data_dir",
    "val_split",
    "model",
    "batch_size",
    "num_parallel_workers",
    "image_resize",
    "crop_pct",
    "interpolation",
    "mean",
    "std",
    "val_amp_level",
    "distribute",
)


def keys_epilog() -> str:
    texts = {key: k.help for key, k in KEYS.items()}
    texts["ckpt_path"] = "the checkpoint to validate: MindSpore .ckpt, .pth, .safetensors, best.pt"
    lines = ["recipe keys (in the YAML file, or on the command line as --key value):"]
    lines += [f"  --{key}\n      {texts[key]}" for key in VALIDATE_KEYS if key in texts]
    lines.append("and every other key of `res2net train --help`")
    return "\n".join(lines)


def add_parser(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = keys_epilog()
    p.add_argument("-c", "--config", help="recipe YAML (MindCV keys)")
    p.add_argument(
        "--per_class_csv",
        "--per-class-csv",
        help="write per-class images, correct, precision, recall (top-1) and F1 to this CSV "
        "file (the columns of --report_dir's per_class.csv)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    r = p.add_argument_group("reports (see README: Evaluation reports)")
    r.add_argument(
        "--report_dir",
        "--report-dir",
        help="write confusion.png, per_class.csv (precision/recall), confused_pairs.csv and "
        "summary.json here",
    )
    r.add_argument(
        "--tta", choices=("flip", "five_crop", "ten_crop"), help="test-time augmentation"
    )
    r.add_argument(
        "--class_map",
        "--class-map",
        help="the model's class names, one per line (line i = output i): score each class folder "
        "against the output of its name",
    )
    r.add_argument(
        "--real_labels",
        "--real-labels",
        help="ReaL-style labels JSON (timm's real.json): also report the accuracy against every "
        "image's set of correct labels",
    )
    r.add_argument(
        "--results_csv", "--results-csv", help="append the results row (timm's columns) to this CSV"
    )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    # recipe and file errors answer before torch is imported
    cfg = config_from_argv(args.config, extra)
    if not cfg.ckpt_path:
        raise ConfigError("give the checkpoint to validate with --ckpt_path FILE")
    check_regular_file(cfg.ckpt_path, "checkpoint")
    from ..engine.report import ReportOptions
    from ..engine.validate import validate

    report = ReportOptions(
        report_dir=args.report_dir,
        tta=args.tta,
        class_map=args.class_map,
        real_labels=args.real_labels,
        results_csv=args.results_csv,
    )
    result = validate(
        cfg, cfg.ckpt_path, args.per_class_csv, report, given=given_keys(args.config, extra)
    )
    if int(os.environ.get("RANK", "0")) != 0:  # distributed: rank 0 reports
        return 0
    if args.json:
        print(json.dumps({"model": cfg.model, "ckpt_path": cfg.ckpt_path, **result.as_dict()}))
    else:
        print(
            f"{cfg.model}  {cfg.ckpt_path}: top-1 {result.top1:.2f}  top-5 {result.top5:.2f}  "
            f"loss {result.loss:.4f}  ({result.n} images)"
        )
        if "real_top1" in result.extra:
            real = result.extra
            print(
                f"  ReaL labels: top-1 {real['real_top1']:.2f}  top-5 {real['real_top5']:.2f}  "
                f"({real['real_images']} images with labels)"
            )
    return 0
