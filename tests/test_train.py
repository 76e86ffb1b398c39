"""Training end to end on a tiny folder: resume is exact, stops are clean, bad input is caught."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from res2net.cli.train import config_from_argv
from res2net.engine import train as train_mod
from res2net.engine.checkpoint import load_training_state
from res2net.engine.train import train
from res2net.engine.validate import validate
from tests.conftest import TINY_ARCH

REPO = Path(__file__).resolve().parents[1]
# tiny_config's model: the training path is the point, not the zoo model
pytestmark = pytest.mark.usefixtures("tiny_arch")


def make_folder(
    root: Path, n_classes: int = 3, per_class: int = 6, splits=("train", "val")
) -> Path:
    """A tiny ImageNet-style tree of 24x24 images: class c is a brighter c-th channel."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(n_classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 80, (24, 24, 3), dtype=np.uint8)
                pixels[..., c] += 150
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data"))


def tiny_config(data_dir: Path, ckpt_dir: Path, *extra: str):
    return config_from_argv(
        None,
        [
            "--model",
            TINY_ARCH,
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
            "2",
            "--num_parallel_workers",
            "0",
            "--opt",
            "momentum",
            "--lr",
            "0.01",
            "--warmup_epochs",
            "1",
            "--decay_epochs",
            "1",
            "--mode",
            "1",
            "--val_while_train",
            "True",
            "--log_interval",
            "1",
            "--hflip",
            "0.5",
            "--color_jitter",
            "0.2",
            "--seed",
            "7",
            *extra,
        ],
    )


