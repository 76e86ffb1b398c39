"""Hostile inputs (README "Threat model"): every attack of the security review is a regression
test here; hypothesis fuzzes recipes, `index.json` files and safetensors headers, with peak
memory measured against the documented bounds."""

from __future__ import annotations

import atexit
import contextlib
import gzip
import io
import json
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from res2net.cli.main import main as cli_main
from res2net.cli.train import config_from_argv
from res2net.config import ConfigError, load_config
from res2net.data import (
    DataError,
    ShardDataset,
    ShardIndex,
    iter_shard_samples,
    load_image,
    write_shards,
)
from res2net.data import shards as shards_module
from res2net.engine.checkpoint import CheckpointManager, deletable_checkpoint, load_training_state
from res2net.errors import CheckpointError
from res2net.guards import short
from res2net.models import Res2Net
from res2net.weights import mindspore as ms
from res2net.weights import pretrained as pt
from res2net.weights.formats import detect_format as detect_bytes
from res2net.weights.loading import load_checkpoint, read_checkpoint
from tests.test_checkpoint_value import huge_bytearray_pickle, nul_named_zip, torch_zip

ARCH = dict(layers=(1, 1, 1, 1), base_width=4, scale=4)
MiB = 1 << 20


def tiny() -> Res2Net:
    torch.manual_seed(0)
    return Res2Net(**ARCH, num_classes=10).eval()


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging the suite) when the block takes longer than `seconds`."""

    def expire(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(message: str, *names: object) -> None:
    assert "\n" not in message and len(message) < 600, message
    for name in names:
        assert str(name) in message, (name, message)


# Peak RSS from /proc (VmHWM, reset before each read): unlike ru_maxrss it neither carries
# over the parent's size across fork and exec nor keeps the previous read's peak.
_RSS = """
import json, os, sys
from res2net.weights.loading import read_checkpoint
read_checkpoint(sys.argv[1])  # warm-up: torch's first allocations are not the reader's
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
results = {}
for path in sys.argv[2:]:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    try:
        read_checkpoint(path)
        line = "OK"
    except Exception as e:
        line = str(e).splitlines()[0]
    results[path] = [status("VmHWM") - base, line]
print(json.dumps(results))
"""


def peak_growth(paths: list[Path], warm_up: Path) -> dict[str, tuple[int, str]]:
    """path -> (peak resident memory growth in bytes, first line of the error or "OK") of
    `read_checkpoint(path)`, each measured in turn in one fresh process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, "-c", _RSS, str(warm_up), *map(str, paths)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return {k: tuple(v) for k, v in json.loads(out.stdout).items()}


# --- 1. nothing untrusted runs a command or deletes a file --------------------------------------


@pytest.mark.parametrize("command", ["train", "validate"])
def test_recipe_with_pipe_data_dir_runs_nothing(tmp_path, capsys, command):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f'data_dir: "pipe:touch {marker}; cat /data/{{}}"\nckpt_path: x.pth\n')
    assert cli_main([command, "-c", str(recipe)]) == 2
    assert not marker.exists()
    err = capsys.readouterr().err.strip()
    one_line(err, recipe, "data_dir", "command line")


def test_urls_and_commands_come_only_from_the_command_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data_dir: https://example.com/imagenet\n")
    with pytest.raises(ConfigError, match="data_dir"):
        load_config(recipe)
    # the same values from the trusted command line are taken as given
    cfg = config_from_argv(recipe, ["--data_dir", "pipe:cat /data/{}"])
    assert cfg.data_dir == "pipe:cat /data/{}"
    recipe.write_text("data_dir: /data/imagenet\n")
    assert load_config(recipe).data_dir == "/data/imagenet"


def _index(names, classes=("a",), **extra) -> dict:
    shards = [{"name": n, "count": 1, "bytes": None} for n in names]
    return {
        "format": "res2net-webdataset",
        "version": 1,
        "split": "train",
        "classes": list(classes),
        "total": len(shards),
        "shards": shards,
        **extra,
    }


