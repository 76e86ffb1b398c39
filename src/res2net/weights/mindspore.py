"""MindSpore checkpoints (`.ckpt`) without MindSpore: read, write, and map MindCV's names to ours.

A MindSpore checkpoint is one protobuf `Checkpoint` message::

    message Checkpoint  { repeated Value value = 1; }
    message Value       { string tag = 1; TensorProto tensor = 2; MapTensorProto maptensor = 3; }
    message TensorProto { repeated int64 dims = 1; string tensor_type = 2;
                          bytes tensor_content = 3; }

MindSpore writes each entry as its own serialized `Checkpoint` and concatenates them (which is
the same message); a tensor over 512 MiB is split over consecutive entries with the same tag,
each carrying the full dims; a 0-d tensor has dims [0]; `save_checkpoint(crc_check=True)`
appends b"crc_num" and a 10-byte big-endian CRC-32 of everything before it.

The file is decoded by a small hand-written protobuf wire-format reader rather than the
`protobuf` package, so that every length is checked against the bytes actually left before
anything is sliced or allocated: no allocation exceeds the file size, a lying or truncated file
raises `ValueError` (naming the file) instead of hanging, over-allocating or crashing, and no
generated protobuf code or MindSpore install is needed. Reading takes at most twice the file's
size (its bytes, and the copies of the tensors returned) plus about 1.5 KiB per entry, and a file
may have at most `MAX_ENTRIES` entries: at most 2x the file + 64 MiB in all.
"""

from __future__ import annotations

import binascii
import itertools
import math
import os
import re
from collections.abc import Iterator
from typing import BinaryIO

import torch
from torch import nn

from ..errors import CheckpointError
from ..fileio import atomic_write
from ..guards import open_regular_file

# MindSpore's tensor_type names (`str(Tensor.dtype)`) <-> torch dtypes
_MS_TO_TORCH: dict[str, torch.dtype] = {
    "Float16": torch.float16,
    "Float32": torch.float32,
    "Float64": torch.float64,
    "BFloat16": torch.bfloat16,
    "Int8": torch.int8,
    "Int16": torch.int16,
    "Int32": torch.int32,
    "Int64": torch.int64,
    "UInt8": torch.uint8,
    "UInt16": torch.uint16,
    "UInt32": torch.uint32,
    "UInt64": torch.uint64,
    "Bool": torch.bool,
}
_TORCH_TO_MS: dict[torch.dtype, str] = {v: k for k, v in _MS_TO_TORCH.items()}

# Entries that are training state rather than model weights: optimizer slots (Momentum,
# Adam/AdamW/AdamWeightDecay, Lamb, Adagrad, RMSProp, FTRL), gradient accumulation, EMA copies,
# loss scaling and step/epoch counters.
SKIPPED_PREFIXES: tuple[str, ...] = (
    "moments.",
    "moment.",
    "moment1.",
    "moment2.",
    "accum.",
    "adam_m.",
    "adam_v.",
    "lamb_m.",
    "lamb_v.",
    "mean_grad.",
    "mean_square.",
    "accu_grads.",
    "grad_accumulations.",
    "ema.",
)
SKIPPED_NAMES: frozenset[str] = frozenset(
    {
        "global_step",
        "learning_rate",
        "scale_sense",
        "loss_scale",
        "current_iterator_step",
        "last_overflow_iterator_step",
        "epoch_num",
        "step_num",
        "beta1_power",
        "beta2_power",
        "updates",
        "ema_updates",
        "accumulation_step",
    }
)

_CRC_MARK = b"crc_num"
_CRC_TRAILER = len(_CRC_MARK) + 10
_CHUNK_BYTES = 512 * 1024 * 1024  # MindSpore's slice size for big tensors
_MAX_DIMS = 64
# bound on the product of the other dims of a tensor with a 0 dim (keeps torch's strides in range)
MAX_EMPTY_EXTENT = 1 << 40
# Entries per file: the largest MindCV checkpoints (weights plus optimizer slots) have a few
# thousand; each costs about 1 KiB of bookkeeping whatever its size.
MAX_ENTRIES = 1 << 15


def is_training_state(name: str) -> bool:
    """True for optimizer / bookkeeping entries (`moments.*`, `global_step`, ...)."""
    return name in SKIPPED_NAMES or name.startswith(SKIPPED_PREFIXES)


