"""Class activation maps: Grad-CAM on every stage of both net families, CAM = Grad-CAM at the
last stage, a map that must land on a known spot, and `res2net cam` on scikit-image's photos."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import res2net
from res2net.cam import class_activation_map, denormalize, grad_cam, overlay, stage_names
from res2net.cli import cam as cam_cli
from res2net.data import eval_transform
from res2net.models import DLA, Res2Net

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_res2net(num_classes: int = 10) -> Res2Net:
    torch.manual_seed(0)
    return Res2Net(layers=(1, 1, 1, 1), base_width=4, scale=4, num_classes=num_classes).eval()


def tiny_dla(num_classes: int = 10) -> DLA:
    torch.manual_seed(0)
    return DLA(
        levels=(1, 1, 1, 1, 1, 1),
        channels=(8, 16, 32, 64, 128, 256),
        base_width=16,
        num_classes=num_classes,
    ).eval()


def check_maps(maps: torch.Tensor, n: int, size: int) -> None:
    assert maps.shape == (n, size, size)
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    peaks = maps.flatten(1).amax(dim=1)
    assert torch.all((peaks == 0) | torch.isclose(peaks, torch.ones_like(peaks)))


@pytest.mark.parametrize("make", [tiny_res2net, tiny_dla])
def test_grad_cam_on_every_stage(make):
    model = make()
    x = torch.randn(2, 3, 64, 64)
    assert len(stage_names(model)) == 4
    for layer in stage_names(model):
        maps, logits = grad_cam(model, x, layer=layer)
        check_maps(maps, 2, 64)
        assert logits.shape == (2, 10)
    assert stage_names(model)[-1] in ("layer4", "level5")
    # the default is the last stage
    torch.testing.assert_close(
        grad_cam(model, x)[0], grad_cam(model, x, layer=stage_names(model)[-1])[0]
    )


@pytest.mark.parametrize("make", [tiny_res2net, tiny_dla])
def test_cam_equals_grad_cam_at_last_stage(make):
    model = make()
    x = torch.randn(2, 3, 64, 64)
    for target in (None, 3, [7, 1]):
        cam, logits = class_activation_map(model, x, target)
        gcam, logits2 = grad_cam(model, x, target)
        check_maps(cam, 2, 64)
        torch.testing.assert_close(cam, gcam, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits, logits2)
    # another class, another map
    assert not torch.allclose(grad_cam(model, x, 3)[0], grad_cam(model, x, 4)[0])


def test_grad_cam_finds_the_evidence():
    """Class 0 sees only channel 0: its map must light up where channel 0 is bright."""
    features = nn.ReLU()
    model = nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        model[3].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        model[3].bias.zero_()
    x = torch.zeros(1, 3, 32, 32)
    x[0, 0, 4:12, 20:28] = 1.0  # class 0's evidence, top right
    x[0, 1, 20:30, 2:10] = 1.0  # class 1's evidence, bottom left
    maps, _ = grad_cam(model, x, target_class=0, layer=features)
    assert maps[0, 4:12, 20:28].min() > 0.99 and maps[0, 20:30, 2:10].max() < 1e-6
    maps, _ = grad_cam(model, x, target_class=1, layer="0")
    assert maps[0, 20:30, 2:10].min() > 0.99 and maps[0, 4:12, 20:28].max() < 1e-6


def test_frozen_weights_and_bad_arguments():
    model = tiny_res2net()
    for p in model.parameters():
        p.requires_grad_(False)
    check_maps(grad_cam(model, torch.randn(1, 3, 64, 64), layer="layer2")[0], 1, 64)
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="layer1, layer2, layer3, layer4"):
        grad_cam(model, x, layer="level5")
    with pytest.raises(ValueError, match="out of range"):
        grad_cam(model, x, target_class=10)
    with pytest.raises(ValueError, match="2 images"):
        grad_cam(model, x, target_class=[1, 2, 3])
    backbone = Res2Net(layers=(1, 1, 1, 1), base_width=4, out_indices=(4,))
    with pytest.raises(ValueError, match="classifier"):
        class_activation_map(backbone, x)


def test_denormalize_gives_the_pixels_the_model_saw():
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    x = eval_transform(32, crop_pct=1.0)(Image.fromarray(pixels))
    np.testing.assert_array_equal(denormalize(x[None])[0], pixels)
    heat = overlay(pixels, np.zeros((32, 32)), alpha=0.0)
    np.testing.assert_array_equal(heat, pixels)
    with pytest.raises(ValueError, match="shape"):
        overlay(pixels, np.zeros((16, 16)))


# ---------------------------------------------------------------------------------------------
# `res2net cam` on real photos


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    data = pytest.importorskip("skimage.data")
    root = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.astronaut()).save(root / "astronaut.jpg", quality=90)
    Image.fromarray(data.chelsea()).save(root / "chelsea.png")
    (root / "more").mkdir()
    Image.fromarray(data.coffee()).save(root / "more" / "coffee.jpg", quality=90)
    return root


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cam_cli.add_parser(parser)
    return cam_cli.run(parser.parse_args(list(argv)), [])


def test_cli_writes_one_figure_per_photo(tiny_arch, photos, tmp_path, capsys):
    torch.manual_seed(0)
    classes = ["cat", "coffee", "person"]
    model = tiny_res2net(3)  # tiny_arch's weights, 3 classes
    torch.save(model.state_dict(), tmp_path / "tiny_3.pth")
    (tmp_path / "classes.txt").write_text("\n".join(classes))
    out = tmp_path / "out"
    assert (
        cli(
            str(photos),
            "--model",
            tiny_arch,
            "--ckpt_path",
            str(tmp_path / "tiny_3.pth"),
            "--classes",
            str(tmp_path / "classes.txt"),
            "--layer",
            "layer3",
            "--out",
            str(out),
            "--image_resize",
            "96",
            "--device",
            "cpu",
        )
        == 0
    )
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["astronaut_cam.png", "chelsea_cam.png", "more/coffee_cam.png"]
    assert sorted(capsys.readouterr().out.split()) == sorted(str(out / w) for w in written)
    for w in written:
        with Image.open(out / w) as im:
            assert im.format == "PNG" and im.size == (1100, 380)
            rgb = np.asarray(im.convert("RGB"))
            assert rgb.std() > 20  # a picture, not a blank page

    # one file, CAM, a chosen class
    assert (
        cli(
            str(photos / "chelsea.png"),
            "--model",
            tiny_arch,
            "--ckpt_path",
            str(tmp_path / "tiny_3.pth"),
            "--method",
            "cam",
            "--class",
            "0",
            "--out",
            str(tmp_path / "one"),
            "--image_resize",
            "96",
            "--device",
            "cpu",
        )
        == 0
    )
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["chelsea_cam.png"]

    with pytest.raises(ValueError, match="last stage"):
        cli(str(photos), "--model", tiny_arch, "--method", "cam", "--layer", "layer2")
    with pytest.raises(FileNotFoundError):
        cli(str(tmp_path / "missing.jpg"), "--model", tiny_arch)


def test_cli_gives_same_named_images_their_own_figures(tiny_arch, photos, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    shutil.copy(photos / "astronaut.jpg", tmp_path / "in" / "x.jpg")
    shutil.copy(photos / "chelsea.png", tmp_path / "in" / "x.png")
    wider = Res2Net(layers=(1, 1, 1, 1), base_width=8, scale=4, num_classes=3)
    torch.save(wider.state_dict(), tmp_path / "wider.pth")
    args = ["--model", tiny_arch, "--ckpt_path", str(tmp_path / "wider.pth")]
    with pytest.raises(ValueError):  # another architecture's checkpoint: refused, nothing written
        cli(str(tmp_path / "in"), *args, "--out", str(tmp_path / "out"))
    model = tiny_res2net(3)
    torch.save(model.state_dict(), tmp_path / "tiny_3.pth")
    args = [
        "--model",
        tiny_arch,
        "--ckpt_path",
        str(tmp_path / "tiny_3.pth"),
        "--image_resize",
        "64",
    ]
    assert cli(str(tmp_path / "in"), *args, "--out", str(tmp_path / "out"), "--device", "cpu") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x_cam.png", "x_cam_2.png"]


def test_cli_skips_an_unreadable_image_in_a_folder_and_exits_1(tiny_arch, photos, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    shutil.copy(photos / "chelsea.png", tmp_path / "in" / "a.png")
    (tmp_path / "in" / "b.png").write_bytes(b"not a png")
    model = tiny_res2net(3)
    torch.save(model.state_dict(), tmp_path / "tiny_3.pth")
    ckpt = ["--ckpt_path", str(tmp_path / "tiny_3.pth"), "--image_resize", "64"]
    args = ["--model", tiny_arch, *ckpt, "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert cli(str(tmp_path / "in"), *args) == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a_cam.png"]
    err = capsys.readouterr().err.strip().splitlines()
    assert "b.png" in err[-2] and "1 of 2 images could not be read" in err[-1]


def test_a_checkpoint_whose_classifier_does_not_load_is_refused(tiny_arch, tmp_path, photos):
    """Predicting with a freshly initialised classifier gives confident nonsense: refused."""
    from res2net.inference import iter_predictions

    state = tiny_res2net(3).state_dict()
    headless = {k: v for k, v in state.items() if not k.startswith("fc.")}
    torch.save(headless, tmp_path / "headless.pth")
    with pytest.raises(ValueError, match="no classifier in this checkpoint"):
        next(
            iter_predictions(
                [str(photos / "chelsea.png")], tiny_arch, ckpt_path=str(tmp_path / "headless.pth")
            )
        )
    torch.save(
        {**state, "fc.weight": torch.zeros(5, state["fc.weight"].shape[1])}, tmp_path / "mixed.pth"
    )  # bias: 3
    with pytest.raises(ValueError, match="mixed.pth"):
        next(
            iter_predictions(
                [str(photos / "chelsea.png")], tiny_arch, ckpt_path=str(tmp_path / "mixed.pth")
            )
        )


def test_a_model_folder_predicts_with_its_own_classes(tiny_arch, tmp_path, photos):
    from res2net.inference import iter_predictions

    model = tiny_res2net(3)
    res2net.save_to_folder(
        model,
        tmp_path / "folder",
        arch=tiny_arch,
        classes=["cat", "dog", "eel"],
        eval_args={"image_resize": 64, "crop_pct": 1.0},
    )
    [(_, top, error)] = iter_predictions(
        [str(photos / "chelsea.png")], f"local-dir:{tmp_path / 'folder'}", topk=5
    )
    assert error is None
    assert len(top) == 3 and {name for name, _ in top} == {"cat", "dog", "eel"}


def test_predict_cli_goes_on_past_an_unreadable_image(tiny_arch, tmp_path, photos, capsys):
    from res2net.cli.main import main

    (tmp_path / "in").mkdir()
    shutil.copy(photos / "chelsea.png", tmp_path / "in" / "a.png")
    (tmp_path / "in" / "b.png").write_bytes(b"")  # unreadable
    shutil.copy(photos / "astronaut.jpg", tmp_path / "in" / "c\nfake 99.00%  line.jpg")
    model = tiny_res2net(3)
    torch.save(model.state_dict(), tmp_path / "tiny_3.pth")
    code = main(
        [
            "predict",
            str(tmp_path / "in"),
            "--model",
            tiny_arch,
            "--ckpt_path",
            str(tmp_path / "tiny_3.pth"),
            "--image_resize",
            "64",
            "--topk",
            "1",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 1
    assert "b.png" in err and "skipped" in err and "1 of 3 images could not be read" in err
    lines = out.splitlines()
    assert len(lines) == 4 and lines[0].endswith("a.png") and "c\\nfake" in lines[2]  # escaped name


def test_cli_shows_a_crafted_file_name_escaped(tiny_arch, photos, tmp_path, capsys):
    """A file name inside a folder is anyone's: printed as the figure's path, its control
    characters are escaped, as `predict` shows names, so it cannot drive the terminal."""
    (tmp_path / "in").mkdir()
    shutil.copy(photos / "chelsea.png", tmp_path / "in" / "evil\x1b[2J\x07.png")
    model = tiny_res2net(3)
    torch.save(model.state_dict(), tmp_path / "tiny_3.pth")
    ckpt = ["--ckpt_path", str(tmp_path / "tiny_3.pth"), "--image_resize", "64"]
    args = ["--model", tiny_arch, *ckpt, "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert cli(str(tmp_path / "in"), *args) == 0
    assert capsys.readouterr().out == f"{tmp_path}/out/evil\\x1b[2J\\x07_cam.png\n"


def test_cli_decodes_each_image_straight_to_the_input_size(tiny_arch, tmp_path, decoded_images):
    """The figure shows the model's input: the image is decoded straight to it (the eval
    transform's resize and trim), never at full size."""
    pixels = np.random.default_rng(0).integers(0, 256, (900, 1200, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=90)
    out = tmp_path / "out"
    args = ["--model", tiny_arch, "--out", str(out), "--image_resize", "64", "--device", "cpu"]
    assert cli(str(tmp_path / "big.jpg"), *args) == 0
    (image,) = decoded_images
    assert image.info["source_size"] == (1200, 900) and min(image.size) < 80
    with Image.open(out / "big_cam.png") as figure:
        assert figure.size == (1100, 380)