@pytest.mark.parametrize(
    "name",
    [
        "train-000000.tar; touch {marker} #",
        "/etc/passwd",
        "../outside.tar",
        ".hidden.tar",
        "a/b.tar",
        "$(touch {marker}).tar",
        "",
        "x" * 300,
        7,
    ],
)
def test_shard_names_from_index_are_plain_file_names(tmp_path, name):
    marker = tmp_path / "pwned"
    name = name.format(marker=marker) if isinstance(name, str) else name
    split = tmp_path / "shards" / "train"
    split.mkdir(parents=True)
    (split / "index.json").write_text(json.dumps(_index([name])))
    for location in (str(tmp_path / "shards"), f"pipe:cat {tmp_path}/shards/{{}}"):
        with pytest.raises(DataError) as info:
            list(iter_shard_samples(location, "train"))
        one_line(str(info.value), "index.json", "plain file name")
    assert not marker.exists()


def test_pipe_paths_are_quoted_and_splits_checked(tmp_path):
    assert shards_module._join("pipe:cat /d/{}", "a b.tar") == "pipe:cat /d/'a b.tar'"
    with pytest.raises(DataError, match="split"):
        ShardIndex.load(f"pipe:cat {tmp_path}/{{}}", "train; touch x")


def test_planted_checkpoint_index_deletes_nothing_outside_its_own_files(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    ckpt = tmp_path / "run" / "ckpt"
    ckpt.mkdir(parents=True)
    other = ckpt / "other.pt"
    other.write_text("not a checkpoint of this run")
    (ckpt / "tiny-004.pt").symlink_to(notes)
    planted = [
        {"epoch": 1, "file": str(notes), "top1": None},
        {"epoch": 2, "file": "../../notes.txt", "top1": None},
        {"epoch": 3, "file": "other.pt", "top1": None},
        {"epoch": 4, "file": "tiny-004.pt", "top1": None},
        {"epoch": "x", "file": 5},
    ]
    (ckpt / "checkpoints.json").write_text(json.dumps(planted))
    manager = CheckpointManager(ckpt, prefix="tiny", keep_max=1, run_id="r")
    manager.save_epoch({"x": torch.ones(1)}, epoch=5, top1=None)  # a damaged index: rebuilt
    assert notes.read_text() == "mine" and other.exists() and (ckpt / "tiny-004.pt").is_symlink()
    # a well-formed index naming a link: the link is never followed nor deleted
    (ckpt / "checkpoints.json").write_text(
        json.dumps([{"epoch": 4, "file": "tiny-004.pt", "top1": None, "run": "r"}])
    )
    manager.save_epoch({"x": torch.ones(1)}, epoch=5, top1=None)
    assert notes.read_text() == "mine" and (ckpt / "tiny-004.pt").is_symlink()
    # its own files still rotate
    manager.save_epoch({"x": torch.ones(1)}, epoch=6, top1=None)
    assert not (ckpt / "tiny-005.pt").exists() and (ckpt / "tiny-006.pt").exists()


def test_deletable_checkpoint_rule(tmp_path):
    (tmp_path / "res2net50-007.pt").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "res2net50-008.pt").write_bytes(b"x")
    assert (
        deletable_checkpoint(tmp_path, "res2net50-007.pt", "res2net50")
        == tmp_path / "res2net50-007.pt"
    )
    for name in [
        "sub/res2net50-008.pt",
        "../res2net50-007.pt",
        str(tmp_path / "res2net50-007.pt"),
        "res2net50-007.pth",
        "res2net101-007.pt",
        "res2net50-009.pt",
        "last.pt",
        None,
        7,
    ]:
        assert deletable_checkpoint(tmp_path, name, "res2net50") is None, name


# --- 2. every reader bounded --------------------------------------------------------------------


def _tiny_entries(n: int) -> bytes:
    tensor = (
        ms._key(1, 0)
        + ms._encode_varint(1)
        + ms._key(2, 2)
        + b"\x04Int8"
        + ms._key(3, 2)
        + b"\x01\x01"
    )
    tensor_field = ms._key(2, 2) + ms._encode_varint(len(tensor)) + tensor
    out = []
    for i in range(n):
        tag = b"t%d" % i
        value = ms._key(1, 2) + ms._encode_varint(len(tag)) + tag + tensor_field
        out.append(ms._key(1, 2) + ms._encode_varint(len(value)) + value)
    return b"".join(out)


