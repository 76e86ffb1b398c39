"""`res2net train -c RECIPE --data_dir DIR [--key value ...]`: MindCV-style training.

``--help`` lists every recipe key from its declaration in ``config.Config``; :func:`keys_table`
renders the same lines as README.md's key table (``tests/test_config.py`` compares them).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import HELP as KEY_HELP
from ..config import KEYS, Config, Key, choices, load_config

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


def keys_help() -> str:
    """Every recipe key by MindCV's group, with its default and help (``train --help``)."""
    lines = ["recipe keys (in the YAML file, or on the command line as --key value; a recipe "
             "may not set the keys marked 'command line only'):"]  # fmt: skip
    defaults = Config()
    for group, names in KEY_HELP.items():
        lines.append(f"\n{group}:")
        for name in names:
            k, only = KEYS[name], ""
            if k.trust:
                only = "; command line only" + (f" when it {k.trust}" if k.untrusted else "")
            default = _default(defaults, name)
            lines.append(f"  --{name} (default: {default})\n      {_help_line(name)}{only}")
    return "\n".join(lines)


def keys_table() -> str:
    """Every recipe key as a Markdown table (README.md, "Recipe keys")."""
    rows = ["| key | default | meaning | MindCV | in a recipe |", "|---|---|---|---|---|"]
    defaults = Config()
    for group, names in KEY_HELP.items():
        for name in names:
            k, default = KEYS[name], _default(defaults, name)
            where = f"not when it {k.trust}" if k.untrusted else "no" if k.trust else "yes"
            meaning, status = _help_line(name, ignored=False), _status(k, group)
            cells = [f"`{name}`", f"`{default}`", meaning, status, where]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def _status(k: Key, group: str) -> str:
    """A key's MindCV status: honoured, mapped or ignored (and why), or PyTorch-only."""
    if k.ignored:
        return f"ignored: {k.ignored}"
    if k.mapped:
        return f"mapped: {k.mapped}"
    return "PyTorch-only" if group.startswith("PyTorch") else "honoured"


def _default(defaults: Config, name: str) -> str:
    value = getattr(defaults, name)
    return repr(list(value) if isinstance(value, tuple) else value)


def _help_line(name: str, *, ignored: bool = True) -> str:
    """The help text, the choices and bounds its declaration states, and why it is ignored."""
    k, words = KEYS[name], [c for c in choices(name) if isinstance(c, str)]
    text = k.help + (": " + ", ".join(words) if len(words) > 1 else "")
    bounds = [f"{op} {v:g}" if isinstance(v, float) else f"{op} {v}" for op, v in k.bounds()]
    text += f" [{', '.join(bounds)}]" if bounds else ""
    return text + (f"; ignored ({k.ignored})" if k.ignored and ignored else "")