class _Bad(Exception):
    """Internal: the bytes are not a valid checkpoint (turned into ValueError with the path)."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= end:
            raise _Bad("a varint runs past the end of its message")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            if result >= 1 << 64:
                raise _Bad("a varint is larger than 64 bits")
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Bad("a varint is longer than 10 bytes")


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of the message in buf[pos:end]; a length-delimited value
    is a zero-copy view, checked against the bytes left before it is taken."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _Bad("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield field, wire, value
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            if size > end - pos:
                raise _Bad(f"a field claims {size} bytes but only {end - pos} are left")
            yield field, wire, buf[pos : pos + size]
            pos += size
        elif wire in (1, 5):  # fixed64 / fixed32: never used by the schema, skipped
            size = 8 if wire == 1 else 4
            if size > end - pos:
                raise _Bad("a fixed-size field runs past the end of its message")
            pos += size
        else:
            raise _Bad(f"unsupported wire type {wire} (field {field})")


def _parse_tensor(buf: memoryview) -> tuple[list[int], str, memoryview]:
    dims: list[int] = []
    tensor_type: str | None = None
    content = buf[0:0]
    for field, wire, value in _fields(buf, 0, len(buf)):
        if field == 1 and wire == 0:
            assert isinstance(value, int)
            _add_dim(dims, value)
        elif field == 1 and wire == 2:  # packed encoding: decoded no further than _MAX_DIMS
            packed = value
            assert isinstance(packed, memoryview)
            pos = 0
            while pos < len(packed):
                dim, pos = _varint(packed, pos, len(packed))
                _add_dim(dims, dim)
        elif field == 2 and wire == 2:
            tensor_type = _text(value, "tensor_type")
        elif field == 3 and wire == 2:
            assert isinstance(value, memoryview)
            content = value
        elif field in (1, 2, 3):
            raise _Bad(f"TensorProto field {field} has the wrong wire type {wire}")
    if tensor_type is None:
        raise _Bad("a tensor has no tensor_type")
    # int64 on the wire: values >= 2**63 are negative
    dims = [d - (1 << 64) if d >= 1 << 63 else d for d in dims]
    return dims, tensor_type, content


def _add_dim(dims: list[int], dim: int) -> None:
    """Append `dim`, refusing the one past `_MAX_DIMS` before it is stored: a packed field of
    millions of dims costs no more to refuse than one of 65."""
    if len(dims) == _MAX_DIMS:
        raise _Bad(f"a tensor has more than {_MAX_DIMS} dims")
    dims.append(dim)


def _text(value: int | memoryview, what: str) -> str:
    if not isinstance(value, memoryview):
        raise _Bad(f"{what} is not a string")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad(f"{what} is not valid UTF-8") from None


def _entries(
    buf: memoryview,
) -> Iterator[tuple[str, list[int], str, memoryview] | tuple[str, None, None, None]]:
    """(tag, dims, tensor_type, content) per `Value`; (tag, None, None, None) for a map tensor."""
    for field, wire, value in _fields(buf, 0, len(buf)):
        if field != 1:
            continue  # unknown top-level field: skipped like protobuf does
        if wire != 2:
            raise _Bad(f"Checkpoint.value has the wrong wire type {wire}")
        assert isinstance(value, memoryview)
        tag: str | None = None
        tensor: memoryview | None = None
        has_map = False
        for f2, w2, v2 in _fields(value, 0, len(value)):
            if f2 in (1, 2, 3) and w2 != 2:
                raise _Bad(f"Value field {f2} has the wrong wire type {w2}")
            if f2 == 1:
                tag = _text(v2, "tag")
            elif f2 == 2:
                assert isinstance(v2, memoryview)
                tensor = v2
            elif f2 == 3:
                has_map = True
        if tag is None:
            raise _Bad("an entry has no name (tag)")
        if tensor is None:
            if not has_map:
                raise _Bad(f"entry {tag!r} has no tensor")
            yield tag, None, None, None
            continue
        yield (tag, *_parse_tensor(tensor))


def _shape(
    tag: str, dims: list[int], tensor_type: str, nbytes: int
) -> tuple[list[int], torch.dtype]:
    """The shape and dtype of an entry, after checking that its dims describe exactly `nbytes`."""
    dtype = _MS_TO_TORCH.get(tensor_type)
    if dtype is None:
        raise _Bad(f"entry {tag!r} has unsupported tensor_type {tensor_type!r}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if dims == [0] and nbytes == itemsize:  # MindSpore's spelling of a 0-d tensor
        dims = []
    count = 1
    for d in dims:
        if d < 0:
            raise _Bad(f"entry {tag!r} has a negative dim {d}")
        count *= d
        if count * itemsize > nbytes:  # stop before the product gets large
            break
    if count * itemsize != nbytes:
        raise _Bad(
            f"entry {tag!r}: dims {dims[:8]} of {tensor_type} need {count * itemsize}+ bytes, not "
            f"{nbytes}"
        )
    if count == 0 and math.prod(d for d in dims if d) > MAX_EMPTY_EXTENT:
        raise _Bad(f"entry {tag!r} is empty but has dims {dims[:8]}")
    return dims, dtype


def _to_tensor(
    tag: str, dims: list[int], tensor_type: str, parts: list[memoryview]
) -> torch.Tensor:
    nbytes = sum(len(p) for p in parts)
    dims, dtype = _shape(tag, dims, tensor_type, nbytes)
    if math.prod(dims) == 0:
        return torch.empty(dims, dtype=dtype)
    raw = bytearray(nbytes)  # the tensor's one copy, filled slice by slice
    pos = 0
    for part in parts:
        raw[pos : pos + len(part)] = part
        pos += len(part)
    if dtype == torch.bool:  # any non-zero byte is True
        return torch.frombuffer(raw, dtype=torch.uint8).ne(0).reshape(dims)
    return torch.frombuffer(raw, dtype=dtype).reshape(dims)


def _decode(data: bytes | bytearray) -> tuple[dict[str, torch.Tensor], list[str]]:
    view = memoryview(data)  # slices of it are views, never copies
    if len(view) >= _CRC_TRAILER and view[-_CRC_TRAILER:-10] == _CRC_MARK:
        view, crc = view[:-_CRC_TRAILER], int.from_bytes(view[-10:], "big")
        if binascii.crc32(view) != crc:
            raise _Bad("the CRC-32 check failed")
    # Count first: a file of many tiny entries is refused before any tensor is built.
    if sum(1 for _ in itertools.islice(_entries(view), MAX_ENTRIES + 1)) > MAX_ENTRIES:
        raise _Bad(f"it has more than {MAX_ENTRIES} entries (MindCV's have a few thousand)")
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    seen: set[str] = set()
    # consecutive entries with one tag are slices of one tensor (MindSpore splits big tensors)
    pending: tuple[str, list[int], str, list[memoryview]] | None = None

    def finish(tag: str, dims: list[int], tensor_type: str, parts: list[memoryview]) -> None:
        if tag in seen:
            raise _Bad(f"entry {tag!r} appears twice")
        seen.add(tag)
        if tensor_type == "str" or is_training_state(tag):
            if tensor_type != "str":
                _shape(tag, dims, tensor_type, sum(len(p) for p in parts))  # validated all the same
            skipped.append(tag)
        else:
            tensors[tag] = _to_tensor(tag, dims, tensor_type, parts)

    for tag, dims, tensor_type, content in _entries(view):
        if pending is not None and dims is not None and pending[0] == tag:
            if pending[1] != dims or pending[2] != tensor_type:
                raise _Bad(f"the slices of entry {tag!r} disagree on dims or tensor_type")
            assert content is not None  # dims and content are None together (a map tensor)
            pending[3].append(content)
            continue
        if pending is not None:
            finish(*pending)
            pending = None
        if dims is None:  # MindSpore MapParameter (embedding cache): no dense tensor to load
            if tag not in seen:
                seen.add(tag)
                skipped.append(tag)
            continue
        assert tensor_type is not None and content is not None
        pending = (tag, dims, tensor_type, [content])
    if pending is not None:
        finish(*pending)
    if not tensors and not skipped:
        raise _Bad("it holds no entries")
    return tensors, skipped


def read_mindspore_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read a MindSpore `.ckpt` file: (name -> tensor in the stored dtype, names skipped).

    Optimizer and bookkeeping entries (`moments.*`, `adam_m.*`, `global_step`, `learning_rate`,
    ... see `is_training_state`), string entries and map tensors are validated but not
    returned; their names come back in the second list. A file that is not a complete, valid
    checkpoint raises CheckpointError naming it.
    """
    with open_regular_file(path, "checkpoint") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)  # read in place: no second buffer
        data = data[: f.readinto(data)]
    return decode_mindspore_checkpoint(data, path)


