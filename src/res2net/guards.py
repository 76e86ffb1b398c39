"""Small guards that keep hostile input bounded (see the README's threat model).

- `open_regular_file` / `check_regular_file`: a file argument must be a regular file. A named
  pipe would block `open()` forever and `/dev/zero` would be read until memory runs out; the
  file is opened non-blocking and checked with `fstat`, so nothing waits and no race with a
  swapped file is possible.
- `check_output_file`: an output argument must name a file (new, or a regular file to
  replace; never a link, as `fileio` never writes through one), checked before the work whose
  result it receives, not after.
- `short`: values quoted in error messages are truncated, so that a hostile value (a YAML
  alias bomb, a megabyte-long name) cannot make the message itself the attack.
- `read_yaml`: a YAML file is read with a safe loader, after its size and its node count with
  every alias expanded are known to be small (no "billion laughs").
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

import yaml

from . import fileio
from .errors import ConfigError, FileRefused, MissingFile, Res2NetError
from .fileio import file_kind

# Seconds a network call may wait for a connection or for the next bytes.
NETWORK_TIMEOUT = 30.0

_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


def short(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to about `limit` characters, without building the full repr."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int beyond sys.get_int_max_str_digits()
        text = f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(text: str) -> str:
    """`text` as one printable line: a file or class name with a newline or control character
    (anyone can name a file so) is shown escaped, so that it cannot pass for another line of
    output or move the terminal's cursor."""
    return text if text.isprintable() else ascii(text)[1:-1]


def quoted(path: str | os.PathLike) -> str:
    """`path` in single quotes for a message, control characters escaped (see `printable`)."""
    return f"'{printable(os.fspath(path))}'"


class NotARegularFile(Res2NetError, FileNotFoundError, ValueError):
    """A path that names a directory, pipe, device or socket where a file was expected (a
    FileNotFoundError, as no such file exists there, and a ValueError, as the input is wrong)."""

    def __str__(self) -> str:
        return str(self.args[0])


def check_regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` as a Path when it is an existing regular file (symlinks followed); else
    FileNotFoundError or ValueError naming it. Never opens the file, so never blocks."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MissingFile(f"{what} {quoted(path)} does not exist") from None
    except OSError as e:
        raise ConfigError(f"{what} {quoted(path)} cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise NotARegularFile(f"{what} {quoted(path)} is {file_kind(mode)}, not a regular file")
    return path


def check_output_file(
    path: str | os.PathLike,
    what: str = "output file",
    *,
    keep: str | os.PathLike | None = None,
    kept: str = "the input",
) -> Path:
    """`path` as a Path when a file can be written there: nothing there yet, or a regular file
    to replace; ValueError naming it when it is a symbolic link, directory, pipe, device or
    socket, when a folder on its way is a file, or when it is the file `keep` (described as
    `kept`: e.g. the checkpoint the output is made from, which writing would destroy).

    The name itself is checked (`lstat`, as `fileio` writes it): a link there is refused now,
    before the work whose result it receives, not by the write at its end."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    except NotADirectoryError:
        raise ConfigError(
            f"{what} {quoted(path)} cannot be written: a folder on its path is a file"
        ) from None
    except OSError as e:
        raise ConfigError(f"{what} {quoted(path)} cannot be checked ({e.strerror or e})") from None
    if keep is not None and _same_file(path, keep):  # by any name: a link or a hard link too
        raise ConfigError(f"{what} {quoted(path)} is {kept}: write it elsewhere")
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{what} {quoted(path)} is {file_kind(mode)}: name a file to write")
    return path


def make_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """`folder` created with its parents if need be; FileRefused naming it when it cannot be
    (a file on its way, no permission)."""
    folder = Path(folder)
    try:
        return fileio.make_directory(folder)
    except FileRefused as e:
        raise FileRefused(f"{what} {quoted(folder)}: {e}") from None


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
            raise NotARegularFile(f"{what} {quoted(path)} is {file_kind(mode)}, not a regular file")
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
            raise ConfigError(
                f"{what} {quoted(path)} has {size} bytes, more than the {max_bytes} allowed"
            )
        return f.read(size if max_bytes is None else min(size, max_bytes) + 1)


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps an integer too long for int() as text, so that the code reading
    the value names its key, instead of failing without saying where."""

    def construct_yaml_int(self, node: Any) -> Any:
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            return self.construct_scalar(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def read_yaml(path: str, what: str, max_bytes: int, max_nodes: int) -> Any:
    """The document of YAML file `path`, read safely once it has at most `max_bytes` bytes and
    `max_nodes` nodes with aliases expanded; any problem is a ConfigError naming the file."""
    shown = printable(path)
    try:
        loader = _Loader(read_regular_file(path, what, max_bytes).decode("utf-8"))
        try:
            node = loader.get_single_node()
            if node is not None and _expanded_size(node, {}, max_nodes) > max_nodes:
                raise ConfigError(
                    f"{shown}: more than {max_nodes} values once its aliases (*name) are "
                    "expanded; a recipe is a flat list of keys"
                )
            return loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except FileNotFoundError as e:
        missing = "does not exist" in str(e)
        raise ConfigError(f"{what} not found: {shown}" if missing else str(e)) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{shown}: not UTF-8 text") from None
    except Res2NetError as e:
        raise ConfigError(str(e)) from None
    except ValueError as e:
        raise ConfigError(str(e) if path in str(e) else f"{shown}: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {shown}: {e.strerror or e}") from None
    except RecursionError:
        raise ConfigError(f"{shown}: nested too deeply; a recipe is a flat list of keys") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at = f"{shown}: line {mark.line + 1}" if mark is not None else shown
        problem = short(getattr(e, "problem", None) or str(e), 200).strip("'\"")
        if "python/" in problem:
            raise ConfigError(
                f"{at}: Python-specific YAML tags (like !!python/object) are not allowed in "
                "config files; write plain values"
            ) from None
        if isinstance(e, yaml.constructor.ConstructorError):
            raise ConfigError(f"{at}: unsupported YAML tag: {problem}") from None
        raise ConfigError(f"{at}: invalid YAML: {problem}") from None


def _expanded_size(node: yaml.Node, sizes: dict[int, int], most: int) -> int:
    """Nodes in `node` with every alias expanded, counted without expanding anything (each
    shared node is counted once per use from its memoized size); a cycle counts as too many."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = most + 1  # seen again before it is done: a cycle
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(child, sizes, most) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(
            _expanded_size(k, sizes, most) + _expanded_size(v, sizes, most) for k, v in node.value
        )
    sizes[id(node)] = min(total, most + 1)
    return sizes[id(node)]


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
