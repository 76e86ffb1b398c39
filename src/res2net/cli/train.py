"""`res2net train -c RECIPE --data_dir DIR [--key value ...]`: MindCV-style training."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import keys_help, load_config

HELP = "train from a MindCV-style recipe; any config key can be overridden with --key value"
ACCEPTS_EXTRA = True
log = logging.getLogger("res2net.train")


def add_parser(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = keys_help()
    p.add_argument(
        "-c", "--config", help="recipe YAML (MindCV keys), e.g. configs/res2net/res2net_50_gpu.yaml"
    )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    cfg = load_config(args.config, extra)  # recipe errors answer before torch is imported
    from ..engine.tracking import check_stores, parse_backends

    # a link planted at ./mlruns or the run's wandb folder: refused before any work
    check_stores(parse_backends(cfg.log), uri=cfg.log_uri, directory=Path(cfg.ckpt_save_dir))
    from ..engine.train import format_row, train

    result = train(cfg)
    if result.interrupted:
        return 0
    if result.row:
        print(format_row(result.row))
        if result.plot_path is not None:
            print(f"plot: {result.plot_path}")
        print(f"checkpoints: {result.ckpt_dir}")
    return 0
