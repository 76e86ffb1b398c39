"""`Checkpoint`: every command reads a weights file exactly once, through `read_checkpoint`, and
the torch reader loads the very bytes it checked (files whose readers could disagree are
refused in one line, before anything large is allocated)."""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from res2net.cli.main import main as cli_main
from res2net.engine import train as train_mod
from res2net.errors import CheckpointError
from res2net.models import ARCHITECTURES, Res2Net
from res2net.weights.convert import write_safetensors
from res2net.weights.loading import Checkpoint, read_checkpoint
from res2net.weights.mindspore import ours_to_mindcv, write_mindspore_checkpoint

from .conftest import rgb
from .test_train import make_folder, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = "res2net_tiny_test"
ARCH = dict(layers=(1, 1, 1, 1), base_width=4, scale=4)
EVAL = {"image_resize": 32, "crop_pct": 1.0}


@pytest.fixture()
def tiny(monkeypatch) -> Res2Net:
    monkeypatch.setitem(ARCHITECTURES, TINY, (Res2Net, dict(ARCH)))
    torch.manual_seed(0)
    return Res2Net(**ARCH, num_classes=3).eval()


def write_weights(model: Res2Net, path: Path) -> Path:
    """`model` as `path`, in the format its extension names (a .safetensors names its model)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        meta = {"arch": TINY, "num_classes": "3", "eval": json.dumps(EVAL)}
        write_safetensors(path, state, meta)
    elif path.suffix == ".ckpt":
        write_mindspore_checkpoint(path, ours_to_mindcv(state, model))
    else:
        torch.save(state, path)
    return path


@contextlib.contextmanager
def counting_opens(path: Path):
    """Count every open of `path` (os.open, open, io.open) inside the block."""
    target = os.path.realpath(path)
    opened: list[str] = []

    def counted(real):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and os.path.realpath(file) == target:
                opened.append(str(file))
            return real(file, *args, **kwargs)

        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "open", counted(os.open))
        mp.setattr(builtins, "open", counted(builtins.open))
        mp.setattr(io, "open", counted(io.open))
        yield opened


# --- 1. one value, read once --------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".ckpt"])
def test_read_checkpoint_carries_everything_from_one_read(tiny, tmp_path, suffix):
    path = write_weights(tiny, tmp_path / f"w{suffix}")
    with counting_opens(path) as opened:
        c = read_checkpoint(path, model=TINY)
    assert len(opened) == 1
    assert isinstance(c, Checkpoint) and c.num_classes == 3 and c.origin == str(path)
    assert (
        c.format == {".safetensors": "safetensors", ".pth": "torch", ".ckpt": "mindspore"}[suffix]
    )
    if suffix == ".safetensors":
        assert c.arch == TINY and c.eval is not None and c.eval.image_resize == 32
    with pytest.raises(AttributeError):
        c.format = "torch"  # frozen
    assert read_checkpoint(c) is c


def test_read_checkpoint_refuses_a_file_over_max_bytes(tiny, tmp_path):
    path = write_weights(tiny, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="w.pth: has .* bytes, more than the 1000"):
        read_checkpoint(path, max_bytes=1000)


@pytest.fixture()
def weights(tiny, tmp_path) -> Path:
    return write_weights(tiny, tmp_path / "w.safetensors")


@pytest.fixture()
def photo(tmp_path) -> Path:
    return rgb(tmp_path / "photos" / "a.png", size=(40, 40))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".ckpt"])
def test_predict_reads_the_checkpoint_once(tiny, tmp_path, photo, capsys, suffix):
    path = write_weights(tiny, tmp_path / f"w{suffix}")
    with counting_opens(path) as opened:
        assert cli_main(["predict", str(photo), "--model", TINY, "--ckpt_path", str(path)]) == 0
    assert len(opened) == 1, opened
    assert "a" in capsys.readouterr().out


def test_cam_reads_the_checkpoint_once(weights, tmp_path, photo):
    argv = ["cam", str(photo), "--model", TINY, "--ckpt_path", str(weights)]
    with counting_opens(weights) as opened:
        assert cli_main([*argv, "--out", str(tmp_path / "cam"), "--device", "cpu"]) == 0
    assert len(opened) == 1, opened


def test_serve_loads_the_checkpoint_once(weights):
    from res2net.serve import load_classifier

    with counting_opens(weights) as opened:
        classifier = load_classifier(ckpt_path=str(weights))  # the architecture from the file
    assert len(opened) == 1, opened
    assert classifier.classes == ["0", "1", "2"]


def test_validate_reads_the_checkpoint_once(weights, tmp_path, capsys):
    data = make_folder(tmp_path / "data", splits=("val",))
    argv = ["validate", "--model", TINY, "--data_dir", str(data), "--ckpt_path", str(weights)]
    with counting_opens(weights) as opened:
        assert cli_main([*argv, "--num_parallel_workers", "0", "--batch_size", "6"]) == 0
    assert len(opened) == 1, opened
    assert "top-1" in capsys.readouterr().out


def test_export_reads_the_checkpoint_once(weights, tmp_path):
    with counting_opens(weights) as opened:
        assert cli_main(["export", str(weights), str(tmp_path / "w.pt2")]) == 0
    assert len(opened) == 1, opened


@pytest.mark.parametrize("target", ["w.pth", "hub"])
def test_convert_and_the_hub_writer_read_the_checkpoint_once(weights, tmp_path, target):
    out = (
        ["--to-hub-folder", str(tmp_path / target)] if target == "hub" else [str(tmp_path / target)]
    )
    with counting_opens(weights) as opened:
        assert cli_main(["convert", str(weights), *out]) == 0
    assert len(opened) == 1, opened
    if target == "hub":
        hub = read_checkpoint(f"local-dir:{tmp_path / target}")
        assert hub.arch == TINY and hub.eval is not None and hub.eval.image_resize == 32


def _train_once(tmp_path: Path, *flags: str) -> tuple[Path, Path]:
    data = make_folder(tmp_path / "data")
    run = tmp_path / "run"
    tiny = ("--model", TINY, "--num_classes", "3", "--epoch_size")
    train_mod.train(tiny_config(data, run, *tiny, "1", *flags))
    return data, run


def test_training_reads_ckpt_path_once(weights, tmp_path):
    with counting_opens(weights) as opened:
        _train_once(tmp_path, "--ckpt_path", str(weights))
    assert len(opened) == 1, opened


@pytest.mark.usefixtures("tiny")
def test_resume_reads_last_pt_once(tmp_path):
    data, run = _train_once(tmp_path)
    last = run / "last.pt"
    cfg = tiny_config(
        data, run, "--model", TINY, "--num_classes", "3", "--epoch_size", "2", "--resume", str(last)
    )
    with counting_opens(last) as opened:
        train_mod.train(cfg)
    assert len(opened) == 1, opened


# --- 2. verified bytes are the loaded bytes -----------------------------------------------------


def torch_zip(obj=None) -> bytes:
    buf = io.BytesIO()
    torch.save(obj if obj is not None else {"fc.weight": torch.zeros(2, 3)}, buf)
    return buf.getvalue()


def huge_bytearray_pickle(nbytes: int = 3 << 30) -> bytes:
    """A legacy torch stream whose first pickle builds `bytearray(nbytes)`: a few bytes that
    `torch.load` would turn into `nbytes` of memory."""
    return (
        b"\x80\x02cbuiltins\nbytearray\nq\x00"
        + pickle.dumps(nbytes, protocol=2)[2:-1]
        + b"\x85q\x01Rq\x02."
    )


def no_torch_load(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load reached")

    monkeypatch.setattr(torch, "load", refuse)


def test_a_legacy_pickle_before_a_valid_zip_is_refused_before_loading(tmp_path, monkeypatch):
    path = tmp_path / "prefixed.pt"
    path.write_bytes(huge_bytearray_pickle() + torch_zip())
    assert zipfile.is_zipfile(path)  # what a zip reader sees: a benign archive
    no_torch_load(monkeypatch)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    message = str(e.value)
    assert (
        "\n" not in message and str(path) in message and "zip archive after other data" in message
    )


def nul_named_zip() -> bytes:
    """The issue's second file: the hostile pickle as `archive/DATA.PKL`, the benign one as
    `archive/data.pkl\\0` (Python's zipfile cuts the NUL and scans the benign one; torch's
    reader finds `DATA.PKL` without regard to case)."""
    benign = zipfile.ZipFile(io.BytesIO(torch_zip()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as out:
        out.writestr("archive/DATA.PKL", huge_bytearray_pickle())
        for info in benign.infolist():
            name = "archive/data.pklX" if info.filename == "archive/data.pkl" else info.filename
            out.writestr(name, benign.read(info))
    return buf.getvalue().replace(b"archive/data.pklX", b"archive/data.pkl\x00")


def test_names_that_readers_see_differently_are_refused_before_loading(tmp_path, monkeypatch):
    path = tmp_path / "nul.pt"
    path.write_bytes(nul_named_zip())
    no_torch_load(monkeypatch)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    assert "NUL" in message or "appears twice" in message


def odd_zips() -> dict[str, tuple[bytes, str]]:
    """name -> (a torch file with one odd zip layout, the reason its refusal gives)."""
    good = torch_zip()
    directory = good.index(b"PK\x01\x02")  # the first record's central header

    def central(offset: int, value: bytes) -> bytes:
        at = directory + offset
        return good[:at] + value + good[at + len(value) :]

    renamed = good[:directory].replace(b"archive/byteorder", b"archive/byteordeR")
    return {
        "prefix": (b"\x80\x02N." * 16 + good, "zip archive after other data"),
        "offset": (central(42, (7).to_bytes(4, "little")), "first zip record"),
        "encrypted": (central(8, (1).to_bytes(2, "little")), "encrypted"),
        "local name": (renamed + good[directory:], "differs from its directory name"),
    }


def rezipped(extra: dict[str, bytes]) -> bytes:
    """A torch file's records rewritten by Python's zipfile, with `extra` records added."""
    src = zipfile.ZipFile(io.BytesIO(torch_zip()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info))
        for name, data in extra.items():
            out.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("name", ["prefix", "offset", "encrypted", "local name"])
def test_odd_zip_layouts_are_one_line_naming_the_file(tmp_path, name):
    data, reason = odd_zips()[name]
    path = tmp_path / f"{name.replace(' ', '_')}.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and reason in message, message


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("extra", ["archive/Version", "archive/version"])
def test_names_equal_up_to_case_or_repeated_are_refused(tmp_path, extra):
    path = tmp_path / "twice.pt"
    path.write_bytes(rezipped({extra: b"3\n"}))
    with pytest.raises(CheckpointError, match="twice.pt: .*appears twice"):
        read_checkpoint(path)


@pytest.mark.parametrize("make", [huge_bytearray_pickle, nul_named_zip], ids=["prefix", "nul"])
def test_the_attack_files_allocate_nothing_large_as_weights_or_as_last_pt(tmp_path, make):
    import tracemalloc

    from res2net.engine.checkpoint import load_training_state

    path = tmp_path / "last.pt"
    path.write_bytes(make() + (torch_zip() if make is huge_bytearray_pickle else b""))
    for load in (read_checkpoint, load_training_state):
        tracemalloc.start()
        try:
            with pytest.raises(CheckpointError, match=str(path)):
                load(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 16 << 20, peak


# --- 5. every failure to read weights is one line naming the file, in every command -------------


def safetensors_with_header(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


def corpus(tmp_path: Path) -> dict[str, Path]:
    """Odd zips and odd JSON, each as the file a command is given (a folder for Hub configs)."""
    files = {name: data for name, (data, _) in odd_zips().items()}
    files["nul"] = nul_named_zip()
    files["prefixed pickle"] = huge_bytearray_pickle() + torch_zip()
    files["deep header"] = safetensors_with_header(
        b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    )
    files["long integer"] = safetensors_with_header(b'{"a": ' + b"9" * 5000 + b"}")
    files["entry not an object"] = safetensors_with_header(b'{"fc.weight": [1, 2, 3]}')
    files["metadata not strings"] = safetensors_with_header(b'{"__metadata__": {"a": 1}}')
    out = {}
    for name, data in files.items():
        path = tmp_path / "corpus" / f"{name.replace(' ', '_')}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        out[name] = path
    for name, text in (("deep config", "[" * 100_000), ("long config", "9" * 5000)):
        folder = tmp_path / "corpus" / name.replace(" ", "_")
        folder.mkdir()
        (folder / "config.json").write_text(text)
        out[name] = folder / "config.json"
    return out


def commands(
    path: Path, tmp_path: Path, data: Path, photo: Path, good: Path
) -> dict[str, list[str]]:
    """Every command that reads weights, given `path` (a file, or a Hub folder's config; `good`
    is the weights `validate` checks against a Hub model's architecture)."""
    hub = path.name == "config.json"
    source = f"local-dir:{path.parent}" if hub else str(path)
    weights = ["--model", source] if hub else ["--model", TINY, "--ckpt_path", source]
    train = ["train", "--data_dir", str(data), "--ckpt_save_dir", str(tmp_path / "run")]
    train += ["--model", TINY, "--num_classes", "3", "--epoch_size", "1", "--batch_size", "6"]
    train += ["--num_parallel_workers", "0"]
    out = {
        "predict": ["predict", str(photo), *weights],
        "cam": ["cam", str(photo), *weights, "--out", str(tmp_path / "cam")],
        "serve": ["serve", *(weights if hub else ["--ckpt_path", source]), "--port", "0"],
        "validate": ["validate", "--data_dir", str(data), "--num_parallel_workers", "0"],
        "export": ["export", source, str(tmp_path / "m.pt2"), "--model", TINY],
        "convert": ["convert", source, str(tmp_path / "m.pth"), "--model", TINY],
        "hub writer": [
            "convert",
            source,
            "--to-hub-folder",
            str(tmp_path / "hub"),
            "--model",
            TINY,
        ],
    }
    out["validate"] += weights if not hub else ["--model", source, "--ckpt_path", str(good)]
    if not hub:
        out["train"] = [*train, "--ckpt_path", source]
        out["resume"] = [*train, "--resume", source]
    return out


def test_odd_files_are_one_line_naming_the_file_in_every_command(tiny, tmp_path, photo, capsys):
    good = write_weights(tiny, tmp_path / "good.safetensors")
    data = make_folder(tmp_path / "data", per_class=2)
    failures = []
    for name, path in corpus(tmp_path).items():
        for command, argv in commands(path, tmp_path, data, photo, good).items():
            code = cli_main(argv)
            err = capsys.readouterr().err.strip()
            one_line = code == 2 and "\n" not in err and str(path) in err
            if not one_line:
                failures.append(f"{command} {name}: exit {code}: {err[-300:]}")
    assert not failures, "\n".join(failures)


# --- fuzz: zip layouts (prefixes, names, offsets, flags) and pickles ----------------------------

_GOOD_ZIP = torch_zip({"fc.weight": torch.arange(6.0).reshape(2, 3), "n": torch.tensor([1, 2])})
_GOOD_LEGACY = io.BytesIO()
torch.save({"fc.weight": torch.ones(2, 3)}, _GOOD_LEGACY, _use_new_zipfile_serialization=False)


def _header_positions(data: bytes) -> list[int]:
    """Every byte of the zip's local and central headers (names, offsets, sizes, flags) and of
    its end records (the zip64 end record, its locator, the end record)."""
    positions: list[int] = list(range(data.rfind(b"PK\x06\x06"), len(data)))
    for magic, fixed in ((b"PK\x03\x04", 30), (b"PK\x01\x02", 46)):
        start = data.find(magic)
        while start >= 0:
            n = int.from_bytes(data[start + fixed - (4 if fixed == 30 else 18) :][:2], "little")
            positions += range(start, min(start + fixed + n, len(data)))
            start = data.find(magic, start + 4)
    return positions


_POSITIONS = _header_positions(_GOOD_ZIP)
_ZIP_EDITS = st.lists(
    st.tuples(
        st.sampled_from(_POSITIONS) | st.integers(0, len(_GOOD_ZIP) - 1), st.integers(0, 255)
    ),
    max_size=6,
)


def _edited(data: bytes, edits: list[tuple[int, int]], prefix: bytes = b"") -> bytes:
    out = bytearray(data)
    for at, value in edits:
        out[at % len(out)] = value
    return prefix + bytes(out)


def _pickle_rezipped(edits: list[tuple[int, int]]) -> bytes:
    """The torch file with its data.pkl's bytes edited (the zip itself stays well formed)."""
    src = zipfile.ZipFile(io.BytesIO(_GOOD_ZIP))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        for info in src.infolist():
            data = src.read(info)
            out.writestr(
                info.filename, _edited(data, edits) if info.filename.endswith(".pkl") else data
            )
    return buf.getvalue()


def _check_weights_bytes(data: bytes, tmp: Path) -> None:
    """Either a Checkpoint whose tensors fit in the file, or one line naming it; never another
    exception, and never more Python memory than twice the file plus 64 MiB."""
    import tracemalloc

    path = tmp / "fuzz.pt"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        try:
            state = read_checkpoint(path).state_dict
        except CheckpointError as e:
            message = str(e)
            assert "\n" not in message and str(path) in message, message
            return
        finally:
            peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 2 * len(data) + (64 << 20)
    assert sum(t.numel() * t.element_size() for t in state.values()) <= len(data)


_FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
_FUZZ_LONG = settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))