def _deflated_copy(src: Path, dst: Path) -> None:
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for info in z.infolist():
            out.writestr(info.filename, z.read(info), compress_type=zipfile.ZIP_DEFLATED)


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, tuple[Path, int, str]]:
    """The hostile checkpoints of the review (and the largest allowed MindSpore file), each
    read in one subprocess: name -> (path, peak memory growth, error line or "OK")."""
    root = tmp_path_factory.mktemp("hostile")
    files = {
        "tiny_entries": root / "tiny-entries.ckpt",  # many tiny entries: a 10 MB file took 589 MB
        "most_entries": root / "most-entries.ckpt",
        "deflated": root / "deflated.pth",  # a compressed record: 390 KB took 400 MB
        "bytearray": root / "bytearray.pth",  # bytearray(2**31) in 34 bytes took 2.2 GB
        # issue 25: a legacy pickle of bytearray(3 GiB) before a valid zip took 3.8 GB, and so
        # did a hostile DATA.PKL beside a benign data.pkl\0
        "prefixed": root / "prefixed.pt",
        "nul_name": root / "nul-name.pt",
        "plain_torch": root / "plain.pth",  # valid files: within twice their size
        "plain_safetensors": root / "plain.safetensors",
    }
    files["prefixed"].write_bytes(huge_bytearray_pickle() + torch_zip())
    files["nul_name"].write_bytes(nul_named_zip())
    save_file({"w": torch.zeros(40 * MiB, dtype=torch.uint8)}, files["plain_safetensors"])
    files["tiny_entries"].write_bytes(_tiny_entries(220_000))
    files["most_entries"].write_bytes(_tiny_entries(ms.MAX_ENTRIES))
    plain = files["plain_torch"]
    torch.save({"w": torch.zeros(40 * MiB, dtype=torch.uint8)}, plain)
    _deflated_copy(plain, files["deflated"])
    files["bytearray"].write_bytes(b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x80\x85R.")
    warm_up = root / "warm-up.safetensors"
    save_file({"w": torch.ones(4)}, warm_up)
    results = peak_growth(list(files.values()), warm_up)
    return {name: (path, *results[str(path)]) for name, path in files.items()}


def test_mindspore_many_tiny_entries_stay_within_the_bound(measured):
    path, growth, line = measured["tiny_entries"]
    assert "entries" in line and str(path) in line
    assert growth <= 2 * path.stat().st_size + 64 * MiB, growth / MiB
    path, growth, line = measured["most_entries"]
    assert line == "OK"
    assert growth <= 2 * path.stat().st_size + 64 * MiB, growth / MiB


def test_torch_zip_with_compressed_record_is_refused_without_expanding(measured):
    path, growth, line = measured["deflated"]
    assert path.stat().st_size < MiB
    assert "compressed" in line and str(path) in line
    assert growth < 16 * MiB, growth / MiB


def test_bytearray_and_other_allocations_are_refused(measured):
    path, growth, line = measured["bytearray"]
    assert len(path.read_bytes()) < 40
    assert "builtins.bytearray" in line and str(path) in line
    assert growth < 16 * MiB, growth / MiB


@pytest.mark.parametrize("name", ["prefixed", "nul_name"])
def test_scanned_bytes_are_loaded_bytes(measured, name):
    """The two files whose zip scan and torch.load read different bytes: refused, small."""
    path, growth, line = measured[name]
    assert str(path) in line and ("after other data" in line or "NUL" in line), line
    assert growth < 16 * MiB, growth / MiB


@pytest.mark.parametrize("name", ["plain_torch", "plain_safetensors"])
def test_valid_weights_stay_within_twice_their_size(measured, name):
    path, growth, line = measured[name]
    assert line == "OK"
    assert growth <= 2 * path.stat().st_size + 64 * MiB, growth / MiB


def test_memoized_copies_are_charged(tmp_path):
    text = b"x" * MiB
    body = b"\x80\x02c_codecs\nencode\nq\x00X" + struct.pack("<I", len(text)) + text + b"q\x01"
    body += b"X\x06\x00\x00\x00latin1q\x02](" + b"h\x00h\x01h\x02\x86R" * 2000 + b"e."
    hostile = tmp_path / "copies.pth"
    hostile.write_bytes(body)  # torch.load would build 2000 copies: 2 GB
    with pytest.raises(ValueError, match="builds far more data"):
        read_checkpoint(hostile)


class _Claim:
    pass


def test_storage_larger_than_the_file_is_refused(tmp_path):
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return (
                ("storage", torch.FloatStorage, "0", "cpu", 2**40, None)
                if isinstance(obj, _Claim)
                else None
            )

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump({"s": _Claim()})
    hostile = tmp_path / "claim.pth"
    hostile.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="claim more bytes than the file has"):
        read_checkpoint(hostile)


