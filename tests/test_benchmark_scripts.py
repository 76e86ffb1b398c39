"""The benchmark scripts run by hand, not here; this checks, in seconds, that what they call in
this package still exists with the signatures they use (they broke once when the factories
became keyword-only, and nothing noticed until a benchmark run)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytest.importorskip("skimage")
pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import data_pipeline
        import train_e2e

        yield data_pipeline, train_e2e
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_data_pipeline_candidates_and_shards_produce_batches(scripts, tmp_path):
    data_pipeline, _ = scripts
    root = tmp_path / "corpus"
    assert data_pipeline.build_corpus(root, per_photo=1) == 9
    for name, dataset in data_pipeline.candidates(root).items():
        image, _ = dataset[0]
        assert image.shape == (3, 224, 224), name
    epochs = data_pipeline.shard_epochs(root, [64], batch_size=4)
    assert len(epochs) == 2  # JPEG and raw shards
    for run_epoch in epochs.values():
        run_epoch()


def test_train_e2e_command_is_a_valid_recipe(scripts, tmp_path):
    from res2net.cli.train import config_from_argv

    _, train_e2e = scripts
    args = argparse.Namespace(batch_size=8, workers=2)
    for precision, level in (("fp32", "O0"), ("bf16", "O2")):
        argv = train_e2e.ours_command(args, tmp_path / "data", tmp_path / "out", 9, precision)
        assert argv[1:4] == ["-m", "res2net.cli.main", "train"]
        cfg = config_from_argv(None, argv[4:])
        assert (cfg.num_classes, cfg.batch_size) == (9, 8)
        assert (cfg.amp_level, cfg.val_amp_level) == (level, level)


def test_train_e2e_refuses_the_recipes_bf16_against_timms_fp32(scripts, tmp_path):
    """The recipe says amp_level O3: an fp32 row whose command leaves the level to the recipe
    times bf16 autocast against timm's fp32, and must not run."""
    _, train_e2e = scripts
    args = argparse.Namespace(batch_size=8, workers=2, timm_train=Path("train.py"))
    ours = train_e2e.ours_command(args, tmp_path / "data", tmp_path / "out", 9, "fp32")
    at = ours.index("--amp_level")
    del ours[at : at + 4]  # --amp_level O0 --val_amp_level O0
    timm = train_e2e.timm_command(args, tmp_path / "data", tmp_path / "out", 9, "fp32")
    settings = train_e2e.ours_settings(ours, "cpu")
    assert settings["precision"] == "bf16"
    with pytest.raises(SystemExit, match="precision: ours 'bf16', timm train.py 'fp32'"):
        train_e2e.check_like_for_like(settings, train_e2e.timm_settings(timm), "timm train.py")
    batch_16 = argparse.Namespace(batch_size=16, workers=2, timm_train=Path("train.py"))
    timm_16 = train_e2e.timm_command(batch_16, tmp_path / "data", tmp_path / "out", 9, "bf16")
    with pytest.raises(SystemExit, match="batch_size: ours 8, timm train.py 16"):
        train_e2e.check_like_for_like(settings, train_e2e.timm_settings(timm_16), "timm train.py")
    ours_fp32 = train_e2e.ours_settings(
        train_e2e.ours_command(args, tmp_path / "data", tmp_path / "out", 9, "fp32"), "cpu"
    )
    train_e2e.check_like_for_like(ours_fp32, train_e2e.timm_settings(timm), "timm train.py")
    nesterov = [a if a != "momentum" else "sgd" for a in timm]  # timm's "sgd" is Nesterov's
    with pytest.raises(SystemExit, match="nesterov: ours False, timm True"):
        train_e2e.check_like_for_like(ours_fp32, train_e2e.timm_settings(nesterov), "timm")


def test_train_e2e_rows_are_like_for_like_at_each_precision(scripts):
    _, train_e2e = scripts
    args = argparse.Namespace(
        batch_size=8,
        workers=2,
        precision=["fp32", "bf16"],
        timm_compile=True,
        timm_train=Path("train.py"),
    )
    rows = train_e2e.trainers(args, "cpu")
    assert list(rows) == [
        f"{p}: {t}"
        for p in ("fp32", "bf16")
        for t in (
            "res2net train",
            "timm train.py",
            "timm train.py --channels-last",
            "timm train.py --channels-last --torchcompile",
        )
    ]
    for name, (_, settings) in rows.items():
        assert settings["precision"] == settings["val_precision"] == name.split(":")[0]
        assert settings["channels_last"] == ("channels-last" in name or "res2net" in name)
        assert settings["compile"] == ("torchcompile" in name)