def _zip_case(tmp_path_factory, prefix, edits):
    _check_weights_bytes(_edited(_GOOD_ZIP, edits, prefix), tmp_path_factory.mktemp("zip"))


def _pickle_case(tmp_path_factory, edits, legacy):
    data = _edited(_GOOD_LEGACY.getvalue(), edits) if legacy else _pickle_rezipped(edits)
    _check_weights_bytes(data, tmp_path_factory.mktemp("pickle"))


@_FUZZ
@given(prefix=st.binary(max_size=16), edits=_ZIP_EDITS)
def test_fuzz_zip_layouts(tmp_path_factory, prefix, edits):
    _zip_case(tmp_path_factory, prefix, edits)


@_FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=4),
    legacy=st.booleans(),
)
def test_fuzz_pickles(tmp_path_factory, edits, legacy):
    _pickle_case(tmp_path_factory, edits, legacy)


@pytest.mark.slow
@_FUZZ_LONG
@given(prefix=st.binary(max_size=16), edits=_ZIP_EDITS)
def test_fuzz_zip_layouts_long(tmp_path_factory, prefix, edits):
    _zip_case(tmp_path_factory, prefix, edits)


@pytest.mark.slow
@_FUZZ_LONG
@given(
    edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=4),
    legacy=st.booleans(),
)
def test_fuzz_pickles_long(tmp_path_factory, edits, legacy):
    _pickle_case(tmp_path_factory, edits, legacy)
