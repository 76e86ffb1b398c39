"""Engine parts in isolation: schedules equal their formulas, checkpoints rotate and stay whole,
optimizer groups follow weight_decay_filter, evaluation counts every image once."""

from __future__ import annotations

import math
import os
import zipfile

import pytest
import torch
from torch import nn

from res2net.engine.checkpoint import CheckpointManager, load_training_state, save_checkpoint
from res2net.engine.evaluate import evaluate
from res2net.engine.optim import build_optimizer
from res2net.engine.schedules import LrSchedule


def test_cosine_with_warmup_equals_formula():
    s = LrSchedule(
        "cosine_decay", lr=0.1, steps_per_epoch=10, min_lr=0.001, warmup_epochs=4, decay_epochs=196
    )
    assert s(0) == 0.0
    assert s(20) == pytest.approx(0.1 * 20 / 40)
    assert s(40) == pytest.approx(0.1)
    t, total = 1000 - 40, 1960
    assert s(1000) == pytest.approx(
        0.001 + 0.5 * (0.1 - 0.001) * (1 + math.cos(math.pi * t / total))
    )
    assert s(40 + 1960) == pytest.approx(0.001)
    assert s(10_000) == pytest.approx(0.001)


def test_warmup_factor_and_epoch_stair():
    s = LrSchedule("constant", lr=1.0, steps_per_epoch=4, warmup_epochs=1, warmup_factor=0.5)
    assert [s(i) for i in range(5)] == pytest.approx([0.5, 0.625, 0.75, 0.875, 1.0])
    stair = LrSchedule(
        "cosine_decay", lr=1.0, steps_per_epoch=4, decay_epochs=2, lr_epoch_stair=True
    )
    assert stair(5) == stair(4) == pytest.approx(0.5)


def test_step_and_multi_step_decay():
    step = LrSchedule("step_decay", lr=1.0, steps_per_epoch=10, decay_epochs=2, decay_rate=0.5)
    assert [step(i) for i in (0, 19, 20, 40)] == pytest.approx([1.0, 1.0, 0.5, 0.25])
    multi = LrSchedule(
        "multi_step_decay", lr=1.0, steps_per_epoch=10, milestones=(1, 3), decay_rate=0.1
    )
    assert [multi(i) for i in (9, 10, 29, 30)] == pytest.approx([1.0, 0.1, 0.1, 0.01])


def test_cosine_cycles():
    s = LrSchedule(
        "cosine_decay", lr=1.0, steps_per_epoch=1, decay_epochs=10, num_cycles=2, cycle_decay=0.5
    )
    assert s(10) == pytest.approx(0.5) and s(20) == 0.0


def test_unknown_scheduler():
    with pytest.raises(ValueError, match="scheduler"):
        LrSchedule("linear", lr=0.1, steps_per_epoch=1)


def test_weight_decay_filter():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    opt = build_optimizer(
        model, opt="momentum", lr=0.1, weight_decay=1e-4, weight_decay_filter="norm_and_bias"
    )
    decay, no_decay = opt.param_groups
    assert {p.ndim for p in decay["params"]} == {2, 4} and decay["weight_decay"] == 1e-4
    assert {p.ndim for p in no_decay["params"]} == {1} and no_decay["weight_decay"] == 0.0
    assert len(build_optimizer(model, opt="adamw", lr=0.1, weight_decay=1e-4).param_groups) == 1
    assert build_optimizer(model, opt="nesterov", lr=0.1, nesterov=True).param_groups[0]["nesterov"]
    with pytest.raises(ValueError, match="opt"):
        build_optimizer(model, opt="shampoo", lr=0.1)


def test_checkpoint_policies(tmp_path):
    latest = CheckpointManager(
        tmp_path / "a", prefix="m", keep_max=2, policy="latest_k", run_id="r"
    )
    latest.check_writable()
    for epoch, top1 in enumerate([50.0, 70.0, 60.0], start=1):
        latest.save_epoch({"epoch": epoch}, epoch, top1)
    assert sorted(p.name for p in (tmp_path / "a").glob("m-*.pt")) == ["m-002.pt", "m-003.pt"]
    assert load_training_state(latest.latest())["epoch"] == 3

    top = CheckpointManager(tmp_path / "b", prefix="m", keep_max=2, policy="top_k", run_id="r")
    for epoch, top1 in enumerate([50.0, 70.0, 60.0, 40.0], start=1):
        top.save_epoch({"epoch": epoch}, epoch, top1)
    assert sorted(p.name for p in (tmp_path / "b").glob("m-*.pt")) == ["m-002.pt", "m-003.pt"]


