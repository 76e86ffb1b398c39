"""`res2net demo` keeps its best weights and removes its own training checkpoints, only those."""

from __future__ import annotations

import json
from pathlib import Path

from res2net.cli.demo import keep_best_weights
from res2net.engine.checkpoint import save_checkpoint


def test_keep_best_weights_removes_only_the_runs_checkpoints(tmp_path, monkeypatch):
    names = [
        "last.pt",
        "best.pt",
        "res2net50-001.pt",
        "res2net50-002.pt",
        "checkpoints.json",
        "metrics.jsonl",
        "training.png",
        "mine.pt",
        "res2net101-001.pt",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    for name in names[:4]:  # the run's own checkpoints: their headers name the run
        save_checkpoint({}, tmp_path / name, run_id="r", epoch_file=name)
    (tmp_path / "checkpoints.json").write_text(
        json.dumps(
            [{"epoch": e, "file": f"res2net50-00{e}.pt", "top1": None, "run": "r"} for e in (1, 2)]
        )
    )
    save_checkpoint(
        {}, tmp_path / "res2net50-003.pt", run_id="x", epoch_file="res2net50-003.pt"
    )  # not its own

    def convert(src, dst, **kwargs):
        Path(dst).write_bytes(b"weights")
        return Path(dst)

    monkeypatch.setattr("res2net.weights.convert.convert", convert)
    keep_best_weights(tmp_path, tmp_path / "best.pt", prefix="res2net50")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [
        "best.safetensors",
        "metrics.jsonl",
        "mine.pt",
        "res2net101-001.pt",
        "res2net50-003.pt",
        "training.png",
    ]
