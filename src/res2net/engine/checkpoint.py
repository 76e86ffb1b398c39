"""Training checkpoints: written atomically, rotated by MindCV's policies, found again on resume.

Layout of `ckpt_save_dir`:
- `last.pt`: the newest resumable state (written at every save and on SIGTERM/Ctrl-C);
- `<model>-<epoch>.pt`: per-epoch checkpoints, at most `keep_checkpoint_max` of them, kept by
  `ckpt_save_policy` (`latest_k`: the newest; `top_k`: the best validation top-1);
- `best.pt`: the checkpoint with the best validation top-1 so far;
- `checkpoints.json`: the index of epoch checkpoints and their metrics.
Every file appears whole or not at all: written through `res2net.fileio` (temporary file,
fsync, rename; never through a link). `last.pt` is written last: a process killed while saving
leaves the previous `last.pt`, and the resumed run redoes the epoch and writes the same files
again.

Deleting needs proof. Each run has a random id (`run_id`), made when a run starts in an empty
folder and carried on by every resume; every checkpoint holds it in its header, and every
index entry names it. Rotation, and `CheckpointManager.reconcile` at the next start, delete
only epoch files whose own header names this run. A missing, empty or damaged index is rebuilt
from the epoch files' headers, so losing it never loses a checkpoint.

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
import secrets
import socket
import stat
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .. import fileio
from ..errors import CheckpointError, FileRefused
from ..guards import short
from ..weights import torchfile

log = logging.getLogger(__name__)

FORMAT = "res2net-train"
MAX_INDEX_BYTES = 1 << 20
# The most `checkpoint_header` reads of a checkpoint: its zip directory and pickle record (a
# training state's is tens to hundreds of KB), never its tensors.
MAX_HEADER_BYTES = 16 << 20
# what a run writes in its folder besides the epoch files (`.res2net.lock` stays: it is held)
RUN_FILES = ("last.pt", "best.pt", "checkpoints.json", "metrics.jsonl", "training.png")
TENSORBOARD = "tensorboard"


def new_run_id() -> str:
    """A random id for a new run: what proves that a checkpoint is this run's to delete."""
    return secrets.token_hex(8)


def epoch_file_name(prefix: str, epoch: int) -> str:
    """The name of the per-epoch checkpoint `CheckpointManager` writes."""
    return f"{prefix}-{epoch:03d}.pt"


def deletable_checkpoint(directory: str | Path, name: Any, prefix: str) -> Path | None:
    """The path rotation may consider deleting for an index entry's `name`, or None.

    Only a plain name of the form `epoch_file_name` gives (`<prefix>-<epoch>.pt`, no directory
    part) that is a regular file, not a link, in `directory` itself qualifies. `checkpoints.json`
    is a file anyone may have planted, so whatever else it lists (absolute paths, `../`, other
    names) is never deleted; the file's own header must still name the run (see
    `CheckpointManager`)."""
    if not isinstance(name, str) or not re.fullmatch(re.escape(prefix) + r"-\d{3,9}\.pt", name):
        return None
    path = Path(directory) / name
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    return path if stat.S_ISREG(mode) else None


def save_checkpoint(state: dict[str, Any], path: Path, **header: Any) -> None:
    """Atomically `torch.save` a training state, tagged with this project's format and the
    `header` entries (`run_id`; for an epoch file `epoch_file`, its name, and `epoch_top1`)."""
    fileio.atomic_write(path, lambda f: torch.save({"format": FORMAT, **header, **state}, f))


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


def checkpoint_header(path: Path) -> dict[str, Any] | None:
    """The run id, epoch and epoch top-1 a training checkpoint records about itself, or None
    when `path` is not a regular file holding a training checkpoint whose header reads.

    Only the header is read: the zip directory and the pickle record (`data.pkl`, where
    `torch.save` puts everything but the tensors' bytes), within `MAX_HEADER_BYTES`, replayed by
    `torchfile`'s non-executing scanner. Rotation reads the header of every epoch file, each
    hundreds of MB. The file is opened at its name (`fileio.open_read`: never through a link,
    never blocked by a named pipe)."""
    try:
        with fileio.open_read(path) as f:
            state = _read_pickle_record(_BoundedReader(f, MAX_HEADER_BYTES))
    except Exception:  # a foreign, damaged or odd file fails in many ways: None keeps it
        return None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return None
    return _header_of(state)


