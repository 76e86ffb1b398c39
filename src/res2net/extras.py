"""Optional dependencies: import one, or fail in one line naming the extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import Res2NetError


class MissingExtra(Res2NetError, ImportError):
    """An optional package is missing; the message names the `pip install` line."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """`import module`, or raise MissingExtra naming `what` and `pip install 'res2net[extra]'`."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != module.split(".")[0]:
            raise  # the package is there but broken: a genuine error, keep its traceback
        raise MissingExtra(
            f"{what} needs the {module.split('.')[0]} package: pip install 'res2net[{extra}]'"
        ) from None
