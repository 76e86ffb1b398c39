"""Read a checkpoint of any supported format and load it into a model.

The format is detected from the file's first bytes, never from its extension:
- torch pickles (zip archives or legacy pickles) are checked by `torchfile.scan` (bounded memory,
  dense tensors only) and read with `torch.load(weights_only=True)`, so a file carrying code is
  refused, never run;
- `.safetensors` starts with an 8-byte header length followed by a JSON header;
- MindSpore's protobuf checkpoint starts with the key of its first entry (byte 0x0a).

Names are mapped to ours (the official/timm layout): DDP (`module.`) and torch.compile
(`_orig_mod.`) prefixes are removed and OpenMMLab's (`backbone.`, `head.fc.`) renamed when the
file is read; MindCV's (`gamma`, `down_sample`, `classifier`) when it is loaded into a model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..guards import open_regular_file, short
from . import torchfile
from .mindspore import mindcv_to_ours, read_mindspore_checkpoint

log = logging.getLogger(__name__)

# Keys under which training scripts commonly nest the model's state dict.
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "net")
# Prefixes added by DistributedDataParallel and torch.compile.
_PREFIXES = ("module.", "_orig_mod.")
_CLASSIFIER_PREFIXES = ("fc.",)
# Bounds on what a checkpoint's header and metadata may ask for.
MAX_SAFETENSORS_HEADER = 16 << 20
MAX_IMAGE_SIZE = 4096
MAX_CLASSES = 1 << 20
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
TRAIN_FORMAT = (
    "res2net-train"  # engine/checkpoint.py's tag (not imported: weights/ is independent of engine/)
)


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
    protocol-0/1 pickles). Anything else raises ValueError; a missing file FileNotFoundError.

    Safetensors is tried first: its 8-byte header length may start with 0x80 (the mark of a
    pickle), but a pickle's first 8 bytes never read as a length that fits the file followed
    by `{`."""
    path = Path(path)
    with open_regular_file(path, "checkpoint") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(16)
        f.seek(max(size - 1, 0))
        last = f.read(1)
    if len(head) >= 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"
    if head[:1] == b"\x0a":
        return "mindspore"
    if last == b".":  # every pickle ends with STOP; protocols 0 and 1 have no leading marker
        return "torch"
    what = "is empty" if not head else f"starts with {head[:8]!r}"
    raise CheckpointError(
        f"{path}: not a checkpoint this library reads (torch .pth, .safetensors or MindSpore "
        f".ckpt): it {what}"
    )


def read_checkpoint(
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], str, list[str], dict[str, str]]:
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

    with open_regular_file(path, "checkpoint") as f:
        header_bytes = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))[0]
    if header_bytes > MAX_SAFETENSORS_HEADER:
        raise CheckpointError(
            f"{path}: its safetensors header claims {header_bytes} bytes, more than the "
            f"{MAX_SAFETENSORS_HEADER} a model's needs"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: not a valid safetensors file ({short(str(e), 200)})"
        ) from None
    check_metadata(path, metadata)
    return state, metadata


def check_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    """Refuse (ValueError naming `path` and the key) metadata this project reads but cannot use:
    `eval` must be a JSON object of known transform settings in range, `num_classes` a count."""
    if "num_classes" in metadata:
        n = metadata["num_classes"]
        if not (n.isdigit() and len(n) < 10 and 1 <= int(n) <= MAX_CLASSES):
            raise CheckpointError(
                f"{path}: metadata 'num_classes' must be a count from 1 to {MAX_CLASSES}, "
                f"got {short(n)}"
            )
    if "eval" not in metadata:
        return
    try:
        settings = json.loads(metadata["eval"])
    except (ValueError, RecursionError) as e:
        reason = short(str(e), 100)
        raise CheckpointError(f"{path}: metadata 'eval' is not valid JSON ({reason})") from None
    if not isinstance(settings, dict):
        raise CheckpointError(
            f"{path}: metadata 'eval' must be a JSON object, got {short(settings)}"
        )
    problem = _eval_problem(settings)
    if problem:
        raise CheckpointError(f"{path}: metadata 'eval' {problem}")


def _eval_problem(settings: dict) -> str | None:
    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for key, value in settings.items():
        if key == "image_resize":
            ok = number(value) and isinstance(value, int) and 1 <= value <= MAX_IMAGE_SIZE
            rule = f"an integer from 1 to {MAX_IMAGE_SIZE}"
        elif key == "crop_pct":
            ok, rule = number(value) and 0 < value <= 2, "a number in (0, 2]"
        elif key == "interpolation":
            ok, rule = value in INTERPOLATIONS, "one of " + ", ".join(INTERPOLATIONS)
        elif key in ("mean", "std"):
            ok = isinstance(value, list) and 1 <= len(value) <= 4
            ok = ok and all(number(v) and 0 <= v <= 1 for v in value)
            ok = ok and (key == "mean" or all(v > 0 for v in value))
            rule = "a list of 1 to 4 numbers in 0..1" + (" above 0" if key == "std" else "")
        else:
            continue  # other keys are informational
        if not ok:
            return f"key {key!r} must be {rule}, got {short(value)}"
    return None


