"""Read a checkpoint of any supported format and load it into a model.

The format is detected from the file's first bytes, never from its extension:
- torch pickles (zip archives or legacy pickles) go through `torch.load(weights_only=True)`, so a
  file carrying code is refused, never run;
- `.safetensors` starts with an 8-byte header length followed by a JSON header;
- MindSpore's protobuf checkpoint starts with the key of its first entry (byte 0x0a).

Names are mapped to ours (the official/timm layout): DDP (`module.`) and torch.compile
(`_orig_mod.`) prefixes are removed and OpenMMLab's (`backbone.`, `head.fc.`) renamed when the
file is read; MindCV's (`gamma`, `down_sample`, `classifier`) when it is loaded into a model.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
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
TRAIN_FORMAT = "res2net-train"  # engine/checkpoint.py's tag (not imported: weights/ is independent of engine/)


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
    """'torch', 'safetensors' or 'mindspore', from the file's first bytes (and last byte, for
    protocol-0/1 pickles). Anything else raises ValueError; a missing file FileNotFoundError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(16)
        f.seek(max(size - 1, 0))
        last = f.read(1)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] < 1 << 32:
        return "safetensors"
    if head[:1] == b"\x0a":
        return "mindspore"
    if last == b".":  # every pickle ends with STOP; protocols 0 and 1 have no leading marker
        return "torch"
    what = "is empty" if not head else f"starts with {head[:8]!r}"
    raise ValueError(
        f"{path}: not a checkpoint this library reads (torch .pth, .safetensors or MindSpore .ckpt): it {what}"
    )


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str, list[str], dict[str, str]]:
    """Return (tensors, format, skipped entries, metadata) for a checkpoint file of any format.

    Wrappers (`{"state_dict": ...}`, `{"model": ...}`, this project's training checkpoints) and
    DDP/compile prefixes are removed and OpenMMLab names mapped to ours; MindCV names are left
    as they are (mapping them needs the model: see `load_checkpoint`). `metadata` is the
    safetensors header's, or `arch`/`num_classes` from this project's training checkpoints."""
    path = Path(path)
    fmt = detect_format(path)
    skipped: list[str] = []
    metadata: dict[str, str] = {}
    if fmt == "mindspore":
        state, skipped = read_mindspore_checkpoint(path)
    elif fmt == "safetensors":
        state, metadata = _read_safetensors(path)
    else:
        state, metadata = _read_torch(path)
    state = _strip_prefixes(state)
    if any(k.startswith("backbone.") for k in state):
        state = mmpretrain_to_ours(state)
    return state, fmt, skipped, metadata


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from None
    return state, metadata


def _refusal_reason(message: str) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return f"it imports {found.group(1)!r}"
    found = re.search(r"Unsupported operand \d+", message)
    return f"it uses a pickle instruction torch's safe loader rejects ({found.group(0)})" if found else "see torch.load"


def _read_torch(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: refused to load: the file holds Python objects other than tensors and plain "
            f"containers ({_refusal_reason(str(e))}), which could run code; nothing in it was executed. "
            "If you trust its source, unpickle it yourself in a session you control and save "
            "its state dict with torch.save or safetensors."
        ) from None
    except Exception as e:  # a damaged pickle or zip archive fails in many ways
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable torch checkpoint, truncated or damaged? ({reason})") from None
    metadata: dict[str, str] = {}
    if isinstance(obj, dict) and obj.get("format") == TRAIN_FORMAT and isinstance(obj.get("model"), dict):
        metadata = {k: str(obj[k]) for k in ("arch", "num_classes") if isinstance(obj.get(k), (str, int))}
        if isinstance(obj.get("config"), dict):  # the run's eval transform travels with its weights
            metadata["eval"] = _config_eval(obj["config"], path)
        # the EMA weights, when kept, are the ones training validated and ranked
        ema = obj.get("ema")
        obj = {k: v for k, v in ema.items() if k != "n_averaged"} if isinstance(ema, dict) and ema else obj["model"]
    while isinstance(obj, dict) and not _is_state_dict(obj):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not (isinstance(obj, dict) and _is_state_dict(obj)):
        raise ValueError(
            f"{path}: holds no state dict (expected a dict of tensors, possibly under 'state_dict'/'model')"
        )
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, metadata


