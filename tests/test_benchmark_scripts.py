"""The benchmark scripts run by hand, not here; this checks, in seconds, that what they call in
this package still exists with the signatures they use (they broke once when the factories
became keyword-only, and nothing noticed until a benchmark run)."""

from __future__ import annotations

import argparse
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
    from res2net.config import load_config

    _, train_e2e = scripts
    args = argparse.Namespace(batch_size=8, workers=2, bf16=True)
    argv = train_e2e.ours_command(args, tmp_path / "data", tmp_path / "out", num_classes=9)
    assert argv[1:4] == ["-m", "res2net.cli.main", "train"]
    cfg = load_config(None, argv[4:])
    assert (cfg.num_classes, cfg.batch_size, cfg.amp_level) == (9, 8, "O2")


def test_train_e2e_large_folder_holds_each_image_copies_times(scripts, tmp_path):
    _, train_e2e = scripts
    assert train_e2e.build_folder(tmp_path / "data", per_photo=1, copies=3) == 27
    files = sorted((tmp_path / "data" / "train").glob("*/*.jpg"))
    assert len(files) == 27 and len(list((tmp_path / "data" / "val").glob("*/*.jpg"))) == 9
    assert files[0].read_bytes() == files[1].read_bytes()  # the same image, linked


def test_train_e2e_timm_flags_match_the_variant(scripts, tmp_path):
    _, train_e2e = scripts
    args = argparse.Namespace(batch_size=128, workers=15, bf16=True, timm_train=Path("train.py"))
    argv = train_e2e.timm_command(args, tmp_path / "data", tmp_path / "out", 9, compile=True)
    assert argv[-5:] == ["--amp", "--amp-dtype", "bfloat16", "--channels-last", "--torchcompile"]
    args.bf16 = False
    plain = train_e2e.timm_command(args, tmp_path / "data", tmp_path / "out", 9)
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
    )
    out = lowprec.accuracy(args)
    assert out["val_images"] == 8 and out["calibration_images"] == 8
    assert out["fp32"]["top1_minus_fp32"] == 0 and out["fp32"]["agreement_with_fp32"] == 100
    precisions = ["int8"] + (["bf16"] if res2net.lowprec.bf16_supported() else [])
    for name in precisions:
        result = out[name]
        assert 0 <= result["top1"] <= 100 and 0 <= result["agreement_with_fp32"] <= 100
        assert result["top1_minus_fp32"] == result["top1"] - out["fp32"]["top1"]
