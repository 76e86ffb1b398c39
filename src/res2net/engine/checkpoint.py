"""Training checkpoints: written atomically, rotated by MindCV's policies, found again on resume.

Layout of `ckpt_save_dir`:
- `last.pt`: the newest resumable state (written at every save and on SIGTERM/Ctrl-C);
- `<model>-<epoch>.pt`: per-epoch checkpoints, at most `keep_checkpoint_max` of them, kept by
  `ckpt_save_policy` (`latest_k`: the newest; `top_k`: the best validation top-1);
- `best.pt`: the checkpoint with the best validation top-1 so far;
- `checkpoints.json`: the index of epoch checkpoints and their metrics.
Every file appears whole or not at all: written to a temporary file, fsynced, then renamed.
`last.pt` is written last: a process killed while saving leaves the previous `last.pt`, and
the resumed run redoes the epoch and writes the same files again. When the next run starts,
`CheckpointManager.reconcile` removes the temporary files of killed writes and the epoch files
that `checkpoints.json` no longer lists (a kill between the index's rename and the rotation's
deletes), after checking the index itself.

`RunLock` keeps two runs out of one directory: an advisory `flock` on `.res2net.lock`, which
the operating system releases when the holder exits or dies.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import stat
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, FileRefused
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
        raise CheckpointError(
            f"{path}: not a res2net training checkpoint (use it as weights with --ckpt_path "
            "instead)"
        )
    return state


class CheckpointManager:
    """Writes and rotates the checkpoints of one run in `directory` (see the module docstring)."""

    def __init__(
        self,
        directory: str | Path,
        *,
        prefix: str,
        keep_max: int = 10,
        policy: str | None = "latest_k",
    ) -> None:
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
            raise FileRefused(
                f"ckpt_save_dir {str(self.directory)!r} is not writable ({e.strerror or e}); "
                "choose another with --ckpt_save_dir"
            ) from None

    def remove_stale_files(self) -> list[Path]:
        """Remove the temporary files of writes that a killed process never finished."""
        return remove_stale_temporaries(self.directory)

    def epoch_file(self, epoch: int) -> Path:
        return self.directory / f"{self.prefix}-{epoch:03d}.pt"

    def epoch_files(self) -> list[Path]:
        """The epoch checkpoints of this run's naming (`<model>-<epoch>.pt`) in the directory."""
        pattern = re.compile(re.escape(self.prefix) + r"-\d{3,}\.pt")
        if not self.directory.is_dir():
            return []
        found = (p for p in self.directory.iterdir() if pattern.fullmatch(p.name))
        return sorted(p for p in found if p.is_file())

    def run_files(self) -> list[Path]:
        """Files a run of this project leaves here (what a fresh run would overwrite)."""
        names = ("last.pt", "best.pt", "checkpoints.json", "metrics.jsonl", "training.png")
        return [p for p in (self.directory / n for n in names) if p.is_file()] + self.epoch_files()

    def reconcile(self) -> list[Path]:
        """Make the directory agree with its index before any training: remove temporary
        files of killed writes, check `checkpoints.json` (a ValueError naming it when it is
        damaged) and remove the epoch files it does not list (left by a kill between the
        index's rename and the rotation's deletes). Returns the removed paths."""
        removed = self.remove_stale_files()
        listed = {e["file"] for e in self._index()}
        for path in self.epoch_files():
            if path.name not in listed:
                path.unlink()
                removed.append(path)
        return removed

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
        """The entries of `checkpoints.json` ([] when there is none); a ValueError naming the
        file when it is not an index this class wrote."""
        if not self.index_path.is_file():
            return []
        fix = "delete it to start the index afresh (the checkpoint files stay)"
        try:
            text = read_regular_file(self.index_path, "checkpoint index", MAX_INDEX_BYTES)
            entries = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(
                f"{self.index_path}: not valid JSON ({short(str(e), 120)}); {fix}"
            ) from None
        if not isinstance(entries, list):
            raise CheckpointError(f"{self.index_path}: expected a list of checkpoints; {fix}")
        for i, entry in enumerate(entries):
            ok = (
                isinstance(entry, dict)
                and type(entry.get("epoch")) is int
                and entry.get("file") == self.epoch_file(entry["epoch"]).name
                and (entry.get("top1") is None or type(entry.get("top1")) in (int, float))
            )
            if not ok:
                raise CheckpointError(
                    f"{self.index_path}: entry {i} ({short(json.dumps(entry), 80)}) is not "
                    f'{{"epoch": N, "file": "{self.prefix}-NNN.pt", "top1": X}}; {fix}'
                )
        return entries

    def save_last(self, state: dict[str, Any], *, is_best: bool = False) -> Path:
        """Write the resumable state to `last.pt` (and to `best.pt` first when `is_best`)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if is_best:
            save_checkpoint(state, self.best)
            self._link(self.best, self.last)
        else:
            save_checkpoint(state, self.last)
        return self.last

    def save_epoch(
        self, state: dict[str, Any], epoch: int, top1: float | None, *, is_best: bool = False
    ) -> Path:
        """Write the epoch checkpoint for `epoch` (1-based), `best.pt` when `is_best`, apply
        the policy, and write `last.pt` last; returns the epoch checkpoint's path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.epoch_file(epoch)
        entries = [e for e in self._index() if e["epoch"] != epoch] + [
            {"epoch": epoch, "file": path.name, "top1": top1}
        ]
        if self.policy == "top_k":
            ranked = sorted(
                entries,
                key=lambda e: (e["top1"] is not None, e["top1"] or 0.0, e["epoch"]),
                reverse=True,
            )
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
        atomic_write(
            self.index_path,
            lambda f: f.write(
                json.dumps(sorted(entries, key=lambda e: e["epoch"]), indent=1).encode()
            ),
        )

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
            raise FileRefused(
                f"could not write {path} ({e.strerror or e}); the previous file there, if any, is "
                "intact"
            ) from e
        fsync_directory(path.parent)


class RunLock:
    """An exclusive advisory lock on a run directory (`flock` on `.res2net.lock`, released by
    the operating system when the holder exits or dies, so it never goes stale). The file
    names the holder: process id, host and start time."""

    NAME = ".res2net.lock"

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / self.NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock at once, or raise a RuntimeError naming the run that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FileRefused(
                f"ckpt_save_dir {str(self.path.parent)!r} is in use by another run ({holder}); "
                "wait for it to finish or choose another --ckpt_save_dir"
            ) from None
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        holder = f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n"
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