def test_train_e2e_json_records_flags_settings_load_and_ratios(scripts, tmp_path, monkeypatch):
    """main() with the trainers' runs replaced by fixed times: 1 s + 0.1 s per step for timm,
    0.08 s per step for ours, so ours is 1.25x timm's steady-state rate at both precisions."""
    _, train_e2e = scripts

    def fake_run(command, log):
        steps = 4 if "data-small" in " ".join(command) else 16
        return 1.0 + steps * (0.1 if "-c" in command[1:2] else 0.08)

    monkeypatch.setattr(
        train_e2e, "build_folder", lambda root, per_photo, copies=1: _classes(root, per_photo)
    )
    monkeypatch.setattr(train_e2e, "run_once", fake_run)
    monkeypatch.setattr(train_e2e, "bf16_available", lambda device_type: True)
    timm_train = tmp_path / "train.py"
    timm_train.write_text("")
    out = tmp_path / "e2e.json"
    argv = ["train_e2e.py", "--timm_train", str(timm_train), "--small", "4", "--large", "16"]
    monkeypatch.setattr(sys, "argv", argv + ["--rounds", "1", "--out", str(out)])
    train_e2e.main()
    result = json.loads(out.read_text())
    assert result["flags"]["precision"] == ["fp32", "bf16"]
    assert result["flags"]["batch_size"] == 8 and result["flags"]["timm_train"] == str(timm_train)
    assert isinstance(result["quiet"], bool) and result["max_load_1min"] >= 0
    assert len(result["runs"]) == 2 * 6  # small and large, 6 rows
    assert all(len(run["load_before"]) == 3 for run in result["runs"])
    assert result["trainers"]["fp32: res2net train"]["settings"]["precision"] == "fp32"
    assert "--amp_level" in result["trainers"]["fp32: res2net train"]["command"]
    assert result["steps"] == {"small": 4, "large": 18}
    for precision in ("fp32", "bf16"):
        ratio = result["ratio"][f"{precision}: res2net train / timm train.py"]
        assert ratio["best_runs"] == pytest.approx(1.25)


def _classes(root: Path, per_photo: int) -> int:
    (root / "train" / "a").mkdir(parents=True)
    return 9 * per_photo


def test_train_e2e_large_folder_holds_each_image_copies_times(scripts, tmp_path):
    _, train_e2e = scripts
    assert train_e2e.build_folder(tmp_path / "data", per_photo=1, copies=3) == 27
    files = sorted((tmp_path / "data" / "train").glob("*/*.jpg"))
    assert len(files) == 27 and len(list((tmp_path / "data" / "val").glob("*/*.jpg"))) == 9
    assert files[0].read_bytes() == files[1].read_bytes()  # the same image, linked


def test_train_e2e_timm_flags_match_the_variant(scripts, tmp_path):
    _, train_e2e = scripts
    args = argparse.Namespace(batch_size=128, workers=15, timm_train=Path("train.py"))
    argv = train_e2e.timm_command(
        args, tmp_path / "data", tmp_path / "out", 9, "bf16", channels_last=True, compile=True
    )
    assert argv[-5:] == ["--amp", "--amp-dtype", "bfloat16", "--channels-last", "--torchcompile"]
    plain = train_e2e.timm_command(args, tmp_path / "data", tmp_path / "out", 9, "fp32")
    assert not {"--amp", "--channels-last", "--torchcompile"} & set(plain)


