"""Salient object detection: metrics and loss on known inputs, the image/mask folder, training
that lowers the loss, and the `res2net saliency` commands end to end on a synthetic set."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from res2net import create_model
from res2net.cli import saliency as saliency_cli
from res2net.data import DataError, decode_image
from res2net.models import Res2Net
from res2net.saliency import (
    SaliencyFolder,
    SaliencyMetrics,
    bce_iou_loss,
    evaluate_saliency,
    f_measure_curve,
    find_pairs,
    iou_loss,
    load_saliency_model,
    mae,
    predict_saliency,
    saliency_geometry,
    saliency_mask,
    saliency_res2net,
    train_saliency,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_trunk() -> Res2Net:
    return Res2Net(layers=(1, 1, 1, 1), base_width=4, scale=4, out_indices=(1, 2, 3, 4))


def write_disks(root: Path, n: int = 8, size: int = 64, seed: int = 0) -> Path:
    """`n` images of a bright disk on dark noise (JPEG) with their masks (PNG)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx, r = rng.integers(size // 3, 2 * size // 3, 2).tolist() + [
            int(rng.integers(size // 8, size // 4))
        ]
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img = rng.integers(0, 100, (size, size, 3)).astype(np.uint8)
        img[disk] = rng.integers(200, 256, (int(disk.sum()), 3))
        Image.fromarray(img).save(root / "images" / f"disk{i}.jpg", quality=95)
        Image.fromarray((disk * 255).astype(np.uint8)).save(root / "masks" / f"disk{i}.png")
    return root


@pytest.fixture(scope="module")
def disks(tmp_path_factory) -> Path:
    return write_disks(tmp_path_factory.mktemp("disks"))


# ---------------------------------------------------------------------------------------------
# Metrics and loss on known inputs


def test_metrics_perfect_and_empty_predictions():
    gt = torch.zeros(1, 1, 4, 4)
    gt[..., :2] = 1  # half salient
    assert mae(gt, gt).tolist() == [0.0]
    assert f_measure_curve(gt, gt).max().item() == pytest.approx(1.0)
    zeros = torch.zeros_like(gt)
    assert mae(zeros, gt).tolist() == [0.5]
    # every threshold marks no pixel except t = 0, which marks all: P = 0.5, R = 1
    curve = f_measure_curve(zeros, gt)[0]
    assert curve[0].item() == pytest.approx(1.3 * 0.5 / (0.3 * 0.5 + 1))
    assert curve[1:].abs().max().item() == 0.0


def test_max_f_averages_per_image_curves():
    gt = torch.tensor([[1.0, 1.0, 0.0, 0.0]]).view(1, 2, 2)
    pred = torch.tensor([[1.0, 0.5, 0.5, 0.0]]).view(1, 2, 2)  # quantized 255, 127, 127, 0
    curve = f_measure_curve(pred, gt)[0]
    f_all = 1.3 * 0.5 * 1 / (0.3 * 0.5 + 1)  # t = 0: 4 marked, 2 right
    f_three = 1.3 * (2 / 3) * 1 / (0.3 * 2 / 3 + 1)  # t in 1..127: 3 marked, 2 right
    f_one = 1.3 * 1 * 0.5 / (0.3 * 1 + 0.5)  # t in 128..255: 1 marked, right
    expected = torch.tensor([f_all] + [f_three] * 127 + [f_one] * 128)
    torch.testing.assert_close(curve, expected.float())
    assert mae(pred, gt).item() == pytest.approx(0.25)

    m = SaliencyMetrics()
    m.update(pred, gt)
    m.update(gt.clone(), gt)  # perfect: F = 1 for t >= 1, f_all at t = 0
    out = m.compute()
    assert out["images"] == 2
    assert out["mae"] == pytest.approx(0.125)
    assert out["max_f"] == pytest.approx(
        (f_one + 1) / 2
    )  # max of the mean curve, not mean of maxima


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="0..1"):
        mae(torch.full((2, 2), 2.0), torch.ones(2, 2))
    with pytest.raises(ValueError, match="shape"):
        mae(torch.zeros(2, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="no images"):
        SaliencyMetrics().compute()


def test_bce_iou_loss_values():
    target = torch.ones(1, 1, 2, 2)
    # p = 0.5 everywhere: intersection 2, union 4, IoU (2 + 1) / (4 + 1)
    assert iou_loss(torch.zeros(1, 1, 2, 2), target).item() == pytest.approx(0.4)
    assert bce_iou_loss(torch.zeros(1, 1, 2, 2), target).item() == pytest.approx(
        np.log(2) + 0.4, rel=1e-5
    )
    sure = torch.where(target > 0, 20.0, -20.0)
    assert bce_iou_loss(sure, target).item() < 1e-6


# ---------------------------------------------------------------------------------------------
# Data


def test_folder_items(disks):
    ds = SaliencyFolder(disks, image_size=32)
    assert len(ds) == 8
    x, m = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert m.shape == (1, 32, 32) and set(m.unique().tolist()) <= {0.0, 1.0}
    full = np.array(Image.open(disks / "masks" / "disk0.png")) > 127
    assert m.mean().item() == pytest.approx(full.mean(), abs=0.03)
    assert [p.stem for p, _ in find_pairs(disks)] == [f"disk{i}" for i in range(8)]


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="images/"):
        find_pairs(tmp_path)
    root = write_disks(tmp_path / "set", n=2)
    (root / "masks" / "disk1.png").unlink()
    with pytest.raises(DataError, match="disk1.jpg"):
        find_pairs(root)


# ---------------------------------------------------------------------------------------------
# Model and training


def test_model_output_at_input_resolution():
    model = saliency_res2net(tiny_trunk(), decoder_channels=16).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 48)).shape == (2, 1, 64, 48)
    with pytest.raises(ValueError, match="features_only"):
        saliency_res2net(Res2Net(layers=(1, 1, 1, 1), base_width=4, num_classes=2))


