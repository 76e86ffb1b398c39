"""Weights file formats, parsed from bytes already read: what `read_checkpoint` reads.

The format is detected from the first bytes, never from the extension:
- torch pickles (zip archives or legacy pickles) are checked by `torchfile.scan` (bounded memory,
  dense tensors only) and read with `torch.load(weights_only=True)` from the same bytes, so a
  file carrying code is refused, never run;
- `.safetensors` starts with an 8-byte header length followed by a JSON header;
- MindSpore's protobuf checkpoint starts with the key of its first entry (byte 0x0a).

Names are mapped to ours (the official/timm layout): DDP (`module.`) and torch.compile
(`_orig_mod.`) prefixes are removed and OpenMMLab's (`backbone.`, `head.fc.`) renamed here;
MindCV's (`gamma`, `down_sample`, `classifier`) when loaded into a model (`load_checkpoint`).
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import CheckpointError
from ..guards import short
from ..models import build_model
from ..models.registry import resolve_name
from . import torchfile
from .entry import EvalTransform
from .mindspore import MAX_EMPTY_EXTENT, decode_mindspore_checkpoint

# Keys under which training scripts commonly nest the model's state dict.
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "net")
# Prefixes added by DistributedDataParallel and torch.compile.
_PREFIXES = ("module.", "_orig_mod.")
# Bounds on what a checkpoint's header and metadata may ask for.
MAX_SAFETENSORS_HEADER = 16 << 20
# What a header's JSON may hold, checked before it is parsed (`_json_problem`), so that parsing
# stays within a few tens of MiB whatever the header says: its values (11 per tensor: some
# 23,000 tensors), and its size when it holds characters beyond U+FFFF (4 bytes each once
# decoded, and every other character of the text with them); `eval` metadata's size.
MAX_HEADER_VALUES = 1 << 18
MAX_WIDE_JSON = 4 << 20
MAX_EVAL_METADATA = 64 << 10
MAX_IMAGE_SIZE = 4096
MAX_CLASSES = 1 << 20
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
TRAIN_FORMAT = (
    "res2net-train"  # engine/checkpoint.py's tag (not imported: weights/ is independent of engine/)
)
# A JSON string, its escapes included (one left open runs to the end, so that no match starts
# again inside it: the scan stays linear), every byte but brackets, and characters beyond
# U+FFFF (a 4-byte UTF-8 sequence or a surrogate escape).
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_BEYOND_BMP = re.compile(rb"[\xf0-\xf4]|\\u[dD][89abAB]")
# The brackets a header may have, strings aside: one object of objects (tensor entries and
# `__metadata__`), whose values may be flat arrays (shapes, offsets); a class list is one array.
_HEADER_BRACKETS = re.compile(rb"\{(?:\{(?:\[\])*+\})*+\}")
_LIST_BRACKETS = re.compile(rb"\[\]")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _Parsed(NamedTuple):
    state: dict[str, torch.Tensor]
    format: str
    skipped: list[str]
    metadata: dict[str, str]
    classes: tuple[str, ...] | None


def detect_format(data: bytes, path: str | Path) -> str:
    """'torch', 'safetensors' or 'mindspore', from a file's bytes (its first bytes, and its
    last byte for protocol-0/1 pickles); CheckpointError naming `path` for anything else.

    Safetensors is tried first: its 8-byte header length may start with 0x80 (the mark of a
    pickle), but a pickle's first 8 bytes never read as a length that fits the file followed
    by `{`."""
    head, size = data[:16], len(data)
    if len(head) >= 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"
    if head[:1] == b"\x0a":
        return "mindspore"
    if data[-1:] == b".":  # every pickle ends with STOP; protocols 0 and 1 have no leading marker
        return "torch"
    what = "is empty" if not head else f"starts with {bytes(head[:8])!r}"
    raise CheckpointError(
        f"{path}: not a checkpoint this library reads (torch .pth, .safetensors or MindSpore "
        f".ckpt): it {what}"
    )


def parse(data: bytes, path: str | Path) -> _Parsed:
    """The tensors, format, skipped entries, metadata and class names of a weights file's
    bytes `data` (read from `path`, which errors name).

    Wrappers (`{"state_dict": ...}`, `{"model": ...}`, this project's training checkpoints) and
    DDP/compile prefixes are removed and OpenMMLab names mapped to ours; MindCV names are left
    as they are (mapping them needs the model). `metadata` is the safetensors header's, or
    `arch`/`num_classes`/`eval` from this project's training checkpoints."""
    path = Path(path)
    fmt = detect_format(data, path)
    if fmt == "mindspore":
        state, skipped = decode_mindspore_checkpoint(data, path)
        parsed = _Parsed(state, fmt, skipped, {}, None)
    elif fmt == "safetensors":
        parsed = _read_safetensors(data, path)
    else:
        parsed = _read_torch(data, path)
    state = _strip_prefixes(parsed.state)
    if any(k.startswith("backbone.") for k in state):
        state = mmpretrain_to_ours(state)
    return parsed._replace(state=state)


def _read_safetensors(data: bytes, path: Path) -> _Parsed:
    """Tensors copied out of `data` one by one, after checking the header against the spec:
    one JSON object of tensor entries (its structure bounded before it is parsed), known
    dtypes, shapes matching their byte ranges, ranges in order, inside the data and covering
    it. Written here because `safetensors.torch.load(bytes)` holds two more copies of every
    tensor at its peak, and `safe_open` would open the file a second time."""
    n = struct.unpack("<Q", data[:8].ljust(8, b"\0"))[0]
    if n > MAX_SAFETENSORS_HEADER:
        raise CheckpointError(
            f"{path}: its safetensors header claims {n} bytes, more than the "
            f"{MAX_SAFETENSORS_HEADER} a model's needs"
        )
    problem = _json_problem(data, 8, 8 + n, _HEADER_BRACKETS, MAX_HEADER_VALUES)
    if problem:
        raise CheckpointError(
            f"{path}: its safetensors header {problem}; a valid one is a JSON object of tensor "
            "entries (refused before parsing it)"
        )
    try:
        header = json.loads(str(memoryview(data)[8 : 8 + n], "utf-8"))
    except (ValueError, RecursionError) as e:
        reason = short(str(e), 100)
        raise CheckpointError(
            f"{path}: its safetensors header is not valid JSON ({reason})"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: its safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: its safetensors '__metadata__' must map strings to strings")
    body = memoryview(data)[8 + n :]
    state: dict[str, torch.Tensor] = {}
    end = 0
    for name, info in sorted(header.items(), key=lambda kv: _start(kv[1])):
        dtype, shape, (begin, stop) = _entry_layout(name, info, path)
        count = math.prod(shape)
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if begin != end or stop - begin != nbytes or stop > len(body):
            raise CheckpointError(
                f"{path}: safetensors entry {short(name)} has data_offsets {short([begin, stop])} "
                "that do not follow the entry before it, fit its shape or fit in the file"
            )
        end = stop
        if count == 0:
            state[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = bytearray(body[begin:stop])  # the tensor's own copy: 2x the file at most
        if dtype == torch.bool:  # any non-zero byte is True, as a bool must hold 0 or 1
            state[name] = torch.frombuffer(raw, dtype=torch.uint8).ne(0).reshape(shape)
        else:
            state[name] = torch.frombuffer(raw, dtype=dtype).reshape(shape)
    if end != len(body):
        raise CheckpointError(f"{path}: its safetensors data has bytes no tensor claims")
    check_metadata(path, metadata)
    return _Parsed(state, "safetensors", [], metadata, _metadata_classes(metadata, path))


def _json_problem(
    data: bytes, start: int, end: int, brackets: re.Pattern[bytes], max_values: int
) -> str:
    """What would make parsing `data[start:end]` as JSON cost far more memory than its size
    ("" when nothing does), found at C speed and without copying it, before `json.loads`
    builds anything. At most `max_values` values (counted by the separators and brackets
    outside strings, with at most two quotes each); brackets outside strings nested as
    `brackets` says; and a text with characters beyond U+FFFF, which widen every character
    decoded with them to 4 bytes, at most MAX_WIDE_JSON bytes. The standard library's parser
    has no such bounds, and `safetensors` reads headers only from files."""
    text = memoryview(data)[start:end]
    if end - start > MAX_WIDE_JSON and _BEYOND_BMP.search(text):
        return f"holds characters beyond U+FFFF and is over {MAX_WIDE_JSON} bytes"
    if data.count(b'"', start, end) > 2 * max_values:  # bounds the strings blanked next
        return f"holds more than {max_values} strings"
    skeleton = _JSON_STRING.sub(b"", text)
    if sum(skeleton.count(c) for c in (b",", b":", b"[", b"{")) > max_values:
        return f"holds more than {max_values} values"
    if not brackets.fullmatch(skeleton.translate(None, _NOT_BRACKETS)):
        return "nests objects and arrays otherwise than tensor entries do"
    return ""


def _entry_layout(
    name: str, info: object, path: Path
) -> tuple[torch.dtype, list[int], tuple[int, int]]:
    """The dtype, shape and data_offsets of one header entry, checked: a known dtype, at most
    64 non-negative dims (those of an empty tensor multiplying to at most MAX_EMPTY_EXTENT,
    which keeps torch's strides in range) and two non-negative offsets."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: safetensors entry {short(name)} is not an object")
    dtype = _SAFETENSORS_DTYPES.get(str(info.get("dtype")))
    shape, offsets = info.get("shape"), info.get("data_offsets")
    ints = (
        isinstance(shape, list)
        and len(shape) <= 64
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape + offsets)
    )
    if dtype is None or not ints:
        raise CheckpointError(
            f"{path}: safetensors entry {short(name)} has an unknown dtype or a malformed "
            "shape or data_offsets"
        )
    assert isinstance(shape, list) and isinstance(offsets, list)
    if 0 in shape and math.prod(d for d in shape if d) > MAX_EMPTY_EXTENT:
        raise CheckpointError(
            f"{path}: safetensors entry {short(name)} is empty but has shape {short(shape)}, "
            f"whose other dims multiply to more than {MAX_EMPTY_EXTENT}"
        )
    return dtype, shape, (offsets[0], offsets[1])


def _start(info: object) -> int:
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if isinstance(offsets, list) and offsets and isinstance(offsets[0], int):
        return offsets[0]
    return -1


def _metadata_classes(metadata: dict[str, str], path: Path) -> tuple[str, ...] | None:
    """The class names a `.safetensors` header may carry (`classes`: a JSON list of strings)."""
    if "classes" not in metadata:
        return None
    text = metadata["classes"]
    encoded = text.encode("utf-8", "surrogatepass")
    names = None
    if not _json_problem(encoded, 0, len(encoded), _LIST_BRACKETS, MAX_HEADER_VALUES):
        try:
            names = json.loads(text)
        except (ValueError, RecursionError):
            pass
    if not (isinstance(names, list) and all(isinstance(c, str) for c in names)):
        raise CheckpointError(
            f"{path}: metadata 'classes' must be a JSON list of at most {MAX_HEADER_VALUES} strings"
        )
    return tuple(names)


def check_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    """Refuse (ValueError naming `path` and the key) metadata this project reads but cannot use:
    `eval` must be a JSON object of known transform settings in range, `num_classes` a count."""
    if "num_classes" in metadata:
        n = metadata["num_classes"]
        if not (n.isascii() and n.isdigit() and len(n) < 10 and 1 <= int(n) <= MAX_CLASSES):
            raise CheckpointError(
                f"{path}: metadata 'num_classes' must be a count from 1 to {MAX_CLASSES}, "
                f"got {short(n)}"
            )
    if "eval" not in metadata:
        return
    if len(metadata["eval"]) > MAX_EVAL_METADATA:
        raise CheckpointError(
            f"{path}: metadata 'eval' is {len(metadata['eval'])} characters long; a transform's "
            f"settings take a few hundred (at most {MAX_EVAL_METADATA})"
        )
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


def _read_torch(data: bytes, path: Path) -> _Parsed:
    obj = torchfile.loads(data, path)
    metadata: dict[str, str] = {}
    classes: tuple[str, ...] | None = None
    if (
        isinstance(obj, dict)
        and obj.get("format") == TRAIN_FORMAT
        and isinstance(obj.get("model"), dict)
    ):
        metadata = {
            k: str(obj[k]) for k in ("arch", "num_classes") if isinstance(obj.get(k), (str, int))
        }
        stored = obj.get("classes")
        if isinstance(stored, list) and all(isinstance(c, str) for c in stored):
            classes = tuple(stored)
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
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return _Parsed(state, "torch", [], metadata, classes)


def _config_eval(config: dict, path: Path) -> str:
    """The `eval` metadata (JSON, mean/std in 0..1) of a training checkpoint's config."""
    try:
        return json.dumps(EvalTransform.from_config(config).to_dict())
    except ValueError as e:
        raise CheckpointError(
            f"{path}: the training config's eval transform is invalid ({e})"
        ) from None


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
    try:
        resolve_name(model_name)
    except ValueError:
        return None
    with torch.device("meta"):
        return build_model(model_name, num_classes=0).num_features
