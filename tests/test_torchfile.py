"""The torch-file reader under attack: the zip end records (Python's zipfile and torch's reader
must see one central directory), the pickle budget (every opcode that builds something is
charged) and tensor views (no view holds more elements than its storage). Each attack file is
built here, tiny, and must be refused in one line naming it, with exit code 2 from the command
line, before anything large is allocated."""

from __future__ import annotations

import contextlib
import io
import struct
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from res2net.cli.main import main as cli_main
from res2net.errors import CheckpointError
from res2net.models import ARCHITECTURES, Res2Net
from res2net.weights import torchfile
from res2net.weights.loading import Checkpoint, load_checkpoint, read_checkpoint

from .test_checkpoint_value import huge_bytearray_pickle, torch_zip

pytestmark = pytest.mark.usefixtures("single_thread")
MiB = 1 << 20
TINY = "res2net_tiny_test"
ARCH = dict(layers=(1, 1, 1, 1), base_width=4, scale=4)


@pytest.fixture()
def tiny(monkeypatch) -> Res2Net:
    monkeypatch.setitem(ARCHITECTURES, TINY, (Res2Net, dict(ARCH)))
    torch.manual_seed(0)
    return Res2Net(**ARCH, num_classes=3).eval()


def refused_in_one_line(path: Path, tmp_path: Path, capsys, *reason: str) -> None:
    """`read_checkpoint(path)` and `res2net convert path` refuse it: one line naming it, exit 2."""
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    assert all(r in message for r in reason), message
    code = cli_main(["convert", str(path), str(tmp_path / "out.safetensors"), "--model", TINY])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and str(path) in err, (code, err)


