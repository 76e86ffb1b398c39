"""Every file the project creates, replaces or deletes goes through this module.

The rules, the same for run folders, Hub folders, exports, reports and data it writes:

- a name is written only when nothing is there or a regular file is (checked with `lstat`,
  so a symbolic link, named pipe, directory or device planted at the name is refused in one
  line naming it, and never followed); the folder the user named may be a link, a subfolder
  the project chooses below it (`make_subdirectory`) may not;
- new files are opened with `O_CREAT | O_EXCL | O_NOFOLLOW`: a file appears whole or not at
  all (temporary file, fsync, rename over the name, fsync of the folder);
- a file changed in place (the run lock, the metrics log) must be a regular file with one
  link, so a hard link to a file elsewhere is refused rather than written through;
- a name the project reads before replacing it (an index, a checkpoint's header, a results
  table) is opened with `O_NOFOLLOW | O_NONBLOCK` and checked on the descriptor (`open_read`):
  a link is not followed, and a named pipe swapped in after any check cannot block the open;
- every output of a command is checked before the command's work (`check_target`,
  `check_below`), so that a refusal comes in seconds, not after the model was built;
- a file is deleted only by `remove`, which unlinks a regular file's name (never a link's
  target, never a folder), and callers delete only files they proved are theirs;
- a folder is never emptied to start over: `move_aside` moves the previous files to a sibling
  folder `<folder>.replaced-<time>`.

Written here, not taken from a library, because no well-kept package offers refusing links at
the final name together with the atomic replace (`atomicwrites` is unmaintained and follows
links; `os.replace` alone cannot tell a planted link from a file).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

from .errors import FileRefused

# `.NAME.PID.HEX.tmp`: a temporary file of `atomic_write` (or `temporary_path`) for NAME
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages ("a symbolic link", "a named pipe"...)."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _refuse(path: Path, what: str) -> FileRefused:
    return FileRefused(
        f"'{path}' is {what}: the project writes only new names or regular files it can "
        "replace; move it away or choose another path"
    )


def check_target(path: str | os.PathLike) -> Path:
    """`path` when a file may be written there: nothing at the name, or a regular file (the
    name itself, not a link's target); else FileRefused naming it."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    except NotADirectoryError:
        raise FileRefused(f"'{path}' cannot be written: a folder on its path is a file") from None
    except OSError as e:
        raise FileRefused(f"'{path}' cannot be checked ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise _refuse(path, file_kind(mode))
    return path


def make_directory(path: str | os.PathLike) -> Path:
    """Create the folder `path` (and its parents) unless it exists; a link to a folder the
    user made is fine. FileRefused naming it when something else is there or it cannot be
    created."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # something else is there: named below
        pass
    except OSError as e:
        raise FileRefused(f"folder '{path}' cannot be created ({e.strerror or e})") from None
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise FileRefused(f"folder '{path}' cannot be used ({e.strerror or e})") from None
    if not stat.S_ISDIR(mode):
        raise FileRefused(f"'{path}' is {file_kind(mode)}, not a folder: choose another path")
    return path


def make_subdirectory(root: str | os.PathLike, relative: str | os.PathLike) -> Path:
    """Create the folder `root / relative` and return it: `root` (the folder the user named)
    as `make_directory` does, a link included; every component of `relative` (a name the
    project chose below it) created or checked with `lstat`, so that a link, file or pipe
    planted there is refused in one line naming it (FileRefused), never followed."""
    path = make_directory(root)
    parts = Path(relative).parts
    if Path(relative).is_absolute() or ".." in parts:
        raise FileRefused(f"'{relative}' is not a folder name below '{root}'")
    for part in parts:
        path = path / part
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        except OSError as e:
            raise FileRefused(f"folder '{path}' cannot be created ({e.strerror or e})") from None
        try:
            mode = os.lstat(path).st_mode
        except OSError as e:
            raise FileRefused(f"folder '{path}' cannot be used ({e.strerror or e})") from None
        _require_folder(path, mode)
    return path


def _require_folder(path: Path, mode: int) -> None:
    """Refuse what `lstat` found at a folder's name unless it is a folder (never a link)."""
    if not stat.S_ISDIR(mode):
        raise FileRefused(
            f"'{path}' is {file_kind(mode)}, not a folder: the project never writes through "
            "it; move it away or choose another output folder"
        )


def new_directory(parent: str | os.PathLike, name: str) -> Path:
    """Create a new, empty folder `name` in `parent` (or `name-2`, `name-3`, ... when taken):
    nothing planted can be inside it, so a library may write there by its own names."""
    make_directory(parent)
    for n in range(1, 1000):
        path = Path(parent) / (name if n == 1 else f"{name}-{n}")
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        except OSError as e:
            raise FileRefused(f"folder '{path}' cannot be created ({e.strerror or e})") from None
        return path
    raise FileRefused(f"no free folder name for '{Path(parent) / name}'")


def temporary_path(path: str | os.PathLike) -> Path:
    """A fresh name next to `path` for a file that will be renamed to `path`; it names the
    writing process, so that `remove_stale_temporaries` can tell a killed write from a live one."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _nofollow(name: str, flags: int) -> int:
    return os.open(name, flags | _NOFOLLOW | _CLOEXEC, 0o644)


def _create_exclusive(path: Path) -> BinaryIO:
    """The new regular file `path` open for writing (`O_CREAT | O_EXCL | O_NOFOLLOW`: never a
    link's target, never an existing file)."""
    return open(path, "xb", opener=_nofollow)


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
        if match is None:
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _process_exists(pid):
            continue
        if remove(entry):
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


def _replace(tmp: Path, path: Path) -> None:
    """Rename `tmp` over `path` after checking, with `lstat`, what is there."""
    check_target(path)
    os.replace(tmp, path)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(file)` on a new temporary file next to `path`, fsync it, rename it over
    `path`, then fsync the directory so that the rename itself survives a crash.

    Readers see the old file or the new one, never a partial one. A link, pipe or folder at
    `path` is refused (FileRefused) before anything is written. On any failure the temporary
    file is removed and `path` is left as it was; write errors (OSError, or the RuntimeError that
    `torch.save` raises) come back as one OSError naming `path`."""
    path = check_target(path)
    tmp = temporary_path(path)
    try:
        with _create_exclusive(tmp) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException as e:
        full = isinstance(e, RuntimeError) and _disk_full(tmp.parent)  # torch.save hides ENOSPC
        _discard(tmp)
        if isinstance(e, FileRefused):
            raise
        if isinstance(e, (OSError, RuntimeError)):
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if full:
                reason = f"{os.strerror(errno.ENOSPC)}; {reason}"
            raise FileRefused(
                f"could not write {path} ({reason}); the previous file there, if any, is intact"
            ) from e
        raise
    fsync_directory(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`atomic_write` of `data`."""
    atomic_write(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write` of `text` as UTF-8."""
    write_bytes(path, text.encode("utf-8"))


def atomic_link(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Atomically give `path` the bytes of `source` (a file this project just wrote): a hard
    link where the filesystem has them (no space, no time), else a copy."""
    path = check_target(path)
    tmp = temporary_path(path)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            with open(source, "rb") as src, _create_exclusive(tmp) as dst:
                shutil.copyfileobj(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
        _replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        if isinstance(e, FileRefused):
            raise
        raise FileRefused(
            f"could not write {path} ({e.strerror or e}); the previous file there, if any, is "
            "intact"
        ) from e
    fsync_directory(path.parent)


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """For libraries that write by file name (ONNX, image savers): yield a new, empty
    temporary file next to `path` (created here, exclusively, so the name is ours), and rename
    it over `path` when the block succeeds. A failed block leaves `path` as it was."""
    path = check_target(path)
    tmp = temporary_path(path)
    _create_exclusive(tmp).close()
    try:
        yield tmp
        _replace(tmp, path)
    finally:
        _discard(tmp)
    fsync_directory(path.parent)


def open_new(path: str | os.PathLike) -> BinaryIO:
    """`path`, a name where nothing is yet, opened as a new file for binary writing (for a
    stream written piece by piece and then `rename_into` its final name)."""
    path = Path(path)
    try:
        return _create_exclusive(path)
    except FileExistsError:
        raise _refuse(path, "taken") from None


def rename_into(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the file `source` (written by this process) over `path`, after checking that
    nothing or a regular file is there; fsync the folder."""
    path = Path(path)
    _replace(Path(source), path)
    fsync_directory(path.parent)


def private_directory(parent: str | os.PathLike, prefix: str) -> Path:
    """A new folder only this user can enter (`tempfile.mkdtemp`) in `parent`: files written
    inside it by name cannot meet anything planted; `publish_directory` renames it into place."""
    make_directory(parent)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def publish_directory(source: Path, path: str | os.PathLike) -> None:
    """Rename the folder `source` (from `private_directory`) to `path`, where nothing or an
    empty folder is (never a link)."""
    path = Path(path)
    if os.path.islink(path):
        raise _refuse(path, "a symbolic link")
    if path.is_dir():
        path.rmdir()  # empty, else OSError: rename cannot replace it everywhere
    os.rename(source, path)
    fsync_directory(path.parent)


def remove_private_directory(path: Path) -> None:
    """Delete a folder `private_directory` made, with what this process wrote in it."""
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def scratch_directory(
    parent: str | os.PathLike | None = None, prefix: str = ".res2net."
) -> Iterator[Path]:
    """A `private_directory` in `parent` (the system's temporary folder when None) for the
    block, deleted after it: where libraries that write by their own names put their files."""
    path = private_directory(tempfile.gettempdir() if parent is None else parent, prefix)
    try:
        yield path
    finally:
        remove_private_directory(path)


def check_in_place(path: str | os.PathLike) -> Path:
    """`path` when a library may write it by name in place: nothing there, or a regular file
    with one link (checked with `lstat`; a library writing by name gets no descriptor)."""
    path = check_target(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if st.st_nlink > 1:
        raise _refuse(path, "a file with another name (a hard link)")
    return path


def _open_in_place(path: Path, flags: int) -> int:
    """A descriptor of `path` opened with `flags | O_CREAT | O_NOFOLLOW`, refused unless it is
    a regular file with a single link (a hard link would carry the write to another name)."""
    try:
        fd = os.open(path, flags | os.O_CREAT | _NOFOLLOW | _NONBLOCK | _CLOEXEC, 0o644)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR, errno.EMLINK):
            check_target(path)  # names what is there
        raise FileRefused(f"'{path}' cannot be opened ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, file_kind(st.st_mode))
        if st.st_nlink > 1:
            raise _refuse(path, "a file with another name (a hard link)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_read(path: str | os.PathLike) -> BinaryIO:
    """The regular file at the name `path` opened for binary reading: for a name the project
    reads and then replaces (an index, a header, a results table), where a link or pipe planted
    there must neither be followed nor block. Opened with `O_NOFOLLOW | O_NONBLOCK`, then checked
    on the descriptor (`fstat`), so a file swapped in after any earlier check is caught too.
    FileNotFoundError when nothing is there; FileRefused naming it for anything but a regular
    file."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR, errno.EMLINK):
            check_target(path)  # names what is there
        raise FileRefused(f"'{path}' cannot be opened ({e.strerror or e})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _refuse(path, file_kind(mode))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_existing(path: str | os.PathLike, max_bytes: int) -> bytes | None:
    """The bytes of the regular file at the name `path` (`open_read`: never through a link,
    never blocking), None when nothing is there; FileRefused naming it when it is something
    else or holds more than `max_bytes`."""
    try:
        f = open_read(path)
    except FileNotFoundError:
        return None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise FileRefused(
                f"'{path}' has {size} bytes, more than the {max_bytes} expected there: move it "
                "away or choose another path"
            )
        return f.read(max_bytes + 1)[:max_bytes]


def check_below(
    root: str | os.PathLike, relative: str | os.PathLike, *, folder: bool = False
) -> Path:
    """`root / relative` when a file may later be written there by `make_subdirectory(root,
    relative.parent)` and `atomic_write` (with `folder`: when `make_subdirectory(root,
    relative)` may make it): each name of `relative` that exists is a folder (`lstat`: not a
    link), and its last name, for a file, is nothing or a regular file. Creates nothing: for
    checking every output of a command before its work. FileRefused naming the first name
    that is not so."""
    relative = Path(relative)
    if relative.is_absolute() or ".." in relative.parts:
        raise FileRefused(f"'{relative}' is not a name below '{root}'")
    path = Path(root)
    for part in relative.parts if folder else relative.parts[:-1]:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return Path(root) / relative  # made new, below the folders checked here
        except OSError as e:
            raise FileRefused(f"folder '{path}' cannot be used ({e.strerror or e})") from None
        _require_folder(path, mode)
    return path if folder else check_target(Path(root) / relative)


def open_lock(path: str | os.PathLike) -> int:
    """A read-write descriptor of the lock file `path` (created when missing), never through
    a link."""
    return _open_in_place(Path(path), os.O_RDWR)


def open_append(path: str | os.PathLike) -> TextIO:
    """`path` opened for appending text (created when missing), never through a link."""
    return os.fdopen(_open_in_place(Path(path), os.O_WRONLY | os.O_APPEND), "a", encoding="utf-8")


def remove(path: str | os.PathLike) -> bool:
    """Unlink the regular file `path` (its name only); False when nothing or something else
    is there. Callers decide first that the file is theirs to delete."""
    path = Path(path)
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _discard(tmp: Path) -> None:
    """Remove a temporary file of this process, if still there."""
    with contextlib.suppress(OSError):
        remove(tmp)


def move_aside(directory: str | os.PathLike, names: list[str]) -> Path | None:
    """Move the entries `names` of `directory` (files, links or folders: moved, never opened)
    into a new sibling folder `<directory>.replaced-<UTC time>`; return it (None when none of
    the names is there). Nothing is deleted: the previous files stay readable there."""
    directory = Path(directory)
    present = [n for n in names if os.path.lexists(directory / n)]
    if not present:
        return None
    real = directory.resolve()  # a link the user made: next to the folder it names
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    aside = new_directory(real.parent, f"{real.name}.replaced-{stamp}")
    for name in present:
        os.rename(directory / name, aside / name)
    fsync_directory(aside)
    fsync_directory(directory)
    return aside


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