def test_rotation_reads_only_the_header_of_each_checkpoint(tmp_path, monkeypatch):
    """Which run an epoch file belongs to is read from its own header alone (the zip directory
    and the pickle record, never the tensors: epoch files are hundreds of MB), and rotation
    still deletes only this run's files."""
    import tracemalloc

    from res2net.engine.checkpoint import checkpoint_header
    from res2net.weights import torchfile

    manager = CheckpointManager(tmp_path, prefix="m", keep_max=1, policy="latest_k", run_id="r")
    for epoch, run in [(1, "r"), (2, "another run")]:
        path = manager.epoch_file(epoch)
        state = {"epoch": epoch, "w": torch.zeros(1 << 21)}  # 8 MiB of tensor bytes
        save_checkpoint(state, path, run_id=run, epoch_file=path.name, epoch_top1=None)

    def whole_read(*args, **kwargs):
        raise AssertionError("a whole checkpoint was read")

    monkeypatch.setattr(torch, "load", whole_read)
    monkeypatch.setattr(torchfile, "read_file", whole_read)
    tracemalloc.start()
    try:
        header = checkpoint_header(manager.epoch_file(1))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert header == {"run_id": "r", "epoch": 1, "epoch_file": "m-001.pt", "epoch_top1": None}
    assert peak < 2 << 20, peak
    assert manager.reconcile() == []
    manager.save_epoch({"epoch": 3}, 3, 60.0)  # keeps one: epoch 1 (this run's) goes
    assert sorted(p.name for p in tmp_path.glob("m-*.pt")) == ["m-002.pt", "m-003.pt"]


@pytest.mark.parametrize("damage", ["pipe", "link", "not a zip", "no pickle", "over the bound"])
def test_a_checkpoint_without_a_readable_header_is_kept(tmp_path, monkeypatch, damage):
    """A file whose header cannot be read within its bound, or that is not a regular file at
    its name, is never proven this run's: its header is None (so it is kept), at once."""
    from res2net.engine import checkpoint

    path = tmp_path / "m-001.pt"
    header = {"run_id": "r", "epoch_file": path.name}
    if damage == "pipe":
        os.mkfifo(path)
    elif damage == "link":
        save_checkpoint({"epoch": 1}, tmp_path / "real.pt", **header)
        path.symlink_to(tmp_path / "real.pt")
    elif damage == "not a zip":
        path.write_bytes(b"\x80\x02}q\x00.")
    elif damage == "no pickle":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/version", "3")
    else:
        save_checkpoint({"epoch": 1, "notes": "x" * 10000}, path, **header)
        assert checkpoint.checkpoint_header(path)["run_id"] == "r"
        monkeypatch.setattr(checkpoint, "MAX_HEADER_BYTES", 4096)
    assert checkpoint.checkpoint_header(path) is None


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="previous file there, if any, is intact"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_training_state(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_read_only_dir_fails_before_training(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(OSError, match="not writable"):
        CheckpointManager(ro / "ckpt", prefix="m").check_writable()


def test_load_training_state_rejects_other_files(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="not a res2net training checkpoint"):
        load_training_state(tmp_path / "w.pt")


def test_evaluate_counts_and_skips_invalid():
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3, 4))
        model.bias.zero_()
    x = torch.eye(4)[:3]  # sample i scores highest on class i
    labels = torch.tensor([0, 1, 0])
    valid = torch.tensor([True, True, False])
    result = evaluate(model, [(x, labels, valid)], device=torch.device("cpu"), num_classes=3)
    assert result.n == 2 and result.correct1 == 2 and result.top1 == 100.0
    assert result.class_total.tolist() == [1, 1, 0]
