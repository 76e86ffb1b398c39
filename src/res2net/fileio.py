"""Files that appear whole or not at all: write to a temporary file, fsync, rename."""

from __future__ import annotations

import errno
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import FileRefused

# `.NAME.PID.HEX.tmp`: a temporary file of `atomic_write` (or `temporary_path`) for NAME
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")


def temporary_path(path: str | os.PathLike) -> Path:
    """A fresh name next to `path` for a file that will be renamed to `path`; it names the
    writing process, so that `remove_stale_temporaries` can tell a killed write from a live one."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files in `directory` that a killed process left behind (its write
    never finished, so the file it was replacing is intact); return their paths.

    A temporary file counts as stale when the process that wrote it no longer exists, or when
    it carries this process's own id (a previous process with the same id, e.g. after a
    container restart: this process has no write under way when it calls this). Files of live
    processes are left alone; readers never look at temporary files anyway."""
    removed: list[Path] = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or not entry.is_file() or entry.is_symlink():
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _process_exists(pid):
            continue
        try:
            entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


def _process_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):  # no such process id on this system
        return False
    return True


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(file)` on a new temporary file next to `path`, fsync it, rename it over
    `path`, then fsync the directory so that the rename itself survives a crash.

    Readers see the old file or the new one, never a partial one. On any failure the temporary
    file is removed and `path` is left as it was; write errors (OSError, or the RuntimeError that
    `torch.save` raises) come back as one OSError naming `path`."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = isinstance(e, RuntimeError) and _disk_full(tmp.parent)  # torch.save hides ENOSPC
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if full:
                reason = f"{os.strerror(errno.ENOSPC)}; {reason}"
            raise FileRefused(
                f"could not write {path} ({reason}); the previous file there, if any, is intact"
            ) from e
        raise
    fsync_directory(path.parent)


def _disk_full(directory: Path) -> bool:
    """Whether the filesystem of `directory` has (next to) no space left."""
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make renames and creations in `directory` durable, where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, where directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
