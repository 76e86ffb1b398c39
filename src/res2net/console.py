"""Terminal output shared by every layer: progress bars that only appear on a terminal."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(
    iterable: Any,
    *,
    total: int | None = None,
    desc: str = "",
    enabled: bool = True,
    unit: str = "it",
) -> Any:
    """`iterable` wrapped in a tqdm bar when `enabled` and stderr is a terminal (it disappears
    when done); `iterable` itself otherwise, so logs and pipes stay clean."""
    if not (enabled and sys.stderr.isatty()):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
