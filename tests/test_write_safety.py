"""Folders the project writes can never be turned against their owner.

At every name a command writes, in each kind of folder (a run folder, a Hub folder, an export,
cam and saliency outputs, validate reports), something is planted: a symbolic link to a file
outside, a dangling link, a named pipe, a folder, a hard link to a file outside, and for run
folders a checkpoint index that is missing, empty, truncated, or lists other files or `../`
paths. Then the command runs into that folder, and: no file outside changes, no checkpoint that
existed before is lost, and the command either succeeds or refuses in one line naming the path.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from res2net.cli.main import main as cli_main
from res2net.engine.checkpoint import load_training_state
from res2net.models.registry import ARCHITECTURES
from res2net.models.res2net import Res2Net
from res2net.saliency import save_saliency_model
from res2net.saliency.model import saliency_res2net

from .test_train import make_folder

TINY = (Res2Net, dict(layers=(1, 1, 1, 1), base_width=4, scale=4))
MODEL = "res2net_tiny"
PLANTS = ["symlink", "dangling", "fifo", "dir", "hardlink"]
INDEXES = {
    "missing": None,
    "empty": "",
    "empty list": "[]",
    "truncated": None,  # the first half of the real index
    "other files": json.dumps([{"epoch": 1, "file": "notes.txt", "top1": 1.0, "run": "x"}]),
    "../ paths": json.dumps([{"epoch": 1, "file": "../outside/notes.txt", "top1": None}]),
}


@contextlib.contextmanager
def tiny_registered():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(ARCHITECTURES, MODEL, TINY)
            yield
    finally:
        torch.set_num_threads(threads)


def run_cli(*argv: str) -> tuple[int, list[str]]:
    """`res2net ARGV` in this process: its exit code and the lines it wrote to stderr."""
    err = io.StringIO()
    with (
        tiny_registered(),
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        rc = cli_main(list(argv))
    return rc, err.getvalue().strip().splitlines()


def train_argv(data: Path, folder: Path, *extra: str) -> list[str]:
    """A one-epoch run of the tiny model; plain SGD keeps no optimizer state, so that each
    checkpoint the cases copy, hash and load is the model's 13 MB alone (Adam's two moments
    would triple it)."""
    return [
        "train",
        *("--model", MODEL, "--data_dir", str(data), "--ckpt_save_dir", str(folder)),
        *("--image_resize", "16", "--crop_pct", "1.0", "--batch_size", "4", "--epoch_size", "1"),
        *("--opt", "sgd", "--momentum", "0"),
        *("--num_parallel_workers", "0", "--device", "cpu", "--seed", "1"),
        *("--keep_checkpoint_max", "10", "--log_interval", "1"),
        *extra,
    ]


@dataclass
class World:
    """What every case starts from, built once."""

    root: Path
    data: Path  # the image folder
    weights: Path  # the tiny model's weights
    run: Path  # a finished one-epoch run
    hub: Path  # a Hub folder convert wrote
    image: Path  # one picture for cam and saliency
    saliency: Path  # a tiny saliency model
    outputs: dict[str, str]  # command -> the name it writes in its folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("write-safety")
    data = make_folder(root / "data", n_classes=2, per_class=2)
    run = root / "run"
    rc, err = run_cli(*train_argv(data, run))
    assert rc == 0, err
    weights = root / "w.pth"
    torch.save(load_training_state(run / "last.pt")["model"], weights)
    hub = root / "hub"
    rc, err = run_cli("convert", str(weights), "--model", MODEL, "--to-hub-folder", str(hub))
    assert rc == 0, err
    image = root / "pic.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    with tiny_registered():
        trunk = Res2Net(layers=(1, 1, 1, 1), base_width=4, scale=4, out_indices=(1, 2, 3, 4))
        model = saliency_res2net(trunk, decoder_channels=8)
        saliency = save_saliency_model(root / "sal.pth", model, MODEL, image_size=32)
    world = World(root, data, weights, run, hub, image, saliency, {})
    world.outputs["export"] = "m.pt2"
    for command in ("cam", "saliency"):
        folder = root / f"probe-{command}"
        folder.mkdir()
        rc, err = run_cli(*command_argv(world, command, folder))
        assert rc == 0, err
        (written,) = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
        world.outputs[command] = written
    return world


def command_argv(world: World, command: str, folder: Path, *extra: str) -> list[str]:
    """The command line of `command` writing into `folder`."""
    if command == "cam":
        return [
            *("cam", str(world.image), "--model", MODEL, "--ckpt_path", str(world.weights)),
            *("--method", "cam", "--out", str(folder), "--image_resize", "32", "--device", "cpu"),
        ]
    if command == "saliency":
        return ["saliency", "predict", str(world.image), "--weights", str(world.saliency)] + [
            "--out",
            str(folder),
        ]
    if command == "export":
        return [
            *("export", str(folder / "m.pt2"), "--format", "pt2", "--model", MODEL),
            *("--ckpt_path", str(world.weights), "--image_resize", "32"),
        ]
    if command == "convert":
        return ["convert", str(world.weights), "--model", MODEL, "--to-hub-folder", str(folder)]
    if command == "validate":
        return [
            *("validate", "--model", MODEL, "--ckpt_path", str(world.weights)),
            *("--data_dir", str(world.data), "--image_resize", "16", "--crop_pct", "1.0"),
            *("--num_parallel_workers", "0", "--batch_size", "4"),
            *("--report_dir", str(folder / "report"), "--results_csv", str(folder / "r.csv")),
            *("--per_class_csv", str(folder / "top1.csv")),
        ]
    if command == "train":
        return train_argv(world.data, folder, *extra)
    if command == "resume":
        return train_argv(world.data, folder, "--resume", "auto", *extra)
    raise AssertionError(command)


# the names each command writes in its folder
RUN_NAMES = [
    ".res2net.lock",
    "last.pt",
    "best.pt",
    "checkpoints.json",
    "metrics.jsonl",
    "training.png",
    "tensorboard",
    f"{MODEL}-001.pt",
    f"{MODEL}-002.pt",
]
NAMES = {
    "train": RUN_NAMES,
    "resume": RUN_NAMES,
    "convert": ["model.safetensors", "config.json", "README.md"],
    "validate": [
        "r.csv",
        "top1.csv",
        "report/per_class.csv",
        "report/confused_pairs.csv",
        "report/confusion.png",
        "report/summary.json",
    ],
    "cam": ["<out>"],
    "saliency": ["<out>"],
    "export": ["m.pt2"],
}


def plant(kind: str, path: Path, outside: Path) -> None:
    if os.path.lexists(path):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "symlink":
        path.symlink_to(outside / "notes.txt")
    elif kind == "dangling":
        path.symlink_to(outside / "not-yet")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
        (path / "inside.txt").write_text("mine")
    elif kind == "hardlink":
        os.link(outside / "notes.txt", path)


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder`: what it is, and a file's content hash."""
    seen = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            seen[str(path)] = "link:" + os.readlink(path)
        elif path.is_file():
            seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            seen[str(path)] = "dir" if path.is_dir() else "other"
    return seen


