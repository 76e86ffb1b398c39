"""res2net: the Res2Net family of image models in PyTorch.

The public names are imported on first use (PEP 562), so that `res2net --help` and the other
quick answers of the command line do not pay for importing torch and torchvision.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .factory import create_model
    from .hub import push_to_hub, save_to_folder
    from .inference import optimize_for_inference
    from .models import list_models
    from .weights.entry import get_weights
    from .weights.loading import Checkpoint, load_checkpoint, read_checkpoint

# public name -> the module that defines it
_LAZY = {
    "Checkpoint": ".weights.loading",
    "create_model": ".factory",
    "get_weights": ".weights.entry",
    "list_models": ".models",
    "load_checkpoint": ".weights.loading",
    "optimize_for_inference": ".inference",
    "push_to_hub": ".hub",
    "read_checkpoint": ".weights.loading",
    "save_to_folder": ".hub",
}

__all__ = [
    "Checkpoint",
    "create_model",
    "get_weights",
    "list_models",
    "load_checkpoint",
    "optimize_for_inference",
    "push_to_hub",
    "read_checkpoint",
    "save_to_folder",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'res2net' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
