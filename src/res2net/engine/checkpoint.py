"""Training checkpoints: written atomically, rotated by MindCV's policies, found again on resume.

Layout of `ckpt_save_dir`:
- `last.pt`: the newest resumable state (written at every save and on SIGTERM/Ctrl-C);
- `<model>-<epoch>.pt`: per-epoch checkpoints, at most `keep_checkpoint_max` of them, kept by
  `ckpt_save_policy` (`latest_k`: the newest; `top_k`: the best validation top-1);
- `best.pt`: the checkpoint with the best validation top-1 so far;
- `checkpoints.json`: the index of epoch checkpoints and their metrics.
Every file appears whole or not at all: written to a temporary file, fsynced, then renamed.
`last.pt` is written last: a process killed while saving leaves the previous `last.pt`, and
the resumed run redoes the epoch and writes the same files again. Temporary files of killed
writes are removed when the next run starts (`CheckpointManager.remove_stale_files`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_write, fsync_directory, remove_stale_temporaries, temporary_path
from ..guards import read_regular_file, short
from ..weights import torchfile

log = logging.getLogger(__name__)

FORMAT = "res2net-train"
MAX_INDEX_BYTES = 1 << 20


def epoch_file_name(prefix: str, epoch: int) -> str:
    """The name of the per-epoch checkpoint `CheckpointManager` writes."""
    return f"{prefix}-{epoch:03d}.pt"


def deletable_checkpoint(directory: str | Path, name: Any, prefix: str) -> Path | None:
    """The path rotation may delete for an index entry's `name`, or None.

    Only a file this project wrote there qualifies: a plain name of the form `epoch_file_name`
    gives (`<prefix>-<epoch>.pt`, no directory part) that is a regular file, not a link, in
    `directory` itself. `checkpoints.json` is a file anyone may have planted, so whatever else
    it lists (absolute paths, `../`, other names) is never deleted."""
    if not isinstance(name, str) or not re.fullmatch(re.escape(prefix) + r"-\d{3,9}\.pt", name):
        return None
    path = Path(directory) / name
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    return path if stat.S_ISREG(mode) else None


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Atomically `torch.save` a training state (tagged with this project's format)."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint written by `save_checkpoint` (never executes pickled code)."""
    path = Path(path)
    state = torchfile.load(path, "training checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a res2net training checkpoint (use it as weights with --ckpt_path instead)")
    return state


class CheckpointManager:
    """Writes and rotates the checkpoints of one run in `directory` (see the module docstring)."""

    def __init__(self, directory: str | Path, prefix: str, keep_max: int = 10, policy: str | None = "latest_k") -> None:
        self.directory = Path(directory)
        self.prefix = prefix
        self.keep_max = keep_max
        self.policy = policy
        self.index_path = self.directory / "checkpoints.json"

    def check_writable(self) -> None:
        """Fail before training starts if the directory cannot be created or written."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = temporary_path(self.directory / "write-test")
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise OSError(f"ckpt_save_dir {str(self.directory)!r} is not writable ({e.strerror or e}); choose another with --ckpt_save_dir") from None

    def remove_stale_files(self) -> list[Path]:
        """Remove the temporary files of writes that a killed process never finished."""
        return remove_stale_temporaries(self.directory)

    @property
    def last(self) -> Path:
        return self.directory / "last.pt"

    @property
    def best(self) -> Path:
        return self.directory / "best.pt"

    def latest(self) -> Path | None:
        """The newest resumable checkpoint, or None (what `--resume auto` continues from)."""
        return self.last if self.last.is_file() else None

    def _index(self) -> list[dict[str, Any]]:
        """The entries of `checkpoints.json` that are well formed (others are dropped with a
        warning; a damaged index reads as empty: rotation then only forgets, never deletes)."""
        if not self.index_path.exists():
            return []
        try:
            text = read_regular_file(self.index_path, "checkpoint index", MAX_INDEX_BYTES)
            entries = json.loads(text)
        except (OSError, ValueError, RecursionError) as e:
            reason = short(str(e), 120)
            log.warning("%s: ignored, not a readable index (%s)", self.index_path, reason)
            return []
        entries = entries if isinstance(entries, list) else [entries]
        good = [e for e in entries if _valid_entry(e)]
        if len(good) != len(entries):
            dropped = len(entries) - len(good)
            log.warning("%s: ignored %d malformed entries", self.index_path, dropped)
        return good

    def save_last(self, state: dict[str, Any], *, is_best: bool = False) -> Path:
        """Write the resumable state to `last.pt` (and to `best.pt` first when `is_best`)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if is_best:
            save_checkpoint(state, self.best)
            self._link(self.best, self.last)
        else:
            save_checkpoint(state, self.last)
        return self.last

    def save_epoch(self, state: dict[str, Any], epoch: int, top1: float | None, *, is_best: bool = False) -> Path:
        """Write the epoch checkpoint for `epoch` (1-based), `best.pt` when `is_best`, apply
        the policy, and write `last.pt` last; returns the epoch checkpoint's path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / epoch_file_name(self.prefix, epoch)
        entries = [e for e in self._index() if e["epoch"] != epoch] + [{"epoch": epoch, "file": path.name, "top1": top1}]
        if self.policy == "top_k":
            ranked = sorted(entries, key=lambda e: (e["top1"] is not None, e["top1"] or 0.0, e["epoch"]), reverse=True)
        else:
            ranked = sorted(entries, key=lambda e: e["epoch"], reverse=True)
        keep, drop = ranked[: self.keep_max], ranked[self.keep_max :]
        kept = any(e["epoch"] == epoch for e in keep)  # else the policy wants no epoch file
        if kept:
            save_checkpoint(state, path)
            if is_best:
                self._link(path, self.best)
        self._write_index(keep)
        for e in drop:
            old = deletable_checkpoint(self.directory, e["file"], self.prefix)
            if old is not None and e["epoch"] != epoch:
                old.unlink(missing_ok=True)
        if kept:
            self._link(path, self.last)
        else:
            self.save_last(state, is_best=is_best)
        return path

    def _write_index(self, entries: list[dict[str, Any]]) -> None:
        atomic_write(self.index_path, lambda f: f.write(json.dumps(sorted(entries, key=lambda e: e["epoch"]), indent=1).encode()))

    def _link(self, source: Path, path: Path) -> None:
        """Atomically give `path` the bytes of `source`: a hard link where the filesystem has
        them (no space, no time), else a copy."""
        tmp = temporary_path(path)
        try:
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OSError(f"could not write {path} ({e.strerror or e}); the previous file there, if any, is intact") from e
        fsync_directory(path.parent)


def _valid_entry(entry: Any) -> bool:
    """An index entry as `CheckpointManager` writes it: epoch, file name, top-1 or None."""
    if not isinstance(entry, dict):
        return False
    epoch, file, top1 = entry.get("epoch"), entry.get("file"), entry.get("top1")
    number = isinstance(top1, (int, float)) and not isinstance(top1, bool) and math.isfinite(top1)
    return (isinstance(epoch, int) and not isinstance(epoch, bool) and 0 < epoch < 10**9
            and isinstance(file, str) and (top1 is None or number))
