"""Weights files made to cost far more than their size: safetensors headers of millions of tiny
JSON values (or widened by one character beyond U+FFFF), metadata holding such JSON, shapes
torch cannot hold, a MindSpore tensor with millions of packed dims. Each is refused in one line
naming the file (exit 2 from the CLI), and reading any of them, or the largest headers still
accepted, stays within the bound of every weights file: twice its size plus 64 MiB."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from res2net.cli.main import main as cli_main
from res2net.errors import CheckpointError
from res2net.weights import formats
from res2net.weights.loading import read_checkpoint

from .test_mindspore_ckpt import _ld
from .test_security import deadline, peak_growth

pytestmark = pytest.mark.usefixtures("single_thread")
MiB = 1 << 20
SIZE = 16 * MiB  # the largest header a safetensors file may have


def safetensors(header: bytes, data: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + data


def repeated(prefix: bytes, item: bytes, suffix: bytes, size: int = SIZE) -> bytes:
    """`prefix`, then `item` comma-separated as often as fits in `size` bytes, then `suffix`."""
    n = (size - len(prefix) - len(suffix) + 1) // (len(item) + 1)
    return prefix + (item + b",") * (n - 1) + item + suffix


def packed_dims(n: int) -> bytes:
    """A MindSpore entry whose tensor packs `n` one-byte dims into one field."""
    tensor = _ld(1, b"\x01" * n) + _ld(2, b"Float32") + _ld(3, b"")
    return _ld(1, _ld(1, b"w") + _ld(2, tensor))


# name -> (the file's bytes, made when needed; what its one line says)
HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    # the review's header: 5.6 million empty objects took 440 MiB inside json.loads
    "objects": (lambda: safetensors(repeated(b'{"x":[', b"{}", b"]}")), "more than 262144 values"),
    "numbers": (lambda: safetensors(repeated(b'{"x":{"shape":[', b"1", b"]}}")), "values"),
    "strings": (lambda: safetensors(repeated(b'{"x":{"shape":[', b'"ab"', b"]}}")), "strings"),
    "keys": (lambda: safetensors(repeated(b'{"x":{', b'"k":0', b"}}")), "strings"),
    "nested": (lambda: safetensors(b'{"x":{"shape":[[1],[2]]}}'), "nests"),
    "wide string": (
        lambda: safetensors(b'{"__metadata__":{"a":"\\ud83d\\ude00' + b"a" * (SIZE - 64) + b'"}}'),
        "beyond U+FFFF",
    ),
    "eval metadata": (
        lambda: safetensors(repeated(b'{"__metadata__":{"eval":"[', b"{}", b']"}}')),
        "metadata 'eval'",
    ),
    "class metadata": (
        lambda: safetensors(repeated(b'{"__metadata__":{"classes":"[', b"1", b']"}}')),
        "metadata 'classes'",
    ),
    "mindspore dims": (lambda: packed_dims(SIZE), "more than 64 dims"),
}

# empty tensors (11 values each) and class names (2 quotes each in the header) that fit
TENSORS = formats.MAX_HEADER_VALUES // 11
CLASSES = formats.MAX_HEADER_VALUES - 8


def tensor_entries(n: int) -> bytes:
    entry = b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    return b"{" + b",".join(entry % i for i in range(n)) + b"}"


# headers at the edge of what is accepted: read, or refused later, within the bound all the same
ACCEPTED: dict[str, Callable[[], bytes]] = {
    "most tensors": lambda: safetensors(tensor_entries(TENSORS)),
    "most metadata": lambda: safetensors(
        b'{"__metadata__":{'
        + b",".join(b'"k%d":""' % i for i in range(formats.MAX_HEADER_VALUES // 2 - 1))
        + b"}}"
    ),
    "widest": lambda: safetensors(
        b'{"__metadata__":{"a":"\\ud83d\\ude00' + b"a" * (formats.MAX_WIDE_JSON - 64) + b'"}}'
    ),
    "widest below U+FFFF": lambda: safetensors(
        b'{"__metadata__":{"a":"\\u4e00' + b"a" * (SIZE - 64) + b'"}}'
    ),
    "most classes": lambda: safetensors(
        b'{"__metadata__":{"classes":"[' + b",".join([b'\\"\\"'] * CLASSES) + b']"}}'
    ),
}


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, tuple[Path, int, str, int]]:
    """Every file above read in one subprocess: name -> (path, peak memory growth, error line
    or "OK", file size). The files (16 MiB each) are removed once measured."""
    root = tmp_path_factory.mktemp("bounds")
    paths = {}
    for name, make in {**{k: v[0] for k, v in HOSTILE.items()}, **ACCEPTED}.items():
        suffix = ".ckpt" if name.startswith("mindspore") else ".safetensors"
        paths[name] = root / (name.replace(" ", "-") + suffix)
        paths[name].write_bytes(make())
    warm_up = root / "warm-up.safetensors"
    save_file({"w": torch.ones(4)}, warm_up)
    try:
        with pytest.MonkeyPatch.context() as mp:
            # large blocks mapped and unmapped, never kept in the heap for the next file: each
            # file's growth is its own, whatever was read before it
            mp.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
            results = peak_growth(list(paths.values()), warm_up)
        return {
            name: (path, *results[str(path)], path.stat().st_size) for name, path in paths.items()
        }
    finally:
        for path in paths.values():
            path.unlink()


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_headers_are_refused_within_the_bound(measured, name):
    path, growth, line, size = measured[name]
    assert str(path) in line and HOSTILE[name][1] in line, line
    assert growth <= 2 * size + 64 * MiB, growth / MiB


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_the_largest_accepted_headers_stay_within_the_bound(measured, name):
    path, growth, line, size = measured[name]
    assert line == "OK" or str(path) in line, line
    assert growth <= 2 * size + 64 * MiB, growth / MiB


def test_the_largest_accepted_headers_are_read(tmp_path):
    path = tmp_path / "most.safetensors"
    path.write_bytes(ACCEPTED["most tensors"]())
    assert len(read_checkpoint(path).state_dict) == TENSORS
    path.write_bytes(ACCEPTED["most classes"]())
    assert read_checkpoint(path).classes == ("",) * CLASSES


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_headers_exit_2_in_one_line_naming_the_file(tmp_path, capsys, name):
    suffix = ".ckpt" if name.startswith("mindspore") else ".safetensors"
    path = tmp_path / ("hostile" + suffix)
    path.write_bytes(HOSTILE[name][0]())
    try:
        assert cli_main(["convert", str(path), str(tmp_path / "out.pth")]) == 2
    finally:
        path.unlink()  # 16 MiB: not kept with the test's folder
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and HOSTILE[name][1] in err, err
    assert not (tmp_path / "out.pth").exists()


def tensor_header(shape: object, offsets: object = (0, 0), dtype: object = "F32") -> bytes:
    entry = {"dtype": dtype, "shape": shape, "data_offsets": list(offsets)}
    return safetensors(json.dumps({"w": entry}).encode())


@pytest.mark.parametrize(
    "data, why",
    [
        (tensor_header([0, 2**63]), "is empty but has shape"),
        (tensor_header([0, 2**40, 2**40]), "is empty but has shape"),
        (tensor_header([2**64, 2**64], (0, 4)), "data_offsets"),
        (tensor_header([-1]), "malformed shape"),
        (tensor_header([1] * 65, (0, 4)), "malformed shape"),
        (tensor_header([True]), "malformed shape"),
        (tensor_header([1.0]), "malformed shape"),
        (tensor_header([2], (0, 8), "C64"), "unknown dtype"),
        (tensor_header([2], (0, 8), ["F32"]), "unknown dtype"),
        (tensor_header([2], (0, 8, 9)), "malformed"),
        (tensor_header([2], (4, 12)), "data_offsets"),
        (tensor_header([2], (0, 8)), "data_offsets"),  # no data in the file
    ],
)
def test_every_shape_dtype_or_offset_problem_is_one_line_naming_the_file(
    tmp_path, capsys, data, why
):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=why) as e:
        read_checkpoint(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert cli_main(["convert", str(path), str(tmp_path / "out.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err, err


def test_empty_tensors_within_the_bound_are_read(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(tensor_header([0, 2**20, 2**20]))
    assert read_checkpoint(path).state_dict["w"].shape == (0, 2**20, 2**20)


def test_bool_tensors_hold_only_true_and_false(tmp_path):
    path = tmp_path / "bool.safetensors"
    path.write_bytes(tensor_header([3], (0, 3), "BOOL") + b"\x00\x01\x07")
    t = read_checkpoint(path).state_dict["w"]
    assert t.tolist() == [False, True, True] and t.view(torch.uint8).tolist() == [0, 1, 1]


def test_a_string_left_open_is_scanned_once(tmp_path):
    """A header whose last string never closes and holds 250,000 escaped quotes: the scan for
    strings never starts again inside it (which would take hours)."""
    path = tmp_path / "open.safetensors"
    path.write_bytes(safetensors(b'{"a":"' + (b'\\"' + b"x" * 62) * (SIZE // 64 - 1)))
    try:
        with deadline(20), pytest.raises(CheckpointError, match="safetensors header"):
            read_checkpoint(path)
    finally:
        path.unlink()


@pytest.mark.parametrize("count", ["²", "١٢", "9" * 5000])
def test_a_class_count_of_other_digits_is_refused_naming_the_file(tmp_path, count):
    """`str.isdigit()` accepts '²' and Arabic-Indic digits, which are not a count here."""
    path = tmp_path / "odd.safetensors"
    header = json.dumps({"__metadata__": {"num_classes": count}}).encode()
    path.write_bytes(safetensors(header))
    with pytest.raises(CheckpointError, match=rf"{path}: metadata 'num_classes' must be a count"):
        read_checkpoint(str(path))