def test_training_lowers_the_loss_and_metrics_follow(disks):
    torch.manual_seed(0)
    model = saliency_res2net(tiny_trunk(), decoder_channels=16)
    ds = SaliencyFolder(disks, image_size=64, train=True)
    history = train_saliency(model, ds, epochs=6, batch_size=8, lr=3e-3)
    assert len(history) == 6 and all(np.isfinite(history))
    assert history[-1] < 0.9 * history[0]

    prob = predict_saliency(
        model, Image.open(disks / "images" / "disk0.jpg").convert("RGB"), image_size=64
    )
    assert prob.shape == (64, 64) and 0 <= prob.min() and prob.max() <= 1
    metrics = evaluate_saliency(model, disks, image_size=64)
    assert metrics["images"] == 8
    assert 0 <= metrics["mae"] <= 1 and 0 <= metrics["max_f"] <= 1


def test_load_rejects_other_files(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a saliency model"):
        load_saliency_model(tmp_path / "other.pth")


def _saved(tmp_path: Path, arch: str, **change) -> Path:
    """A saliency checkpoint of an `arch` trunk with its entries replaced by `change`."""
    model = saliency_res2net(create_model(arch, features_only=True), decoder_channels=8)
    meta = {"backbone": arch, "decoder_channels": 8, "image_size": 32}
    ckpt = {"kind": "res2net-saliency", **meta, "state_dict": model.state_dict()} | change
    path = tmp_path / "sal.pth"
    torch.save({k: v for k, v in ckpt.items() if v is not None}, path)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"backbone": None}, "'backbone'"),
        ({"backbone": 5}, "'backbone'"),
        ({"backbone": "local-dir:/tmp"}, "'backbone'"),
        ({"decoder_channels": "64"}, "'decoder_channels'"),
        ({"decoder_channels": 10**6}, "decoder"),  # would build a 36 TB decoder
        ({"image_size": 10**6}, "'image_size'"),  # would resize each image to 10^12 pixels
        ({"image_size": 0}, "'image_size'"),
        ({"state_dict": {}}, "missing"),
        ({"state_dict": [1]}, "'state_dict'"),
    ],
)
def test_load_refuses_damaged_metadata_in_one_line(tmp_path, tiny_arch, change, message):
    with pytest.raises(ValueError, match=message) as e:
        load_saliency_model(_saved(tmp_path, tiny_arch, **change))
    assert len(str(e.value).splitlines()) == 1 and "sal.pth" in str(e.value)


# ---------------------------------------------------------------------------------------------
# CLI


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    saliency_cli.add_parser(parser)
    return saliency_cli.run(parser.parse_args(list(argv)), [])


