"""No run is lost and no file can hurt: training processes killed at chosen and at random
points, stopped by SIGTERM, given a full or read-only disk, or a dead or hung rank.

docs/reliability.md lists every promise with the test that proves it. Killed runs are real
processes (`python tests/reliability_hook.py train ...`, the `res2net` command plus fault
hooks) killed with SIGKILL; they are resumed with `--resume auto` and must end with the same
weights, optimizer, EMA, checkpoint files and metrics as an uninterrupted run, bit for bit.
Random choices print their seed on failure; set RELIABILITY_SEED to repeat one. With
RELIABILITY_FIGURES=FILE the tests add what they measured to that JSON file (`make soak`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from res2net.cli.main import main as cli_main
from res2net.cli.train import config_from_argv
from res2net.data import ImageFolderDataset
from res2net.engine import distributed
from res2net.engine import train as train_mod
from res2net.engine.checkpoint import FORMAT, CheckpointManager, RunLock, load_training_state
from res2net.engine.distributed import DistInfo, peer_failure
from res2net.engine.train import train
from res2net.errors import FileRefused
from res2net.fileio import remove_stale_temporaries
from res2net.models import ARCHITECTURES, Res2Net

from .test_train import make_folder

HOOK = Path(__file__).with_name("reliability_hook.py")
TINY = (Res2Net, dict(layers=(1, 1, 1, 1), base_width=4, scale=4))  # as registered by the hook
EPOCHS = 2
STEPS_PER_EPOCH = 4  # 18 images, batch 4, drop_remainder
THREADS = 1
SIGTERM_BOUND_S = 60.0  # a step, or a validation plus a checkpoint, on a loaded 2-core machine

# Kill points of `make test`: in a training step, in a validation, in a checkpoint write; all
# in epoch 2, so that the run resumes from the checkpoint of epoch 1.
FAST_POINTS = [f"backward:{STEPS_PER_EPOCH + 2}", "eval:2", "save:2"]


def seed_for(test: str) -> int:
    seed = int(os.environ.get("RELIABILITY_SEED", time.time_ns() % 2**32))
    print(f"{test}: RELIABILITY_SEED={seed}")  # shown by pytest when the test fails
    return seed


def record_figures(key: str, value: Any) -> None:
    """Add `value` under `key` to the JSON file named by RELIABILITY_FIGURES, if any."""
    path = os.environ.get("RELIABILITY_FIGURES")
    if not path:
        return
    figures = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    figures[key] = value
    Path(path).write_text(json.dumps(figures, indent=1))


def train_args(data_dir: Path, ckpt_dir: Path, *extra: str) -> list[str]:
    return [
        "--model",
        "res2net_tiny",
        "--data_dir",
        str(data_dir),
        "--ckpt_save_dir",
        str(ckpt_dir),
        "--image_resize",
        "16",
        "--crop_pct",
        "1.0",
        "--batch_size",
        "4",
        "--epoch_size",
        str(EPOCHS),
        "--num_parallel_workers",
        "0",
        "--mode",
        "1",
        "--device",
        "cpu",
        "--opt",
        "momentum",
        "--lr",
        "0.01",
        "--warmup_epochs",
        "1",
        "--decay_epochs",
        "1",
        "--val_while_train",
        "True",
        "--ema",
        "True",
        "--ema_decay",
        "0.9",
        "--hflip",
        "0.5",
        "--color_jitter",
        "0.2",
        "--seed",
        "7",
        "--log_interval",
        "1",
        "--keep_checkpoint_max",
        "1",
        *extra,
    ]


@contextlib.contextmanager
def tiny_registered():
    """`res2net_tiny` known, and one thread (as in the processes: on a busy machine, threads
    wait for each other more than they help; results depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(ARCHITECTURES, "res2net_tiny", TINY)
            yield
    finally:
        torch.set_num_threads(threads)


def train_here(data_dir: Path, ckpt_dir: Path, *extra: str):
    """Train in this process (the reference run, and the resumed runs)."""
    with tiny_registered():
        return train(config_from_argv(None, train_args(data_dir, ckpt_dir, *extra)))


@dataclass
class Reference:
    data: Path
    ckpt: Path
    seconds: float  # how long train() took, for the random delays


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    root = tmp_path_factory.mktemp("reliability")
    data = make_folder(root / "data")
    t0 = time.perf_counter()
    train_here(data, root / "reference")
    return Reference(data, root / "reference", time.perf_counter() - t0)


class Hooked:
    """One `res2net train` process with fault hooks; its log and event trace in files."""

    def __init__(
        self,
        ref: Reference,
        ckpt: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        torchrun: int = 0,
    ) -> None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        n = len(list(ckpt.parent.glob(f"{ckpt.name}.*.trace")))
        self.trace = ckpt.parent / f"{ckpt.name}.{n}.trace"
        self.log = ckpt.parent / f"{ckpt.name}.{n}.log"
        env = {
            **os.environ,
            "RELIABILITY_TRACE": str(self.trace),
            "RELIABILITY_THREADS": str(THREADS),
            "OMP_NUM_THREADS": str(THREADS),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        cmd = [sys.executable, str(HOOK), "train", *train_args(ref.data, ckpt, *extra)]
        if torchrun:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(torchrun),
                str(HOOK),
                "train",
                *train_args(ref.data, ckpt, *extra),
                "--distribute",
                "True",
            ]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.started = time.perf_counter()

    def events(self) -> list[str]:
        return self.trace.read_text().splitlines() if self.trace.is_file() else []

    def wait_for(self, event: str, timeout: float = 300) -> None:
        deadline = time.perf_counter() + timeout
        while not any(e.startswith(event) for e in self.events()):
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"process ended ({self.proc.returncode}) before {event!r}:\n{self.output()}"
                )
            if time.perf_counter() > deadline:
                raise AssertionError(f"no {event!r} within {timeout}s:\n{self.output()}")
            time.sleep(0.02)

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"still running after {timeout}s:\n{self.output()}") from None

    def output(self) -> str:
        return self.log.read_text()[-4000:] if self.log.is_file() else ""

    def phase(self) -> str:
        """What the process was doing when it stopped: its last event."""
        events = [e for e in self.events() if not e.startswith("killed")]
        return events[-1] if events else "startup"


