"""Terminal output shared by every layer: progress bars on a terminal that can show them, log
lines on one that reports no width (e.g. under `script`, where a bar would draw nothing)."""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger("res2net")

MIN_BAR_COLUMNS = 20  # narrower than this, a tqdm bar shows nothing useful


def terminal_columns() -> int | None:
    """The width of the terminal on stderr; 0 when it reports none; None when stderr is not a
    terminal (a pipe or a file)."""
    if not sys.stderr.isatty():
        return None
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 0


def can_show_bar() -> bool:
    """A progress bar can be drawn: stderr is a terminal of a known, usable width."""
    columns = terminal_columns()
    return columns is not None and columns >= MIN_BAR_COLUMNS


def progress_bar(
    iterable: Any,
    *,
    total: int | None = None,
    desc: str = "",
    enabled: bool = True,
    unit: str = "it",
) -> Any:
    """`iterable` wrapped in a tqdm bar when `enabled` and stderr is a terminal that can draw
    one (it disappears when done); on a terminal without a width, a log line at every tenth of
    `total`; `iterable` itself otherwise, so logs and pipes stay clean."""
    if not enabled or terminal_columns() is None:
        return iterable
    if not can_show_bar():
        return _logged(iterable, total=total, desc=desc, unit=unit)
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)


def _logged(iterable: Iterable[Any], *, total: int | None, desc: str, unit: str) -> Iterator[Any]:
    every = max(1, math.ceil(total / 10)) if total else 100
    for done, item in enumerate(iterable, start=1):
        yield item
        if done % every == 0 or done == total:
            log.info("%s: %s %d/%s", desc, unit, done, total if total else "?")