def _header_of(state: dict[str, Any]) -> dict[str, Any]:
    return {k: state.get(k) for k in ("run_id", "epoch", "epoch_file", "epoch_top1")}


def _read_pickle_record(f: _BoundedReader) -> Any:
    """The object in the `data.pkl` record of the `torch.save` archive `f`, tensors replaced by
    shape-only stand-ins: nothing is executed and no tensor's bytes are read."""
    archive = zipfile.ZipFile(f)
    records = {r.filename: r for r in archive.infolist()}
    pickles = [r for r in records.values() if re.fullmatch(r"[^/]+/data\.pkl", r.filename)]
    if len(pickles) != 1 or pickles[0].compress_type != zipfile.ZIP_STORED:
        raise CheckpointError("not an archive torch.save wrote")
    prefix = pickles[0].filename[: -len("data.pkl")]

    def storage_bytes(key: str, nbytes: int) -> None:
        record = records.get(f"{prefix}data/{key}")
        if record is None or record.file_size != nbytes:
            raise CheckpointError(f"storage {key[:40]!r} has no record of its size")

    return torchfile.replay(archive.read(pickles[0]), storage_bytes)


class _BoundedReader:
    """The reads `zipfile` makes of a file, refused (OSError) past `budget` bytes in all."""

    def __init__(self, f: BinaryIO, budget: int) -> None:
        self.f, self.left = f, budget
        self.size = os.fstat(f.fileno()).st_size

    def read(self, n: int | None = -1) -> bytes:
        rest = max(0, self.size - self.f.tell())
        n = rest if n is None or n < 0 else min(n, rest)
        if n > self.left:
            raise OSError("the checkpoint's header is larger than expected")
        self.left -= n
        return self.f.read(n)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def seekable(self) -> bool:
        return True


