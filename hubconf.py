"""torch.hub entry points: one per zoo model (canonical and MindCV names).

    model = torch.hub.load("<owner>/res2net", "res2net50", pretrained=True)
    model = torch.hub.load("path/to/clone", "res2net50", source="local", checkpoint_path="w.ckpt")

Each takes `create_model`'s arguments: `pretrained` (True or a source name), `checkpoint_path`,
`num_classes`, `features_only`, ...
"""

import os as _os
import sys as _sys
from collections.abc import Callable as _Callable
from typing import Any as _Any

dependencies = ["torch", "torchvision", "numpy", "PIL", "yaml", "safetensors", "tqdm", "matplotlib"]

_SRC = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "src")
if _SRC not in _sys.path:
    _sys.path.insert(0, _SRC)  # this checkout's package, not another installed copy

from res2net import create_model as _create_model  # noqa: E402
from res2net import list_models as _list_models  # noqa: E402


def _entry(name: str) -> _Callable[..., _Any]:
    def build(
        pretrained: bool | str = False, checkpoint_path: str | None = None, **kwargs: _Any
    ) -> _Any:
        return _create_model(name, pretrained=pretrained, checkpoint_path=checkpoint_path, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"{name}: `create_model({name!r}, pretrained=..., checkpoint_path=..., **kwargs)`; "
        "pretrained=True downloads the published weights, checkpoint_path= loads a local file "
        "of any format."
    )
    return build


for _name in _list_models():
    globals()[_name] = _entry(_name)
