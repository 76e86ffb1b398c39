"""Files that appear whole or not at all: write to a temporary file, fsync, rename."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(file)` on a new temporary file next to `path`, fsync it, rename it over
    `path`, then fsync the directory so that the rename itself survives a crash.

    Readers see the old file or the new one, never a partial one. On any failure the temporary
    file is removed and `path` is left as it was; write errors (OSError, or the RuntimeError that
    `torch.save` raises) come back as one OSError naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise OSError(f"could not write {path} ({reason}); the previous file there, if any, is intact") from e
        raise
    fsync_directory(path.parent)


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
