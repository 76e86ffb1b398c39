"""`res2net demo`: the main job on the embedded dataset — train Res2Net-50 on scikit-learn's
handwritten digits (written once as an ImageNet-style folder), validate the best checkpoint,
print the results row and where the plot is. The demo continues its own run (`--resume auto`):
a second `res2net demo` reports the finished result, and an interrupted one goes on."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import load_config

HELP = "train and validate on the bundled digits dataset (the whole ImageNet code path, in minutes)"
ACCEPTS_EXTRA = True


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default="configs/demo/res2net_digits.yaml", help="demo recipe")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ..data import write_digits_folder
    from ..engine.train import format_row, train
    from ..engine.validate import validate

    cfg = load_config(args.config, ["--resume", "auto", *extra])  # a later --resume wins
    write_digits_folder(cfg.data_dir, upscale=cfg.image_resize)
    result = train(cfg)
    if result.interrupted:
        return 0
    if not result.row:
        print(f"already trained: {result.ckpt_dir} ({result.epochs_done} epochs; train again with "
              "--ckpt_save_dir NEW_DIR or --resume '' --overwrite True)")
    if result.best_path is None:
        raise RuntimeError("training ended without a validated checkpoint (is val_while_train off?)")
    val = validate(cfg, result.best_path)
    if result.row:
        accuracy = {"acc@top1": round(val.top1, 2), "acc@top5": round(val.top5, 2)}
        print(format_row(dict(result.row, **accuracy)))
    print(f"best checkpoint: {result.best_path} (validated: top-1 {val.top1:.2f}% on {val.n} images)")
    if result.plot_path is not None:
        print(f"plot: {Path(result.plot_path)}")
    return 0