@pytest.mark.parametrize(
    "data, name",
    [(pickle.dumps(os.system, protocol=4), "system"), (b"(S'true'\nios\nsystem\n.", "os.system")],
    ids=["stack_global", "inst"],
)
def test_refusal_names_what_the_pickle_wanted_to_call(tmp_path, data, name):
    hostile = tmp_path / "evil.pth"
    hostile.write_bytes(data)
    for load in (read_checkpoint, load_training_state):
        with pytest.raises(ValueError) as info:
            load(hostile)
        message = str(info.value)
        one_line(message, hostile, name)
        assert (
            "Unsupported operand" not in message and "weights_only" not in message
        )  # no torch hint


def _shard_folder(tmp_path: Path) -> Path:
    for i in range(2):
        path = tmp_path / "images" / "train" / "a" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i, 0, 0)).save(path)
    write_shards(tmp_path / "images", tmp_path / "shards", splits=("train",))
    return tmp_path / "shards"


def test_compressed_shard_is_refused(tmp_path):
    root = _shard_folder(tmp_path)
    index_path = root / "train" / "index.json"
    index = json.loads(index_path.read_text())
    shard = root / "train" / index["shards"][0]["name"]
    shard.write_bytes(gzip.compress(shard.read_bytes()))
    index["shards"][0]["bytes"] = shard.stat().st_size
    index_path.write_text(json.dumps(index))
    with pytest.raises(DataError) as info:
        list(iter_shard_samples(root, "train"))
    one_line(str(info.value), shard, "gzip")


def test_oversized_sample_is_a_bad_image_not_read(tmp_path, monkeypatch):
    root = _shard_folder(tmp_path)
    monkeypatch.setattr(shards_module, "MAX_SAMPLE_BYTES", 16)
    samples = list(iter_shard_samples(root, "train"))  # streamed past, never held
    assert samples and all(
        s.data is None and s.problem == "holds more than 16 bytes" for s in samples
    )
    assert [s.index for s in samples] == list(range(len(samples)))  # one sample each, in order
    with pytest.raises(DataError, match=r"sample '.*' holds more than 16 bytes"):
        next(iter(ShardDataset(root, "train", training=False)))
    skipped = list(ShardDataset(root, "train", training=False, on_bad_image="skip"))
    assert len(skipped) == len(samples) and not any(valid for _, _, valid, _ in skipped)


