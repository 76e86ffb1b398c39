"""Read a checkpoint of any supported format and load it into a model.

The format is detected from the file's first bytes, never from its extension:
- torch pickles (zip archives or legacy pickles) go through `torch.load(weights_only=True)`, so a
  file carrying code is refused, never run;
- `.safetensors` starts with an 8-byte header length followed by a JSON header;
- anything else is tried as MindSpore's protobuf checkpoint.
"""

from __future__ import annotations

import logging
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .mindspore import mindcv_to_ours, read_mindspore_checkpoint

log = logging.getLogger(__name__)

# Keys under which training scripts commonly nest the model's state dict.
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "net")
# Prefixes added by DistributedDataParallel and torch.compile.
_PREFIXES = ("module.", "_orig_mod.")
_CLASSIFIER_PREFIXES = ("fc.",)


@dataclass
class LoadReport:
    """What `load_checkpoint` did: the format read, entries skipped as non-model state,
    keys the model lacked or the file lacked, and whether the classifier was re-initialised."""

    path: str
    format: str
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    head_reset: bool = False
    metadata: dict[str, str] = field(default_factory=dict)


def detect_format(path: str | Path) -> str:
    """'torch', 'safetensors' or 'mindspore', from the file's first bytes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n <= path.stat().st_size - 8 and head[8:9] == b"{":
            return "safetensors"
    return "mindspore"


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str, list[str], dict[str, str]]:
    """Return (tensors, format, skipped entries, metadata) for a checkpoint file of any format.

    Wrappers (`{"state_dict": ...}`, `{"model": ...}`, this project's training checkpoints) and
    DDP/compile prefixes are removed; keys are left in the file's naming (see `load_checkpoint`
    for MindCV renaming)."""
    path = Path(path)
    fmt = detect_format(path)
    skipped: list[str] = []
    metadata: dict[str, str] = {}
    if fmt == "mindspore":
        state, skipped = read_mindspore_checkpoint(path)
    elif fmt == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path}: not a valid safetensors file ({e})") from None
    else:
        state = _read_torch(path)
    return _strip_prefixes(state), fmt, skipped, metadata


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: refused to load: the file holds Python objects other than tensors, which could "
            f"run code ({str(e).splitlines()[0]}). Only load files from sources you trust; convert "
            "trusted ones to .safetensors with `res2net convert`."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
    if isinstance(obj, dict) and obj.get("format") == "res2net-train" and "model" in obj:
        obj = obj["model"]
    while isinstance(obj, dict) and not _is_state_dict(obj):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not (isinstance(obj, dict) and _is_state_dict(obj)):
        raise ValueError(f"{path}: holds no state dict (expected a dict of tensors, possibly under 'state_dict'/'model')")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) for k in obj) and any(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_checkpoint(
    model: nn.Module, path: str | Path, *, strict: bool = True, reset_head: bool = False
) -> LoadReport:
    """Load the weights in `path` (any supported format) into `model`, in place.

    MindCV names are mapped to ours. A classifier whose shape differs from the model's is an
    error, unless `reset_head` is True: then the model keeps its freshly initialised classifier,
    everything else is loaded, and one warning says so (the start of fine-tuning).
    `strict` as in `nn.Module.load_state_dict`, except that BatchNorm's `num_batches_tracked`
    counters, which other frameworks do not store, are never required.
    """
    state, fmt, skipped, metadata = read_checkpoint(path)
    if fmt == "mindspore" or any(k.endswith(".gamma") or k.startswith("classifier.") for k in state):
        state = mindcv_to_ours(state, model)
    report = LoadReport(path=str(path), format=fmt, skipped=skipped, metadata=metadata)

    own = model.state_dict()
    head_keys = [k for k in state if k.startswith(_CLASSIFIER_PREFIXES)]
    mismatched_head = [k for k in head_keys if k in own and own[k].shape != state[k].shape]
    if mismatched_head:
        if not reset_head:
            n_file = state[mismatched_head[0]].shape[0]
            n_model = own[mismatched_head[0]].shape[0]
            raise ValueError(
                f"{path}: the checkpoint's classifier has {n_file} classes but the model has {n_model}. "
                f"Build the model with num_classes={n_file} to use it as is, or ask for a new head "
                "(create_model(..., num_classes=N, checkpoint_path=...) or load_checkpoint(..., reset_head=True))."
            )
        for k in head_keys:
            state.pop(k)
        report.head_reset = True
        log.warning("%s: classifier re-initialised for %d classes; all other weights loaded", path, getattr(model, "num_classes", -1))

    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(
                f"{path}: tensor {k!r} has shape {tuple(v.shape)} but the model expects {tuple(own[k].shape)}: "
                "the checkpoint is for a different architecture"
            )
        if k in own and v.is_floating_point():
            state[k] = v.to(own[k].dtype)
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(v)
    if report.head_reset:
        for k in own:
            if k.startswith(_CLASSIFIER_PREFIXES):
                state[k] = own[k]

    result = model.load_state_dict(state, strict=False)
    report.missing, report.unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if strict and (report.missing or report.unexpected):
        raise ValueError(
            f"{path}: does not match the model: {len(report.missing)} missing keys "
            f"(e.g. {report.missing[:3]}), {len(report.unexpected)} unexpected keys (e.g. {report.unexpected[:3]}). "
            "Check the model name, or pass strict=False to load the matching part."
        )
    if skipped:
        log.info("%s: skipped %d non-model entries (%s...)", path, len(skipped), ", ".join(skipped[:3]))
    return report