def checkpoints(folder: Path) -> dict[str, bytes]:
    """The epoch checkpoints in `folder` that are regular files: name -> content (compared
    whole: cheaper than hashing it before and after)."""
    return {
        p.name: p.read_bytes()
        for p in folder.glob(f"{MODEL}-*.pt")
        if p.is_file() and not p.is_symlink()
    }


def one_case(world: World, command: str, name: str, kind: str, index: str | None, epochs: int):
    """Plant `kind` at `name` (and the index `index`) in a new folder for `command`, run it,
    and check the promises."""
    case = Path(tempfile.mkdtemp(dir=world.root, prefix="case-"))
    try:
        outside = case / "outside"
        outside.mkdir()
        (outside / "notes.txt").write_text("the owner's notes")
        folder = case / "folder"
        if command == "resume":
            shutil.copytree(world.run, folder, symlinks=True)
        elif command == "convert":
            shutil.copytree(world.hub, folder)
        else:
            folder.mkdir()
        if name == "<out>":
            name = world.outputs[command]
        target = folder / name
        if kind != "none":
            plant(kind, target, outside)
        if index is not None:
            plant_index(folder / "checkpoints.json", index)
        before_outside = snapshot(outside)
        before_ckpts = checkpoints(folder)
        extra = ("--epoch_size", str(epochs)) if command == "resume" else ()
        rc, err = run_cli(*command_argv(world, command, folder, *extra))
        assert snapshot(outside) == before_outside, (command, name, kind, err)
        assert not (outside / "not-yet").exists()
        after = checkpoints(folder)
        for ckpt, content in before_ckpts.items():
            kept = after.get(ckpt) == content  # not in the assert: no diff of MBs on failure
            assert kept, (command, name, kind, index, ckpt, err)
        if rc != 0:
            assert rc == 2 and len(err) == 1, (command, name, kind, index, err)
            assert str(folder) in err[0], (name, err)
        return rc, err
    finally:
        shutil.rmtree(case, ignore_errors=True)


