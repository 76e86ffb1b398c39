"""Convert weights between formats: any readable checkpoint -> `.safetensors` (with metadata),
MindSpore `.ckpt` (MindCV names, loadable by MindCV) or a torch `.pth` state dict.

Every output holds the model's float32 values whatever the input's dtype (MindCV's published
files are float16 or float32; float16 -> float32 is exact). The `.safetensors` and `.pth` files
use our (official/timm) names and include BatchNorm's `num_batches_tracked`, so
`model.load_state_dict` takes them as they are in timm and the official code; the `.ckpt` uses
MindCV's names and leaves those counters out, as MindSpore does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import fileio
from ..errors import CheckpointError
from ..models import build_model
from ..schema import IMAGENET_MEAN_01, IMAGENET_STD_01
from .loading import load_checkpoint, read_checkpoint, state_num_classes
from .mindspore import ours_to_mindcv, write_mindspore_checkpoint
from .pretrained import pretrained_entries

DEFAULT_EVAL = {
    "image_resize": 224,
    "crop_pct": 0.875,
    "interpolation": "bilinear",
    "mean": list(IMAGENET_MEAN_01),
    "std": list(IMAGENET_STD_01),
}
TARGETS = {
    ".safetensors": "safetensors",
    ".ckpt": "mindspore",
    ".pth": "torch",
    ".pt": "torch",
    ".bin": "torch",
}


def _num_classes(state: dict[str, torch.Tensor], path: str | Path, name: str | None) -> int:
    n = state_num_classes(state, path, name)
    if n is None:
        raise CheckpointError(
            "the checkpoint has no classifier (fc/classifier) to size the model from"
        )
    return n


def convert(
    src: str | Path,
    dst: str | Path,
    model_name: str | None = None,
    source: str | None = None,
    *,
    model: nn.Module | None = None,
) -> Path:
    """Read `src` (any supported format), load it into architecture `model_name` (or the name
    stored in the file, or the given `model` for architectures outside the registry), which checks
    every name and shape, and write `dst` in the format its extension names.

    `.safetensors` metadata: `arch`, `num_classes`, `source` (`source`, else the input's own,
    else the pretrained-table entry whose file name `src` has, else the input format) and `eval`
    (JSON of the evaluation transform: the input's own, else the table's for that source, else
    ImageNet defaults)."""
    src, dst = Path(src), Path(dst)
    target = TARGETS.get(dst.suffix.lower())
    if target is None:
        raise CheckpointError(
            f"cannot tell the output format from {dst.name!r}: use one of {', '.join(TARGETS)}"
        )
    state, fmt, _, metadata = read_checkpoint(src)
    name = model_name or metadata.get("arch")
    if model is None:
        if not name:
            raise CheckpointError(
                f"{src}: the file does not name its architecture; pass --model NAME (see `res2net "
                "models`)"
            )
        model = build_model(name, num_classes=_num_classes(state, src, name))
    name = name or type(model).__name__
    load_checkpoint(model, src)  # maps names and checks every shape
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fileio.make_directory(dst.parent)
    if target == "safetensors":
        write_safetensors(dst, ours, _metadata(name, model, src, fmt, source, metadata))
    elif target == "mindspore":
        write_mindspore_checkpoint(dst, ours_to_mindcv(ours, model))
    else:
        fileio.atomic_write(dst, lambda f: torch.save(ours, f))
    return dst


def _entries(name: str) -> list[dict[str, Any]]:
    try:
        return pretrained_entries(name)
    except ValueError:  # an architecture outside the registry
        return []


def _metadata(
    name: str, model: nn.Module, src: Path, fmt: str, source: str | None, old: dict[str, str]
) -> dict[str, str]:
    entries = _entries(name)
    by_file = next((e for e in entries if e["file_name"] == src.name), None)
    source = source or old.get("source") or (by_file["source"] if by_file else fmt)
    entry = by_file or next((e for e in entries if e["source"] == source), None)
    eval_args = (
        json.loads(old["eval"]) if "eval" in old else (entry["eval"] if entry else DEFAULT_EVAL)
    )
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        num_classes = _num_classes(model.state_dict(), src, None)
    return {
        "arch": name,
        "num_classes": str(num_classes),
        "source": source,
        "eval": json.dumps(eval_args),
    }


def write_safetensors(
    path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Atomically write `state` as safetensors with string `metadata` in its header."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in state.items()}, metadata=metadata)
    fileio.write_bytes(path, data)
