"""MindSpore checkpoints: MindCV's logits reproduced, write/read round trips, name mapping, and
hostile files (truncated, bit-flipped, random or lying) that must only ever raise ValueError."""

from __future__ import annotations

import binascii
import math
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from res2net.models import Res2Net
from res2net.weights import mindspore as ms
from res2net.weights.mindspore import (
    mindcv_to_ours,
    ours_to_mindcv,
    read_mindspore_checkpoint,
    write_mindspore_checkpoint,
)

FIXTURES = Path(__file__).parent / "fixtures" / "mindcv"
TINY = dict(layers=(1, 1, 1, 1), base_width=4, scale=4, num_classes=10)
V1B = dict(deep_stem=True, avg_down=True)
INVALID = "is not a valid, complete MindSpore checkpoint"


# --- a minimal protobuf encoder, independent of the module's writer ---------------------------


def _vi(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _ld(field: int, payload: bytes, lie: int = 0) -> bytes:
    """A length-delimited field whose length prefix is off by `lie`."""
    return _vi(field << 3 | 2) + _vi(max(0, len(payload) + lie)) + payload


def _entry(
    tag: bytes,
    dims: list[int],
    ttype: bytes,
    content: bytes,
    lies: tuple[int, int, int] = (0, 0, 0),
) -> bytes:
    tensor = b"".join(_vi(1 << 3) + _vi(d) for d in dims) + _ld(2, ttype) + _ld(3, content, lies[0])
    return _ld(1, _ld(1, tag) + _ld(2, tensor, lies[1]), lies[2])


def _int8(tag: bytes) -> bytes:
    return _entry(tag, [1], b"Int8", b"\x01")


# --- MindCV's logits ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, kw", [("res2net_tiny", {}), ("res2net_v1b_tiny", V1B)])
def test_mindcv_logits_reproduced(name, kw):
    state, skipped = read_mindspore_checkpoint(FIXTURES / f"{name}.ckpt")
    assert skipped == []
    assert all(t.dtype == torch.float16 for t in state.values())
    model = Res2Net(**TINY, **kw).eval()
    mapped = {k: v.float() for k, v in mindcv_to_ours(state, model).items()}
    model.load_state_dict(mapped, strict=True)
    x = torch.from_numpy(np.load(FIXTURES / "input.npy"))
    theirs = torch.from_numpy(np.load(FIXTURES / f"{name}_logits.npy"))
    with torch.no_grad():
        ours = model(x)
    rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert rel < 1e-4, rel


@pytest.mark.parametrize("name, kw", [("res2net_tiny", {}), ("res2net_v1b_tiny", V1B)])
def test_our_names_map_onto_mindcv_names(name, kw):
    state, _ = read_mindspore_checkpoint(FIXTURES / f"{name}.ckpt")
    model = Res2Net(**TINY, **kw)
    back = ours_to_mindcv(model.state_dict(), model)
    assert set(back) == set(state)
    assert all(back[k].shape == state[k].shape for k in state)


# --- name mapping ------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, V1B], ids=["classic", "v1b"])
def test_mapping_round_trip(kw):
    model = Res2Net(layers=(2, 1, 1, 1), base_width=4, scale=4, num_classes=7, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    ours = model.state_dict()
    theirs = ours_to_mindcv(ours, model)
    assert not any(k.endswith("num_batches_tracked") for k in theirs)
    assert all(
        k.startswith(("conv1.", "bn1.", "layer", "classifier."))
        and "downsample" not in k
        and ".running_" not in k
        for k in theirs
    )
    if kw:  # v1b: MindCV's stride-1 shortcut is [conv, bn], ours [Identity, conv, bn]
        assert (
            "layer1.0.down_sample.0.weight" in theirs and "layer2.0.down_sample.1.weight" in theirs
        )
    back = mindcv_to_ours(theirs, model)
    assert set(back) == set(ours)
    for k, v in ours.items():
        assert torch.equal(back[k], v), k


def test_missing_num_batches_tracked_filled():
    model = Res2Net(**TINY)
    state, _ = read_mindspore_checkpoint(FIXTURES / "res2net_tiny.ckpt")
    mapped = mindcv_to_ours(state, model)
    result = model.load_state_dict(mapped, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert mapped["bn1.num_batches_tracked"].item() == 0


# --- writing and reading -----------------------------------------------------------------------


def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f16": torch.randn(3, 4, generator=g).half(),
        "f32": torch.randn(2, 3, 1, 1, generator=g),
        "f64": torch.randn(5, generator=g).double(),
        "bf16": torch.randn(4, 2, generator=g).bfloat16(),
        "i8": torch.randint(-128, 128, (6,), generator=g, dtype=torch.int8),
        "i16": torch.randint(-(2**15), 2**15, (2, 2), generator=g, dtype=torch.int16),
        "i32": torch.randint(-(2**31), 2**31 - 1, (3,), generator=g, dtype=torch.int32),
        "i64": torch.tensor([-(2**63), 0, 2**63 - 1]),
        "u8": torch.randint(0, 256, (7,), generator=g, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "scalar_int": torch.tensor(7, dtype=torch.int32),
        "empty": torch.empty(0, 3),
        "layer1.0.down_sample.1.gamma": torch.ones(8),
        "non_contiguous": torch.arange(12.0).reshape(3, 4).t(),
    }


def test_write_read_round_trip(tmp_path):
    tensors = _sample_tensors()
    path = tmp_path / "all.ckpt"
    write_mindspore_checkpoint(path, tensors)
    back, skipped = read_mindspore_checkpoint(path)
    assert skipped == []
    assert list(back) == list(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype, name
        assert back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name
    assert [p.name for p in tmp_path.iterdir()] == ["all.ckpt"]  # no temporary left behind


def test_write_matches_mindspore_bytes(tmp_path):
    """Our writer produces the exact bytes MindSpore wrote for the fixture."""
    original = FIXTURES / "res2net_tiny.ckpt"
    state, _ = read_mindspore_checkpoint(original)
    write_mindspore_checkpoint(tmp_path / "copy.ckpt", state)
    assert (tmp_path / "copy.ckpt").read_bytes() == original.read_bytes()


def test_write_replaces_atomically(tmp_path, monkeypatch):
    path = tmp_path / "w.ckpt"
    write_mindspore_checkpoint(path, {"a": torch.ones(2)})
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ms, "_write_entry", boom)
    with pytest.raises(OSError):
        write_mindspore_checkpoint(path, {"a": torch.zeros(2)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.ckpt"]
    with pytest.raises(ValueError):
        write_mindspore_checkpoint(path, {"c": torch.ones(2, dtype=torch.complex64)})


def test_big_tensors_split_and_joined(tmp_path, monkeypatch):
    """MindSpore splits big tensors over consecutive entries with one tag; both directions."""
    monkeypatch.setattr(ms, "_CHUNK_BYTES", 16)
    t = torch.arange(30, dtype=torch.float32).reshape(5, 6)
    path = tmp_path / "split.ckpt"
    write_mindspore_checkpoint(path, {"w": t, "b": torch.ones(3)})
    assert path.read_bytes().count(b"\x0a\x01w") == 8  # 120 bytes in 16-byte slices
    back, _ = read_mindspore_checkpoint(path)
    assert torch.equal(back["w"], t) and torch.equal(back["b"], torch.ones(3))


def test_skipped_entries_reported(tmp_path):
    path = tmp_path / "train.ckpt"
    write_mindspore_checkpoint(
        path,
        {
            "conv1.weight": torch.ones(2, 1, 1, 1),
            "moments.conv1.weight": torch.zeros(2, 1, 1, 1),
            "adam_m.conv1.weight": torch.zeros(2, 1, 1, 1),
            "accu_grads.conv1.weight": torch.zeros(2, 1, 1, 1),
            "global_step": torch.tensor([100], dtype=torch.int32),
            "learning_rate": torch.tensor(0.1),
            "scale_sense": torch.tensor(1024.0),
            "bn1.gamma": torch.ones(2),
        },
    )
    tensors, skipped = read_mindspore_checkpoint(path)
    assert list(tensors) == ["conv1.weight", "bn1.gamma"]
    assert skipped == [
        "moments.conv1.weight",
        "adam_m.conv1.weight",
        "accu_grads.conv1.weight",
        "global_step",
        "learning_rate",
        "scale_sense",
    ]


def test_string_entries_skipped_and_crc_checked(tmp_path):
    body = _entry(b"w", [2], b"Float32", np.float32([1, 2]).tobytes())
    body += _entry(b"epoch_info", [0], b"str", "ep3".encode("utf-32-le"))
    path = tmp_path / "crc.ckpt"
    path.write_bytes(body + b"crc_num" + binascii.crc32(body).to_bytes(10, "big"))
    tensors, skipped = read_mindspore_checkpoint(path)
    assert torch.equal(tensors["w"], torch.tensor([1.0, 2.0])) and skipped == ["epoch_info"]
    path.write_bytes(body + b"crc_num" + (binascii.crc32(body) ^ 1).to_bytes(10, "big"))
    with pytest.raises(ValueError, match="CRC"):
        read_mindspore_checkpoint(path)


@pytest.mark.parametrize(
    "data, why",
    [
        (b"", "no entries"),
        (_entry(b"w", [2, 3], b"Float32", bytes(20)), "need"),
        (_entry(b"w", [-1], b"Float32", bytes(4)), "negative"),
        (_entry(b"w", [2], b"Complex64", bytes(16)), "unsupported tensor_type"),
        (_entry(b"w", [2], b"Float32", bytes(8), lies=(1, 0, 0)), "claims"),
        (_entry(b"w", [2], b"Float32", bytes(8), lies=(0, 0, 2**40)), "claims"),
        (_int8(b"w") + _int8(b"v") + _int8(b"w"), "twice"),
        (b"\x0a" + b"\xff" * 11, "varint"),
        (b"\x0b\x0c", "wire type"),
        (_ld(1, _ld(1, b"\xff\xfe") + _ld(2, _ld(2, b"Int8") + _ld(3, b"\x01"))), "UTF-8"),
    ],
    ids=[
        "empty",
        "dims",
        "negative",
        "type",
        "content_len",
        "entry_len",
        "twice",
        "varint",
        "wire",
        "utf8",
    ],
)
def test_invalid_files_named_errors(tmp_path, data, why):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=why) as info:
        read_mindspore_checkpoint(path)
    assert str(path) in str(info.value) and INVALID in str(info.value)


def test_huge_claimed_tensor_rejected_without_allocating(tmp_path):
    path = tmp_path / "huge.ckpt"
    path.write_bytes(_entry(b"w", [2**20, 2**20], b"Float32", bytes(16)))  # 2**40 elements
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ValueError, match="need"):
            read_mindspore_checkpoint(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0
    assert peak < 1 << 20


def test_millions_of_packed_dims_are_refused_before_decoding_them(tmp_path):
    tensor = _ld(1, b"\x01" * (4 << 20)) + _ld(2, b"Float32") + _ld(3, b"")
    data = _ld(1, _ld(1, b"w") + _ld(2, tensor))  # 4 million dims in one packed field
    path = tmp_path / "dims.ckpt"
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ValueError, match="more than 64 dims") as info:
            ms.decode_mindspore_checkpoint(data, path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert time.perf_counter() - start < 1.0
    assert peak < 1 << 20  # decoded first, the dims took 32 MiB


def test_a_tensor_split_over_entries_is_copied_once(tmp_path, monkeypatch):
    monkeypatch.setattr(ms, "_CHUNK_BYTES", 1 << 20)
    t = torch.arange(2 << 20, dtype=torch.float32)  # 8 MiB in 8 slices
    path = tmp_path / "split.ckpt"
    write_mindspore_checkpoint(path, {"w": t})
    data = path.read_bytes()
    tracemalloc.start()
    try:
        back, _ = ms.decode_mindspore_checkpoint(data, path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert torch.equal(back["w"], t)
    assert peak < 12 << 20  # the tensor's 8 MiB once (joined, then copied: 16 MiB)


# --- hostile files -----------------------------------------------------------------------------


def _small_valid() -> bytes:
    body = b"".join(
        [
            _entry(b"conv.weight", [2, 1, 1, 2], b"Float16", np.float16([1, -2, 3, 0.5]).tobytes()),
            _entry(b"bn.moving_mean", [3], b"Float32", np.float32([0.1, 0.2, 0.3]).tobytes()),
            _entry(b"step", [0], b"Int64", np.int64([7]).tobytes()),
            _entry(b"mask", [2], b"Bool", b"\x01\x00"),
            _entry(b"global_step", [1], b"Int32", np.int32([9]).tobytes()),
        ]
    )
    return body


SMALL = _small_valid()
SMALL_TENSORS, SMALL_SKIPPED = ms._decode(SMALL)


def _assert_only_value_error(
    path: Path, data: bytes
) -> tuple[dict[str, torch.Tensor], list[str]] | None:
    path.write_bytes(data)
    try:
        tensors, skipped = read_mindspore_checkpoint(path)
    except ValueError as e:
        assert str(path) in str(e) and INVALID in str(e), str(e)
        return None
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items())
    assert all(isinstance(k, str) for k in skipped)
    assert sum(v.numel() * v.element_size() for v in tensors.values()) <= len(data)
    return tensors, skipped


def test_every_truncation(tmp_path):
    """A cut inside an entry is an error; a cut between entries reads as fewer entries."""
    path = tmp_path / "cut.ckpt"
    for n in range(len(SMALL)):
        result = _assert_only_value_error(path, SMALL[:n])
        if result is not None:
            tensors, skipped = result
            assert set(tensors) < set(SMALL_TENSORS) or len(skipped) < len(SMALL_SKIPPED)
            assert all(torch.equal(v, SMALL_TENSORS[k]) for k, v in tensors.items())


_TENSOR_TYPES = [
    b"Float16",
    b"Float32",
    b"Float64",
    b"Int8",
    b"Int64",
    b"UInt8",
    b"Bool",
    b"BFloat16",
    b"str",
]
_ITEMSIZE = {
    b"Float16": 2,
    b"Float32": 4,
    b"Float64": 8,
    b"Int8": 1,
    b"Int64": 8,
    b"UInt8": 1,
    b"Bool": 1,
    b"BFloat16": 2,
}
_JUNK_TYPES = [b"Int4", b"float32", b"", b"Float\xff", b"Float32\x00"]
_HUGE = [2**31, 2**32, 2**40, 2**62, 2**63 - 1, -(2**63), -1]
_LIES = [0] * 8 + [1, -1, 7, 2**31, 2**40, 2**63]
_TOKENS = [
    b"\x0b",
    b"\x0c",
    b"\x0e",
    b"\x0f",
    b"\xff" * 11,
    b"\x00",
    b"\x08\x01",
    b"\x0d\x00\x00\x00\x00",
]


@st.composite
def _crafted(draw) -> bytes:
    """Entries with lying length prefixes, dims, types and content sizes, plus stray tokens."""
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        dims = draw(st.lists(st.one_of(st.integers(0, 6), st.sampled_from(_HUGE)), max_size=5))
        ttype = draw(st.sampled_from(_TENSOR_TYPES + _JUNK_TYPES))
        size = _ITEMSIZE.get(ttype, 1) * math.prod(max(d, 0) for d in dims)
        if draw(st.booleans()) and size <= 64:  # content that agrees with the dims
            content = draw(st.binary(min_size=size, max_size=size))
        else:
            content = draw(st.binary(max_size=48))
        tag = draw(
            st.sampled_from([b"w", b"b", b"w", b"b", b"global_step", b"moments.w", b"\xff\xfe"])
        )
        lies = (
            draw(st.sampled_from(_LIES)),
            draw(st.sampled_from(_LIES)),
            draw(st.sampled_from(_LIES)),
        )
        out += draw(st.sampled_from([b""] * 4 + _TOKENS)) + _entry(tag, dims, ttype, content, lies)
    return out + draw(st.sampled_from([b""] * 4 + _TOKENS))


@st.composite
def _bit_flips(draw) -> bytes:
    data = bytearray(SMALL)
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


@st.composite
def _splices(draw) -> bytes:
    start = draw(st.integers(0, len(SMALL)))
    end = draw(st.integers(start, len(SMALL)))
    return SMALL[:start] + draw(st.binary(max_size=16)) + SMALL[end:]


HOSTILE = st.one_of(
    st.integers(0, len(SMALL) - 1).map(lambda n: SMALL[:n]),
    _bit_flips(),
    _splices(),
    st.binary(max_size=256),
    _crafted(),
)


@pytest.fixture(scope="module")
def fuzz_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "hostile.ckpt"


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=HOSTILE)
def test_hostile_files_only_raise_value_error(fuzz_path, data):
    _assert_only_value_error(fuzz_path, data)


@pytest.mark.slow
@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=HOSTILE)
def test_hostile_files_only_raise_value_error_long(fuzz_path, data):
    _assert_only_value_error(fuzz_path, data)