def test_cli_train_predict_eval(disks, tmp_path, capsys, tiny_arch):
    weights = tmp_path / "sal.pth"
    assert (
        cli(
            "train",
            "--data",
            str(disks),
            "--val",
            str(disks),
            "--model",
            tiny_arch,
            "--epochs",
            "1",
            "--batch_size",
            "4",
            "--image_size",
            "64",
            "--workers",
            "0",
            "--lr",
            "1e-3",
            "--out",
            str(weights),
            "--device",
            "cpu",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "trained 1 epoch(s) on 8 images" in out and "max F (beta^2=0.3)" in out
    _, meta = load_saliency_model(weights)
    assert meta == {"backbone": tiny_arch, "decoder_channels": 64, "image_size": 64}

    assert (
        cli(
            "predict",
            str(disks / "images"),
            "--weights",
            str(weights),
            "--out",
            str(tmp_path / "pred"),
            "--device",
            "cpu",
        )
        == 0
    )
    masks = sorted((tmp_path / "pred").glob("*.png"))
    assert [p.name for p in masks] == [f"disk{i}.png" for i in range(8)]
    first = Image.open(masks[0])
    assert first.mode == "L" and first.size == (64, 64)

    assert cli("eval", "--data", str(disks), "--weights", str(weights), "--device", "cpu") == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "MAE" in line and "(8 images)" in line


@pytest.mark.parametrize("out", ["folder", "r50.pth"])
def test_cli_train_checks_out_before_training(disks, tmp_path, monkeypatch, out, tiny_arch):
    ckpt = tmp_path / "r50.pth"
    torch.save(create_model(tiny_arch).state_dict(), ckpt)
    (tmp_path / "folder").mkdir()
    monkeypatch.setattr("res2net.saliency.train_saliency", lambda *a, **kw: pytest.fail("trained"))
    with pytest.raises(ValueError, match="--out"):
        cli(
            "train",
            "--data",
            str(disks),
            "--model",
            tiny_arch,
            "--ckpt_path",
            str(ckpt),
            "--out",
            str(tmp_path / out),
            "--image_size",
            "32",
            "--device",
            "cpu",
        )
    assert ckpt.is_file()


def test_cli_predict_never_overwrites_an_input_or_an_earlier_mask(tmp_path, capsys, tiny_arch):
    weights = _saved(tmp_path, tiny_arch)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (16, 12), "red").save(photos / "a.png")
    Image.new("RGB", (16, 12), "blue").save(photos / "a.jpg")
    before = (photos / "a.png").read_bytes()
    assert (
        cli(
            "predict",
            str(photos),
            "--weights",
            str(weights),
            "--out",
            str(photos),
            "--device",
            "cpu",
        )
        == 0
    )
    assert (photos / "a.png").read_bytes() == before
    written = capsys.readouterr().out.split()
    assert len(set(written)) == 2 and all(Image.open(p).mode == "L" for p in written)


def test_cli_predict_skips_an_unreadable_image_in_a_folder_and_exits_1(tmp_path, capsys, tiny_arch):
    """As `predict` does: the other images still get their masks; a file named on the command
    line that cannot be read stops the run."""
    weights = _saved(tmp_path, tiny_arch)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (16, 12), "red").save(photos / "a.png")
    (photos / "b.png").write_bytes(b"not a png")
    Image.new("RGB", (16, 12), "blue").save(photos / "c.png")
    out = tmp_path / "masks"
    args = ["--weights", str(weights), "--out", str(out), "--device", "cpu"]
    assert cli("predict", str(photos), *args) == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "b.png" in err[0] and "1 of 3 images" in err[1]
    with pytest.raises(DataError, match="b.png"):
        cli("predict", str(photos / "b.png"), *args)


def test_cli_predict_shows_a_crafted_file_name_escaped(tmp_path, capsys, tiny_arch):
    """A file name inside a folder is anyone's: printed as the mask's path, its control
    characters are escaped, as `predict` shows names, so it cannot drive the terminal."""
    weights = _saved(tmp_path, tiny_arch)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (16, 12), "red").save(photos / "evil\x1b[2J\x07.png", format="PNG")
    out = tmp_path / "masks"
    args = ["--weights", str(weights), "--out", str(out), "--device", "cpu"]
    assert cli("predict", str(photos), *args) == 0
    assert capsys.readouterr().out == f"{out}/evil\\x1b[2J\\x07.png\n"


def test_mask_is_the_map_at_the_image_size_in_255_levels():
    """`saliency_mask` (what `saliency predict` writes, made a band of rows at a time) is
    `predict_saliency`'s map in 0..255, at the size of the image's file when it was decoded
    straight to the model's input; the map of an image so decoded is the map of the whole
    image to within the resampling rounding of its input."""
    torch.manual_seed(0)
    model = saliency_res2net(tiny_trunk(), decoder_channels=8).eval()
    pixels = np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    whole = decode_image(buffer.getvalue())
    small = decode_image(buffer.getvalue(), resize=saliency_geometry(32))
    assert small.size == (32, 32) and small.info["source_size"] == (200, 150)

    prob = predict_saliency(model, small, 32)
    assert prob.shape == (150, 200)
    assert (prob - predict_saliency(model, whole, 32)).abs().max() < 0.02
    mask = saliency_mask(model, small, 32)
    assert mask.mode == "L" and mask.size == (200, 150)
    expected = (prob * 255).round()
    assert (torch.from_numpy(np.array(mask)).float() - expected).abs().max() <= 1


def test_cli_predict_decodes_straight_to_the_input_and_writes_the_image_size(
    tmp_path, decoded_images, tiny_arch
):
    """The image is decoded to the model's input (32 x 32 here), never whole; the mask is
    written at the size of the file's image."""
    weights = _saved(tmp_path, tiny_arch)
    photos = tmp_path / "photos"
    photos.mkdir()
    pixels = np.random.default_rng(1).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photos / "wide.jpg", quality=90)
    out = tmp_path / "masks"
    args = ["--weights", str(weights), "--out", str(out), "--device", "cpu"]
    assert cli("predict", str(photos), *args) == 0
    assert [image.size for image in decoded_images] == [(32, 32)]
    assert Image.open(out / "wide.png").size == (500, 300)
