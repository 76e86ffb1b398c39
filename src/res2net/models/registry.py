"""Model names -> architectures. A name is the whole interface: `build_model("res2net50")`.

Official/timm names are canonical; MindCV's names are aliases of them.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any

from ..errors import ConfigError
from .base import Res2NetBase
from .dla import DLA
from .res2net import Res2Net

_R50, _R101, _R152 = (3, 4, 6, 3), (3, 4, 23, 3), (3, 8, 36, 3)
_V1B = dict(deep_stem=True, avg_down=True)

# name -> (class, architecture arguments)
ARCHITECTURES: dict[str, tuple[type[Res2NetBase], dict[str, Any]]] = {
    "res2net50_26w_4s": (Res2Net, dict(layers=_R50, base_width=26, scale=4)),
    "res2net50_26w_6s": (Res2Net, dict(layers=_R50, base_width=26, scale=6)),
    "res2net50_26w_8s": (Res2Net, dict(layers=_R50, base_width=26, scale=8)),
    "res2net50_48w_2s": (Res2Net, dict(layers=_R50, base_width=48, scale=2)),
    "res2net50_14w_8s": (Res2Net, dict(layers=_R50, base_width=14, scale=8)),
    "res2net101_26w_4s": (Res2Net, dict(layers=_R101, base_width=26, scale=4)),
    "res2net152_26w_4s": (Res2Net, dict(layers=_R152, base_width=26, scale=4)),
    "res2next50": (Res2Net, dict(layers=_R50, base_width=4, scale=4, cardinality=8)),
    "res2net50_v1b_26w_4s": (Res2Net, dict(layers=_R50, base_width=26, scale=4, **_V1B)),
    "res2net101_v1b_26w_4s": (Res2Net, dict(layers=_R101, base_width=26, scale=4, **_V1B)),
    "res2net152_v1b_26w_4s": (Res2Net, dict(layers=_R152, base_width=26, scale=4, **_V1B)),
    "dla60_res2net": (DLA, dict(base_width=28, scale=4, cardinality=1)),
    "dla60_res2next": (DLA, dict(base_width=4, scale=4, cardinality=8)),
}

# MindCV's names
ALIASES: dict[str, str] = {
    "res2net50": "res2net50_26w_4s",
    "res2net101": "res2net101_26w_4s",
    "res2net152": "res2net152_26w_4s",
    "res2net50_v1b": "res2net50_v1b_26w_4s",
    "res2net101_v1b": "res2net101_v1b_26w_4s",
    "res2net152_v1b": "res2net152_v1b_26w_4s",
}


def list_models(pattern: str = "*") -> list[str]:
    """All model names (canonical and MindCV aliases) matching a shell-style `pattern`."""
    return sorted(n for n in (*ARCHITECTURES, *ALIASES) if fnmatch.fnmatch(n, pattern))


def resolve_name(name: str) -> str:
    """The canonical name for `name` (an alias or a canonical name); unknown names raise a
    ValueError that lists the closest known names."""
    if name in ARCHITECTURES:
        return name
    if name in ALIASES:
        return ALIASES[name]
    close = difflib.get_close_matches(name, list_models(), n=4, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown model {name!r}.{hint} `res2net models` lists all names.")


def build_model(name: str, **kwargs: Any) -> Res2NetBase:
    """Build the architecture called `name` with random weights. Keyword arguments are the
    model's own (num_classes, in_chans, drop_rate, drop_path_rate, zero_init_last,
    output_stride, out_indices)."""
    cls, arch = ARCHITECTURES[resolve_name(name)]
    for key in [k for k in kwargs if k in arch]:  # scale, base_width...: the name fixes them
        value = kwargs.pop(key)
        if value != arch[key]:
            raise ConfigError(
                f"{key}={value!r} is invalid for {name!r}: the name fixes {key}={arch[key]!r}; "
                f"pick the model with the {key} you want (`res2net models` lists them)"
            )
    return cls(**arch, **kwargs)