def final_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    return load_training_state(ckpt_dir / "last.pt")["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


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


def test_train_validate_and_outputs(data_dir, tmp_path, capsys):
    cfg = tiny_config(
        data_dir,
        tmp_path / "run",
        "--ema",
        "True",
        "--ema_decay",
        "0.9",
        "--mixup",
        "0.2",
        "--label_smoothing",
        "0.1",
        "--clip_grad",
        "True",
    )
    result = train(cfg)
    assert result.epochs_done == 2 and not result.interrupted
    assert result.best_path is not None and result.best_path.is_file()
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all("val_top1" in r for r in epochs)
    assert any(r["kind"] == "step" for r in records)
    assert result.plot_path is not None and result.plot_path.read_bytes()[:4] == b"\x89PNG"
    assert set(result.row) >= {
        "model name",
        "params(M)",
        "cards",
        "batch size",
        "ms/step",
        "img/s",
        "acc@top1",
    }
    state = load_training_state(result.last_path)
    assert state["ema"] is not None and state["classes"] == ["class0", "class1", "class2"]
    val = validate(tiny_config(data_dir, tmp_path / "run"), result.best_path)
    assert val.n == 18 and 0 <= val.top1 <= 100

    # the same through the MindCV-style command, with per-class accuracy and predictions
    from res2net.cli.main import main

    csv_path = tmp_path / "per_class.csv"
    args = [
        "validate",
        "--model",
        TINY_ARCH,
        "--data_dir",
        str(data_dir),
        "--image_resize",
        "16",
        "--crop_pct",
        "1.0",
        "--num_parallel_workers",
        "0",
        "--ckpt_path",
        str(result.best_path),
        "--per_class_csv",
        str(csv_path),
        "--json",
    ]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["top1"] == pytest.approx(val.top1) and printed["n"] == 18
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "class,images,correct,precision,recall,f1" and len(rows) == 4
    image = next((data_dir / "val" / "class1").iterdir())
    assert (
        main(
            [
                "predict",
                str(image),
                "--model",
                TINY_ARCH,
                "--ckpt_path",
                str(result.best_path),
                "--image_resize",
                "16",
                "--crop_pct",
                "1.0",
                "--topk",
                "2",
                "--json",
            ]
        )
        == 0
    )
    top = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top"]
    assert len(top) == 2 and {t["class"] for t in top} <= {
        "class0",
        "class1",
        "class2",
    }  # names from the checkpoint


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    ckpt_dir = tmp_path_factory.mktemp("full")
    train(tiny_config(data_dir, ckpt_dir))
    return final_weights(ckpt_dir)


@pytest.mark.parametrize("stop_after", [3, 4])  # mid-epoch, and after the epoch's last step
def test_resume_after_stop_is_bit_identical(
    data_dir, tmp_path, monkeypatch, reference_run, stop_after
):
    monkeypatch.setattr(
        train_mod, "StopRequest", lambda: StopAfter(stop_after)
    )  # 4 steps per epoch
    stopped = train(tiny_config(data_dir, tmp_path / "resumed"))
    assert stopped.interrupted and stopped.epochs_done == 0
    state = load_training_state(tmp_path / "resumed" / "last.pt")
    assert (state["epoch"], state["batch_in_epoch"], state["global_step"]) == (
        0,
        stop_after,
        stop_after,
    )
    monkeypatch.undo()

    resumed = train(tiny_config(data_dir, tmp_path / "resumed", "--resume", "auto"))
    assert resumed.epochs_done == 2 and resumed.best_path is not None
    assert_same_weights(final_weights(tmp_path / "resumed"), reference_run)


def test_resume_auto_after_a_kill_before_the_first_checkpoint_starts_over(
    data_dir, tmp_path, reference_run
):
    """A run killed before its first checkpoint leaves only its log: `--resume auto` starts
    over and moves that log aside (nothing to continue, nothing lost)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    resumed = train(tiny_config(data_dir, run, "--resume", "auto"))
    assert resumed.epochs_done == 2
    assert_same_weights(final_weights(run), reference_run)
    (aside,) = tmp_path.glob("run.replaced-*")
    assert (aside / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_num_classes_mismatch_fails_before_training(data_dir, tmp_path):
    with pytest.raises(ValueError, match="num_classes is 5 but .* has 3 class folders"):
        train(tiny_config(data_dir, tmp_path / "x", "--num_classes", "5"))
    assert not (tmp_path / "x" / "last.pt").exists()


def test_nan_loss_stops_naming_the_step(data_dir, tmp_path, monkeypatch):
    train(tiny_config(data_dir, tmp_path / "run", "--epoch_size", "1"))
    before = (tmp_path / "run" / "last.pt").read_bytes()
    real_loss = train_mod._loss

    def diverging(cfg, soft):
        fn = real_loss(cfg, soft)
        return lambda logits, targets: fn(logits, targets) * float("nan")

    monkeypatch.setattr(train_mod, "_loss", diverging)
    with pytest.raises(
        FloatingPointError, match=r"loss is nan at epoch 2, step 1 \(global step 4\)"
    ):
        train(tiny_config(data_dir, tmp_path / "run", "--epoch_size", "2", "--resume", "auto"))
    assert (
        tmp_path / "run" / "last.pt"
    ).read_bytes() == before  # the last good checkpoint is untouched


def test_missing_data_dir_shows_expected_tree(tmp_path):
    """...before the run folder exists: a command run without its data leaves nothing behind."""
    with pytest.raises(ValueError, match="train/<class>"):
        train(tiny_config(tmp_path / "nothing", tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_sigterm_checkpoints_and_exits_cleanly(data_dir, tmp_path, monkeypatch, caplog):
    """A real SIGTERM to the training process (this one: the command runs here), sent after
    step 2: checkpoint at that step boundary, exit code 0, and how to continue. A separate
    process under SIGTERM: test_reliability's sigterm tests."""
    from res2net.cli.main import main as cli_main
    from res2net.engine import progress

    real = progress.StepReporter.update

    def update(self, step, *args, **kwargs):
        real(self, step, *args, **kwargs)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(progress.StepReporter, "update", update)
    args = [
        "train",
        "--model",
        TINY_ARCH,
        "--data_dir",
        str(data_dir),
        "--ckpt_save_dir",
        str(tmp_path / "run"),
        "--image_resize",
        "16",
        "--batch_size",
        "4",
        "--epoch_size",
        "3",
        "--num_parallel_workers",
        "0",
        "--mode",
        "1",
        "--opt",
        "momentum",
        "--lr",
        "0.01",
    ]
    with caplog.at_level(logging.INFO):
        assert cli_main(args) == 0
    state = load_training_state(tmp_path / "run" / "last.pt")
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 2)
    assert "--resume auto" in caplog.text


def test_recipe_runs_unchanged_given_data_dir(data_dir, tmp_path):
    """A shared MindCV recipe, only shrunk from the command line (the tiny Res2Net: a
    res2net50 checkpoint is hundreds of MB, and the recipe's values are the point), goes
    through the whole path."""
    recipe = REPO / "tests" / "fixtures" / "mindcv_recipes" / "res2net_50_gpu.yaml"
    cfg = config_from_argv(
        str(recipe),
        [
            "--model",
            TINY_ARCH,
            "--data_dir",
            str(data_dir),
            "--distribute",
            "False",
            "--num_classes",
            "3",
            "--image_resize",
            "16",
            "--batch_size",
            "4",
            "--epoch_size",
            "1",
            "--num_parallel_workers",
            "0",
            "--ckpt_save_dir",
            str(tmp_path / "run"),
            "--mode",
            "1",
            "--amp_level",
            "O0",
        ],
    )
    result = train(cfg)
    assert result.epochs_done == 1


def test_train_and_validate_on_shards(data_dir, tmp_path):
    pytest.importorskip("webdataset")
    from res2net.data import write_shards

    write_shards(data_dir, tmp_path / "wds", shard_size=5)
    result = train(tiny_config(tmp_path / "wds", tmp_path / "run", "--epoch_size", "1"))
    assert result.epochs_done == 1 and result.row["acc@top1"] is not None
    val = validate(tiny_config(tmp_path / "wds", tmp_path / "run"), result.last_path)
    assert val.n == 18
