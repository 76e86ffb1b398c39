"""What a user meets on the first day: `--pretrained True`, advice a command-line user can
follow, progress on a terminal of unknown width, titled plots with whole epochs, one per-class
CSV format, and the README's outputs ignored by git."""

from __future__ import annotations

import csv
import logging
import subprocess
from pathlib import Path

import pytest
import torch

from res2net import console, load_checkpoint
from res2net.cli.main import build_parser
from res2net.cli.predict import pretrained_source
from res2net.engine.evaluate import EvalResult
from res2net.engine.progress import training_figure
from res2net.engine.report import PER_CLASS_COLUMNS, confusion_matrix, per_class_rows
from res2net.engine.validate import write_per_class
from res2net.models import Res2Net

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("True", True), ("true", True), ("1", True), ("False", False), ("timm", "timm")],
)
def test_pretrained_flag_takes_true_as_python_does(value: str, expected: bool | str) -> None:
    assert pretrained_source(value) == expected
    for command in (["predict", "x.jpg"], ["cam", "x.jpg"]):
        args = build_parser().parse_args([*command, "--model", "res2net50", "--pretrained", value])
        assert args.pretrained == expected


def test_architecture_mismatch_advice_fits_the_command_line(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Res2Net(layers=(1, 1, 1, 1), base_width=4, scale=4, num_classes=3)
    state = {**model.state_dict(), "extra.weight": torch.ones(1)}
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(ValueError) as err:
        load_checkpoint(model, tmp_path / "extra.pth")
    message = str(err.value)
    assert "1 unexpected keys (e.g. ['extra.weight'])" in message and "model name" in message
    assert "missing keys" not in message and "strict=False" not in message


def test_progress_on_a_terminal_without_width_is_log_lines(monkeypatch, caplog) -> None:
    monkeypatch.setattr(console, "terminal_columns", lambda: 0)  # a tty under `script`
    with caplog.at_level(logging.INFO, logger="res2net"):
        items = list(console.progress_bar(range(20), total=20, desc="validation", unit="batch"))
    assert items == list(range(20))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "validation: batch 2/20" and lines[-1] == "validation: batch 20/20"
    assert len(lines) == 10
    monkeypatch.setattr(console, "terminal_columns", lambda: None)  # a pipe: left clean
    assert console.progress_bar(range(3), total=3) == range(3)


def test_training_figure_of_a_short_run() -> None:
    """One epoch shorter than a log interval: no step records, yet an lr panel; whole epochs."""
    records = [
        {"kind": "epoch", "epoch": 1, "global_step": 3, "train_loss": 2.0, "lr": 0.1,
         "val_loss": 1.5, "val_top1": 40.0},
        {"kind": "epoch", "epoch": 2, "global_step": 6, "train_loss": 1.0, "lr": 0.05,
         "val_loss": 1.0, "val_top1": 60.0},
    ]  # fmt: skip
    fig = training_figure(records, title="training run: digits")
    assert fig is not None and fig.get_suptitle() == "training run: digits"
    lr = fig.axes[1]
    assert [t.get_title() for t in fig.axes] == ["loss", "learning rate", "validation top-1 (%)"]
    assert list(lr.lines[0].get_xdata()) == [3, 6] and list(lr.lines[0].get_ydata()) == [0.1, 0.05]
    for run in (records, records[:1]):  # one epoch too: a single point on each axis
        fig = training_figure(run, title="training run: digits")
        assert fig is not None
        fig.canvas.draw()
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_per_class_csv_has_the_report_columns(tmp_path: Path) -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    pred1 = torch.tensor([0, 1, 1, 1, 0, 2])
    classes = ["cat", "dog", "fox"]
    result = EvalResult(
        class_total=torch.bincount(labels, minlength=3),
        class_correct=torch.bincount(labels[labels == pred1], minlength=3),
        class_predicted=torch.bincount(pred1, minlength=3),
    )
    write_per_class(result, classes, tmp_path / "per_class.csv")
    rows = list(csv.reader((tmp_path / "per_class.csv").open()))
    assert rows[0] == PER_CLASS_COLUMNS
    report = per_class_rows(confusion_matrix(labels, pred1, 3), classes)  # per_class.csv's
    assert rows[1:] == [[str(v) for v in row] for row in report]
    assert rows[2] == ["dog", "3", "2", "66.67", "66.67", "66.67"]


@pytest.mark.parametrize(
    "path",
    ["mlruns/mlflow.db", "digits-res2net/model.safetensors", "res2net50.onnx", "cam/x.png"],
)
def test_readme_outputs_are_ignored_by_git(path: str) -> None:
    proc = subprocess.run(
        ["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT, capture_output=True
    )
    if proc.returncode == 128:
        pytest.skip("not a git checkout")
    assert proc.returncode == 0, f"{path} is not ignored by .gitignore"


def test_validation_loss_is_the_mean_cross_entropy() -> None:
    """The figure behind "loss 795.77 at top-1 33.33": the mean cross entropy of the logits,
    so a large value is the model's (a diverged run's), not the arithmetic's."""
    from torch import nn
    from torch.nn import functional as F

    from res2net.engine.evaluate import evaluate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with torch.no_grad():
        model[1].weight.mul_(500)  # huge logits, as after divergence
    batches = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])) for _ in range(3)]
    result = evaluate(model, batches, device=torch.device("cpu"), num_classes=3)
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in batches])
        expected = F.cross_entropy(logits, torch.cat([y for _, y in batches])).item()
    assert expected > 100 and result.loss == pytest.approx(expected, rel=1e-6)


def test_a_diverging_epoch_is_named() -> None:
    from res2net.engine.train import diverging

    healthy = {"train_loss": 1.2, "val_loss": 0.9}
    assert diverging(healthy, num_classes=3) is None
    assert "the training loss 5.067e+05" in diverging({"train_loss": 506721.2}, 3)
    assert "validation loss 795.8 is 724x" in diverging({"train_loss": 2.0, "val_loss": 795.77}, 3)
    assert "validation loss is nan" in diverging({"train_loss": 2.0, "val_loss": float("nan")}, 3)
