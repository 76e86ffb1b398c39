"""Soak: many epochs of training with DataLoader workers started again every epoch; memory
(RSS) and open files must not grow. Run by `make soak` (after the slow reliability tests) as
`python -m tests.soak`; writes docs/soak.json, docs/soak.png and the figures block of
docs/reliability.md.

The run: the tiny Res2Net of tests/test_reliability.py on a 3-class folder of 18 + 18 images,
`num_parallel_workers 2`, training loader with non-persistent workers (2 new worker processes
per epoch) and the validation loader's 2 workers started again at every validation, a
checkpoint every epoch. After each epoch (and a `gc.collect()`): this process's resident memory,
open file descriptors, threads and child processes. The slope of a least-squares line through
the epochs after the first `--warmup` is the growth per epoch. The soak fails when memory grows
faster than `--max-rss-slope`, when open files trend upwards or end above where they started,
or when a worker process outlives its epoch.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from res2net.cli.train import config_from_argv
from res2net.engine import progress
from res2net.engine import train as train_mod
from res2net.models import ARCHITECTURES

from .test_reliability import TINY, train_args
from .test_train import make_folder

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
BEGIN, END = "<!-- figures:begin (written by `make soak`) -->", "<!-- figures:end -->"


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def sample() -> dict[str, int]:
    gc.collect()
    status = Path("/proc/self/status").read_text()
    children = 0
    for task in Path("/proc/self/task").iterdir():
        with open(task / "children") as f:
            children += len(f.read().split())
    return {
        "rss_kib": rss_kib(),
        "open_fds": len(os.listdir("/proc/self/fd")),
        "threads": int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1)),
        "children": children,
    }


def slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def soak(epochs: int, workers: int, warmup: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    ARCHITECTURES["res2net_tiny"] = TINY
    samples: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    real_write = progress.MetricsLog.write

    def write(self, record):
        real_write(self, record)
        if record.get("kind") == "epoch":
            samples.append(
                {
                    "epoch": record["epoch"],
                    "seconds": round(time.perf_counter() - t0, 2),
                    **sample(),
                }
            )

    progress.MetricsLog.write = write
    # non-persistent training workers: two new worker processes every epoch
    train_mod.build_loader = functools.partial(train_mod.build_loader, persistent_workers=False)
    with tempfile.TemporaryDirectory(prefix="res2net-soak-") as tmp:
        data = make_folder(Path(tmp) / "data")
        before = sample()
        cfg = config_from_argv(
            None,
            train_args(
                data,
                Path(tmp) / "run",
                "--epoch_size",
                str(epochs),
                "--num_parallel_workers",
                str(workers),
                "--warmup_epochs",
                "2",
                "--decay_epochs",
                str(epochs),
            ),
        )
        train_mod.train(cfg)
        after = sample()
    steady = [s for s in samples if s["epoch"] > warmup]
    xs = [s["epoch"] for s in steady]
    summary = {
        "epochs": epochs,
        "workers_per_loader": workers,
        "worker_starts": 2 * workers * epochs,
        "warmup_epochs_excluded": warmup,
        "rss_slope_kib_per_epoch": round(slope(xs, [s["rss_kib"] for s in steady]), 1),
        "rss_first_last_kib": [steady[0]["rss_kib"], steady[-1]["rss_kib"]],
        "open_fds_slope_per_epoch": round(slope(xs, [s["open_fds"] for s in steady]), 3),
        "open_fds_min_max": [
            min(s["open_fds"] for s in steady),
            max(s["open_fds"] for s in steady),
        ],
        "open_fds_first_last": [steady[0]["open_fds"], steady[-1]["open_fds"]],
        "epochs_with_more_fds_than_first": sum(
            s["open_fds"] > steady[0]["open_fds"] for s in steady
        ),
        "threads_min_max": [min(s["threads"] for s in steady), max(s["threads"] for s in steady)],
        "children_after_epochs_max": max(s["children"] for s in steady),
        "before": before,
        "after": after,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return {
        "summary": summary,
        "samples": samples,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["samples"]
    epochs = [x["epoch"] for x in s]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(epochs, [x["rss_kib"] / 1024 for x in s], marker=".", label="resident memory")
    summary = result["summary"]
    steady = [x for x in s if x["epoch"] > summary["warmup_epochs_excluded"]]
    k = summary["rss_slope_kib_per_epoch"]
    mid_x = sum(x["epoch"] for x in steady) / len(steady)
    mid_y = sum(x["rss_kib"] for x in steady) / len(steady)
    a.plot(
        [steady[0]["epoch"], steady[-1]["epoch"]],
        [(mid_y + k * (e - mid_x)) / 1024 for e in (steady[0]["epoch"], steady[-1]["epoch"])],
        "--",
        label=f"fit: {k:+.1f} KiB/epoch",
    )
    lo, hi = min(x["rss_kib"] for x in s) / 1024, max(x["rss_kib"] for x in s) / 1024
    pad = max(8.0, hi - lo)  # a flat line looks flat; growth of a few MiB still shows
    a.set_ylim(lo - pad, hi + pad)
    a.set_xlabel("epoch")
    a.set_ylabel("MiB")
    a.set_title("RSS of the training process")
    a.legend()
    b.plot(epochs, [x["open_fds"] for x in s], marker=".", label="open file descriptors")
    b.plot(epochs, [x["threads"] for x in s], marker=".", label="threads")
    b.plot(epochs, [x["children"] for x in s], marker=".", label="child processes")
    b.set_xlabel("epoch")
    b.set_ylim(bottom=0)
    b.set_title(f"{summary['worker_starts']} DataLoader worker starts")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def hypothesis_cases(log: str) -> dict[str, int]:
    """Passing cases per test from pytest's --hypothesis-show-statistics output."""
    cases: dict[str, int] = {}
    test = None
    for line in log.splitlines():
        if re.match(r"^\S+::\S+:$", line.strip()):
            test = line.strip()[:-1]
        elif test and (m := re.search(r"(\d+) passing", line)):
            cases[test] = cases.get(test, 0) + int(m.group(1))
    return cases


