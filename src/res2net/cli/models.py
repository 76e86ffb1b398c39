"""`res2net models`: the zoo table (name, parameters, GFLOPs at 224, published top-1).

The table comes from `models/zoo.json`, written by `write_zoo_table` from the real models and
checked against them by tests/test_models.py: listing the zoo needs neither torch nor building
thirteen networks (20 s of CPU), so it answers at once.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from pathlib import Path

from .. import fileio
from ..errors import ConfigError
from ..guards import short

ZOO_FILE = Path(__file__).resolve().parents[1] / "models" / "zoo.json"
HELP = "list the model zoo: parameters, GFLOPs, published top-1"


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "pattern",
        nargs="?",
        default="*",
        help="shell-style filter on model names, e.g. 'res2net50*'",
    )
    p.add_argument(
        "--time",
        action="store_true",
        help="also measure forward ms (batch 1, 224x224) on this machine",
    )
    p.add_argument("--names", action="store_true", help="print only the names, aliases included")


def zoo_rows(pattern: str = "*", measure_time: bool = False) -> list[dict]:
    """One row per canonical model matching `pattern` (aliases match their canonical model),
    computed from the models: built on the meta device (shapes only, no weights) unless
    `measure_time` runs them."""
    import torch

    from ..models import ALIASES, ARCHITECTURES, build_model
    from ..profile import count_flops, count_params, time_forward
    from ..weights.pretrained import pretrained_entries

    rows = []
    for name in ARCHITECTURES:
        aliases = [a for a, c in ALIASES.items() if c == name]
        if not any(fnmatch.fnmatch(n, pattern) for n in [name, *aliases]):
            continue
        with torch.device("cpu" if measure_time else "meta"):
            model = build_model(name)
        top1 = [e["top1"] for e in pretrained_entries(name) if e.get("top1") is not None]
        row = {
            "name": name,
            "aliases": aliases,
            "params_m": round(count_params(model) / 1e6, 4),
            "gflops": round(count_flops(model, 224) / 1e9, 4),
            "top1": max(top1) if top1 else None,
        }
        if measure_time:
            row["forward_ms"] = time_forward(model, batch_size=1, image_size=224, repeats=3)
        rows.append(row)
    return rows


def write_zoo_table(path: Path = ZOO_FILE) -> None:
    """Write `zoo_rows()` to the package's zoo.json (after adding or changing a model)."""
    fileio.write_text(path, json.dumps(zoo_rows(), indent=1) + "\n")


def stored_zoo_rows(pattern: str = "*") -> list[dict]:
    """The rows of zoo.json whose name or alias matches `pattern`, without importing torch."""
    rows = json.loads(ZOO_FILE.read_text(encoding="utf-8"))
    return [r for r in rows if any(fnmatch.fnmatch(n, pattern) for n in [r["name"], *r["aliases"]])]


def format_table(rows: list[dict]) -> str:
    """Markdown table of `zoo_rows`."""
    timed = rows and "forward_ms" in rows[0]
    head = "| model | MindCV name | params (M) | GFLOPs@224 | best published top-1 |" + (
        " forward ms (bs 1) |" if timed else ""
    )
    sep = "|---|---|---:|---:|---:|" + ("---:|" if timed else "")
    lines = [head, sep]
    for r in rows:
        top1 = f"{r['top1']:.2f}" if r["top1"] is not None else "-"
        aliases = ", ".join(r["aliases"]) or "-"
        line = f"| {r['name']} | {aliases} | {r['params_m']:.2f} | {r['gflops']:.2f} | {top1} |"
        if timed:
            line += f" {r['forward_ms']:.1f} |"
        lines.append(line)
    return "\n".join(lines)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    rows = stored_zoo_rows(args.pattern)
    every = (n for r in rows for n in [r["name"], *r["aliases"]])
    names = sorted(n for n in every if fnmatch.fnmatch(n, args.pattern))  # as list_models
    if not names:  # checked first, so that --names does not print an empty line and succeed
        raise ConfigError(
            f"no model matches {short(args.pattern)}; `res2net models --names` lists them"
        )
    if args.names:
        print("\n".join(names))
        return 0
    print(format_table(zoo_rows(args.pattern, measure_time=True) if args.time else rows))
    return 0