def _read_torch(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    obj = torchfile.load(path)
    metadata: dict[str, str] = {}
    if (
        isinstance(obj, dict)
        and obj.get("format") == TRAIN_FORMAT
        and isinstance(obj.get("model"), dict)
    ):
        metadata = {
            k: str(obj[k]) for k in ("arch", "num_classes") if isinstance(obj.get(k), (str, int))
        }
        if isinstance(obj.get("config"), dict):  # the run's eval transform travels with its weights
            metadata["eval"] = _config_eval(obj["config"], path)
        # the EMA weights, when kept, are the ones training validated and ranked
        ema = obj.get("ema")
        obj = (
            {k: v for k, v in ema.items() if k != "n_averaged"}
            if isinstance(ema, dict) and ema
            else obj["model"]
        )
    while isinstance(obj, dict) and not _is_state_dict(obj):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not (isinstance(obj, dict) and _is_state_dict(obj)):
        raise CheckpointError(
            f"{path}: holds no state dict (expected a dict of tensors, possibly under "
            "'state_dict'/'model')"
        )
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, metadata


def _config_eval(config: dict, path: Path) -> str:
    """The `eval` metadata (JSON, mean/std in 0..1) of a training checkpoint's config."""
    from .entry import EvalTransform

    try:
        return json.dumps(EvalTransform.from_config(config).to_dict())
    except ValueError as e:
        raise CheckpointError(
            f"{path}: the training config's eval transform is invalid ({e})"
        ) from None


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
            raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    return _read_torch(path)[1]


def _is_state_dict(obj: dict) -> bool:
    return (
        bool(obj)
        and all(isinstance(k, str) for k in obj)
        and any(isinstance(v, torch.Tensor) for v in obj.values())
    )


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
                module = (
                    f"conv1.{3 * i}"
                    if kind == "conv"
                    else "bn1"
                    if i == 2
                    else f"conv1.{3 * i + 1}"
                )
                key = f"{module}.{rest}"
        elif key.startswith("head.fc."):
            key = key[len("head.") :]
        out[key] = value
    return out


def load_checkpoint(
    model: nn.Module, path: str | Path, *, strict: bool = True, reset_head: bool = False
) -> LoadReport:
    """Load the weights in `path` (any supported format) into `model`, in place.

    MindCV and OpenMMLab names are mapped to ours; floating-point values are cast to the model's
    dtypes, and a tensor that is not floating-point where the model's is (integers, bools) is an
    error. A file none of whose tensors is one of the model's (empty, or another network's) is
    an error, `strict` or not. A classifier whose shape differs from the model's is an error,
    unless `reset_head` is True: then the model keeps its freshly initialised classifier,
    everything else is loaded, and one warning says so (the start of fine-tuning). `strict` as
    in `nn.Module.load_state_dict`, except that BatchNorm's `num_batches_tracked` counters,
    which other frameworks do not store, are never required. On any error the model is left
    unchanged.
    """
    state, fmt, skipped, metadata = read_checkpoint(path)
    if fmt == "mindspore" or any(
        k.endswith(".gamma") or k.startswith("classifier.") for k in state
    ):
        state = mindcv_to_ours(state, model)
    report = LoadReport(path=str(path), format=fmt, skipped=skipped, metadata=metadata)

    own = model.state_dict()
    if not any(k in own for k in state):
        examples = short(list(state)[:3])
        found = (
            f"none of its {len(state)} tensors is one of the model's (e.g. {examples})"
            if state
            else "it holds no tensors"
        )
        raise CheckpointError(f"{path}: {found}; check the model name; nothing was loaded")
    head_keys = [k for k in state if k.startswith(_CLASSIFIER_PREFIXES)]
    own_head = [k for k in own if k.startswith(_CLASSIFIER_PREFIXES)]
    mismatched_head = [k for k in head_keys if k in own and own[k].shape != state[k].shape]
    if mismatched_head and not reset_head:
        n_file = state[mismatched_head[0]].shape[0]
        n_model = own[mismatched_head[0]].shape[0]
        raise CheckpointError(
            f"{path}: the checkpoint's classifier has {n_file} classes but the model has "
            f"{n_model}. "
            f"Build the model with num_classes={n_file} to use it as is, or ask for a new head "
            "(create_model(..., num_classes=N, checkpoint_path=...) or load_checkpoint(..., "
            "reset_head=True))."
        )
    head_fits = not mismatched_head and set(head_keys) == set(own_head)
    heads = ""  # the two classifiers, for the warning once a new head is loaded
    if reset_head and not head_fits:
        file_head = next(
            (f"{state[k].shape[0]} classes" for k in head_keys if k.endswith("weight")), "none"
        )
        model_head = f"{getattr(model, 'num_classes', '?')} classes" if own_head else "none"
        for k in head_keys:
            state.pop(k)
        for k in own_head:
            state[k] = own[k]
        report.head_reset = True
        heads = f"checkpoint's: {file_head}, model's: {model_head}"

    _check_tensors(path, state)
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise CheckpointError(
                f"{path}: tensor {k!r} has shape {tuple(v.shape)} but the model expects "
                f"{tuple(own[k].shape)}: "
                "the checkpoint is for a different architecture"
            )
        if k in own and own[k].is_floating_point() and not v.is_floating_point():
            raise CheckpointError(
                f"{path}: tensor {short(k)} holds {v.dtype} values where the model's "
                f"{own[k].dtype} weights go; nothing was loaded"
            )
        if k in own and v.is_floating_point():
            state[k] = v.to(own[k].dtype)
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(v)

    report.missing = [k for k in own if k not in state]
    report.unexpected = [k for k in state if k not in own]
    if strict and (report.missing or report.unexpected):
        # advice every caller can follow: a command-line user has no strict=False to pass
        mismatch = [
            f"{len(names)} {kind} keys (e.g. {names[:3]})"
            for kind, names in (("missing", report.missing), ("unexpected", report.unexpected))
            if names
        ]
        raise CheckpointError(
            f"{path}: does not match the model: {', '.join(mismatch)}. Is it a checkpoint of "
            "another model? Check the model name."
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if report.head_reset:  # said once loaded, so that it never precedes an error
        rest = (
            "all other weights loaded"
            if not report.missing
            else f"{len(report.missing)} other weights were not in the file"
        )
        log.warning(
            "%s: classifier not loaded (%s), the model's stays freshly initialised; %s",
            path,
            heads,
            rest,
        )
    if skipped:
        log.info(
            "%s: skipped %d non-model entries (%s...)", path, len(skipped), ", ".join(skipped[:3])
        )
    return report


def _check_tensors(path: str | Path, state: dict[str, torch.Tensor]) -> None:
    """Before anything is copied: every tensor is dense, holds data on the CPU, so that
    `load_state_dict` cannot fail half-way; a warning names the tensors with NaN or Inf."""
    for k, v in state.items():
        if v.layout != torch.strided or v.is_meta or v.is_quantized or v.device.type != "cpu":
            raise CheckpointError(
                f"{path}: tensor {short(k)} is not a dense CPU tensor ({v.layout}, "
                f"device {v.device}); nothing was loaded"
            )
    bad = [
        k
        for k, v in state.items()
        if (v.is_floating_point() or v.is_complex()) and not torch.isfinite(v).all()
    ]
    if bad:
        log.warning(
            "%s: %d tensors hold NaN or Inf values (%s%s); the model will compute NaN",
            path,
            len(bad),
            ", ".join(bad[:5]),
            ", ..." if len(bad) > 5 else "",
        )


def state_num_classes(
    state: dict[str, torch.Tensor], path: str | Path, model_name: str | None = None
) -> int | None:
    """Classifier size in a state dict read from `path` by `read_checkpoint` (our/timm `fc` or
    MindCV's `classifier`), or None when it holds no classifier. The model is then built with
    that many outputs, so the weight is checked first: (classes, features), or DLA's 1x1 conv
    (classes, features, 1, 1), with 1 to MAX_CLASSES classes; and with `model_name` (a zoo
    name), its features must be that architecture's, so that a small file cannot make the
    model allocate a classifier far larger than the one it holds. ValueError otherwise."""
    for key in ("fc.weight", "classifier.weight"):
        if key not in state:
            continue
        shape = tuple(state[key].shape)
        matrix = len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1))
        if not matrix or not 1 <= shape[0] <= MAX_CLASSES or shape[1] < 1:
            raise CheckpointError(
                f"{path}: classifier {key!r} has shape {short(shape)}, not (classes, "
                f"features) with 1 to {MAX_CLASSES} classes"
            )
        features = model_features(model_name) if model_name else None
        if features is not None and shape[1] != features:
            raise CheckpointError(
                f"{path}: classifier {key!r} takes {shape[1]} features where {model_name} has "
                f"{features}: the checkpoint is for another architecture; check the model name"
            )
        return shape[0]
    return None


def model_features(model_name: str) -> int | None:
    """Channels a zoo architecture's classifier takes (built on the meta device: no memory,
    no initialisation), or None for a name outside the zoo (a Hub model brings its own)."""
    from ..models import build_model
    from ..models.registry import resolve_name

    try:
        resolve_name(model_name)
    except ValueError:
        return None
    with torch.device("meta"):
        return build_model(model_name, num_classes=0).num_features


def checkpoint_num_classes(path: str | Path, model_name: str | None = None) -> int | None:
    """Classifier size stored in a checkpoint file of any format, or None; checked as in
    `state_num_classes`."""
    return state_num_classes(read_checkpoint(path)[0], path, model_name)