PHASES = {
    "start": "setup",
    "step": "training step",
    "backward": "training step",
    "eval": "validation",
    "save": "checkpoint write",
    "replace": "between checkpoint renames",
    "returned": "after train() returned",
}


def _phases(events) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in events:
        name = PHASES.get(e.split()[0], e) if e.split() else e
        out[name] = out.get(name, 0) + 1
    return out


def _counts(counts: dict[str, int]) -> str:
    return (
        ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"
    )


def figures_block(
    soak_result: dict[str, Any], figures: dict[str, Any], cases: dict[str, int], passed: str
) -> str:
    s = soak_result["summary"]
    lines = [
        BEGIN,
        "",
        f"Last `make soak`: {time.strftime('%Y-%m-%d')}, {soak_result['machine']}. {passed}",
        "",
    ]
    hook = figures.get("sigkill_hook_points", [])
    rand = figures.get("sigkill_random", {})
    kills = rand.get("kills", [])
    if hook:
        kinds: dict[str, int] = {}
        for h in hook:
            kind = PHASES.get(h["point"].split(":")[0], h["point"])
            kinds[kind] = kinds.get(kind, 0) + 1
        lines.append(
            f"- SIGKILL at {len(hook)} hook points ({_counts(kinds)}) of a 2-epoch run, one run "
            "each: all resumed to the uninterrupted run's final state, bit for bit."
        )
    if kills:
        chains = len({k["chain"] for k in kills})
        seconds = rand.get("process_seconds", 0)
        landed = _counts(_phases(k["died_in"] for k in kills))
        lines.append(
            f"- SIGKILL at {len(kills)} random moments in {chains} chains of runs "
            f"(seed {rand.get('seed')}; uniform over the {seconds:.1f} s from the hooks' "
            f"start to the end of train()); landed in: {landed}. Every chain "
            "ended bit for bit as the uninterrupted run."
        )
    stops = figures.get("sigterm_random", {}).get("stops", [])
    if stops:
        worst = max(x["seconds_to_exit"] for x in stops)
        seed = figures["sigterm_random"]["seed"]
        landed = _counts(_phases(x["during"] for x in stops))
        lines.append(
            f"- SIGTERM at {len(stops)} random moments (seed {seed}; landed in: "
            f"{landed}): exit code 0 within {worst:.1f} s of the "
            "signal (the test's bound: 60 s); each resumed bit for bit."
        )
    for sig in ("SIGTERM", "SIGINT"):
        if f"group_{sig}" in figures:
            g = figures[f"group_{sig}"]
            lines.append(
                f"- {sig} to the whole process group, 2 DataLoader workers: exit code "
                f"{g['exit_code']} {g['seconds_to_exit']:.1f} s after the signal; resumed bit for "
                "bit."
            )
    if "sigterm_torchrun" in figures:
        t = figures["sigterm_torchrun"]
        lines.append(
            "- torchrun, 2 CPU ranks with 2 workers each, SIGTERM to the whole group: both ranks "
            "stopped at the same step boundary and wrote last.pt; the job ended "
            f"{t['seconds_to_exit']:.1f} s after the signal (launcher exit code "
            f"{t['launcher_exit_code']}); resumed to the same weights."
        )
    for fault in ("hang", "die"):
        if f"dist_{fault}" in figures:
            d = figures[f"dist_{fault}"]
            what = "hangs after step 1" if fault == "hang" else "is SIGKILLed in step 2"
            lines.append(
                f"- torchrun, 2 CPU processes, `--dist_timeout 20`, rank 1 {what}: the job ended "
                f"with exit code {d['exit_code']} after {d['seconds_to_end']:.0f} s (process start "
                "included)."
            )
    for test, n in sorted(cases.items()):
        lines.append(f"- Hypothesis: {n:,} passing cases in `{test}`.")
    rss_first, rss_last = (kib / 1024 for kib in s["rss_first_last_kib"])
    fds_first, fds_last = s["open_fds_first_last"]
    threads_min, threads_max = s["threads_min_max"]
    lines.append(
        f"- Soak: {s['epochs']} epochs, {s['worker_starts']} DataLoader worker starts, "
        f"{s['seconds']:.0f} s. RSS slope {s['rss_slope_kib_per_epoch']:+.1f} KiB/epoch after "
        f"epoch {s['warmup_epochs_excluded']} ({rss_first:.0f} -> {rss_last:.0f} MiB); open files "
        f"{fds_first} -> {fds_last} (slope {s['open_fds_slope_per_epoch']:+.3f}/epoch; "
        f"{s['epochs_with_more_fds_than_first']} epochs sampled with more, at most "
        f"{s['open_fds_min_max'][1]}); threads {threads_min}-{threads_max}; at most "
        f"{s['children_after_epochs_max']} child processes left after an epoch. Plot: "
        "[soak.png](soak.png), data: [soak.json](soak.json)."
    )
    lines += ["", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5, help="first epochs left out of the slopes")
    p.add_argument(
        "--max-rss-slope", type=float, default=64.0, help="KiB per epoch that fails the soak"
    )
    p.add_argument("--figures", type=Path, help="JSON the slow tests wrote (RELIABILITY_FIGURES)")
    p.add_argument(
        "--tests-log", type=Path, help="output of the slow tests (for the hypothesis statistics)"
    )
    p.add_argument("--docs", type=Path, default=DOCS)
    args = p.parse_args(argv)

    result = soak(args.epochs, args.workers, args.warmup)
    s = result["summary"]
    # a leak is a trend: a descriptor or thread still closing when one epoch is sampled is not
    fds_ok = (
        s["open_fds_slope_per_epoch"] <= 0.01
        and s["open_fds_first_last"][1] <= s["open_fds_first_last"][0]
    )
    ok = (
        s["rss_slope_kib_per_epoch"] <= args.max_rss_slope
        and fds_ok
        and s["children_after_epochs_max"] == 0
    )
    s["verdict"] = "pass" if ok else "FAIL"
    args.docs.mkdir(exist_ok=True)
    (args.docs / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.docs / "soak.png")
    figures = (
        json.loads(args.figures.read_text()) if args.figures and args.figures.is_file() else {}
    )
    log = args.tests_log.read_text() if args.tests_log and args.tests_log.is_file() else ""
    summary_line = next(
        (line.strip("= ") for line in reversed(log.splitlines()) if " passed" in line), ""
    )
    passed = f"Slow tests: {summary_line}." if summary_line else ""
    doc = args.docs / "reliability.md"
    if doc.is_file() and BEGIN in doc.read_text():
        text = doc.read_text()
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        doc.write_text(head + figures_block(result, figures, hypothesis_cases(log), passed) + tail)
    print(json.dumps(s, indent=1))
    print(
        f"soak: {s['verdict']}: RSS {s['rss_slope_kib_per_epoch']:+.1f} KiB/epoch (limit "
        f"{args.max_rss_slope}), open files {s['open_fds_first_last'][0]} -> "
        f"{s['open_fds_first_last'][1]} ({s['open_fds_slope_per_epoch']:+.3f}/epoch), child "
        f"processes left {s['children_after_epochs_max']}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