# --- comparing runs ----------------------------------------------------------------------------


def assert_equal_values(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_equal_values(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_values(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def metrics(ckpt: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]


_REFERENCE_STATES: dict[tuple[str, int, int], dict[str, Any]] = {}


def reference_state(path: Path) -> dict[str, Any]:
    """`load_training_state(path)` of a reference run's file, read once per version of it
    (a reference run is compared with many runs, and never changes once written)."""
    st = path.stat()
    key = (str(path), st.st_ino, st.st_mtime_ns)
    if key not in _REFERENCE_STATES:
        _REFERENCE_STATES[key] = load_training_state(path)
    return _REFERENCE_STATES[key]


def assert_same_run(run: Path, ref: Path) -> None:
    """`run` ended exactly as `ref`: every state in last.pt and best.pt, the same epoch
    checkpoints and index, the same metrics, and no temporary files."""
    for name in ("last.pt", "best.pt"):
        a, b = load_training_state(run / name), dict(reference_state(ref / name))
        for state in (a, b):  # each run has its own id
            state.pop("config"), state.pop("run_id")
        assert_equal_values(a, b, name)
    files = sorted(p.name for p in run.iterdir() if p.suffix == ".pt")
    assert files == sorted(p.name for p in ref.iterdir() if p.suffix == ".pt")
    assert index_without_ids(run) == index_without_ids(ref)
    assert metrics(run) == metrics(ref)  # a resumed epoch's train_loss included
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def index_without_ids(ckpt: Path) -> list[dict[str, Any]]:
    """`checkpoints.json`'s entries without the run id (each run has its own)."""
    entries = json.loads((ckpt / "checkpoints.json").read_text())
    assert len({e.pop("run") for e in entries}) <= 1
    return entries


def sigterm(proc: Hooked, delay: float, seed: int) -> tuple[float, str]:
    """SIGTERM `proc` after `delay` seconds; it must exit with code 0 within SIGTERM_BOUND_S
    (unless train() had already returned: then the signal only cut the printing of results, and
    its default action applies). Returns the seconds to exit and where the signal landed."""
    time.sleep(delay)
    landed = proc.phase()
    sent = time.perf_counter()
    proc.proc.send_signal(signal.SIGTERM)
    rc = proc.wait()
    took = time.perf_counter() - sent
    if rc == -signal.SIGTERM and "returned" in proc.events():
        return took, "after train() returned"
    assert rc == 0, f"seed {seed}: exit {rc} (signal during {landed!r})\n{proc.output()}"
    assert took < SIGTERM_BOUND_S, f"seed {seed}: {took:.1f}s after SIGTERM"
    return took, landed


def kill_and_resume(ref: Reference, run: Path, point: str) -> str:
    """Kill a run at `point`, check what it left, resume it here; returns where it died."""
    proc = Hooked(ref, run, env={"RELIABILITY_KILL": point})
    rc = proc.wait()
    assert rc == -signal.SIGKILL, f"{point}: exit {rc}\n{proc.output()}"
    if (run / "last.pt").exists():  # the previous checkpoint, whole
        load_training_state(run / "last.pt")
    if point.startswith("save:"):  # the write it was in left its temporary file...
        assert list(run.glob(".*.tmp")), point
    train_here(ref.data, run, "--resume", "auto")  # ...which the next start removes
    assert_same_run(run, ref.ckpt)
    return proc.phase()


# --- 1. killed and stopped runs ------------------------------------------------------------------


@pytest.mark.parametrize("point", FAST_POINTS)
def test_sigkill_then_resume_auto_is_bit_identical(reference, tmp_path, point):
    kill_and_resume(reference, tmp_path / "run", point)


def test_sigterm_checkpoints_at_a_step_boundary_and_exits_0_in_bounded_time(reference, tmp_path):
    seed = seed_for("sigterm")
    delay = random.Random(seed).uniform(0, 0.8 * reference.seconds)
    run = tmp_path / "run"
    proc = Hooked(reference, run)
    proc.wait_for("step")
    took, landed = sigterm(proc, delay, seed)
    state = load_training_state(run / "last.pt")
    done = state["global_step"]
    assert state["batch_in_epoch"] == done - STEPS_PER_EPOCH * state["epoch"]  # a step boundary
    if done < EPOCHS * STEPS_PER_EPOCH:
        assert "--resume auto" in proc.output()
    train_here(reference.data, run, "--resume", "auto")
    assert_same_run(run, reference.ckpt)
    record_figures(
        "sigterm_fast",
        {"seed": seed, "seconds_to_exit": round(took, 2), "during": landed, "step": done},
    )


def test_sigterm_during_setup_stops_at_the_first_step_boundary(reference, tmp_path, monkeypatch):
    """The signal arrives while the model is built (in this process): one step, a checkpoint,
    a clean return; the resumed run ends as the uninterrupted one."""
    real_create = train_mod.create_model

    def create_model(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_create(*args, **kwargs)

    monkeypatch.setattr(train_mod, "create_model", create_model)
    result = train_here(reference.data, tmp_path / "run")
    monkeypatch.undo()
    assert result.interrupted
    assert load_training_state(tmp_path / "run" / "last.pt")["global_step"] == 1
    train_here(reference.data, tmp_path / "run", "--resume", "auto")
    assert_same_run(tmp_path / "run", reference.ckpt)


@pytest.mark.slow
def test_sigkill_at_every_hook_point_resumes_bit_identical(reference, tmp_path):
    """Every step, validation, checkpoint write and checkpoint rename of a run, one by one."""
    traced = Hooked(reference, tmp_path / "traced")
    assert traced.wait() == 0, traced.output()
    assert_same_run(tmp_path / "traced", reference.ckpt)  # a process equals this one
    counts: dict[str, int] = {}
    for e in traced.events():
        kind = {"step": "backward"}.get(e.split()[0], e.split()[0])
        counts[kind] = counts.get(kind, 0) + 1
    points = [
        f"{kind}:{n}"
        for kind in ("backward", "eval", "save", "replace")
        for n in range(1, counts.get(kind, 0) + 1)
    ]
    assert len(points) >= EPOCHS * STEPS_PER_EPOCH + 6
    survived = []
    for point in points:
        survived.append(
            {
                "point": point,
                "died_in": kill_and_resume(reference, tmp_path / point.replace(":", "-"), point),
            }
        )
    record_figures("sigkill_hook_points", survived)


@pytest.mark.slow
def test_sigkill_at_random_times_repeatedly_resumes_bit_identical(reference, tmp_path):
    """Chains of runs, each killed at a random moment (uniform from the hooks' start to the end
    of train() in an uninterrupted process) and continued by the next with --resume auto, until
    one finishes: the chain ends as the uninterrupted run."""
    seed = seed_for("random_kills")
    rng = random.Random(seed)
    timed = Hooked(reference, tmp_path / "timed")
    timed.wait_for("start")
    t0 = time.perf_counter()
    timed.wait_for("returned")
    span = time.perf_counter() - t0  # from the hooks' start to the end of train()
    assert timed.wait() == 0, timed.output()
    kills = []
    for chain in range(8):
        run = tmp_path / f"chain{chain}"
        for attempt in range(6):
            proc = Hooked(reference, run, "--resume", "auto")
            proc.wait_for("start")
            time.sleep(rng.uniform(0, span))
            if proc.proc.poll() is None:
                proc.proc.send_signal(signal.SIGKILL)
            rc = proc.wait()
            if rc == 0:
                break
            assert rc == -signal.SIGKILL, f"seed {seed}: exit {rc}\n{proc.output()}"
            kills.append({"chain": chain, "attempt": attempt, "died_in": proc.phase()})
            if (run / "last.pt").exists():
                load_training_state(run / "last.pt")
            if "returned" in proc.events():  # the run was complete: nothing left to kill
                break
        train_here(reference.data, run, "--resume", "auto")
        assert_same_run(run, reference.ckpt), f"seed {seed}"
    record_figures(
        "sigkill_random", {"seed": seed, "kills": kills, "process_seconds": round(span, 2)}
    )


@pytest.mark.slow
def test_sigterm_at_random_times(reference, tmp_path):
    seed = seed_for("sigterm_random")
    rng = random.Random(seed)
    stops = []
    for i in range(6):
        run = tmp_path / f"run{i}"
        proc = Hooked(reference, run)
        proc.wait_for("step")
        took, landed = sigterm(proc, rng.uniform(0, reference.seconds), seed)
        state = load_training_state(run / "last.pt")
        stops.append(
            {"seconds_to_exit": round(took, 2), "during": landed, "step": state["global_step"]}
        )
        train_here(reference.data, run, "--resume", "auto")
        assert_same_run(run, reference.ckpt)
    record_figures("sigterm_random", {"seed": seed, "stops": stops})


def test_stale_temporaries_removed_and_live_ones_kept(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        names = [
            f".last.pt.{gone.pid}.0badc0de.tmp",
            f".best.pt.{os.getpid()}.0123abcd.tmp",
            f".last.pt.{alive.pid}.89abcdef.tmp",
            "last.pt",
            ".hidden",
            "notes.tmp",
            ".x.12.nothex.tmp",
        ]
        for name in names:
            (tmp_path / name).write_bytes(b"x")
        removed = remove_stale_temporaries(tmp_path)
        assert sorted(p.name for p in removed) == sorted(names[:2])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "copies"])
def test_save_order_makes_last_pt_the_commit_point(tmp_path, monkeypatch, links):
    """The epoch file, best.pt and the index are written before last.pt (by hard link, or by
    copy where the filesystem has none), and the policy's drops happen before it too."""
    if not links:
        monkeypatch.setattr(
            os, "link", lambda *a: (_ for _ in ()).throw(OSError(errno.EPERM, "no links"))
        )
    order = []
    real_replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda src, dst: (real_replace(src, dst), order.append(Path(dst).name))[0]
    )
    real_unlink = Path.unlink
    monkeypatch.setattr(
        Path,
        "unlink",
        lambda self, missing_ok=False: (
            order.append(f"-{self.name}"),
            real_unlink(self, missing_ok),
        )[1],
    )
    ckpts = CheckpointManager(tmp_path, prefix="m", keep_max=1, run_id="r")
    ckpts.save_epoch({"epoch": 1}, 1, 50.0, is_best=True)
    ckpts.save_epoch({"epoch": 2}, 2, 40.0)
    assert order == [
        "m-001.pt",
        "best.pt",
        "checkpoints.json",
        "last.pt",
        "m-002.pt",
        "checkpoints.json",
        "-m-001.pt",
        "last.pt",
    ]
    assert load_training_state(tmp_path / "last.pt")["epoch"] == 2
    assert load_training_state(tmp_path / "best.pt")["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt",
        "checkpoints.json",
        "last.pt",
        "m-002.pt",
    ]
    assert (os.stat(tmp_path / "last.pt").st_ino == os.stat(tmp_path / "m-002.pt").st_ino) == links


# --- 2. storage faults ---------------------------------------------------------------------------


@contextlib.contextmanager
def mounted(*how: str, target: Path):
    """`mount *how target` for the duration (root only); yields False where mounting is
    impossible."""
    target.mkdir(parents=True, exist_ok=True)
    ok = False
    if os.geteuid() == 0:
        with contextlib.suppress(OSError):
            ok = subprocess.run(["mount", *how, str(target)], capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_full_disk_during_checkpoint_keeps_the_previous_one(
    reference, tmp_path, capsys, monkeypatch
):
    """ENOSPC while epoch 2 is saved (a real full tmpfs where root may mount one): a one-line
    error, exit code 2, last.pt of epoch 1 untouched, no temporary file; with space again,
    --resume auto ends as the uninterrupted run, even past a metrics line the full disk cut."""
    disk = tmp_path / "disk"
    run = disk / "run"
    with mounted("-t", "tmpfs", "-o", "size=256m", "tmpfs", target=disk) as real_disk:
        train_here(reference.data, run, "--epoch_size", "1")
        before = (run / "last.pt").read_bytes()
        if real_disk:  # room for half a checkpoint
            size = (used_bytes(disk) + len(before) // 2) // 1024
            subprocess.run(["mount", "-o", f"remount,size={size}k", str(disk)], check=True)
        else:
            real_save = torch.save

            def full_disk(obj, f, *args, **kwargs):
                if isinstance(obj, dict) and obj.get("epoch") == 2:
                    f.write(b"\0" * 1024)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_save(obj, f, *args, **kwargs)

            monkeypatch.setattr(torch, "save", full_disk)
        capsys.readouterr()
        with tiny_registered():
            rc = cli_main(["train", *train_args(reference.data, run, "--resume", "auto")])
        err = [
            line
            for line in capsys.readouterr().err.splitlines()
            if line.startswith("res2net train: error:")
        ]
        assert rc == 2 and len(err) == 1, err
        assert "No space left on device" in err[0] and "could not write" in err[0], err
        assert (run / "last.pt").read_bytes() == before
        assert load_training_state(run / "last.pt")["epoch"] == 1
        assert not list(run.glob(".*.tmp"))
        monkeypatch.undo()
        if real_disk:
            subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
        with (run / "metrics.jsonl").open("a") as f:
            f.write('{"kind": "step", "epoch": 2, "glo')  # a record the full disk cut short
        train_here(reference.data, run, "--resume", "auto")
        assert_same_run(run, reference.ckpt)


@pytest.mark.parametrize("where", ["existing", "to-create"])
def test_read_only_ckpt_dir_fails_before_the_first_step(reference, tmp_path, monkeypatch, where):
    """A read-only bind mount (root), or a folder without write permission (other users)."""
    source, ro = tmp_path / "source", tmp_path / "ro"
    source.mkdir()
    ckpt = ro if where == "existing" else ro / "run"
    with contextlib.ExitStack() as stack:
        if os.geteuid() == 0:
            if not stack.enter_context(mounted("--bind", str(source), target=ro)):
                pytest.skip("cannot bind-mount here")
            subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        else:
            ro.mkdir()
            ro.chmod(0o500)
            stack.callback(ro.chmod, 0o700)
        work = []
        monkeypatch.setattr(train_mod, "create_model", lambda *a, **k: work.append("model built"))
        monkeypatch.setattr(train_mod, "StepReporter", lambda *a, **k: work.append("steps started"))
        with pytest.raises(
            OSError,
            match=r"ckpt_save_dir .* is not writable \((Read-only file system|Permission denied)\)",
        ):
            train_here(reference.data, ckpt)
        assert work == [] and not list(ro.iterdir())


# --- 3. hostile and odd inputs (the rest: see docs/reliability.md) -------------------------------


class Payload:
    """Creates `marker` when unpickled: a pickle that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("kind", ["pickle-with-code", "truncated", "weights-only"])
def test_damaged_or_hostile_last_pt_refused_before_the_first_step(reference, tmp_path, kind):
    run, marker = tmp_path / "run", tmp_path / "ran"
    run.mkdir()
    if kind == "pickle-with-code":
        torch.save({"format": FORMAT, "model": Payload(marker)}, run / "last.pt")
    elif kind == "truncated":
        data = (reference.ckpt / "last.pt").read_bytes()
        (run / "last.pt").write_bytes(data[: len(data) // 3])
    else:
        torch.save({"fc.weight": torch.zeros(3, 4)}, run / "last.pt")
    before = (run / "last.pt").read_bytes()
    with pytest.raises(ValueError, match=r"last\.pt: not a (readable|res2net) training checkpoint"):
        train_here(reference.data, run, "--resume", "auto")
    assert not marker.exists()
    assert (run / "last.pt").read_bytes() == before and not (run / "metrics.jsonl").exists()


def test_named_pipe_in_data_folder_does_not_hang(tmp_path):
    make_folder(tmp_path, n_classes=2, per_class=1, splits=("train",))
    pipe = tmp_path / "train" / "class0" / "pipe.png"
    os.mkfifo(pipe)
    result: dict = {}

    def read_all():
        ds = ImageFolderDataset(tmp_path, "train", on_bad_image="skip")
        result["valid"] = [ds[i][2] for i in range(len(ds))]

    worker = threading.Thread(target=read_all, daemon=True)
    worker.start()
    worker.join(timeout=5)
    hung = worker.is_alive()
    if hung:  # let the blocked open() return
        fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        worker.join(timeout=10)
    assert not hung, "reading a data folder with a named pipe in it blocked"
    assert result["valid"] == [True, True]  # the pipe is not a sample


# --- distributed: a dead or hung rank ends the job --------------------------------------------


def test_peer_failure_becomes_a_clear_error():
    two = DistInfo(0, 2, 0, torch.device("cpu"))
    gloo = RuntimeError(
        "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv operation"
    )
    err = peer_failure(gloo, two, 20)
    assert (
        err is not None
        and "rank 0: another rank died or did not answer within dist_timeout=20s" in str(err)
    )
    assert "--resume auto" in str(err) and "Timed out waiting" in str(err)
    assert (
        peer_failure(RuntimeError("Connection closed by peer [127.0.0.1]:1234"), two, 20)
        is not None
    )
    assert peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), two, 20) is None
    assert (
        peer_failure(RuntimeError("Timed out"), DistInfo(0, 1, 0, torch.device("cpu")), 20) is None
    )


@pytest.mark.parametrize("timeout", [0.0, -5.0, float("inf"), float("nan")])
def test_dist_timeout_must_be_finite_and_positive(timeout):
    with pytest.raises(
        ValueError, match="dist_timeout is .*; it must be a positive number of seconds"
    ):
        distributed.setup(True, "cpu", timeout)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["hang", "die"])
def test_dead_or_hung_rank_ends_the_job_within_the_timeout(reference, tmp_path, fault):
    """torchrun, 2 CPU processes, --dist_timeout 20: rank 1 sleeps for ever after step 1 (or is
    SIGKILLed in step 2); rank 0 fails with a clear error and the job ends, non-zero, within
    90 s."""
    env = (
        {"RELIABILITY_HANG": "1:1"}
        if fault == "hang"
        else {"RELIABILITY_KILL": "backward:2", "RELIABILITY_KILL_RANK": "1"}
    )
    proc = Hooked(
        reference,
        tmp_path / "run",
        "--dist_timeout",
        "20",
        "--freeze_bn",
        "True",
        env=env,
        torchrun=2,
    )
    rc = proc.wait(timeout=180)
    took = time.perf_counter() - proc.started
    out = proc.output()
    assert rc != 0, out
    assert took < 90, f"{took:.0f}s\n{out}"
    if fault == "hang":
        assert "another rank died or did not answer within dist_timeout=20s" in out, out
    record_figures(f"dist_{fault}", {"seconds_to_end": round(took, 1), "exit_code": rc})


# --- runs never collide, never overwrite, and stop on signals to the whole group ---------------


class StopAfter:
    """Stands in for the SIGTERM flag: 'requested' turns True at the n-th step boundary."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    @property
    def requested(self) -> bool:
        self.n -= 1
        return self.n <= 0


# 18 images in batches of 2: 9 batches, 4 steps of 2 micro-batches, 1 batch left over per epoch
ACCUM = ["--batch_size", "2", "--gradient_accumulation_steps", "2", "--log_interval", "3"]


@pytest.fixture(scope="module")
def accum_reference(reference, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("accum") / "run"
    train_here(reference.data, run, *ACCUM)
    return run


@pytest.mark.parametrize("stop_after", [2, 4])  # mid-epoch, the end of epoch 1
def test_accumulation_with_a_remainder_resumes_exactly(
    reference, accum_reference, tmp_path, monkeypatch, stop_after
):
    """len(loader) % accumulation != 0: the left-over batch of each epoch is not read, so no
    gradient leaks into the next epoch; stopped and resumed, the run ends as the uninterrupted
    one: weights, files and metrics, the resumed epoch's train_loss included."""
    monkeypatch.setattr(train_mod, "StopRequest", lambda: StopAfter(stop_after))
    stopped = train_here(reference.data, tmp_path / "run", *ACCUM)
    monkeypatch.undo()
    assert stopped.interrupted
    state = load_training_state(tmp_path / "run" / "last.pt")
    assert state["global_step"] == stop_after and state["batch_in_epoch"] == 2 * (
        stop_after - 4 * state["epoch"]
    )
    train_here(reference.data, tmp_path / "run", *ACCUM, "--resume", "auto")
    assert_same_run(tmp_path / "run", accum_reference)
    assert load_training_state(accum_reference / "last.pt")["global_step"] == EPOCHS * 4


@pytest.mark.parametrize(
    "sig",
    [
        pytest.param(signal.SIGTERM, id="SIGTERM"),
        pytest.param(signal.SIGINT, id="SIGINT", marks=pytest.mark.slow),
    ],
)
def test_signal_to_the_process_group_with_loader_workers(reference, tmp_path, sig):
    """SIGTERM (a scheduler) or SIGINT (Ctrl-C) sent to every process of the group, DataLoader
    workers included: the workers let the main process handle it; last.pt at the next step
    boundary, exit code 0, and --resume auto ends bit for bit as the uninterrupted run."""
    run = tmp_path / "run"
    proc = Hooked(reference, run, "--num_parallel_workers", "2")
    proc.wait_for("step 2")
    sent = time.perf_counter()
    os.killpg(proc.proc.pid, sig)
    rc = proc.wait()
    took = time.perf_counter() - sent
    out = proc.output()
    assert rc == 0, out
    assert "killed by signal" not in out and "Traceback" not in out, out
    assert "--resume auto" in out
    state = load_training_state(run / "last.pt")
    assert state["global_step"] < EPOCHS * STEPS_PER_EPOCH
    assert state["batch_in_epoch"] == state["global_step"] - STEPS_PER_EPOCH * state["epoch"]
    train_here(reference.data, run, "--resume", "auto", "--num_parallel_workers", "2")
    assert_same_run(run, reference.ckpt)
    record_figures(
        f"group_{signal.Signals(sig).name}", {"seconds_to_exit": round(took, 2), "exit_code": rc}
    )


@pytest.mark.slow
def test_sigterm_to_the_process_group_under_torchrun(reference, tmp_path):
    """torchrun, 2 CPU ranks with 2 loader workers each; SIGTERM to the whole group (launcher,
    ranks, workers): every rank stops at the same step boundary and exits cleanly, last.pt is
    written, and the resumed job ends with the uninterrupted job's weights."""
    extra = ("--num_parallel_workers", "2", "--freeze_bn", "True", "--zero_init_last", "True")
    whole = Hooked(reference, tmp_path / "whole", *extra, torchrun=2)
    assert whole.wait() == 0, whole.output()
    run = tmp_path / "run"
    proc = Hooked(reference, run, *extra, torchrun=2)
    proc.wait_for("step 1")
    sent = time.perf_counter()
    os.killpg(proc.proc.pid, signal.SIGTERM)
    rc = proc.wait()
    record_figures(
        "sigterm_torchrun",
        {"launcher_exit_code": rc, "seconds_to_exit": round(time.perf_counter() - sent, 1)},
    )
    out = proc.output()
    assert "stopped at epoch" in out and "killed by signal" not in out, out
    assert proc.events().count("returned") == 2, proc.events()  # both ranks returned from train()
    state = load_training_state(run / "last.pt")
    assert state["global_step"] < EPOCHS * 2  # 18 images, 2 ranks of batch 4: 2 steps an epoch
    resumed = Hooked(reference, run, *extra, "--resume", "auto", torchrun=2)
    assert resumed.wait() == 0, resumed.output()
    a, b = load_training_state(run / "last.pt"), load_training_state(tmp_path / "whole" / "last.pt")
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def lock_holder(run: Path) -> int:
    """The id of a process that holds `run`'s RunLock until killed: forked from this one
    (a new Python would spend seconds importing torch for it)."""
    ready, told = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: takes the lock, says so, waits; never returns into the tests
        try:
            os.close(ready)
            RunLock(run).acquire()
            os.write(told, b"locked")
            time.sleep(120)
        finally:
            os._exit(0)
    os.close(told)
    with os.fdopen(ready, "rb") as f:
        assert f.read(6) == b"locked"
    return pid


def test_second_run_into_a_locked_folder_fails_naming_the_holder(reference, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = lock_holder(run)
    try:
        t0 = time.perf_counter()
        with pytest.raises(
            FileRefused, match=rf"is in use by another run \(pid {holder} on host .+, started "
        ):
            train_here(reference.data, run)
        took = time.perf_counter() - t0
        assert took < 30  # at once, not after waiting
        record_figures("locked_dir", {"seconds_to_fail": round(took, 2)})
        assert not (run / "metrics.jsonl").exists()
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
    result = train_here(reference.data, run, "--epoch_size", "1")  # the dead holder's lock is gone
    assert result.epochs_done == 1


def test_fresh_run_into_another_runs_folder_refuses_in_one_line(reference, tmp_path, capsys):
    run = tmp_path / "run"
    train_here(reference.data, run, "--epoch_size", "1")
    before = {
        p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".res2net.lock"
    }
    with tiny_registered():
        rc = cli_main(["train", *train_args(reference.data, run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "holds another run's files" in err[0] and "--resume auto" in err[0]
    assert "--ckpt_save_dir" in err[0] and "--overwrite True" in err[0]
    assert {
        p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".res2net.lock"
    } == before
    train_here(reference.data, run, "--overwrite", "True")  # explicitly: a new run from scratch
    assert_same_run(run, reference.ckpt)
    (aside,) = tmp_path.glob("run.replaced-*")  # the previous run's files, moved, not deleted
    assert {p.name: p.read_bytes() for p in aside.iterdir() if p.is_file()} == before


def test_orphan_epoch_file_removed_and_index_checked_at_start(reference, tmp_path, monkeypatch):
    """A kill right after checkpoints.json's rename leaves an epoch file the index no longer
    lists; the next start removes it (its header names the run, and the policy drops it) and
    the file set equals the uninterrupted run's. A damaged index is rebuilt from the
    checkpoints' headers: nothing is deleted."""
    kill_and_resume(reference, tmp_path / "orphan", "replace:checkpoints.json:2")
    run = tmp_path / "damaged"
    train_here(reference.data, run, "--epoch_size", "1")
    want = json.loads((run / "checkpoints.json").read_text())
    for text in [
        "{not json",
        '[{"epoch": 1, "file": "../../etc/passwd", "top1": 1.0}]',
        '{"epoch": 1}',
        "[]",
        None,
    ]:
        if text is None:
            (run / "checkpoints.json").unlink()
        else:
            (run / "checkpoints.json").write_text(text)
        train_here(reference.data, run, "--resume", "auto", "--epoch_size", "1")
        assert (run / "res2net_tiny-001.pt").is_file(), text
        assert json.loads((run / "checkpoints.json").read_text()) == want, text


def test_epoch_with_too_few_readable_images_fails_with_the_report(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    for i, path in enumerate(sorted((data / "train").rglob("*.png"))):
        if i % 3:  # 12 of 18 unreadable
            path.write_bytes(b"not an image")
    with tiny_registered():
        rc = cli_main(["train", *train_args(data, tmp_path / "run", "--ema", "False")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert re.search(
        r"only \d of 16 training images could be read \(min_readable_images 0\.5\)", err[-1]
    ), err
    assert "failed to decode and were skipped" in err[-1] and "train/class" in err[-1]
    assert not (tmp_path / "run" / "last.pt").exists()
    ok = train_here(data, tmp_path / "lenient", "--min_readable_images", "0.1", "--epoch_size", "1")
    assert ok.epochs_done == 1


def test_batches_of_one_never_reach_batchnorm(tmp_path):
    """9 images in batches of 4 (the last batch holds one), and a batch left with one readable
    image: skipped, not a BatchNorm error; the epoch's loss counts the images it trained on."""
    data = make_folder(tmp_path / "data", per_class=3)
    train_files = sorted((data / "train").rglob("*.png"))
    result = train_here(
        data,
        tmp_path / "run",
        "--drop_remainder",
        "False",
        "--shuffle",
        "False",
        "--epoch_size",
        "1",
        "--min_readable_images",
        "0.1",
    )
    assert result.epochs_done == 1
    for path in train_files[1:4]:  # the first batch (no shuffle): one readable image left
        path.write_bytes(b"not an image")
    result = train_here(
        data,
        tmp_path / "run2",
        "--drop_remainder",
        "False",
        "--shuffle",
        "False",
        "--epoch_size",
        "1",
        "--min_readable_images",
        "0.1",
    )
    assert result.epochs_done == 1
    state = load_training_state(tmp_path / "run2" / "last.pt")
    assert state["global_step"] == 3


def test_demo_run_twice_reports_the_finished_result(tmp_path, capsys):
    """The second `res2net demo` trains nothing: it finds its finished run and validates it."""
    args = [
        "demo",
        "--data_dir",
        str(tmp_path / "digits"),
        "--ckpt_save_dir",
        str(tmp_path / "run"),
        "--model",
        "res2net_tiny",
        "--epoch_size",
        "1",
        "--image_resize",
        "16",
        "--num_samples",
        "64",
        "--batch_size",
        "16",
        "--num_parallel_workers",
        "0",
    ]
    with tiny_registered():
        assert cli_main(args) == 0
        first = capsys.readouterr().out
        before = {
            p.name: p.stat().st_mtime_ns
            for p in (tmp_path / "run").iterdir()
            if p.name != ".res2net.lock"
        }
        assert cli_main(args) == 0
    second = capsys.readouterr().out
    assert "| res2net_tiny |" in first and "validated: top-1" in first
    assert "already trained" in second and "validated: top-1" in second
    assert {
        p.name: p.stat().st_mtime_ns
        for p in (tmp_path / "run").iterdir()
        if p.name != ".res2net.lock"
    } == before
