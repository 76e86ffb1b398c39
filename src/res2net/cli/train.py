"""`res2net train -c RECIPE --data_dir DIR [--key value ...]`: MindCV-style training.

:func:`config_from_argv` reads the recipe and the ``--key value`` overrides (``validate`` and
``demo`` take the same). ``--help`` lists every recipe key from its declaration in
``config.Config``; :func:`keys_table` renders the same lines as README.md's key table
(``tests/test_config.py`` compares them).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from pathlib import Path
from typing import Any

from ..config import KEYS, TYPES, Config, Key, choices, load_config, read_recipe
from ..errors import ConfigError
from ..guards import printable, short

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
    cfg = config_from_argv(args.config, extra)  # recipe errors answer before torch is imported
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


def config_from_argv(path: str | os.PathLike[str] | None, argv: list[str]) -> Config:
    """The recipe at `path` (or ``-c``/``--config`` in `argv`) with the ``--key value`` overrides
    of `argv` (``["--lr", "0.2", "--data-dir=/x", "--ema"]``), which win over it."""
    path, flags = parse_overrides(path, argv)
    return load_config(path, flags, source="on the command line")


def given_keys(path: str | os.PathLike[str] | None, argv: list[str]) -> dict[str, str]:
    """Which keys the recipe and the command line set, and where: ``{"image_resize":
    "command line", "crop_pct": "recipe configs/x.yaml"}`` (the command line wins)."""
    path, flags = parse_overrides(path, argv)
    recipe = read_recipe(path) if path else {}
    return {name: f"recipe {path}" for name in recipe} | dict.fromkeys(flags, "command line")


def parse_overrides(
    path: str | os.PathLike[str] | None, argv: list[str]
) -> tuple[str | None, dict[str, Any]]:
    """The recipe path (``-c``/``--config`` in `argv` wins over `path`) and the keys `argv` sets:
    ``["--a", "1", "--b-c=x", "--flag"]`` -> ``{"a": "1", "b_c": "x", "flag": True}``. Values
    stay text, for the config to read as each key's type (as MindCV's argparse does); a bare
    flag is a boolean key's True, as MindCV's ``str2bool(nargs='?', const=True)``."""
    flags: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not _is_option(token):
            raise ConfigError(f"unexpected command-line argument {short(token)}; options look "
                              "like --key value or --key=value")  # fmt: skip
        name, eq, text = token.lstrip("-").partition("=")
        name = "config" if name == "c" else name.strip().replace("-", "_")
        i += 1
        if eq:
            flags[name] = text
        elif i < len(argv) and not _is_option(argv[i]):
            flags[name] = argv[i]
            i += 1
        elif TYPES.get(name, bool) in (bool, bool | None):  # unknown: load_config names it
            flags[name] = True
        else:
            raise ConfigError(f"command-line option {printable(token)} needs a value", key=name)
    return flags.pop("config", None if path is None else os.fspath(path)), flags


def _is_option(token: str) -> bool:
    return token.startswith("--") or token == "-c"


def key_groups() -> dict[str, list[str]]:
    """Every recipe key by MindCV's group, in MindCV's order."""
    groups: dict[str, list[str]] = {}
    for name, k in KEYS.items():
        groups.setdefault(k.group or list(groups)[-1], []).append(name)
    return groups


@functools.cache
def keys_help() -> str:
    """Every recipe key by MindCV's group, with its default and help (``train --help``). Built
    once per process: every parser the command line builds carries it (~10 ms each)."""
    lines = ["recipe keys (in the YAML file, or on the command line as --key value; a recipe "
             "may not set the keys marked 'command line only'):"]  # fmt: skip
    defaults = Config()
    for group, names in key_groups().items():
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
    for group, names in key_groups().items():
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
