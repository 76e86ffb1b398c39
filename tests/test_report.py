"""Evaluation reports of `res2net validate`: checked against predictions computed image by image
(and scikit-learn's metrics), for plain, test-time augmented and relabelled evaluation."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import res2net
from res2net.cli.main import main
from res2net.data import eval_transform, load_image
from tests.conftest import TINY_ARCH

# the report is the point, not the zoo model: the tiny registered Res2Net (in-process)
pytestmark = pytest.mark.usefixtures("single_thread", "tiny_arch")
CLASSES = ["class0", "class1", "class2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_arch):
    """A 3-class model with varied predictions and a 3-class val folder of 24x24 images."""
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / "data" / "val" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (24, 28, 3), dtype=np.uint8)).save(
                root / "data" / "val" / c / f"{c}_{i}.png"
            )
    torch.manual_seed(3)
    model = res2net.create_model(tiny_arch, num_classes=3).eval()
    with (
        torch.no_grad()
    ):  # a head centred on these images' features: predictions vary with the image
        t = eval_transform(16, crop_pct=1.0)
        feats = model.forward_head(
            model.forward_features(torch.stack([t(load_image(f)) for f in files(root)])),
            pre_logits=True,
        )
        torch.nn.init.normal_(model.fc.weight, std=0.1)
        model.fc.bias.copy_(-model.fc.weight @ feats.mean(0))
    torch.save(model.state_dict(), root / "w.pth")
    return root, model


def files(root):
    return sorted((root / "data" / "val").glob("*/*.png"))


def direct_probs(model, root, size=16, crop_pct=1.0, views=lambda x: [x]):
    """Each image through the eval transform and the model, one at a time."""
    t = eval_transform(size, crop_pct=crop_pct)
    with torch.no_grad():
        out = []
        for f in files(root):
            x = t(load_image(f)).unsqueeze(0)
            vs = views(x)
            out.append(sum(model(v).softmax(1) for v in vs)[0] / len(vs))
    return torch.stack(out)


def run_validate(root, *extra, size="16", crop="1.0"):
    args = [
        "validate",
        "--model",
        TINY_ARCH,
        "--data_dir",
        str(root / "data"),
        "--image_resize",
        size,
        "--crop_pct",
        crop,
        "--num_parallel_workers",
        "0",
        "--batch_size",
        "4",
        "--ckpt_path",
        str(root / "w.pth"),
        "--json",
        *extra,
    ]
    return main(args)


def test_report_files_match_per_image_predictions(setup, tmp_path, capsys):
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    root, model = setup
    assert (
        run_validate(
            root, "--report_dir", str(tmp_path / "rep"), "--results_csv", str(tmp_path / "r.csv")
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    pred = direct_probs(model, root).argmax(1).numpy()
    truth = np.repeat(np.arange(3), 5)
    assert len(set(pred)) > 1  # the check below is not trivial
    assert printed["top1"] == pytest.approx(100 * (pred == truth).mean())
    precision, recall, _, support = precision_recall_fscore_support(
        truth, pred, labels=[0, 1, 2], zero_division=0
    )
    rows = list(csv.DictReader((tmp_path / "rep" / "per_class.csv").open()))
    assert [r["class"] for r in rows] == CLASSES and [int(r["images"]) for r in rows] == list(
        support
    )
    for r, p, rc in zip(rows, precision, recall):
        assert float(r["recall"]) == pytest.approx(100 * rc, abs=0.01)
        assert (
            r["precision"] == ""
            if p == 0 and r["precision"] == ""
            else float(r["precision"]) == pytest.approx(100 * p, abs=0.01)
        )
    cm = confusion_matrix(truth, pred, labels=[0, 1, 2])
    np.fill_diagonal(cm, 0)
    pairs = list(csv.DictReader((tmp_path / "rep" / "confused_pairs.csv").open()))
    t, p = np.unravel_index(cm.argmax(), cm.shape)
    assert (pairs[0]["true"], pairs[0]["predicted"], int(pairs[0]["count"])) == (
        CLASSES[t],
        CLASSES[p],
        cm.max(),
    )
    assert (tmp_path / "rep" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "rep" / "summary.json").read_text())["n"] == 15
    # the results row, in timm's columns; a second run appends
    assert run_validate(root, "--results_csv", str(tmp_path / "r.csv")) == 0
    results = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert len(results) == 2 and results[0]["model"] == TINY_ARCH
    assert float(results[0]["top1"]) == pytest.approx(printed["top1"], abs=1e-3)
    assert float(results[0]["top1_err"]) == pytest.approx(100 - printed["top1"], abs=1e-3)
    assert results[0]["param_count"] == f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}"


@pytest.mark.parametrize("mode", ["flip", "five_crop"])
def test_tta_averages_the_views(setup, mode, capsys):
    root, model = setup
    size, crop_pct = 16, 0.8
    resized = int(size / crop_pct)

    def views(x):
        if mode == "flip":
            return [x, x.flip(-1)]
        from torchvision.transforms.v2 import functional as TF

        return list((TF.five_crop if mode == "five_crop" else TF.ten_crop)(x, [size, size]))

    probs = direct_probs(
        model, root, resized if mode != "flip" else size, 1.0 if mode != "flip" else crop_pct, views
    )
    truth = torch.arange(3).repeat_interleave(5)
    assert run_validate(root, "--tta", mode, size=str(size), crop=str(crop_pct)) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["top1"] == pytest.approx(100 * (probs.argmax(1) == truth).float().mean().item())
    loss = torch.nn.functional.nll_loss(probs.log(), truth).item()
    assert printed["loss"] == pytest.approx(loss, rel=1e-4)


def test_class_map_and_real_labels(setup, tmp_path, capsys):
    root, model = setup
    # the data has two of the model's classes, in another order; the model names its outputs
    data = tmp_path / "sub"
    for c in ("class2", "class0"):
        (data / "val" / f"z_{c}").mkdir(parents=True)
        for f in (root / "data" / "val" / c).iterdir():
            (data / "val" / f"z_{c}" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "map.txt").write_text("z_class0\nz_unused\nz_class2\n")
    probs = direct_probs(model, root)
    keep = torch.tensor([0, 2])
    sub = torch.cat(
        [probs[0:5], probs[10:15]]
    )  # z_class0 sorts first: class0's images, then class2's
    truth = torch.tensor([0] * 5 + [1] * 5)
    pred = sub[:, keep].argmax(1)
    # ReaL-style labels, naming model outputs: output 2 for even images, 0 or 2 for odd ones
    real = {f.name: [2] if i % 2 == 0 else [0, 2] for i, f in enumerate(files(root))}
    real_sets = [real[f.name] for f in files(root)[0:5] + files(root)[10:15]]
    real_hits = [int(keep[p]) in labels for p, labels in zip(pred.tolist(), real_sets)]
    (tmp_path / "real.json").write_text(json.dumps(real))
    args = [
        "validate",
        "--model",
        TINY_ARCH,
        "--data_dir",
        str(data),
        "--image_resize",
        "16",
        "--crop_pct",
        "1.0",
        "--num_parallel_workers",
        "0",
        "--ckpt_path",
        str(root / "w.pth"),
        "--class_map",
        str(tmp_path / "map.txt"),
        "--real_labels",
        str(tmp_path / "real.json"),
        "--json",
    ]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["top1"] == pytest.approx(100 * (pred == truth).float().mean().item())
    assert 0 < sum(real_hits) < 10  # not trivial
    assert (
        printed["real_top1"] == pytest.approx(100 * np.mean(real_hits))
        and printed["real_images"] == 10
    )
    # a class folder the map does not name: one clear line
    (tmp_path / "map.txt").write_text("z_class0\nx\ny\n")
    assert main(args) == 2
    assert "no line for the data's class folder(s) 'z_class2'" in capsys.readouterr().err
