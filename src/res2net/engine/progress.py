"""Seeing a run: a progress bar on a terminal, plain log lines otherwise, `metrics.jsonl`,
optional TensorBoard events, and the end-of-run plot."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import fileio
from ..console import can_show_bar

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("res2net.train")


class StepReporter:
    """Shows training steps: a tqdm bar (loss, lr, img/s, the share of time spent waiting for
    input, ETA of the epoch and of the whole run) when stderr is a terminal that reports its
    width, else a log line
    whenever the loop passes a loss (at its log intervals). Only the main process (rank 0)
    reports. `later_steps`: the steps of the epochs after this one."""

    def __init__(
        self,
        total_steps: int,
        *,
        start_step: int = 0,
        enabled: bool = True,
        desc: str = "",
        later_steps: int = 0,
    ) -> None:
        self.total = total_steps
        self.later = later_steps
        self.enabled = enabled
        self.desc = desc
        self.bar = None
        self.images = 0
        self.steps = 0
        self.waited: float | None = None  # seconds spent waiting for input, when timed
        self.t0 = time.perf_counter()
        if enabled and can_show_bar():  # else log lines (a pipe, or a terminal of no width)
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc=desc,
                unit="step",
                dynamic_ncols=True,
                leave=False,
            )

    def update(
        self,
        step: int,
        n_images: int,
        loss: float | None,
        lr: float,
        *,
        data_wait: float | None = None,
    ) -> None:
        """Record one finished step (`step`: batches done in the epoch; `data_wait`: seconds it
        waited for its batches, shown when given). `loss` is None between log intervals
        (reading it would make the CPU wait for the device): nothing is shown."""
        if not self.enabled:
            return
        self.images += n_images
        self.steps += 1
        if data_wait is not None:
            self.waited = (self.waited or 0.0) + data_wait
        elapsed = max(1e-9, time.perf_counter() - self.t0)
        rate = self.images / elapsed
        wait = None if self.waited is None else f"{100 * self.waited / elapsed:.0f}%"
        per_step = elapsed / self.steps
        run_eta = _hms((self.total - step + self.later) * per_step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if loss is not None:
                shown = {"loss": f"{loss:.4f}", "lr": f"{lr:.3g}", "img_s": f"{rate:.1f}"}
                if wait is not None:
                    shown["data_wait"] = wait
                self.bar.set_postfix(shown, refresh=False, run_eta=run_eta)
        elif loss is not None:
            eta = _hms((self.total - step) * per_step)
            log.info(
                "%s step %d/%d  loss %.4f  lr %.4g  %.1f img/s%s  ETA %s (run %s)",
                self.desc,
                step,
                self.total,
                loss,
                lr,
                rate,
                "" if wait is None else f"  data wait {wait}",
                eta,
                run_eta,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


MAX_METRICS_BYTES = 1 << 30  # about five million log lines


def _parsed(lines: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Each line with its record, without lines that do not parse."""
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append((line, record))
    return out


class MetricsLog:
    """Appends one JSON object per line to `metrics.jsonl` (and TensorBoard scalars when the
    `tensorboard` package is installed, and to the experiment trackers given)."""

    def __init__(self, directory: Path, enabled: bool = True, trackers: Any = None) -> None:
        self.path = directory / "metrics.jsonl"
        self.enabled = enabled
        self.trackers = trackers  # engine/tracking.py's `Trackers`: MLflow, W&B
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # a new folder per process: its event files go where nothing can be planted
                started = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
                board = fileio.new_directory(directory / "tensorboard", started)
                self.tb = SummaryWriter(str(board))
            except ImportError:
                pass

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with fileio.open_append(self.path) as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(record)
        if self.tb is not None:
            step = record.get("global_step", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("global_step", "epoch", "step"):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def read(self) -> list[dict[str, Any]]:
        """The records, without lines that do not parse (a write cut short by a full disk or a
        crash)."""
        return [record for _, record in _parsed(self._text_lines())]

    def rewind(self, global_step: int) -> None:
        """Keep only the records up to `global_step` (where a resumed run continues; 0 for a
        fresh one): the work after it is done again and its records written again."""
        if not self.enabled:
            return
        lines = self._text_lines()
        kept = [
            line
            for line, record in _parsed(lines)
            if isinstance(step := record.get("global_step", 0), (int, float))
            and step <= global_step
        ]
        if len(kept) == len(lines):
            return  # nothing to drop: the file stays as it is (or is not there)
        fileio.atomic_write(
            self.path, lambda f: f.write("".join(line + "\n" for line in kept).encode())
        )

    def _text_lines(self) -> list[str]:
        """The file's lines, read at its own name (never through a planted link) and bounded."""
        data = fileio.read_existing(self.path, MAX_METRICS_BYTES)
        return [] if data is None else data.decode(errors="replace").splitlines()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_run(records: list[dict[str, Any]], path: Path) -> Path | None:
    """`training_figure` of the run written to `path` (a PNG), titled with the run's folder;
    None without matplotlib or without a finished epoch."""
    try:
        fig = training_figure(records, title=f"training run: {path.parent.resolve().name}")
    except ImportError:
        log.info("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    if fig is None:
        return None
    fileio.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    return path


def training_figure(records: list[dict[str, Any]], *, title: str) -> Figure | None:
    """Loss per epoch, lr per step and validation top-1 per epoch (None before the first
    epoch's end). Epoch axes have whole-number ticks, and the lr panel also uses each epoch's
    end, so a run shorter than one log interval still shows its schedule."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r for r in records if r.get("kind") == "epoch"]
    if not epochs:
        return None
    fig = Figure(figsize=(13, 3.6), layout="tight")
    axes = fig.subplots(1, 3)
    x = [r["epoch"] for r in epochs]
    axes[0].plot(x, [r["train_loss"] for r in epochs], marker="o", label="train")
    val = [r for r in epochs if r.get("val_loss") is not None]
    if val:
        axes[0].plot(
            [r["epoch"] for r in val], [r["val_loss"] for r in val], marker="o", label="val"
        )
    axes[0].set(title="loss", xlabel="epoch")
    axes[0].legend()
    lrs = {  # global step -> lr: the logged steps and each epoch's last step
        r["global_step"]: r["lr"]
        for r in records
        if r.get("kind") in ("step", "epoch") and r.get("lr") is not None
    }
    steps = sorted(lrs)
    axes[1].plot(steps, [lrs[s] for s in steps], marker="o" if len(steps) < 30 else None)
    axes[1].set(title="learning rate", xlabel="step")
    if val:
        axes[2].plot([r["epoch"] for r in val], [r["val_top1"] for r in val], marker="o")
    axes[2].set(title="validation top-1 (%)", xlabel="epoch")
    for ax, xs in zip(axes, (x, steps, x)):
        ax.grid(alpha=0.3)
        if xs and max(xs) - min(xs) < 4:  # a few points: ticks at whole numbers around them
            ax.set_xlim(min(xs) - 1, max(xs) + 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    fig.suptitle(title)
    return fig
