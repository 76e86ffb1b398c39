"""The project's error types. Each is bad input or a bad environment, never a bug: the command
line prints it as one line and exits 2. Any other exception is a genuine bug and keeps Python's
traceback. Each subclass is also the built-in type callers caught before (`ValueError`,
`OSError`), so `except ValueError` around the library keeps working."""

from __future__ import annotations


class Res2NetError(Exception):
    """Base of every error the project raises on purpose for bad input or environment."""


class ConfigError(Res2NetError, ValueError):
    """A recipe or flag problem, in one line that names the key (``.key``) when there is one."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class DataError(Res2NetError, ValueError):
    """A dataset that cannot be used as given: wrong folder layout or an unreadable image."""


class ImageTooLarge(DataError):
    """An image whose pixels, or the memory decoding it would take, pass a limit: judged from
    its header, before any pixel is decoded (`serve` answers 413)."""


class CheckpointError(Res2NetError, ValueError):
    """A weights file or source that cannot be read or does not fit the model; names the file."""


class FileRefused(Res2NetError, OSError):
    """A path the project will not read or write as asked (a link, a pipe, outside its folder)."""


class MissingFile(FileRefused, FileNotFoundError):
    """A file or folder the user named that does not exist (also a FileNotFoundError)."""