def plant_index(path: Path, index: str) -> None:
    text = INDEXES[index]
    if index == "missing":
        path.unlink(missing_ok=True)
    elif index == "truncated":
        whole = path.read_text()
        path.write_text(whole[: len(whole) // 2])
    else:
        path.write_text(text or "")


def plants(command: str, long: bool) -> list[str]:
    """The short run keeps to the cheap cases: an export refused before it starts (a successful
    export takes seconds); the long run draws from all."""
    return PLANTS if long or command != "export" else PLANTS[:-1]


def command_cases(command: str, long: bool, indexes: list[str | None]) -> st.SearchStrategy:
    """(command, name, plant, index, epochs) for one command. The short run's resume trains
    nothing more (1 epoch, as the run it continues)."""
    return st.tuples(
        st.just(command),
        st.sampled_from(NAMES[command]),
        st.sampled_from(plants(command, long)),
        st.sampled_from(indexes),
        st.sampled_from([1, 2] if long else [1]),
    )


def cases(long: bool) -> st.SearchStrategy:
    """(command, name, plant, index, epochs) of any command."""
    return st.sampled_from(sorted(NAMES)).flatmap(
        lambda c: command_cases(c, long, [None, *INDEXES] if c == "resume" else [None])
    )


def fuzz(world: World, case: tuple) -> None:
    command, name, kind, index, epochs = case
    if name == "checkpoints.json" and index is not None:
        index = None  # one plant at that name
    logging.disable(logging.WARNING)
    try:
        one_case(world, command, name, kind, index, epochs)
    finally:
        logging.disable(logging.NOTSET)


def share_out(total: int, spaces: dict[tuple, int]) -> dict[tuple, int]:
    """`total` cases over the shares: each its whole space of cases, or an equal part of what
    the smaller ones leave."""
    budget, left = {}, total
    for k, (share, space) in enumerate(sorted(spaces.items(), key=lambda item: item[1])):
        budget[share] = max(1, min(space, left // (len(spaces) - k)))
        left -= budget[share]
    return budget


# The short run in shares that pytest-xdist workers can take in parallel: one per command, and
# resume once per index state planted beside it; WRITE_SAFETY_CASES cases in all.
SHARES = [(c, None) for c in sorted(NAMES) if c != "resume"] + [
    ("resume", i) for i in [None, *INDEXES]
]
BUDGET = share_out(
    int(os.environ.get("WRITE_SAFETY_CASES", 300)),
    {(c, i): len(NAMES[c]) * len(plants(c, long=False)) for c, i in SHARES},
)


@pytest.mark.parametrize(
    ("command", "index"), SHARES, ids=[c if c != "resume" else f"resume-{i}" for c, i in SHARES]
)
def test_planted_names_never_turn_a_command_against_the_owner(world, command, index):
    @settings(
        max_examples=BUDGET[command, index],
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        derandomize=True,
    )
    @given(case=command_cases(command, long=False, indexes=[index]))
    def check(case: tuple) -> None:
        fuzz(world, case)

    check()


@pytest.mark.slow
@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases(long=True))
def test_planted_names_never_turn_a_command_against_the_owner_long(world, case):
    fuzz(world, case)


# --- the four ways a prepared folder was turned against its owner ------------------------------


def test_planted_lock_and_plot_links_are_refused(world, tmp_path):
    """A copy of a finished run with `.res2net.lock` and `training.png` linked to files
    elsewhere: `--resume auto` writes through neither; nor does a fresh run into a folder
    holding only the lock link."""
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("lock-target", "plot-target"):
        (outside / name).write_text("the owner's file")
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    for name, target in ((".res2net.lock", "lock-target"), ("training.png", "plot-target")):
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(outside / target)
    rc, err = run_cli(*train_argv(world.data, run, "--resume", "auto", "--epoch_size", "2"))
    assert rc == 2 and len(err) == 1 and str(run) in err[0], err
    assert all(
        (outside / n).read_text() == "the owner's file" for n in ("lock-target", "plot-target")
    )
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".res2net.lock").symlink_to(outside / "lock-target")
    rc, err = run_cli(*train_argv(world.data, fresh))
    assert rc == 2 and len(err) == 1 and str(fresh / ".res2net.lock") in err[0], err
    assert (outside / "lock-target").read_text() == "the owner's file"


def test_hub_folder_links_are_refused(world, tmp_path):
    """`convert --to-hub-folder` into a folder with a real `model.safetensors` and `README.md`
    and `config.json` linked elsewhere overwrites neither target."""
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "hub"
    shutil.copytree(world.hub, folder)
    for name in ("README.md", "config.json"):
        (outside / name).write_text("the owner's file")
        (folder / name).unlink()
        (folder / name).symlink_to(outside / name)
    rc, err = run_cli(
        "convert", str(world.weights), "--model", MODEL, "--to-hub-folder", str(folder)
    )
    assert rc == 2 and len(err) == 1 and str(folder) in err[0], err
    assert all(
        (outside / n).read_text() == "the owner's file" for n in ("README.md", "config.json")
    )


@pytest.mark.parametrize("index", ["[]", "", None])
def test_missing_or_empty_index_deletes_no_checkpoint(world, tmp_path, index):
    """`[]`, an empty file or no `checkpoints.json` at all: `--resume auto` rebuilds the index
    from the checkpoints' headers and deletes nothing."""
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    want = json.loads((run / "checkpoints.json").read_text())
    before = checkpoints(run)
    assert before
    if index is None:
        (run / "checkpoints.json").unlink()
    else:
        (run / "checkpoints.json").write_text(index)
    rc, err = run_cli(*train_argv(world.data, run, "--resume", "auto"))
    assert rc == 0, err
    kept = checkpoints(run) == before  # not in the assert: no diff of MBs on failure
    assert kept
    assert json.loads((run / "checkpoints.json").read_text()) == want


def test_no_message_advises_deleting_the_index():
    src = Path(__file__).resolve().parent.parent / "src"
    for path in src.rglob("*.py"):
        assert "delete it" not in path.read_text(), path


def test_overwrite_from_a_recipe_moves_the_other_run_aside(world, tmp_path, caplog):
    """A run whose folder holds another run's files, with `--overwrite True` (a recipe may not
    set `overwrite` or an absolute folder: the config's trust rule): that run's files move to
    `<dir>.replaced-<time>`, whole, and the run says where in one line."""
    other = tmp_path / "other"
    shutil.copytree(world.run, other)
    before = snapshot(other)
    recipe = tmp_path / "recipe.yaml"
    argv = train_argv(world.data, other)[1:]
    options = dict(zip(argv[::2], argv[1::2]))
    options.pop("--ckpt_save_dir")
    recipe.write_text("".join(f"{k.lstrip('-')}: {v}\n" for k, v in options.items()))
    command = ("train", "-c", str(recipe), "--ckpt_save_dir", str(other), "--overwrite", "True")
    with caplog.at_level(logging.WARNING):
        rc, err = run_cli(*command)
    assert rc == 0, err
    (aside,) = tmp_path.glob("other.replaced-*")
    moved = [line for line in caplog.messages if str(aside) in line]
    assert len(moved) == 1 and "moved" in moved[0]
    kept = {k.replace(str(other), str(aside), 1): v for k, v in before.items()}
    lock = str(aside / ".res2net.lock")
    assert {k: v for k, v in snapshot(aside).items() if k != lock} == {
        k: v for k, v in kept.items() if k != lock
    }
    assert (other / "last.pt").is_file()  # the new run


def test_resume_without_last_pt_is_a_fresh_run(world, tmp_path, caplog):
    """`--resume auto` in a run folder without `last.pt` cannot continue that run (a kill
    during the first checkpoint leaves exactly that): it starts over after moving every file
    there aside whole, in one line; the new run never takes the old run's id."""
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    (run / "last.pt").unlink()
    before = snapshot(run)
    with caplog.at_level(logging.INFO):
        rc, err = run_cli(*train_argv(world.data, run, "--resume", "auto"))
    assert rc == 0, err
    (aside,) = tmp_path.glob("run.replaced-*")
    assert [m for m in caplog.messages if str(aside) in m]
    kept = {k.replace(str(run), str(aside), 1): v for k, v in before.items()}
    lock = str(aside / ".res2net.lock")
    assert {k: v for k, v in snapshot(aside).items() if k != lock} == {
        k: v for k, v in kept.items() if k != lock
    }
    old = {e["run"] for e in json.loads((aside / "checkpoints.json").read_text())}
    new = {e["run"] for e in json.loads((run / "checkpoints.json").read_text())}
    assert old and new and not old & new
    assert not any("never finished" in m for m in caplog.messages)


@pytest.mark.parametrize("command", ["cam", "saliency"])
def test_a_link_at_a_mirrored_subfolder_is_refused(world, tmp_path, command):
    """cam and saliency mirror an input folder's subfolders under --out: a link planted at
    such a name (`out/a` -> elsewhere) is refused in one line, and nothing elsewhere changes."""
    images = tmp_path / "imgs"
    (images / "a").mkdir(parents=True)
    shutil.copy(world.image, images / "a" / "x.png")
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in ("x_cam.png", "x.png"):
        (victim / name).write_text("the owner's file")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").symlink_to(victim)
    argv = command_argv(world, command, out)
    argv[argv.index(str(world.image))] = str(images)
    rc, err = run_cli(*argv)
    assert rc == 2 and len(err) == 1 and str(out / "a") in err[0], err
    assert sorted(p.name for p in victim.iterdir()) == ["x.png", "x_cam.png"]
    assert all(p.read_text() == "the owner's file" for p in victim.iterdir())


# --- every output refused before any work, through a link too ---------------------------------


def stop_model_work(monkeypatch) -> list[str]:
    """Make every read of weights or of a model a command could start fail loudly, and record
    it: a command whose output is refused must not have reached any."""
    import res2net.engine.validate as validate_module
    import res2net.inference as inference
    import res2net.saliency as saliency
    import res2net.weights.loading as loading

    reached: list[str] = []

    def stop(name: str):
        def call(*args, **kwargs):
            reached.append(name)
            raise AssertionError(f"{name} reached before the output was checked")

        return call

    monkeypatch.setattr(loading, "read_checkpoint", stop("read_checkpoint"))
    monkeypatch.setattr(validate_module, "read_checkpoint", stop("read_checkpoint"))
    monkeypatch.setattr(inference, "read_weights", stop("read_weights"))
    monkeypatch.setattr(saliency, "load_saliency_model", stop("load_saliency_model"))
    return reached


EARLY = {  # command -> (its argv into `folder`, the output name planted there)
    "export": ("export", "m.pt2"),
    "convert": ("convert-file", "w.safetensors"),
    "convert --to-hub-folder": ("convert", "config.json"),
    "cam": ("cam", "<out>"),
    "saliency predict": ("saliency", "<out>"),
    "validate --per_class_csv": ("validate", "top1.csv"),
    "validate --results_csv": ("validate", "r.csv"),
    "validate --report_dir": ("validate", "report/summary.json"),
}


@pytest.mark.parametrize("kind", ["symlink", "dangling"])
@pytest.mark.parametrize("case", sorted(EARLY))
def test_a_link_at_an_output_is_refused_before_any_model_work(
    world, tmp_path, monkeypatch, case, kind
):
    """A link at the name an output goes to is refused in one line naming it before the
    checkpoint is read or the model built (not by the write at the end of the work), and
    nothing outside changes."""
    command, name = EARLY[case]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "notes.txt").write_text("the owner's notes")
    folder = tmp_path / "folder"
    if command == "convert":
        shutil.copytree(world.hub, folder)
    else:
        folder.mkdir()
    if command == "convert-file":
        argv = ["convert", str(world.weights), str(folder / name), "--model", MODEL]
    else:
        argv = command_argv(world, command, folder)
    name = world.outputs[command] if name == "<out>" else name
    plant(kind, folder / name, outside)
    reached = stop_model_work(monkeypatch)
    rc, err = run_cli(*argv)
    assert rc == 2 and len(err) == 1 and str(folder / name) in err[0], err
    assert "link" in err[0], err
    assert reached == []
    assert (outside / "notes.txt").read_text() == "the owner's notes"
    assert not (outside / "not-yet").exists()


@contextlib.contextmanager
def released_after(fifo: Path, seconds: float):
    """Yield a list that gets an entry when, after `seconds`, a reader blocked on the named
    pipe `fifo` had to be released (by opening it for writing): a call that blocks on it then
    fails its test instead of hanging it."""
    done, released = threading.Event(), []

    def watch() -> None:
        if not done.wait(seconds):
            with contextlib.suppress(OSError):  # ENXIO: no reader waits on it
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                released.append(fifo)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield released
    finally:
        done.set()
        watcher.join()


def test_a_pipe_swapped_in_after_the_hub_check_never_blocks(world, tmp_path, monkeypatch):
    """`convert --to-hub-folder` into a folder this package wrote reads its `model.safetensors`
    to know it may replace it. A named pipe swapped in at that name just before it is opened
    (after any check by name) must not block the open: it is refused in one line."""
    folder = tmp_path / "hub"
    shutil.copytree(world.hub, folder)
    weights = folder / "model.safetensors"
    real_open = os.open

    def swap_then_open(path, *args, **kwargs):
        if os.fspath(path) == str(weights) and not stat.S_ISFIFO(os.lstat(weights).st_mode):
            weights.unlink()
            os.mkfifo(weights)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", swap_then_open)
    with released_after(weights, 30) as released:
        rc, err = run_cli(*command_argv(world, "convert", folder))
    assert not released, "the Hub folder check blocked on a named pipe"
    assert rc == 2 and len(err) == 1 and str(folder) in err[0], err
    assert stat.S_ISFIFO(os.lstat(weights).st_mode)  # refused, never replaced


def test_the_hub_check_reads_only_the_header(world, tmp_path, monkeypatch):
    """Whether a Hub folder is this package's is read from `model.safetensors`' header alone
    (never the tensors, which may be hundreds of MB), and never through a link."""
    from res2net import hub
    from res2net.errors import FileRefused

    folder = tmp_path / "hub"
    shutil.copytree(world.hub, folder)
    weights = folder / "model.safetensors"
    with weights.open("r+b") as f:  # the tensors' bytes cut short: the header alone is intact
        f.truncate(weights.stat().st_size - 16)
    stop_model_work(monkeypatch)
    assert hub.check_folder(folder) == folder
    other = tmp_path / "other"
    shutil.copytree(world.hub, other)
    weights.unlink()
    weights.symlink_to(other / "model.safetensors")  # a model elsewhere: not this folder's
    with pytest.raises(FileRefused, match=re.escape(f"'{weights}' is a symbolic link")):
        hub.check_folder(folder)
    (other / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")  # claims 2**64 bytes
    weights.unlink()
    shutil.copy(other / "model.safetensors", weights)
    with pytest.raises(ValueError, match="is not a model folder this package wrote"):
        hub.check_folder(folder)


# --- MLflow's store: never through a planted link ----------------------------------------------


@pytest.mark.parametrize("where", ["mlruns", "mlruns/mlflow.db", "mlruns/artifacts"])
@pytest.mark.parametrize("kind", ["symlink", "dangling"])
def test_a_planted_mlflow_store_link_is_refused_before_training(
    world, tmp_path, monkeypatch, where, kind
):
    """`train --log mlflow` with the default store writes `./mlruns/mlflow.db` and
    `./mlruns/artifacts` in the folder it starts in; MLflow and SQLite follow links there. A
    link planted at any of those names is refused in one line naming it, before any work,
    and nothing outside changes (SQLite would create a dangling link's target)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "notes.txt").write_text("the owner's notes")
    start = tmp_path / "start"
    (start / "mlruns").mkdir(parents=True)
    monkeypatch.chdir(start)
    target = start / where
    if where == "mlruns":
        shutil.rmtree(target)
    if kind == "symlink":
        target.symlink_to(outside if where != "mlruns/mlflow.db" else outside / "notes.txt")
    else:
        target.symlink_to(outside / "not-yet")
    before = snapshot(outside)
    run = tmp_path / "run"
    rc, err = run_cli(*train_argv(world.data, run, "--log", "mlflow"))
    assert rc == 2 and len(err) == 1 and str(target) in err[0] and "--log_uri" in err[0], err
    assert snapshot(outside) == before and not (outside / "not-yet").exists()
    assert not run.exists()  # refused before the run folder was touched


def test_the_tracker_itself_refuses_a_planted_store(tmp_path, monkeypatch):
    """`Trackers`, as `engine.train` opens them (the Python API, not only the command line),
    refuses a link at `./mlruns` before MLflow starts, and a link at a SQLite file named by
    `--log_uri`; `tracking.json` is read without following a link or blocking on a pipe."""
    from res2net.engine.tracking import Trackers
    from res2net.errors import ConfigError

    outside = tmp_path / "outside"
    outside.mkdir()
    monkeypatch.chdir(tmp_path)
    mlruns = tmp_path / "mlruns"
    mlruns.symlink_to(outside)
    with pytest.raises(ConfigError, match=re.escape(f"'{mlruns}' is a symbolic link")):
        Trackers(tmp_path, ["mlflow"])
    mlruns.unlink()
    db = tmp_path / "run.db"
    db.symlink_to(outside / "victim.db")
    with pytest.raises(ConfigError, match=re.escape(f"'{db}' is a symbolic link")):
        Trackers(tmp_path, ["mlflow"], uri=f"sqlite:///{db}")
    assert list(outside.iterdir()) == []
    state = tmp_path / "tracking.json"
    os.mkfifo(state)
    with released_after(state, 10) as released:
        assert Trackers(tmp_path, [])._ids() == {}  # a pipe: refused at once, never waited on
    assert not released, "tracking.json: blocked on a named pipe"


@pytest.mark.parametrize("kind", ["symlink", "dangling"])
def test_a_planted_wandb_folder_link_is_refused_before_training(world, tmp_path, monkeypatch, kind):
    """W&B writes `<ckpt_save_dir>/wandb`: a link planted there in a prepared run folder is
    refused in one line naming it, before any work, and nothing outside changes."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "wandb").symlink_to(outside if kind == "symlink" else tmp_path / "not-yet")
    rc, err = run_cli(*train_argv(world.data, run, "--log", "wandb"))
    assert rc == 2 and len(err) == 1 and str(run / "wandb") in err[0], err
    assert list(outside.iterdir()) == [] and not (tmp_path / "not-yet").exists()
    assert sorted(p.name for p in run.iterdir()) == ["wandb"]