def decode_mindspore_checkpoint(
    data: bytes | bytearray, path: str | os.PathLike
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`read_mindspore_checkpoint` of bytes already read from `path` (named in errors)."""
    try:
        return _decode(data)
    except _Bad as e:
        raise CheckpointError(
            f"{os.fspath(path)!s} is not a valid, complete MindSpore checkpoint: {e}"
        ) from None


def _key(field: int, wire: int) -> bytes:
    return _encode_varint(field << 3 | wire)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # int64 two's complement, as protobuf does
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _write_entry(
    f: BinaryIO, name: str, dims: list[int], tensor_type: str, content: memoryview
) -> None:
    """One `Checkpoint` holding one `Value`, streamed without copying `content`."""
    tag = name.encode("utf-8")
    type_b = tensor_type.encode("ascii")
    tensor_head = b"".join(_key(1, 0) + _encode_varint(d) for d in dims)
    tensor_head += _key(2, 2) + _encode_varint(len(type_b)) + type_b
    tensor_head += _key(3, 2) + _encode_varint(len(content))
    tensor_len = len(tensor_head) + len(content)
    value_head = (
        _key(1, 2) + _encode_varint(len(tag)) + tag + _key(2, 2) + _encode_varint(tensor_len)
    )
    value_len = len(value_head) + tensor_len
    f.write(_key(1, 2) + _encode_varint(value_len) + value_head + tensor_head)
    f.write(content)


def write_mindspore_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` as a MindSpore `.ckpt` that `mindspore.load_checkpoint` reads.

    Dtypes keep MindSpore's names (Float32, Float16, Int64, ...); a 0-d tensor is stored with
    dims [0] as MindSpore does. The file is written atomically (`res2net.fileio.atomic_write`):
    readers never see a partial file.
    """
    entries = []
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(
                f"write_mindspore_checkpoint needs str -> torch.Tensor, got {type(name)} -> "
                f"{type(t)}"
            )
        if t.dtype not in _TORCH_TO_MS:
            raise CheckpointError(f"{name!r}: dtype {t.dtype} has no MindSpore checkpoint type")
        entries.append((name, t.detach().cpu().contiguous()))

    def write(f: BinaryIO) -> None:
        for name, t in entries:
            dims = list(t.shape) if t.dim() > 0 else [0]
            raw = t.reshape(-1).view(torch.uint8).numpy().data
            step = max(_CHUNK_BYTES - _CHUNK_BYTES % t.element_size(), t.element_size())
            for start in range(0, max(len(raw), 1), step):
                _write_entry(f, name, dims, _TORCH_TO_MS[t.dtype], raw[start : start + step])

    atomic_write(path, write)


# --- MindCV <-> our parameter names ------------------------------------------------------------

_BN_MINDCV_TO_OURS = {
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}
_BN_OURS_TO_MINDCV = {v: k for k, v in _BN_MINDCV_TO_OURS.items()}


def _shortcut_shift(model: nn.Module, block: str) -> int:
    """How far the index of a shortcut module moves from MindCV's layout to ours: +1 where our
    shortcut starts with an Identity in place of a pool (v1b, stride 1) and MindCV's has none."""
    try:
        shortcut = model.get_submodule(f"{block}.downsample")
    except AttributeError:
        return 0
    first = next(iter(shortcut.children()), None)
    return 1 if isinstance(first, nn.Identity) else 0


def _rename(name: str, model: nn.Module, to_ours: bool) -> str:
    parts = name.split(".")
    if to_ours:
        # gamma/beta/moving_* only exist in MindSpore's BatchNorm
        parts[-1] = _BN_MINDCV_TO_OURS.get(parts[-1], parts[-1])
    elif parts[-1] in _BN_OURS_TO_MINDCV and _is_batchnorm(model, ".".join(parts[:-1])):
        parts[-1] = _BN_OURS_TO_MINDCV[parts[-1]]
    head, new_head = ("classifier", "fc") if to_ours else ("fc", "classifier")
    if parts[0] == head:
        parts[0] = new_head
    src, dst = ("down_sample", "downsample") if to_ours else ("downsample", "down_sample")
    if src in parts:
        i = parts.index(src)
        parts[i] = dst
        if i + 1 < len(parts) and re.fullmatch(r"[0-9]{1,9}", parts[i + 1]):
            shift = _shortcut_shift(model, ".".join(parts[:i]))
            parts[i + 1] = str(int(parts[i + 1]) + (shift if to_ours else -shift))
    return ".".join(parts)


def _is_batchnorm(model: nn.Module, module_name: str) -> bool:
    try:
        return isinstance(model.get_submodule(module_name), nn.modules.batchnorm._BatchNorm)
    except AttributeError:
        return False


def mindcv_to_ours(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a MindCV Res2Net state (`bn1.gamma`, `layer1.0.down_sample.0.weight`,
    `classifier.weight`) to `model`'s names (`bn1.weight`, `layer1.0.downsample.1.weight`,
    `fc.weight`). BatchNorm `num_batches_tracked`, which MindSpore does not keep, is filled with
    0 for every BatchNorm whose statistics are given. Values are not cast."""
    out = {_rename(k, model, to_ours=True): v for k, v in state.items()}
    for key in model.state_dict():
        if (
            key.endswith(".num_batches_tracked")
            and key[: -len("num_batches_tracked")] + "running_mean" in out
        ):
            out.setdefault(key, torch.zeros((), dtype=torch.long))
    return out


def ours_to_mindcv(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of `mindcv_to_ours`: `model`'s names to MindCV's, dropping BatchNorm
    `num_batches_tracked`."""
    return {
        _rename(k, model, to_ours=False): v
        for k, v in state.items()
        if not k.endswith(".num_batches_tracked")
    }
