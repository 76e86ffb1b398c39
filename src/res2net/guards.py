"""Small guards that keep hostile input bounded (see the README's threat model).

- `open_regular_file` / `check_regular_file`: a file argument must be a regular file. A named
  pipe would block `open()` forever and `/dev/zero` would be read until memory runs out; the
  file is opened non-blocking and checked with `fstat`, so nothing waits and no race with a
  swapped file is possible.
- `check_output_file`: an output argument must name a file (new, or a regular file to
  replace), checked before the work whose result it receives, not after.
- `short`: values quoted in error messages are truncated, so that a hostile value (a YAML
  alias bomb, a megabyte-long name) cannot make the message itself the attack.
- `interruptible`: SIGTERM and Ctrl-C raise at once inside a network wait, even where the
  training loop has turned them into a "stop at the next step" flag.
"""

from __future__ import annotations

import contextlib
import io
import os
import reprlib
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import Res2NetError

# Seconds a network call may wait for a connection or for the next bytes.
NETWORK_TIMEOUT = 30.0

_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


def short(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to about `limit` characters, without building the full repr."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(text: str) -> str:
    """`text` as one printable line: a file or class name with a newline or control character
    (anyone can name a file so) is shown escaped, so that it cannot pass for another line of
    output or move the terminal's cursor."""
    return text if text.isprintable() else ascii(text)[1:-1]


class NotARegularFile(Res2NetError, FileNotFoundError, ValueError):
    """A path that names a directory, pipe, device or socket where a file was expected (a
    FileNotFoundError, as no such file exists there, and a ValueError, as the input is wrong)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` as a Path when it is an existing regular file (symlinks followed); else
    FileNotFoundError or ValueError naming it. Never opens the file, so never blocks."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} '{path}' does not exist") from None
    except OSError as e:
        raise ValueError(f"{what} '{path}' cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise NotARegularFile(f"{what} '{path}' is {_kind(mode)}, not a regular file")
    return path


def check_output_file(
    path: str | os.PathLike,
    what: str = "output file",
    *,
    keep: str | os.PathLike | None = None,
    kept: str = "the input",
) -> Path:
    """`path` as a Path when a file can be written there: nothing there yet, or a regular file
    to replace; ValueError naming it when it is a directory, pipe, device or socket, when a
    folder on its way is a file, or when it is the file `keep` (described as `kept`: e.g. the
    checkpoint the output is made from, which writing would destroy)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return path
    except NotADirectoryError:
        raise ValueError(
            f"{what} '{path}' cannot be written: a folder on its path is a file"
        ) from None
    except OSError as e:
        raise ValueError(f"{what} '{path}' cannot be checked ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what} '{path}' is {_kind(mode)}: name a file to write")
    if keep is not None and _same_file(path, keep):
        raise ValueError(f"{what} '{path}' is {kept}: write it elsewhere")
    return path


def _same_file(a: Path, b: str | os.PathLike) -> bool:
    """Whether `a` and `b` are one file (through links too); False when `b` does not exist."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def open_regular_file(path: str | os.PathLike, what: str = "file") -> io.BufferedReader:
    """Open `path` for binary reading, refusing anything but a regular file (checked on the
    open descriptor, so a file swapped after a check is caught too)."""
    check_regular_file(path, what)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(f"{what} '{path}' is {_kind(mode)}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(
    path: str | os.PathLike, what: str = "file", max_bytes: int | None = None
) -> bytes:
    """The bytes of regular file `path`; ValueError naming it when larger than `max_bytes`."""
    with open_regular_file(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise ValueError(f"{what} '{path}' has {size} bytes, more than the {max_bytes} allowed")
        return f.read(size if max_bytes is None else min(size, max_bytes) + 1)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise KeyboardInterrupt at once (interrupting a
    blocked read or connect); the previous handlers come back afterwards. Outside the main
    thread, where handlers cannot be set, it does nothing."""

    def handle(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"interrupted by signal {signal.Signals(signum).name}")

    previous: dict[signal.Signals, Any] = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handle)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
