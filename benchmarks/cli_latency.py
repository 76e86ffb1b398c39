"""CPU seconds until the command line answers: `--help` of every command, argument and file
errors, and `res2net models`, each in a fresh interpreter as a user runs it.

CPU seconds (user + system of the child process), not wall time, so that a shared, loaded
machine measures the same as an idle one. Targets: 0.5 s for help and errors, 2 s for
`models`. Each command runs `--repeats` times; the median is reported.

    python benchmarks/cli_latency.py --out benchmarks/results/cli-latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "configs" / "demo" / "res2net_digits.yaml")
HELP_AND_ERRORS = [
    ["--help"],
    ["train", "--help"],
    ["validate", "--help"],
    ["predict", "--help"],
    ["export", "--help"],
    ["saliency", "train", "--help"],
    ["train", "-c", "no-such-recipe.yaml"],
    ["validate", "-c", RECIPE, "--ckpt_path", "no-such-file.ckpt"],
    ["predict", "x.jpg", "--model", "res2net50", "--ckpt_path", "no-such-file.ckpt"],
    ["predict"],
]
MODELS = [["models"], ["models", "--names"]]
TARGETS = {"help and errors": 0.5, "models": 2.0}


def cpu_seconds(argv: list[str]) -> float:
    """User + system CPU seconds of one `res2net ARGV` in a fresh interpreter."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [sys.executable, "-m", "res2net.cli.main", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        check=False,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(repeats: int) -> list[dict]:
    rows = []
    for group, cases in (("help and errors", HELP_AND_ERRORS), ("models", MODELS)):
        for argv in cases:
            median = statistics.median(cpu_seconds(argv) for _ in range(repeats))
            shown = " ".join(a if a != RECIPE else "configs/demo/res2net_digits.yaml" for a in argv)
            rows.append(
                {
                    "command": f"res2net {shown}",
                    "group": group,
                    "cpu_s": round(median, 3),
                    "target_s": TARGETS[group],
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = measure(args.repeats)
    print("| command | CPU s (median) | target |")
    print("|---|---:|---:|")
    for r in rows:
        mark = "" if r["cpu_s"] <= r["target_s"] else " (over)"
        print(f"| `{r['command']}` | {r['cpu_s']:.3f}{mark} | {r['target_s']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