def _config_eval(config: dict, path: Path) -> str:
    """The `eval` metadata (JSON, mean/std in 0..1) of a training checkpoint's config."""
    from .entry import EvalTransform

    try:
        return json.dumps(EvalTransform.from_config(config).to_dict())
    except ValueError as e:
        raise ValueError(f"{path}: the training config's eval transform is invalid ({e})") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata `read_checkpoint` would return; a `.safetensors` header is read alone."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "mindspore":
        return {}
    if fmt == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: not a valid safetensors file ({e})") from None
    return _read_torch(path)[1]


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) for k in obj) and any(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = True
    while stripped:  # `module._orig_mod.`, `_orig_mod.module.`, ...
        stripped = False
        for prefix in _PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


_MM_STEM = re.compile(r"stem\.([0-2])\.(conv|bn)\.(.+)")


def mmpretrain_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an OpenMMLab (mmpretrain/mmcls, mmdet) Res2Net state dict to ours.

    Their backbone already uses our names (`conv1`, `bn1`, `layer1.0.convs.0`, `bns.0`, `bn3`,
    `downsample`); it sits under `backbone.` and the classifier under `head.fc.`. The deep stem
    of their v1d-style nets (`stem.{0,1,2}.conv/.bn`) becomes ours (`conv1.{0,3,6}`,
    `conv1.{1,4}` and `bn1`). Other keys (necks, detection heads) are left as they are."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("backbone."):
            key = key[len("backbone.") :]
            stem = _MM_STEM.fullmatch(key)
            if stem:
                i, kind, rest = int(stem.group(1)), stem.group(2), stem.group(3)
                module = f"conv1.{3 * i}" if kind == "conv" else "bn1" if i == 2 else f"conv1.{3 * i + 1}"
                key = f"{module}.{rest}"
        elif key.startswith("head.fc."):
            key = key[len("head.") :]
        out[key] = value
    return out


def load_checkpoint(
    model: nn.Module, path: str | Path, *, strict: bool = True, reset_head: bool = False
) -> LoadReport:
    """Load the weights in `path` (any supported format) into `model`, in place.

    MindCV and OpenMMLab names are mapped to ours; values are cast to the model's dtypes. A
    classifier whose shape differs from the model's is an error, unless `reset_head` is True:
    then the model keeps its freshly initialised classifier, everything else is loaded, and one
    warning says so (the start of fine-tuning). `strict` as in `nn.Module.load_state_dict`,
    except that BatchNorm's `num_batches_tracked` counters, which other frameworks do not store,
    are never required. On any error the model is left unchanged.
    """
    state, fmt, skipped, metadata = read_checkpoint(path)
    if fmt == "mindspore" or any(k.endswith(".gamma") or k.startswith("classifier.") for k in state):
        state = mindcv_to_ours(state, model)
    report = LoadReport(path=str(path), format=fmt, skipped=skipped, metadata=metadata)

    own = model.state_dict()
    head_keys = [k for k in state if k.startswith(_CLASSIFIER_PREFIXES)]
    own_head = [k for k in own if k.startswith(_CLASSIFIER_PREFIXES)]
    mismatched_head = [k for k in head_keys if k in own and own[k].shape != state[k].shape]
    if mismatched_head and not reset_head:
        n_file = state[mismatched_head[0]].shape[0]
        n_model = own[mismatched_head[0]].shape[0]
        raise ValueError(
            f"{path}: the checkpoint's classifier has {n_file} classes but the model has {n_model}. "
            f"Build the model with num_classes={n_file} to use it as is, or ask for a new head "
            "(create_model(..., num_classes=N, checkpoint_path=...) or load_checkpoint(..., reset_head=True))."
        )
    head_fits = not mismatched_head and set(head_keys) == set(own_head)
    if reset_head and not head_fits:
        n_file = next((f"{state[k].shape[0]} classes" for k in head_keys if k.endswith("weight")), "none")
        n_model = f"{getattr(model, 'num_classes', '?')} classes" if own_head else "none"
        for k in head_keys:
            state.pop(k)
        for k in own_head:
            state[k] = own[k]
        report.head_reset = True
        log.warning(
            "%s: classifier not loaded (checkpoint's: %s, model's: %s), the model's stays freshly initialised; "
            "all other weights loaded", path, n_file, n_model,
        )

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

    report.missing = [k for k in own if k not in state]
    report.unexpected = [k for k in state if k not in own]
    if strict and (report.missing or report.unexpected):
        raise ValueError(
            f"{path}: does not match the model: {len(report.missing)} missing keys "
            f"(e.g. {report.missing[:3]}), {len(report.unexpected)} unexpected keys (e.g. {report.unexpected[:3]}). "
            "Check the model name, or pass strict=False to load the matching part."
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if skipped:
        log.info("%s: skipped %d non-model entries (%s...)", path, len(skipped), ", ".join(skipped[:3]))
    return report


def state_num_classes(state: dict[str, torch.Tensor]) -> int | None:
    """Classifier size in a state dict read by `read_checkpoint` (our/timm `fc` or MindCV's
    `classifier`), or None when it holds no classifier."""
    for key in ("fc.weight", "classifier.weight"):
        if key in state:
            return int(state[key].shape[0])
    return None


def checkpoint_num_classes(path: str | Path) -> int | None:
    """Classifier size stored in a checkpoint file of any format, or None."""
    return state_num_classes(read_checkpoint(path)[0])
