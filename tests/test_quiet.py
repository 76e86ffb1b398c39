"""The README paths print only what the user needs: notes only when they apply, and progress
where long work happens."""

from __future__ import annotations

import logging

from res2net.cli.train import config_from_argv
from res2net.data import cap_workers
from res2net.data import loader as loader_mod
from res2net.engine import progress
from res2net.engine.progress import StepReporter
from res2net.engine.train import config_notes

DEMO = "src/res2net/data/res2net_digits.yaml"


def test_workers_are_capped_at_the_cores_with_one_note(monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(loader_mod.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(loader_mod, "_capped_notes", set())
    assert [cap_workers(8), cap_workers(8), cap_workers(2), cap_workers(0)] == [2, 2, 2, 0]
    notes = [r.getMessage() for r in caplog.records if "CPU cores" in r.getMessage()]
    assert notes == ["num_parallel_workers 8 > 2 CPU cores here: using 2 workers"]


def test_grad_scaler_note_only_under_autocast() -> None:
    cfg = config_from_argv(DEMO, ["--loss_scale", "512"])
    assert not any("loss_scale" in n for n in config_notes(cfg))
    cfg = config_from_argv(DEMO, ["--loss_scale", "512", "--amp_level", "O2"])
    assert any("loss_scale" in n for n in config_notes(cfg))


def test_distribute_note_is_left_to_the_run() -> None:
    assert config_notes(config_from_argv(None, ["--distribute", "True", "--mode", "1"])) == []


def test_step_log_lines_give_the_whole_run_eta(caplog) -> None:
    caplog.set_level(logging.INFO)
    reporter = StepReporter(4, desc="epoch 1/3", later_steps=8)
    for step in range(1, 5):
        loss = 0.5 if step % 2 == 0 else None  # a loss at log intervals
        reporter.update(step, 2, loss, 0.1, data_wait=0.0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("ETA" in ln and "(run " in ln for ln in lines)
    assert all("data wait 0%" in ln for ln in lines)


def test_data_wait_is_the_share_of_time_spent_waiting_for_batches(monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO)
    clock = iter([100.0, 104.0])  # the reporter's start, the step's end
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    reporter = StepReporter(4)
    reporter.update(1, 2, 0.5, 0.1, data_wait=1.0)  # 4 s in, 1 s of it waiting for input
    assert "data wait 25%" in caplog.records[-1].getMessage()