@pytest.mark.slow
def test_lowprec_accuracy_scores_each_precision_against_fp32(tmp_path, monkeypatch):
    """The accuracy half of benchmarks/lowprec.py (fp32, bf16 where supported, int8 calibrated
    on the train folder), end to end on a two-class folder: it compiles for a minute or two."""
    import torch
    from PIL import Image

    import res2net

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import lowprec

    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = torch.randint(0, 256, (36, 40, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    model = res2net.create_model("res2net50_14w_8s", num_classes=2)
    torch.save(model.state_dict(), tmp_path / "model.pth")
    args = argparse.Namespace(
        model="res2net50_14w_8s",
        ckpt=tmp_path / "model.pth",
        data_dir=tmp_path / "data",
        image_size=32,
        crop_pct=1.0,
        batch_size=4,
        no_openvino=importlib.util.find_spec("openvino") is None,
    )
    out = lowprec.accuracy(args)
    assert out["val_images"] == 8 and out["calibration_images"] == 8
    assert out["fp32"]["top1_minus_fp32"] == 0 and out["fp32"]["agreement_with_fp32"] == 100
    precisions = ["int8"] + (["bf16"] if res2net.lowprec.bf16_supported() else [])
    if not args.no_openvino:
        precisions += ["openvino fp32"] + [f"openvino {p}" for p in precisions]
        assert out["openvino fp32"]["agreement_with_fp32"] == 100
    assert lowprec.accuracy_failures(out, max_drop=100.0) == []
    assert lowprec.accuracy_failures({"int8": {"top1": 40.0, "top1_minus_fp32": -0.75}}, 0.5) == [
        "int8 40.00 (-0.75 points)"
    ]
    for name in precisions:
        result = out[name]
        assert 0 <= result["top1"] <= 100 and 0 <= result["agreement_with_fp32"] <= 100
        assert result["top1_minus_fp32"] == result["top1"] - out["fp32"]["top1"]


def test_lowprec_ratio_is_ours_fastest_over_the_fastest_peer(monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import lowprec

    def row(best, median):
        return {"best_ms": best, "median_ms": median}

    rows = {
        "onnxruntime int8 (timm ONNX, quantize_static)": row(110.0, 115.0),
        "openvino int8 (timm, NNCF)": row(90.0, 120.0),
        "res2net int8": row(100.0, 100.0),
        "openvino fp32 (timm)": row(200.0, 200.0),
        "res2net fp32": row(250.0, 250.0),
        "res2net fp32 compiled": row(180.0, 190.0),
    }
    out = lowprec.ratios(rows)
    best, median = out["res2net int8 / best peer (best)"], out["res2net int8 / best peer (median)"]
    assert best["peer"] == "openvino int8 (timm, NNCF)" and best["best"] == pytest.approx(0.9)
    assert median["peer"] == "onnxruntime int8 (timm ONNX, quantize_static)"
    assert median["median"] == pytest.approx(1.15)
    fp32 = out["res2net fp32 / best peer (best)"]
    assert fp32["ours"] == "res2net fp32 compiled" and fp32["best"] == pytest.approx(200 / 180)
    assert "res2net bf16 / best peer (best)" not in out  # no bf16 candidates here


def test_lowprec_openvino_peers_give_the_models_answers(monkeypatch, tiny_arch):
    """The OpenVINO candidates of `lowprec.py speed` (fp32, its default precision, NNCF int8)
    on a tiny model: each returns the logits of the PyTorch model it was converted from."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    pytest.importorskip("onnxruntime")
    import torch

    import res2net

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import lowprec

    torch.manual_seed(0)
    model = res2net.create_model(tiny_arch, num_classes=10).eval()
    x = torch.rand(4, 3, 64, 64)
    calibration = [torch.rand(4, 3, 64, 64) for _ in range(2)] + [x]
    bf16 = res2net.lowprec.bf16_supported()
    candidates, setup_s, precision = lowprec.openvino_models(model, x, calibration, bf16)
    assert set(setup_s) == {"openvino convert_model", "openvino NNCF int8 quantize"}
    assert precision["fp32"] == "<Type: 'float32'>"
    bounds = {"fp32": 1e-4, "bf16": 0.05, "int8": 0.25}
    assert set(candidates) == {"fp32", "int8"} | ({"bf16"} if bf16 else set())
    for batch in (x, x[:1]):  # the batch dimension stays dynamic
        with torch.no_grad():
            want = model(batch)
        for name, run in candidates.items():
            got = run(batch)
            assert got.shape == want.shape, name
            error = ((got - want).abs().max() / want.abs().max()).item()
            assert error < bounds[name], (name, error)