def test_yaml_alias_bomb_answers_at_once(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    lines.append("mean: [" + ",".join(["*i"] * 9) + "]")
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(recipe)
    assert time.perf_counter() - start < 5
    one_line(str(info.value), recipe, "aliases")


def test_long_values_are_truncated_in_messages(tmp_path):
    recipe = tmp_path / "long.yaml"
    recipe.write_text(yaml.safe_dump({"lr": "x" * MiB, "x" * 10_000: 1}))
    with pytest.raises(ConfigError) as info:
        load_config(recipe)
    one_line(str(info.value), recipe)
    assert len(short(list(range(10**6)))) <= 80


@pytest.mark.parametrize(
    "key, value",
    [
        ("seed", "1e29"),
        ("lr", "1e308"),
        ("image_resize", "100000"),
        ("epoch_size", "1e300"),
        ("num_parallel_workers", "100000"),
        ("batch_size", "1e12"),
    ],
)
def test_out_of_range_values_name_the_key(tmp_path, key, value):
    recipe = tmp_path / "big.yaml"
    recipe.write_text(f"{key}: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(recipe)
    one_line(str(info.value), key, recipe)
    with pytest.raises(ConfigError, match=key):
        config_from_argv(None, [f"--{key}", value])


# --- 3. file arguments and waits ----------------------------------------------------------------


@pytest.fixture()
def fifo(tmp_path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def test_file_arguments_must_be_regular_files(fifo, tmp_path):
    with deadline(20):
        for path in (fifo, tmp_path, Path("/dev/zero")):
            for load in (read_checkpoint, load_training_state, load_config, load_image):
                with pytest.raises((ValueError, FileNotFoundError)) as info:
                    load(path)
                one_line(str(info.value), path)


def test_cli_predict_and_resume_refuse_fifo_and_devices(fifo, tmp_path, capsys):
    with deadline(60):
        for image in (fifo, "/dev/zero"):
            assert cli_main(["predict", str(image), "--model", "res2net50_26w_4s"]) == 2
            one_line(capsys.readouterr().err.strip(), image, "not a regular file")
        assert cli_main(["validate", "--data_dir", str(tmp_path), "--ckpt_path", str(fifo)]) == 2
        one_line(capsys.readouterr().err.strip(), fifo, "named pipe")
        assert cli_main(["train", "-c", str(fifo)]) == 2
        one_line(capsys.readouterr().err.strip(), fifo, "named pipe")


class SilentUrl(str):
    """The URL of a server that accepts connections and never answers; `connected` is set
    once a client has connected."""

    connected: threading.Event


@pytest.fixture()
def silent_server():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()
    url = SilentUrl(f"http://127.0.0.1:{server.getsockname()[1]}")
    url.connected = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])
                url.connected.set()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield url
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_downloads_time_out(silent_server, tmp_path, monkeypatch):
    monkeypatch.setattr(pt, "NETWORK_TIMEOUT", 1.0)
    entry = {"source": "official", "urls": [f"{silent_server}/w.pth"], "file_name": "w.pth"}
    start = time.perf_counter()
    with deadline(30), pytest.raises(CheckpointError) as info:
        pt.download_weights(entry, cache_dir=tmp_path)
    assert time.perf_counter() - start < 20
    one_line(str(info.value), silent_server)
    assert list(tmp_path.iterdir()) == []


def test_shard_urls_time_out(silent_server, monkeypatch):
    fast = [a if a != str(int(shards_module.NETWORK_TIMEOUT)) else "1" for a in shards_module._CURL]
    monkeypatch.setattr(shards_module, "_CURL", [a for a in fast if a not in ("--retry", "3")])
    start = time.perf_counter()
    with deadline(60), pytest.raises(DataError) as info:
        ShardIndex.load(f"{silent_server}/data", "train")
    assert time.perf_counter() - start < 40
    one_line(str(info.value), silent_server)


def test_sigterm_interrupts_a_network_wait(silent_server, tmp_path):
    """`res2net train` waiting on a silent server for the shard index exits at SIGTERM."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "res2net.cli.main",
        "train",
        "--data_dir",
        f"{silent_server}/data",
        "--ckpt_save_dir",
        str(tmp_path / "ckpt"),
        "--model",
        "res2net50_26w_4s",
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert silent_server.connected.wait(120), proc.communicate()
        time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()
        start = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert time.perf_counter() - start < 10
    assert proc.returncode == 130 and "interrupted" in err, err[-2000:]


# --- 4. all-or-nothing loading, format detection, metadata --------------------------------------


def test_sparse_or_meta_tensor_changes_nothing(tmp_path):
    source = tiny()
    before = {k: v.clone() for k, v in tiny().state_dict().items()}
    for kind in ("sparse", "meta"):
        state = {k: v + 1 if v.is_floating_point() else v for k, v in source.state_dict().items()}
        key = "fc.weight"
        state[key] = (
            state[key].to_sparse()
            if kind == "sparse"
            else torch.empty_like(state[key], device="meta")
        )
        path = tmp_path / f"{kind}.pth"
        torch.save(state, path)
        model = tiny()
        with pytest.raises(ValueError) as info:
            load_checkpoint(model, path)
        one_line(str(info.value), path, kind)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_non_finite_weights_warn_naming_them(tmp_path, caplog):
    state = tiny().state_dict()
    state["conv1.weight"] = state["conv1.weight"].clone()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    state["fc.bias"] = torch.full_like(state["fc.bias"], float("inf"))
    path = tmp_path / "nan.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    with caplog.at_level("WARNING"):
        load_checkpoint(tiny(), path)
    assert (
        "conv1.weight" in caplog.text and "fc.bias" in caplog.text and "NaN or Inf" in caplog.text
    )


def _safetensors_bytes(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    if header_len is not None:
        text = text.ljust(header_len, b" ")
    return struct.pack("<Q", len(text)) + text + data


def test_safetensors_header_length_ending_in_0x80_is_not_a_pickle(tmp_path):
    data = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    header = {
        "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "__metadata__": {"arch": "x"},
    }
    for length in (0x80, 0x180, 0x1080):
        path = tmp_path / f"h{length}.safetensors"
        path.write_bytes(_safetensors_bytes(header, data, length))
        assert path.read_bytes()[0] == 0x80
        assert detect_bytes(path.read_bytes(), path) == "safetensors"
        c = read_checkpoint(path)
        state, fmt, metadata = c.state_dict, c.format, c.metadata
        assert fmt == "safetensors" and metadata == {"arch": "x"} and state["w"].shape == (2, 3)


@pytest.mark.parametrize(
    "eval_text, why",
    [
        ("{not json", "not valid JSON"),
        ('{"mean": 5}', "'mean'"),
        ('{"image_resize": 30000}', "'image_resize'"),
        ('{"std": [0, 0, 0], "mean": [0, 0, 0]}', "'std'"),
        ("[1, 2]", "JSON object"),
        ('{"interpolation": "x"}', "'interpolation'"),
    ],
)
def test_eval_metadata_is_schema_checked(tmp_path, eval_text, why):
    path = tmp_path / "meta.safetensors"
    save_file({"w": torch.ones(1)}, path, metadata={"eval": eval_text})
    with pytest.raises(ValueError) as info:
        read_checkpoint(path)
    one_line(str(info.value), path, "eval", why)


# --- 5. fuzzing: recipes, index.json files, safetensors headers ---------------------------------

_FUZZ_DIR = Path(tempfile.mkdtemp(prefix="res2net-fuzz-"))
atexit.register(shutil.rmtree, _FUZZ_DIR, ignore_errors=True)
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_KEYS = st.sampled_from(
    [
        "seed",
        "lr",
        "image_resize",
        "epoch_size",
        "num_parallel_workers",
        "data_dir",
        "mean",
        "std",
        "scale",
        "model",
        "batch_size",
        "ckpt_save_policy",
    ]
) | st.text(max_size=10)
_ALIAS = (
    "a: &a [1,2,3,4,5,6,7,8,9,10]\n"
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
)
_RECIPES = st.one_of(
    st.dictionaries(_KEYS, _VALUES, max_size=6).map(
        lambda d: yaml.safe_dump(d, allow_unicode=True)
    ),
    st.text(max_size=200),
    st.tuples(
        st.sampled_from(["mean", "lr", "scale"]),
        st.sampled_from(["*a", "*b", "*c", "[*c,*c,*c,*c]"]),
    ).map(lambda kv: _ALIAS + f"{kv[0]}: {kv[1]}\n"),
)


def _check_recipe(text: str) -> None:
    path = _FUZZ_DIR / "recipe.yaml"
    path.write_text(
        text, encoding="utf-8", errors="surrogatepass"
    ) if text.isprintable() else path.write_bytes(text.encode("utf-8", "surrogatepass"))
    tracemalloc.start()
    try:
        load_config(path)
    except ConfigError as e:
        one_line(str(e))
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 4 * MiB + 400 * len(text.encode("utf-8", "surrogatepass")), peak


def _index_strategy() -> st.SearchStrategy:
    names = st.sampled_from(
        ["train-000000.tar", "x.tar", "../x", "/etc/passwd", "a b", "t;rm"]
    ) | st.text(max_size=12)
    shard = st.fixed_dictionaries(
        {"name": names | _SCALARS, "count": st.integers(-2, 3) | _SCALARS},
        optional={"bytes": st.integers(-1, 10) | _SCALARS},
    )
    valid = st.fixed_dictionaries(
        {
            "format": st.just("res2net-webdataset") | _SCALARS,
            "version": st.integers(-1, 2) | _SCALARS,
            "classes": st.lists(st.text(max_size=5), max_size=3) | _VALUES,
            "shards": st.lists(shard, max_size=3) | _VALUES,
        },
        optional={"total": st.integers(-1, 5) | _SCALARS, "split": _SCALARS, "shuffled": _SCALARS},
    )
    return st.one_of(valid.map(json.dumps), _VALUES.map(json.dumps), st.text(max_size=50))


def _check_index(text: str) -> None:
    split = _FUZZ_DIR / "shards" / "train"
    split.mkdir(parents=True, exist_ok=True)
    (split / "index.json").write_text(text, encoding="utf-8", errors="surrogatepass")
    tracemalloc.start()
    try:
        ShardIndex.load(split.parent, "train")
    except DataError as e:
        one_line(str(e))
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 4 * MiB + 100 * len(text.encode("utf-8", "surrogatepass")), peak
    assert sorted(p.name for p in split.iterdir()) == ["index.json"]


_DTYPES = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "X9", ""])
_TENSOR_INFO = st.fixed_dictionaries(
    {
        "dtype": _DTYPES | _SCALARS,
        "shape": st.lists(st.integers(-2, 2**40), max_size=4) | _SCALARS,
        "data_offsets": st.lists(st.integers(-1, 2**40), min_size=0, max_size=3)
        | st.tuples(st.integers(0, 64), st.integers(0, 64)).map(list),
    }
)
_HEADERS = st.dictionaries(st.text(max_size=6), _TENSOR_INFO, max_size=4).flatmap(
    lambda tensors: st.fixed_dictionaries(
        {},
        optional={
            "__metadata__": st.dictionaries(
                st.sampled_from(["eval", "num_classes", "arch"]),
                st.text(max_size=30)
                | st.sampled_from(
                    [
                        '{"image_resize": 224}',
                        '{"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}',
                        "1000",
                        "[]",
                    ]
                ),
                max_size=3,
            )
        },
    ).map(lambda extra: {**tensors, **extra})
)


def _check_safetensors(header: dict, data: bytes, pad: int) -> None:
    text = json.dumps(header).encode()
    blob = _safetensors_bytes(header, data, len(text) + pad)
    path = _FUZZ_DIR / "fuzz.safetensors"
    path.write_bytes(blob)
    assert detect_bytes(path.read_bytes(), path) == "safetensors"
    try:
        state = read_checkpoint(path).state_dict
    except ValueError as e:
        one_line(str(e), path)
        return
    assert sum(t.numel() * t.element_size() for t in state.values()) <= len(blob)


# 2,000 cases in the default suite (recipes 500, index files 800, safetensors headers 700),
# 12,000 under `-m slow`.
_FAST = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_SLOW = settings(max_examples=4000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FAST
@given(_RECIPES)
def test_fuzz_recipes(text):
    _check_recipe(text)


@pytest.mark.slow
@_SLOW
@given(_RECIPES)
def test_fuzz_recipes_long(text):
    _check_recipe(text)


@settings(_FAST, max_examples=800)
@given(_index_strategy())
def test_fuzz_index_files(text):
    _check_index(text)


@pytest.mark.slow
@_SLOW
@given(_index_strategy())
def test_fuzz_index_files_long(text):
    _check_index(text)


@settings(_FAST, max_examples=700)
@given(_HEADERS, st.binary(max_size=64), st.integers(0, 300))
def test_fuzz_safetensors_headers(header, data, pad):
    _check_safetensors(header, data, pad)


@pytest.mark.slow
@_SLOW
@given(_HEADERS, st.binary(max_size=64), st.integers(0, 300))
def test_fuzz_safetensors_headers_long(header, data, pad):
    _check_safetensors(header, data, pad)


def test_an_output_may_not_be_the_file_it_is_made_from_by_any_name(tmp_path):
    """`check_output_file(keep=...)`: the checkpoint itself, a symlink to it or a hard link to
    it is refused as the output (writing it would destroy the input); another file is not."""
    from res2net.guards import check_output_file

    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"weights")
    (tmp_path / "symlink.pth").symlink_to(ckpt)
    os.link(ckpt, tmp_path / "hardlink.pth")
    for name in ("w.pth", "symlink.pth", "hardlink.pth"):
        with pytest.raises(ValueError, match="is the checkpoint: write it elsewhere"):
            check_output_file(tmp_path / name, "--out", keep=ckpt, kept="the checkpoint")
    assert check_output_file(tmp_path / "new.onnx", "--out", keep=ckpt) == tmp_path / "new.onnx"
    (tmp_path / "other.pth").write_bytes(b"x")
    check_output_file(tmp_path / "other.pth", "--out", keep=ckpt)
