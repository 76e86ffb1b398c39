"""`res2net demo`: the main job on the embedded dataset — train Res2Net-50 on scikit-learn's
handwritten digits (written once as an ImageNet-style folder), keep the best weights alone,
validate them, print the results row and where the plot is. The demo continues its own run
(`--resume auto`): an interrupted one goes on, and once its best weights are kept a second
`res2net demo` validates and reports them without training."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import ConfigError
from .train import config_from_argv

HELP = "train and validate on the bundled digits dataset (the whole ImageNet code path, in minutes)"
ACCEPTS_EXTRA = True
# shipped inside the package: after `pip install 'res2net[demo]'`, `res2net demo` works anywhere
DEMO_RECIPE = Path(__file__).resolve().parents[1] / "data" / "res2net_digits.yaml"


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        default=str(DEMO_RECIPE),
        help="demo recipe (default: the packaged configs/demo/res2net_digits.yaml)",
    )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ..data import write_digits_folder
    from ..engine.train import train

    cfg = config_from_argv(args.config, ["--resume", "auto", *extra])  # a later --resume wins
    kept = Path(cfg.ckpt_save_dir) / "best.safetensors"
    if kept.is_file():
        print(f"already trained: {kept} (train again with --ckpt_save_dir NEW_DIR)")
        report(cfg, kept, {})
        return 0
    write_digits_folder(cfg.data_dir, upscale=cfg.image_resize)
    result = train(cfg)
    if result.interrupted:
        return 0
    if result.best_path is None:
        raise ConfigError("training ended without a validated checkpoint (is val_while_train off?)")
    weights = keep_best_weights(Path(cfg.ckpt_save_dir), result.best_path, prefix=cfg.model)
    report(cfg, weights, result.row)
    if result.plot_path is not None:
        print(f"plot: {Path(result.plot_path)}")
    return 0


def report(cfg: Config, weights: Path, row: dict[str, Any]) -> None:
    """Validate the kept weights (their eval transform comes with them) and print the results
    row of the run that trained them (when it ran now) and where the weights are."""
    from ..engine.train import format_row
    from ..engine.validate import validate

    val = validate(cfg, weights)
    if row:
        accuracy = {"acc@top1": round(val.top1, 2), "acc@top5": round(val.top5, 2)}
        print(format_row(dict(row, **accuracy)))
    size_mb = weights.stat().st_size / 1e6
    print(
        f"best weights: {weights} ({size_mb:.0f} MB; validated: top-1 {val.top1:.2f}% "
        f"on {val.n} images)"
    )


def keep_best_weights(ckpt_dir: Path, best: Path, *, prefix: str) -> Path:
    """Replace the run's training checkpoints (weights, optimizer state, EMA: three times the
    model's size each) by the best weights alone, as `best.safetensors` with the run's
    architecture, classes count and eval transform in its header. Only the files the run wrote
    go (`last.pt`, `best.pt`, its `<prefix>-NNN.pt` epoch files, each only when its header
    names the run): other `.pt` files in a folder given as --ckpt_save_dir stay, as do the logs
    and plot."""
    from .. import fileio
    from ..engine.checkpoint import CheckpointManager, checkpoint_header
    from ..weights.convert import convert

    out = convert(best, ckpt_dir / "best.safetensors", source="res2net demo")
    run = CheckpointManager(ckpt_dir, prefix=prefix)
    ours = run.find_run_id()
    for path in [run.last, run.best, *run.epoch_files()]:
        header = checkpoint_header(path)
        if ours is not None and header is not None and header["run_id"] == ours:
            fileio.remove(path)
    if ours is not None:
        fileio.remove(run.index_path)  # it listed the removed files (an index is rebuilt anyway)
    return out
