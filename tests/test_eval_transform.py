"""The eval transform travels with the weights (typed `Weights`/`EvalTransform`), with the
precedence flags > recipe > checkpoint > defaults, and the CLI's one-line errors and exit codes."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

import res2net
from res2net.cli.main import main
from res2net.cli.train import config_from_argv, given_keys
from res2net.config import Config
from res2net.data.shards import INDEX_FORMAT
from res2net.engine import train as train_mod
from res2net.engine.validate import eval_settings
from res2net.weights import pretrained
from res2net.weights.convert import convert
from res2net.weights.entry import (
    EvalTransform,
    Weights,
    describe_sources,
    get_weights,
    resolve_eval_transform,
)
from res2net.weights.loading import read_checkpoint
from tests.test_train import make_folder, tiny_config

RUN_EVAL = {"image_resize": 16, "crop_pct": 1.0}
pytestmark = pytest.mark.usefixtures("tiny_arch")  # tiny_config's model


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data"), n_classes=2, per_class=2)


@pytest.fixture(scope="module")
def run_ckpt(tmp_path_factory, data_dir, tiny_arch) -> Path:
    """A training checkpoint of a run at 16 px, crop_pct 1.0 (its config inside), of the tiny
    registered Res2Net (the formats and transforms are the point, not the zoo model)."""
    torch.manual_seed(0)
    model = res2net.create_model(tiny_arch, num_classes=2)
    cfg = tiny_config(data_dir, tmp_path_factory.mktemp("run"), "--model", tiny_arch)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.save(
        {
            "format": "res2net-train",
            "arch": tiny_arch,
            "num_classes": 2,
            "classes": ["class0", "class1"],
            "model": model.state_dict(),
            "ema": None,
            "config": cfg.to_dict(),
        },
        path,
    )
    return path


def test_every_table_entry_is_a_typed_weights_entry() -> None:
    for name in res2net.list_models():
        for entry in pretrained.pretrained_entries(name):
            w = Weights.from_entry(name, entry)
            assert w.urls and w.license and w.eval.mean[0] < 1 and "top1" in w.metrics
            assert Weights.from_entry(name, w.entry()) == w
    w = get_weights("res2net50")
    assert (w.source, w.eval.image_resize, w.eval.crop_pct) == ("mindcv", 224, 0.875)
    assert w.transforms()(torch.zeros(3, 300, 400)).shape == (3, 224, 224)


def test_pretrained_model_carries_its_weights_entry(
    monkeypatch, run_ckpt: Path, tmp_path: Path
) -> None:
    sd = tmp_path / "w.pth"
    torch.save(res2net.create_model("res2net50").state_dict(), sd)
    monkeypatch.setattr("res2net.weights.loading.download_weights", lambda entry, *a, **k: sd)
    model = res2net.create_model("res2net50", pretrained="official")
    assert (
        isinstance(model.pretrained_weights, Weights)
        and model.pretrained_weights.source == "official"
    )
    assert res2net.create_model("res2net50").pretrained_weights is None


def test_config_units_are_converted_in_one_place() -> None:
    t = EvalTransform.from_config(config_from_argv(None, ["--image_resize", "32"]))
    assert t == EvalTransform(image_resize=32)  # 0..255 recipe values -> 0..1
    with pytest.raises(ValueError, match="crop_pct"):
        EvalTransform.from_dict({"crop_pct": 2.0}, "x.safetensors metadata")


def test_precedence_flags_recipe_checkpoint_defaults() -> None:
    ckpt = (
        EvalTransform(image_resize=32, crop_pct=1.0, interpolation="bicubic"),
        "checkpoint a.pt",
    )
    t, where = resolve_eval_transform(
        flags={"image_resize": 64},
        recipe={"crop_pct": 0.9},
        checkpoint=ckpt,
        recipe_name="recipe r.yaml",
    )
    assert (t.image_resize, t.crop_pct, t.interpolation, t.mean) == (
        64,
        0.9,
        "bicubic",
        (0.485, 0.456, 0.406),
    )
    assert where == {
        "image_resize": "command line",
        "crop_pct": "recipe r.yaml",
        "interpolation": "checkpoint a.pt",
        "mean": "checkpoint a.pt",
        "std": "checkpoint a.pt",
    }
    line = describe_sources(t, where)
    assert line.startswith("eval transform: ") and "\n" not in line and "(command line)" in line
    _, where = resolve_eval_transform()
    assert set(where.values()) == {"default"}


def test_training_checkpoint_and_its_conversion_carry_the_run_transform(
    run_ckpt: Path, tmp_path: Path
) -> None:
    found, where = read_checkpoint(run_ckpt).eval_transform
    assert (found.image_resize, found.crop_pct) == (16, 1.0) and where == "checkpoint best.pt"
    out = convert(run_ckpt, tmp_path / "w.safetensors")
    assert json.loads(read_checkpoint(out).metadata["eval"])["image_resize"] == 16  # not 224/0.875
    assert read_checkpoint(out).eval == found


def test_validate_ranks_flags_recipe_checkpoint(run_ckpt: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("crop_pct: 0.5\n")
    argv = ["-c", str(recipe), "--image_resize", "24"]
    cfg = config_from_argv(None, argv)
    t, where = eval_settings(cfg, run_ckpt, given_keys(None, argv))
    assert (t.image_resize, t.crop_pct) == (24, 0.5)
    assert where["image_resize"] == "command line" and where["crop_pct"] == f"recipe {recipe}"
    assert where["interpolation"] == "checkpoint best.pt"
    t, _ = eval_settings(config_from_argv(None, []), run_ckpt, given_keys(None, []))
    assert (t.image_resize, t.crop_pct) == (16, 1.0)  # nothing given: the checkpoint's


def test_predict_takes_folders_and_the_checkpoint_transform(
    run_ckpt: Path, data_dir: Path, tiny_arch: str, capsys, caplog
) -> None:
    caplog.set_level(logging.INFO)
    assert (
        main(
            [
                "predict",
                str(data_dir / "val"),
                "--model",
                tiny_arch,
                "--ckpt_path",
                str(run_ckpt),
                "--topk",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    lines = out.out.splitlines()  # 4 images, each with its top class named as in the checkpoint
    assert len(lines) == 8 and all(ln.split()[-1] in ("class0", "class1") for ln in lines[1::2])
    assert "image_resize 16" in caplog.text and "(checkpoint best.pt)" in caplog.text
    assert "random" not in caplog.text


def test_predict_warns_once_about_random_weights(data_dir: Path, caplog) -> None:
    image = next((data_dir / "val" / "class0").iterdir())
    assert main(["predict", str(image), "--model", "res2net50", "--image_resize", "32"]) == 0
    assert sum("random weights" in r.getMessage() for r in caplog.records) == 1


def test_fixed_architecture_argument_is_named() -> None:
    with pytest.raises(ValueError, match=r"scale=0 is invalid for 'res2net50'"):
        res2net.create_model("res2net50", scale=0)


def test_nan_loss_ends_in_one_line_with_exit_code_1(
    data_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    real_loss = train_mod._loss
    monkeypatch.setattr(
        train_mod,
        "_loss",
        lambda cfg, soft: lambda lg, t: real_loss(cfg, soft)(lg, t) * float("nan"),
    )
    cfg = tiny_config(data_dir, tmp_path / "run", "--epoch_size", "1")
    defaults = Config().to_dict()
    changed = {k: v for k, v in cfg.to_dict().items() if v != defaults[k] and k != "config"}
    argv = ["train", *[f"--{k}={v}" for k, v in changed.items()]]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        "res2net train: stopped: loss is nan"
    ) and "Traceback" not in "\n".join(err)


def test_shard_index_missing_a_key_is_one_line(tmp_path: Path, capsys) -> None:
    index = tmp_path / "wds" / "val" / "index.json"
    index.parent.mkdir(parents=True)
    shard = {"name": "val-000000.tar", "count": 1}
    index.write_text(
        json.dumps({"format": INDEX_FORMAT, "version": 1, "total": 1, "shards": [shard]})
    )
    assert (
        main(
            [
                "train",
                "--data_dir",
                str(tmp_path / "wds"),
                "--train_split",
                "val",
                "--model",
                "res2net50",
                "--ckpt_save_dir",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "'classes' must be a list" in err and len(err.splitlines()) == 1


def test_non_utf8_class_name_fails_before_validation(
    run_ckpt: Path, tiny_arch: str, tmp_path: Path, capsys, caplog
) -> None:
    caplog.set_level(logging.INFO)
    data = make_folder(tmp_path / "data", n_classes=1, per_class=1, splits=("val",))
    os.rename(data / "val" / "class0", os.path.join(bytes(data / "val"), b"caf\xe9"))
    make_folder(tmp_path / "data", n_classes=1, per_class=1, splits=("val",))  # a second class
    rc = main(
        [
            "validate",
            "--model",
            tiny_arch,
            "--data_dir",
            str(data),
            "--ckpt_path",
            str(run_ckpt),
            "--num_parallel_workers",
            "0",
            "--per_class_csv",
            str(tmp_path / "pc.csv"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "not valid UTF-8" in err and "validating" not in caplog.text
    assert not (tmp_path / "pc.csv").exists()


def test_hostile_eval_metadata_is_a_value_error(tmp_path: Path) -> None:
    for bad in (
        {"mean": 3},
        {"image_resize": float("inf")},
        {"std": [0.0, 1, 1]},
        {"crop_pct": "x"},
    ):
        with pytest.raises(ValueError):
            EvalTransform.from_dict(bad)
    with pytest.raises(ValueError, match="malformed mean/std"):
        EvalTransform.from_config({"mean": 7})


def _validate_json(ckpt: Path, data_dir: Path, flags: list[str], capsys) -> dict:
    argv = ["validate", "--data_dir", str(data_dir), "--ckpt_path", str(ckpt), *flags]
    assert main([*argv, "--num_parallel_workers", "0", "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_every_format_convert_writes_scores_the_same(
    run_ckpt: Path, data_dir: Path, tiny_arch: str, tmp_path: Path, capsys
) -> None:
    """The training checkpoint, its .safetensors and hub-folder conversions validate the same
    with no flags; .ckpt/.pth (no header) with the flags `convert` prints for them."""
    model = ["--model", tiny_arch]  # no eval transform flags
    reference = _validate_json(run_ckpt, data_dir, model, capsys)
    assert main(["convert", str(run_ckpt), str(tmp_path / "w.safetensors")]) == 0
    assert main(["convert", str(run_ckpt), "--to-hub-folder", str(tmp_path / "hub")]) == 0
    capsys.readouterr()
    for ckpt in (tmp_path / "w.safetensors", tmp_path / "hub" / "model.safetensors"):
        got = _validate_json(ckpt, data_dir, model, capsys)
        assert (got["top1"], got["loss"]) == (reference["top1"], reference["loss"]), ckpt
    for name in ("w.ckpt", "w.pth"):
        assert main(["convert", str(run_ckpt), str(tmp_path / name)]) == 0
        note = capsys.readouterr().out.strip().splitlines()[-1]
        assert note.startswith("note: ") and "--image_resize 16 --crop_pct 1" in note
        flags = note.split("validate it with ")[1].split()
        got = _validate_json(tmp_path / name, data_dir, [*model, *flags], capsys)
        assert got["top1"] == reference["top1"], name
        assert got["loss"] == pytest.approx(reference["loss"], abs=1e-6), name