class CheckpointManager:
    """Writes and rotates the checkpoints of one run in `directory` (see the module docstring).
    `run_id` is the run's id (`new_run_id`, or `find_run_id` on resume): without it, nothing is
    ever deleted."""

    def __init__(
        self,
        directory: str | Path,
        *,
        prefix: str,
        keep_max: int = 10,
        policy: str | None = "latest_k",
        run_id: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.prefix = prefix
        self.keep_max = keep_max
        self.policy = policy
        self.run_id = run_id
        self.index_path = self.directory / "checkpoints.json"
        self._headers: dict[tuple[str, int, int, int], dict[str, Any] | None] = {}

    def check_writable(self) -> None:
        """Fail before training starts if the directory cannot be created or written."""
        try:
            fileio.make_directory(self.directory)
            probe = fileio.temporary_path(self.directory / "write-test")
            fileio.open_new(probe).close()
            fileio.remove(probe)
        except OSError as e:
            reason = e.strerror or str(e).split(" (", 1)[-1].rstrip(")")
            raise FileRefused(
                f"ckpt_save_dir {str(self.directory)!r} is not writable ({reason}); "
                "choose another with --ckpt_save_dir"
            ) from None

    def check_names(self, epochs: int) -> None:
        """FileRefused, naming it, when a name this run will write (its files, the epoch files
        of `epochs` epochs, the TensorBoard folder) holds a link, pipe, folder or hard-linked
        file: before any work, rather than at the end of an epoch."""
        names = [*RUN_FILES, RunLock.NAME]
        names += [epoch_file_name(self.prefix, e) for e in range(1, epochs + 1)]
        for name in names:
            fileio.check_target(self.directory / name)
        for name in ("metrics.jsonl", RunLock.NAME):  # written in place
            fileio.check_in_place(self.directory / name)
        board = self.directory / TENSORBOARD
        if os.path.lexists(board) and not board.is_dir() or board.is_symlink():
            raise fileio.FileRefused(
                f"'{board}' is not a folder of this run (a link or a file): move it away or "
                "choose another --ckpt_save_dir"
            )

    def check_epoch_files(self, epochs: int) -> None:
        """FileRefused when a file at the name of an epoch checkpoint this run has yet to
        write (after `last.pt`'s epoch, up to `epochs`) is not this run's: writing the epoch
        would replace it."""
        header = self._header(self.last)
        done = header["epoch"] if header is not None and type(header["epoch"]) is int else 0
        for path in self.epoch_files():
            epoch = int(path.name[len(self.prefix) + 1 : -3])
            if done < epoch <= epochs and not self._names_this_run(self._header(path), path):
                raise fileio.FileRefused(
                    f"'{path}' is not a checkpoint of this run, and epoch {epoch} would replace "
                    "it: move it away or choose another --ckpt_save_dir"
                )

    def remove_stale_files(self) -> list[Path]:
        """Remove the temporary files of writes that a killed process never finished."""
        return fileio.remove_stale_temporaries(self.directory)

    def epoch_file(self, epoch: int) -> Path:
        return self.directory / epoch_file_name(self.prefix, epoch)

    def epoch_files(self) -> list[Path]:
        """The names of this run's epoch-checkpoint form (`<model>-<epoch>.pt`) in the
        directory, whatever they are (files, links, folders)."""
        pattern = re.compile(re.escape(self.prefix) + r"-\d{3,}\.pt")
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if pattern.fullmatch(p.name))

    def run_files(self) -> list[Path]:
        """What a run of this project leaves here (what a fresh run would replace): its
        files, epoch files and TensorBoard folder, whatever is at those names."""
        names = (*RUN_FILES, TENSORBOARD)
        present = [p for p in (self.directory / n for n in names) if os.path.lexists(p)]
        return present + self.epoch_files()

    def holds_last(self) -> bool:
        """Whether `last.pt` is a regular file (not a link, folder or pipe): what `read_last`
        reads."""
        return self._last_stat() is not None

    def _last_stat(self) -> os.stat_result | None:
        """`last.pt`'s own status when it is a regular file, else None."""
        try:
            st = os.lstat(self.last)
        except OSError:
            return None
        return st if stat.S_ISREG(st.st_mode) else None

    def read_last(self) -> dict[str, Any] | None:
        """The training state in `last.pt` (None when no regular file is there), read once:
        its header is kept, so `find_run_id` and `check_epoch_files` do not read it again, and
        the caller resumes from the state itself. A damaged or foreign `last.pt` raises
        CheckpointError naming it."""
        st = self._last_stat()
        if st is None:
            return None
        state = load_training_state(self.last)
        self._headers[self._header_key(self.last, st)] = _header_of(state)
        return state

    def find_run_id(self) -> str | None:
        """The id of the run that `last.pt`'s header names (the commit point, which a resume
        continues); None without one. Never taken from the index: a run without `last.pt`
        cannot be continued, so a new run there is a fresh one."""
        header = self._header(self.last)
        run = header["run_id"] if header is not None else None
        return run if isinstance(run, str) and run else None

    def reconcile(self) -> list[Path]:
        """Make the directory agree with its index before any training: remove temporary
        files of killed writes, rebuild the index from the epoch files whose headers name this
        run (a missing, empty or damaged index loses nothing), and apply the rotation policy to
        them (an epoch file left by a kill between the index's rename and the rotation's
        deletes goes now). Returns the removed paths."""
        removed = self.remove_stale_files()
        if self.run_id is None:
            return removed
        index = self._index()
        if index is None:
            log.warning("%s is damaged: rebuilt from the checkpoints' headers", self.index_path)
        listed = {
            e["epoch"]: e
            for e in index or []
            if e.get("run") == self.run_id
            and deletable_checkpoint(self.directory, e["file"], self.prefix)
        }
        for path in self.epoch_files():
            epoch = int(path.name[len(self.prefix) + 1 : -3])
            if epoch in listed:
                continue
            header = self._header(path)
            if header is not None and self._names_this_run(header, path):
                listed[epoch] = self._entry(epoch, header["epoch_top1"])
        keep, drop = self._rank(list(listed.values()))
        for e in drop:
            if self._delete_if_ours(e["epoch"]):
                removed.append(self.epoch_file(e["epoch"]))
        if index != sorted(keep, key=lambda e: e["epoch"]):
            self._write_index(keep)
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

    def _entry(self, epoch: int, top1: Any) -> dict[str, Any]:
        top1 = top1 if type(top1) in (int, float) else None
        return {
            "epoch": epoch,
            "file": self.epoch_file(epoch).name,
            "top1": top1,
            "run": self.run_id,
        }

    def _index(self) -> list[dict[str, Any]] | None:
        """The entries of `checkpoints.json` ([] when there is none), or None when it is not an
        index this class wrote (then it is rebuilt from the checkpoints' headers)."""
        try:
            text = fileio.read_existing(self.index_path, MAX_INDEX_BYTES)  # never through a link
            if text is None:
                return []
            entries = json.loads(text)
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
            log.warning("%s: not readable (%s)", self.index_path, short(str(e), 120))
            return None
        if not isinstance(entries, list):
            return None
        for entry in entries:
            ok = (
                isinstance(entry, dict)
                and type(entry.get("epoch")) is int
                and entry.get("file") == self.epoch_file(entry["epoch"]).name
                and (entry.get("top1") is None or type(entry.get("top1")) in (int, float))
                and isinstance(entry.get("run", ""), str)
            )
            if not ok:
                return None
        return entries

    def _rank(
        self, entries: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The entries the policy keeps and those it drops."""
        if self.policy == "top_k":
            ranked = sorted(
                entries,
                key=lambda e: (e["top1"] is not None, e["top1"] or 0.0, e["epoch"]),
                reverse=True,
            )
        else:
            ranked = sorted(entries, key=lambda e: e["epoch"], reverse=True)
        return ranked[: self.keep_max], ranked[self.keep_max :]

    def _header(self, path: Path) -> dict[str, Any] | None:
        """`checkpoint_header(path)`, read once per file version (checkpoints are large)."""
        try:
            st = os.lstat(path)
        except OSError:
            return None
        key = self._header_key(path, st)
        if key not in self._headers:
            self._headers[key] = checkpoint_header(path)
        return self._headers[key]

    @staticmethod
    def _header_key(path: Path, st: os.stat_result) -> tuple[str, int, int, int]:
        """One version of a file: its name, inode, modification time and size."""
        return (path.name, st.st_ino, st.st_mtime_ns, st.st_size)

    def _names_this_run(self, header: dict[str, Any] | None, path: Path) -> bool:
        """Whether a checkpoint's header says it is this run's epoch file `path`."""
        return (
            header is not None
            and self.run_id is not None
            and header["run_id"] == self.run_id
            and header["epoch_file"] == path.name
        )

    def _delete_if_ours(self, epoch: int) -> bool:
        """Delete the epoch file of `epoch` when its own header names this run and epoch."""
        path = deletable_checkpoint(self.directory, self.epoch_file(epoch).name, self.prefix)
        if path is None or self.run_id is None:
            return False
        if not self._names_this_run(self._header(path), path):
            log.info("kept %s: its header does not name this run", path)
            return False
        return fileio.remove(path)

    def save_last(self, state: dict[str, Any], *, is_best: bool = False) -> Path:
        """Write the resumable state to `last.pt` (and to `best.pt` first when `is_best`)."""
        fileio.make_directory(self.directory)
        if is_best:
            save_checkpoint(state, self.best, run_id=self.run_id)
            fileio.atomic_link(self.best, self.last)
        else:
            save_checkpoint(state, self.last, run_id=self.run_id)
        return self.last

    def save_epoch(
        self, state: dict[str, Any], epoch: int, top1: float | None, *, is_best: bool = False
    ) -> Path:
        """Write the epoch checkpoint for `epoch` (1-based), `best.pt` when `is_best`, apply
        the policy, and write `last.pt` last; returns the epoch checkpoint's path."""
        fileio.make_directory(self.directory)
        path = self.epoch_file(epoch)
        index = self._index() or []
        entries = [e for e in index if e["epoch"] != epoch and e.get("run") == self.run_id]
        keep, drop = self._rank([*entries, self._entry(epoch, top1)])
        kept = any(e["epoch"] == epoch for e in keep)  # else the policy wants no epoch file
        if kept:
            save_checkpoint(state, path, run_id=self.run_id, epoch_file=path.name, epoch_top1=top1)
            if is_best:
                fileio.atomic_link(path, self.best)
        self._write_index(keep)
        for e in drop:
            if e["epoch"] != epoch:
                self._delete_if_ours(e["epoch"])
        if kept:
            fileio.atomic_link(path, self.last)
        else:
            self.save_last(state, is_best=is_best)
        return path

    def _write_index(self, entries: list[dict[str, Any]]) -> None:
        text = json.dumps(sorted(entries, key=lambda e: e["epoch"]), indent=1)
        fileio.write_bytes(self.index_path, text.encode())


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
        fd = fileio.open_lock(self.path)
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
