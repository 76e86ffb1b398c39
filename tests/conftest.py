"""Shared test fixtures, and the settings of a run split over pytest-xdist workers."""

import gc
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def _worker_threads() -> int | None:
    """Under pytest-xdist (`-n logical --maxprocesses 2`, pyproject.toml): the CPUs each worker may
    use, so that the workers' torch threads together never outnumber the cores (two workers of
    two threads each on 2 cores spend much of their time waiting for each other)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if not workers:
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // workers)


if (_threads := _worker_threads()) is not None:
    # the processes the tests start (CLI runs, torchrun) inherit it; a value set by the user wins
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def session_tmpdir(tmp_path_factory):
    """Every temporary file of the run (wandb's, torchrun's, multiprocessing's, the CLI
    processes') under the session's temporary folder, removed with it, instead of left in /tmp."""
    folder = tmp_path_factory.mktemp("tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(folder))
        mp.setattr(tempfile, "tempdir", str(folder))
        yield folder


@pytest.fixture(scope="session", autouse=True)
def inductor_cache(tmp_path_factory):
    """torch.compile's caches (Inductor's, and the cpp_wrapper builds) in the session's
    temporary folder, removed with it, instead of /tmp/torchinductor_USER for ever."""
    cache = tmp_path_factory.mktemp("inductor")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: one thread is as fast, and immune to an oversubscribed shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rgb(path: Path, size=(12, 10), color=(200, 30, 30), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


@pytest.fixture()
def bad_tree(tmp_path) -> tuple[Path, dict[str, tuple[str, Path]]]:
    """data_dir with good images in every awkward mode, and bad ones: name -> (status, path)."""
    d = tmp_path / "train" / "x"
    d.mkdir(parents=True)
    good = {"plain": rgb(d / "plain.png")}

    good["gray"] = d / "gray.png"
    Image.new("L", (12, 10), 77).save(good["gray"])
    good["grayjpeg"] = d / "grayjpeg.jpg"
    Image.new("L", (12, 10), 77).save(good["grayjpeg"])
    good["cmyk"] = d / "cmyk.jpg"
    Image.new("CMYK", (12, 10), (0, 255, 255, 0)).save(good["cmyk"])
    good["16bit"] = d / "16bit.png"
    Image.fromarray(np.full((10, 12), 128 * 257, dtype=np.uint16)).save(good["16bit"])
    good["palette"] = d / "palette.png"
    pal = Image.new("P", (12, 10), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(good["palette"], transparency=0)
    good["rgba"] = d / "rgba.png"
    Image.new("RGBA", (12, 10), (10, 20, 30, 40)).save(good["rgba"])
    good["la"] = d / "la.png"
    Image.new("LA", (12, 10), (99, 0)).save(good["la"])

    bad = {"zero": d / "zero.jpg", "text": d / "text.jpg", "truncated": d / "truncated.jpg"}
    bad["zero"].write_bytes(b"")
    bad["text"].write_text("this is not an image\n")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noise.save(d / "full.jpg")
    data = (d / "full.jpg").read_bytes()
    (d / "full.jpg").unlink()
    bad["truncated"].write_bytes(data[: len(data) // 2])
    bad["bomb"] = rgb(d / "bomb.png", size=(100, 100))  # refused with max_pixels=5000
    bad["eps"] = d / "eps.jpg"  # PostScript: its decoder would run Ghostscript, never tried
    Image.new("RGB", (12, 10)).save(bad["eps"], format="EPS")
    return tmp_path, {
        **{k: ("good", p) for k, p in good.items()},
        **{k: ("bad", p) for k, p in bad.items()},
    }


def rng_states() -> tuple:
    """torch's CPU, Python's and NumPy's global RNG states, comparable with `==`."""
    key = np.random.get_state()[1].tobytes()
    return torch.get_rng_state().numpy().tobytes(), random.getstate(), key


def draws() -> list[float]:
    """One draw from each global RNG (torch, Python, NumPy): a transform's output that shows
    how it was seeded."""
    return [torch.rand(()).item(), random.random(), float(np.random.rand())]


TINY_ARCH = "res2net_tiny_test"  # one block per stage, width 4: 3.4 M weights at 3 classes
TINY_ARGS = dict(layers=(1, 1, 1, 1), base_width=4, scale=4)
# the same registration, as source for a Python process a test starts (it does not see this one's)
REGISTER_TINY = (
    "from res2net.models import ARCHITECTURES, Res2Net\n"
    f"ARCHITECTURES[{TINY_ARCH!r}] = (Res2Net, {TINY_ARGS!r})\n"
)


def _register_tiny(mp: pytest.MonkeyPatch) -> str:
    from res2net.models import Res2Net
    from res2net.models.registry import ARCHITECTURES

    mp.setitem(ARCHITECTURES, TINY_ARCH, (Res2Net, TINY_ARGS))
    return TINY_ARCH


@pytest.fixture(scope="module")
def tiny_arch():
    """A registered model name for tests where the zoo model is not the point: it goes through
    every code path of res2net50 (the same class), in a fraction of the time and disk (a
    Res2Net-50 training checkpoint is 285 MB). In-process only: a subprocess does not see it."""
    with pytest.MonkeyPatch.context() as mp:
        yield _register_tiny(mp)


@pytest.fixture
def decoded_images(monkeypatch):
    """The images the commands' `inference.load_found_image` returns, in order: what a command
    decoded (e.g. straight to the model's input, or whole)."""
    from res2net import inference

    decoded: list[Image.Image] = []
    load = inference.load_found_image

    def spy(*args, **kwargs):
        decoded.append(load(*args, **kwargs))
        return decoded[-1]

    monkeypatch.setattr(inference, "load_found_image", spy)
    return decoded


def pytest_collection_finish(session):
    """Every object alive once the tests are collected (the modules of torch, hypothesis and
    the tests, about a million objects) out of the garbage collector's sight: a full collection,
    which `train()` runs at its end and Python itself runs as the heap grows, then scans only
    what the tests made (0.4 s each in this process otherwise, hundreds of times a run)."""
    gc.collect()
    gc.freeze()


# The long files whose tests pytest-xdist may send to either worker one by one; every other
# file's tests go to one worker together (`--dist loadfile`), so that its module fixtures (the
# README's run, the torchrun runs, the measuring subprocesses) run once.
SPREAD = {
    "tests/test_write_safety.py",
    "tests/test_reliability.py",
    "tests/test_export.py",
    "tests/test_models.py",
    "tests/test_recipes.py",
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with the files of SPREAD shared test by test. (pytest-xdist's
    `xdist_group` marks would say the same per test, but its `loadgroup` relies on a node id
    attribute pytest 9 no longer has.) Files with the most tests are sent first, single tests
    last: they fill the gaps at the end of a run."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SpreadScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return nodeid if path in SPREAD else path

    return SpreadScheduling(config, log)