@contextlib.contextmanager
def python_peak() -> Iterator[list[int]]:
    """The peak of Python's allocations inside the block (tracemalloc), in a one-item list."""
    peak = [0]
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak[0] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def rss_growth(run: Callable[[], object]) -> int:
    """Peak resident memory growth while `run()` runs (VmHWM reset through clear_refs first);
    unlike tracemalloc it sees torch's own allocations."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    with contextlib.suppress(CheckpointError):
        run()
    return _status("VmHWM") - base


# --- (a) one central directory for both readers -------------------------------------------------


def zip_records(data: bytes) -> list[tuple[str, bytes]]:
    archive = zipfile.ZipFile(io.BytesIO(data))
    return [(r.filename, archive.read(r)) for r in archive.infolist()]


def zip_parts(
    records: list[tuple[str, bytes]], base: int, last_comment: int = 0
) -> tuple[bytes, bytes]:
    """Stored local records placed at offset `base`, and their central headers (the last one
    announcing a comment of `last_comment` bytes, not included)."""
    local, central = b"", b""
    for i, (name, payload) in enumerate(records):
        raw, crc, n = name.encode(), zlib.crc32(payload), len(payload)
        comment = last_comment if i == len(records) - 1 else 0
        offset = base + len(local)
        local += struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 0, 0, 0, crc, n, n, len(raw), 0)
        local += raw + payload
        central += struct.pack(
            "<4s6H3I5H2I",
            b"PK\x01\x02",
            20,
            20,
            0,
            0,
            0,
            0,
            crc,
            n,
            n,
            len(raw),
            0,
            comment,
            0,
            0,
            0,
            offset,
        )
        central += raw
    return local, central


def end_record(count: int, size: int, offset: int) -> bytes:
    return struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, count, count, size, offset, 0)


def zip64_end(count: int, size: int, offset: int) -> bytes:
    return struct.pack("<4sQ2H2I4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, size, offset)


def locator(at: int) -> bytes:
    return struct.pack("<4sIQI", b"PK\x06\x07", 0, at, 1)


def locator_in_comment(hostile: list[tuple[str, bytes]]) -> bytes:
    """The attack: a benign archive whose last central header's comment hides another archive
    (`hostile`'s records and central directory) and a zip64 end record for it, then, as the
    comment's last 20 bytes, a zip64 locator pointing there. Python's zipfile finds no zip64
    record just before the locator and reads the benign directory; torch's reader follows the
    locator and reads the hostile one."""
    benign = zip_records(torch_zip({"fc.weight": torch.zeros(2, 3)}))
    local, central = zip_parts(benign, 0)
    comment_start = len(local) + len(central)
    h_local, h_central = zip_parts(hostile, comment_start)
    h_dir = comment_start + len(h_local)
    record_at = h_dir + len(h_central)
    comment = h_local + h_central + zip64_end(len(hostile), len(h_central), h_dir)
    comment += b"\0" * 4 + locator(record_at)  # not just before the locator: zipfile skips it
    local, central = zip_parts(benign, 0, last_comment=len(comment))
    directory = central + comment
    return local + directory + end_record(len(benign), len(directory), len(local))


def test_the_attack_file_shows_each_reader_other_weights():
    """The attack is real: zipfile sees the benign zeros, torch's reader the hostile sevens."""
    data = locator_in_comment(zip_records(torch_zip({"fc.weight": torch.full((2, 3), 7.0)})))
    assert len(data) < 4096
    assert zipfile.ZipFile(io.BytesIO(data)).read("archive/data/0") == bytes(24)
    loaded = torch.load(io.BytesIO(data), weights_only=True)  # what an unchecked load reads
    assert loaded["fc.weight"].eq(7).all()


@pytest.mark.parametrize("hostile", ["other weights", "bytearray"])
def test_a_zip64_locator_hidden_in_a_comment_is_refused(tiny, tmp_path, capsys, hostile):
    records = zip_records(torch_zip({"fc.weight": torch.full((2, 3), 7.0)}))
    if hostile == "bytearray":  # torch.load would build bytearray(1 GiB)
        records = [
            (n, huge_bytearray_pickle(1 << 30) if n.endswith("data.pkl") else d) for n, d in records
        ]
    path = tmp_path / "locator.pt"
    path.write_bytes(locator_in_comment(records))
    with python_peak() as peak:
        refused_in_one_line(path, tmp_path, capsys, "zip64 locator")
    assert peak[0] < 16 * MiB, peak


def rezipped(
    records: list[tuple[str, bytes]], comment: bytes = b"", extra: bytes = b""
) -> zipfile.ZipFile:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        for i, (name, payload) in enumerate(records):
            info = zipfile.ZipInfo(name)
            if i == len(records) - 1:
                info.comment, info.extra = comment, extra
            out.writestr(info, payload)
    return buf


def odd_ends() -> dict[str, tuple[bytes, str]]:
    """Layouts the end-record and central-header checks refuse: name -> (file, reason)."""
    good = torch_zip()
    eocd = len(good) - 22
    records = zip_records(good)
    local, central = zip_parts(records, 0)
    plain = local + central + end_record(len(records), len(central), len(local))
    moved = zip64_end(len(records), len(central), len(local))
    return {
        "comment": (rezipped(records, comment=b"hi").getvalue(), "has a comment"),
        "extra field": (rezipped(records, extra=b"xy\x00\x00").getvalue(), "extra field"),
        "archive comment": (good[:-2] + b"\x04\x00abcd", "not at the very end"),
        "trailing data": (good + b"\0" * 8, "not at the very end"),
        # the locator points 8 bytes early: both records present, readers pick different ones
        "locator elsewhere": (
            good[: eocd - 20] + locator(eocd - 20 - 56 - 8) + good[eocd:],
            "zip64 locator",
        ),
        "zip64 disagrees": (
            local
            + central
            + zip64_end(len(records), len(central), len(local) + 1)
            + locator(len(local) + len(central))
            + end_record(len(records), len(central), len(local)),
            "different central directories",
        ),
        "directory offset": (
            local + central + end_record(len(records), len(central), len(local) - 1),
            "does not end where its end records begin",
        ),
        "gap before end": (
            local + central + moved + end_record(len(records), len(central), len(local)),
            "does not end where its end records begin",
        ),
        "plain": (plain, ""),
    }


@pytest.mark.parametrize("name", [n for n in odd_ends() if n != "plain"])
def test_end_records_and_central_headers_that_readers_could_read_differently(
    tiny, tmp_path, capsys, name
):
    data, reason = odd_ends()[name]
    path = tmp_path / f"{name.replace(' ', '_')}.pt"
    path.write_bytes(data)
    refused_in_one_line(path, tmp_path, capsys, reason)


def test_torch_save_layout_with_and_without_zip64_records_loads():
    """torch.save writes a zip64 end record and its locator even for a tiny file; a zip
    without them (as Python's zipfile writes one) is fine too."""
    good = torch_zip()
    assert good[-42:-38] == b"PK\x06\x07" and good[-98:-94] == b"PK\x06\x06"
    for data in (good, odd_ends()["plain"][0]):
        state = torchfile.loads(data, "mem.pt")
        assert state["fc.weight"].shape == (2, 3)


# --- (b) every opcode that builds something is charged ------------------------------------------


def in_zip(pickle_bytes: bytes) -> bytes:
    """A torch file whose data.pkl is `pickle_bytes` (the archive itself well formed)."""
    records = [
        (n, pickle_bytes if n.endswith("/data.pkl") else d) for n, d in zip_records(torch_zip())
    ]
    return rezipped(records).getvalue()


def test_a_small_pickle_of_empty_containers_is_refused_within_the_bound(tiny, tmp_path, capsys):
    # 1.9 MB of EMPTY_DICT, EMPTY_LIST, MARK and memo references: torch.load builds ~170 MB
    hostile = b"\x80\x02]q\x00(" + b"}]h\x00" * 475_000 + b"e."
    assert len(hostile) < 2 * MiB
    path = tmp_path / "containers.pt"
    path.write_bytes(in_zip(hostile))
    with python_peak() as peak:
        refused_in_one_line(path, tmp_path, capsys, "builds far more data")
    assert peak[0] <= 2 * path.stat().st_size + 64 * MiB, peak[0] / MiB


PATTERNS = {  # a pickle body repeating one kind of opcode; each pushes onto one MARK
    "EMPTY_LIST": b"]",
    "EMPTY_DICT": b"}",
    "EMPTY_SET": b"\x8f",
    "MARK": b"(",
    "BINGET": b"h\x00",
    "LONG_BINGET": b"j\x00\x00\x00\x00",
    "DUP": b"2",
    "BINPUT": b"]q\x01",
    "MEMOIZE": b"]\x94",
    "BININT": b"J\x00\x00\x01\x00",
    "BINFLOAT": b"G" + struct.pack(">d", 1.5),
    "SHORT_BINUNICODE": b"\x8c\x02ab",
    "TUPLE2": b"\x88\x89\x86",
    "APPENDS": b"](h\x00h\x00h\x00h\x00e",
    "SETITEMS": b"}(K\x01h\x00K\x02h\x00u",
    "ADDITEMS": b"\x8f(K\x01K\x02K\x03\x90",
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_every_opcode_is_charged_at_least_what_it_allocates(name):
    data = b"\x80\x04]\x94(N" + PATTERNS[name] * 20_000 + b"l."
    scanner = torchfile._Scanner(io.BytesIO(data), 1 << 40, lambda key, nbytes: None)
    with python_peak() as peak:
        scanner.load()
    charged = (1 << 40) - scanner.budget
    assert peak[0] <= charged, (peak[0], charged)


# --- (c) no tensor view holds more elements than its storage ------------------------------------


def test_an_expanded_tensor_is_refused_before_anything_materialises_it(tiny, tmp_path, capsys):
    expanded = torch.zeros(1).expand(30_000, 15_000)  # 450 million elements, one stored
    path = tmp_path / "expanded.pt"
    torch.save({"fc.weight": expanded, "x": expanded}, path)
    assert path.stat().st_size < 4096
    refused_in_one_line(path, tmp_path, capsys, "stride 0")
    growth = rss_growth(lambda: load_checkpoint(tiny, path, strict=False))
    assert growth < 64 * MiB, growth / MiB


@pytest.mark.parametrize(
    "size, stride, reason",
    [
        ((1000, 1000), (1, 1), "overlapping strides"),
        ((4, 3), (0, 1), "stride 0"),
        ((2, 3), (3, 1), ""),  # contiguous
        ((3, 2), (1, 3), ""),  # transposed
        ((1, 5), (0, 1), ""),  # a dimension of one may have any stride
    ],
)
def test_views_that_repeat_elements_are_refused(tmp_path, size, stride, reason):
    storage = torch.zeros(max(sum((n - 1) * s for n, s in zip(size, stride)) + 1, 6))
    path = tmp_path / "view.pt"
    torch.save({"w": storage.as_strided(size, stride)}, path)
    if reason:
        with pytest.raises(CheckpointError, match=reason):
            read_checkpoint(path)
    else:
        assert read_checkpoint(path).state_dict["w"].shape == size


def test_finiteness_is_checked_on_expected_tensors_without_materialising_views(tiny, caplog):
    """A Checkpoint made in memory (no file scan): an expanded tensor the model does not expect
    is never looked at (materialised, it would need a terabyte), an expected one is checked
    element by stored element."""
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    state["fc.bias"] = torch.full((1,), float("nan")).expand(3)
    state["unexpected"] = torch.zeros(1).expand(1_000_000, 1_000_000)
    checkpoint = Checkpoint(state_dict=state, format="torch", origin="memory")
    with caplog.at_level("WARNING"):
        report = load_checkpoint(tiny, checkpoint, strict=False)
    assert report.unexpected == ["unexpected"]
    (warning,) = [r.getMessage() for r in caplog.records if "NaN or Inf" in r.getMessage()]
    assert "fc.bias" in warning and "unexpected" not in warning


def test_torchs_own_reader_is_asked_where_every_record_lies():
    """Were the end-record checks ever wrong, the last check still sees the readers disagree:
    zipfile's view of the attack file lists its records at other places than torch's reader."""
    data = locator_in_comment(zip_records(torch_zip({"fc.weight": torch.full((2, 3), 7.0)})))
    with pytest.raises(torchfile.RefusedPickle, match="readers disagree"):
        torchfile._check_torch_reader(data, zipfile.ZipFile(io.BytesIO(data)))
    good = torch_zip()
    torchfile._check_torch_reader(good, zipfile.ZipFile(io.BytesIO(good)))
