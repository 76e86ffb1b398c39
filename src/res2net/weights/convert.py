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
from .entry import DEFAULT_EVAL
from .formats import state_num_classes
from .loading import Checkpoint, load_checkpoint, read_checkpoint
from .mindspore import ours_to_mindcv, write_mindspore_checkpoint
from .pretrained import pretrained_entries

TARGETS = {
    ".safetensors": "safetensors",
    ".ckpt": "mindspore",
    ".pth": "torch",
    ".pt": "torch",
    ".bin": "torch",
}


def convert(
    src: Checkpoint | str | Path,
    dst: str | Path,
    model_name: str | None = None,
    source: str | None = None,
    *,
    model: nn.Module | None = None,
) -> Path:
    """Load `src` (a `Checkpoint`, or a file of any supported format, read once) into
    architecture `model_name` (or the name stored in the file, or the given `model` for
    architectures outside the registry), which checks every name and shape, and write `dst` in
    the format its extension names.

    `.safetensors` metadata: `arch`, `num_classes`, `source` (`source`, else the input's own,
    else the pretrained-table entry whose file name `src` has, else the input format) and `eval`
    (JSON of the evaluation transform: the input's own, else the table's for that source, else
    ImageNet defaults)."""
    dst = Path(dst)
    target = TARGETS.get(dst.suffix.lower())
    if target is None:
        raise CheckpointError(
            f"cannot tell the output format from {dst.name!r}: use one of {', '.join(TARGETS)}"
        )
    checkpoint = read_checkpoint(src, model=model_name)
    model, name = loaded_model(checkpoint, model_name, model)
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fileio.make_directory(dst.parent)
    if target == "safetensors":
        write_safetensors(dst, ours, weights_metadata(checkpoint, name, model, source))
    elif target == "mindspore":
        write_mindspore_checkpoint(dst, ours_to_mindcv(ours, model))
    else:
        fileio.atomic_write(dst, lambda f: torch.save(ours, f))
    return dst


def loaded_model(
    checkpoint: Checkpoint, model_name: str | None = None, model: nn.Module | None = None
) -> tuple[nn.Module, str]:
    """(`model`, or architecture `model_name` or the checkpoint's own built with its classifier,
    with the checkpoint loaded; the architecture's name)."""
    name = model_name or checkpoint.arch
    if model is None:
        if not name:
            raise CheckpointError(
                f"{checkpoint.origin}: the file does not name its architecture; pass --model NAME "
                "(see `res2net models`)"
            )
        if checkpoint.num_classes is None:
            raise CheckpointError(
                f"{checkpoint.origin}: the checkpoint has no classifier (fc/classifier) to size "
                "the model from"
            )
        model = build_model(name, num_classes=checkpoint.num_classes)
    load_checkpoint(model, checkpoint)  # maps names and checks every shape
    return model, name or type(model).__name__


def _entries(name: str) -> list[dict[str, Any]]:
    try:
        return pretrained_entries(name)
    except ValueError:  # an architecture outside the registry
        return []


def weights_metadata(
    checkpoint: Checkpoint, name: str, model: nn.Module, source: str | None = None
) -> dict[str, str]:
    """The `.safetensors` metadata of `model` loaded from `checkpoint` (see `convert`)."""
    entries = _entries(name)
    file_name = checkpoint.path.name if checkpoint.path is not None else ""
    by_file = next((e for e in entries if e["file_name"] == file_name), None)
    source = (
        source
        or checkpoint.metadata.get("source")
        or (by_file["source"] if by_file else checkpoint.format)
    )
    entry = by_file or next((e for e in entries if e["source"] == source), None)
    eval_args = (
        checkpoint.eval.to_dict()
        if checkpoint.eval is not None
        else (entry["eval"] if entry else DEFAULT_EVAL)
    )
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        num_classes = state_num_classes(model.state_dict(), checkpoint.origin, None)
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
