"""The data layer: folder layout errors, symlink loops, bad images, transforms, mixup/cutmix,
deterministic loaders and the bundled digits set."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from res2net.data import (
    BadImageReport,
    DataError,
    EpochSampler,
    ImageFolderDataset,
    auto_augment_transform,
    build_loader,
    eval_transform,
    find_split,
    load_image,
    mixup_cutmix,
    subset,
    train_transform,
    write_digits_folder,
)
from res2net.data.demo import MARKER
from res2net.errors import FileRefused

from .conftest import draws, rgb, rng_states

# ---------------------------------------------------------------------------------------------
# helpers


def make_tree(root: Path, classes=("a", "b"), per_class=3, split="train") -> Path:
    for c in classes:
        for i in range(per_class):
            rgb(root / split / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits_folder(tmp_path_factory.mktemp("demo") / "digits")


# ---------------------------------------------------------------------------------------------
# folder layout


def test_missing_data_dir_shows_expected_tree(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as e:
        find_split(missing, "train")
    msg = str(e.value)
    assert f"data_dir '{missing}' does not exist" in msg
    assert (
        "Expected:\n" in msg
        and "train/<class>/<image>..." in msg
        and "val/<class>/<image>..." in msg
    )


def test_empty_data_dir(tmp_path):
    (tmp_path / ".DS_Store").write_text("")  # hidden files do not count
    with pytest.raises(DataError, match="is empty. Expected:"):
        ImageFolderDataset(tmp_path, "train")


def test_missing_split_lists_what_is_there(tmp_path):
    make_tree(tmp_path, split="training")
    with pytest.raises(DataError) as e:
        find_split(tmp_path, "train")
    msg = str(e.value)
    assert "has no 'train' folder (found: training/)" in msg
    assert msg.count("Expected:") == 1 and "train/<class>/<image>..." in msg


def test_split_without_class_folders_or_images(tmp_path):
    (tmp_path / "train").mkdir()
    rgb(tmp_path / "train" / "loose.png")
    with pytest.raises(DataError, match="has no class folders. Expected:"):
        find_split(tmp_path, "train")
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="has class folders but no images"):
        ImageFolderDataset(tmp_path, "train")


def test_classes_mapping_and_hidden_entries(tmp_path):
    make_tree(tmp_path, classes=("dog", "cat", "emu"))
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    rgb(tmp_path / "train" / "cat" / "._0.png")  # macOS metadata file: hidden, ignored
    ds = ImageFolderDataset(tmp_path, "train")
    assert ds.classes == ["cat", "dog", "emu"] and ds.num_classes == 3
    assert ds.class_to_idx == {"cat": 0, "dog": 1, "emu": 2}
    assert len(ds) == 9 and ds.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]

    # validation uses the training mapping, even when it lacks a class
    make_tree(tmp_path, classes=("emu",), per_class=2, split="val")
    val = ImageFolderDataset(tmp_path, "val", class_to_idx=ds.class_to_idx)
    assert val.num_classes == 3 and val.targets == [2, 2]
    make_tree(tmp_path, classes=("yak",), per_class=1, split="val")
    with pytest.raises(DataError, match="not in the given classes: yak"):
        ImageFolderDataset(tmp_path, "val", class_to_idx=ds.class_to_idx)


def test_empty_class_folder(tmp_path):
    make_tree(tmp_path, classes=("a",))
    (tmp_path / "train" / "b").mkdir()
    with pytest.raises(DataError, match="class folders without images .*: b"):
        ImageFolderDataset(tmp_path, "train")
    assert ImageFolderDataset(tmp_path, "train", allow_empty=True).num_classes == 2


def test_symlink_loops_terminate(tmp_path):
    make_tree(tmp_path, classes=("a", "b"), per_class=2)
    a = tmp_path / "train" / "a"
    (a / "sub").mkdir()
    rgb(a / "sub" / "deep.png")
    # Loops back to the class folder, the split and the data_dir, twice each: an unguarded
    # os.walk(followlinks=True) branches on every level until the path is too long.
    for name, target in [("up", a), ("up2", a), ("split", a.parent), ("top", tmp_path)]:
        (a / "sub" / name).symlink_to(target, target_is_directory=True)
    (a / "dangling").symlink_to(tmp_path / "gone")

    result: dict = {}
    worker = threading.Thread(
        target=lambda: result.update(ds=ImageFolderDataset(tmp_path, "train"))
    )
    worker.daemon = True
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "walking a folder with symlink loops did not finish"
    ds = result["ds"]
    paths = [os.path.relpath(p, tmp_path) for p, _ in ds.samples]
    assert paths == [
        "train/a/0.png",
        "train/a/1.png",
        "train/a/sub/deep.png",
        "train/b/0.png",
        "train/b/1.png",
    ]


def test_num_samples_and_subset_are_fixed(tmp_path):
    make_tree(tmp_path, classes=("a", "b", "c"), per_class=5)
    full = ImageFolderDataset(tmp_path, "train")
    one = ImageFolderDataset(tmp_path, "train", num_samples=6, seed=3)
    two = ImageFolderDataset(tmp_path, "train", num_samples=6, seed=3)
    assert len(one) == 6 and one.samples == two.samples
    assert set(one.samples) <= set(full.samples) and one.num_classes == 3
    assert ImageFolderDataset(tmp_path, "train", num_samples=6, seed=4).samples != one.samples
    small = subset(full, 6, seed=3)
    assert isinstance(small, ImageFolderDataset) and small.samples == one.samples
    assert len(full) == 15  # the original is untouched
    assert subset(full, None) is full and subset(full, 100) is full
    assert len(subset(list(range(10)), 4)) == 4


# ---------------------------------------------------------------------------------------------
# bad images


def test_loader_converts_every_mode_to_rgb(bad_tree):
    _, files = bad_tree
    for kind, (status, path) in files.items():
        if status == "good":
            im = load_image(path)
            assert im.mode == "RGB" and im.size == (12, 10), kind
    assert np.asarray(load_image(files["16bit"][1]))[0, 0].tolist() == [128, 128, 128]
    assert np.asarray(load_image(files["gray"][1]))[0, 0].tolist() == [77, 77, 77]
    assert np.asarray(load_image(files["palette"][1]))[0, 0].tolist() == [10, 200, 30]
    r, g, b = np.asarray(load_image(files["cmyk"][1]))[0, 0].tolist()
    assert r > 200 and g < 50 and b < 50  # CMYK (0, 255, 255, 0) is red


def test_exif_rotation_is_applied(tmp_path):
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)  # 20 wide, 10 tall: left red, right blue
    pixels[:, :10] = (255, 0, 0)
    pixels[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    im = load_image(tmp_path / "rot.jpg")
    assert im.size == (10, 20)  # now 10 wide, 20 tall
    a = np.asarray(im).astype(int)
    assert a[2, 5, 0] > 200 and a[2, 5, 2] < 60  # the left (red) half is now on top
    assert a[17, 5, 2] > 200 and a[17, 5, 0] < 60


def test_bad_images_raise_naming_the_file(bad_tree):
    root, files = bad_tree
    ds = ImageFolderDataset(root, "train", max_pixels=5000)
    by_path = {p: i for i, (p, _) in enumerate(ds.samples)}
    for status, path in files.values():
        if status == "bad":
            with pytest.raises(DataError, match=str(path)):
                ds[by_path[str(path)]]
        else:
            image, target = ds[by_path[str(path)]]
            assert image.mode == "RGB" and target == 0
    with pytest.raises(DataError, match="decompression bomb"):
        load_image(files["bomb"][1], max_pixels=5000)
    assert load_image(files["bomb"][1], max_pixels=None).size == (100, 100)


def test_bad_images_skipped_and_reported(bad_tree):
    root, files = bad_tree
    ds = ImageFolderDataset(
        root,
        "train",
        transform=eval_transform(16, crop_pct=1.0),
        on_bad_image="skip",
        max_pixels=5000,
    )
    n_bad = sum(status == "bad" for status, _ in files.values())
    for i, (path, _) in enumerate(ds.samples):
        image, target, valid, index = ds[i]
        assert image.shape == (3, 16, 16) and index == i
        assert valid == (files[Path(path).stem][0] == "good")

    report = BadImageReport(ds, keep=2)
    loader = build_loader(ds, batch_size=4, shuffle=True, seed=0)
    kept = 0
    for batch in loader:
        images, targets = report.filter(batch)
        assert images.shape[0] == targets.shape[0]
        kept += len(targets)
    assert kept == len(ds) - n_bad and report.count == n_bad
    message = report.summary()
    assert message.startswith(f"{n_bad} images failed to decode") and len(report.first) == 2
    assert all(p in message for p in report.first)
    report.reset()
    assert report.summary() is None


def test_bad_image_names_are_escaped_in_the_summary(tmp_path):
    """A file name with a newline or terminal escape cannot fake a log line or move the cursor."""
    folder = tmp_path / "train" / "cls"
    folder.mkdir(parents=True)
    (folder / "x\nINFO fake\x1b[2J.jpg").write_bytes(b"not a jpeg")
    ds = ImageFolderDataset(
        tmp_path, "train", transform=eval_transform(16, crop_pct=1.0), on_bad_image="skip"
    )
    report = BadImageReport(ds)
    for batch in build_loader(ds, batch_size=1, shuffle=False, seed=0):
        report.filter(batch)
    message = report.summary()
    assert message is not None and message.isprintable()
    assert "x\\nINFO fake\\x1b[2J.jpg" in message


# ---------------------------------------------------------------------------------------------
# transforms


def test_train_and_eval_transform_shapes():
    im = Image.new("RGB", (300, 200), (124, 116, 104))
    out = eval_transform(224)(im)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    # an image of the mean color normalizes to ~0
    assert out.abs().max() < 0.02
    t = train_transform(64, auto_augment="randaug-m9-mstd0.5-inc1", re_prob=1.0, vflip=0.5)
    out = t(Image.new("RGB", (90, 70), (255, 255, 255)))
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    white = eval_transform(32, crop_pct=1.0, mean=(0, 0, 0), std=(255, 255, 255))(
        Image.new("RGB", (40, 32), (255, 255, 255))
    )
    assert torch.allclose(white, torch.ones(3, 32, 32))


def test_eval_transform_resize_follows_crop_pct():
    resize = eval_transform(224, crop_pct=0.875).transforms[0]
    assert resize.size == [256]
    assert eval_transform(224, crop_pct=0.95).transforms[0].size == [235]
    with pytest.raises(ValueError, match="interpolation"):
        eval_transform(interpolation="wobbly")


def test_auto_augment_replaces_color_jitter():
    for spec in ("rand", "randaug-mX"):
        with pytest.raises(ValueError):
            auto_augment_transform(spec)
    # auto_augment replaces color jitter, as in MindCV
    steps = train_transform(auto_augment="trivialaugwide").transforms
    assert not any(isinstance(s, v2.ColorJitter) for s in steps)
    assert any(isinstance(s, v2.ColorJitter) for s in train_transform().transforms)
    assert not any(
        isinstance(s, v2.ColorJitter) for s in train_transform(color_jitter=None).transforms
    )


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_cutmix_targets(mixup, cutmix):
    torch.manual_seed(0)
    fn = mixup_cutmix(10, mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.1)
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8)
    for _ in range(5):
        out, targets = fn(images, labels)
        assert out.shape == images.shape and targets.shape == (8, 10)
        assert torch.allclose(targets.sum(1), torch.ones(8))
        assert torch.allclose(targets.min(1).values, torch.full((8,), 0.01))  # 0.1 / 10 classes


def test_mixup_cutmix_off_and_never_applied():
    assert mixup_cutmix(10, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1) is None
    fn = mixup_cutmix(4, mixup_alpha=0.2, cutmix_prob=0.0, label_smoothing=0.2)
    images, labels = torch.rand(3, 3, 8, 8), torch.tensor([0, 3, 1])
    out, targets = fn(images, labels)
    assert torch.equal(out, images)
    expected = torch.nn.functional.one_hot(labels, 4) * 0.8 + 0.05
    assert torch.allclose(targets, expected)


def test_an_image_file_is_read_within_a_bound(tmp_path):
    import tracemalloc

    from res2net.data.folders import MAX_IMAGE_BYTES

    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as f:
        f.write(b"\xff\xd8\xff")
        f.truncate(MAX_IMAGE_BYTES + 1)  # sparse: a few kilobytes of disk
    tracemalloc.start()
    try:
        with pytest.raises(
            DataError, match=rf"huge.jpg' has {MAX_IMAGE_BYTES + 1} bytes, more than"
        ):
            load_image(huge)
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()


def test_normalized_float_is_todtype_then_normalize():
    from res2net.data.transforms import IMAGENET_MEAN, IMAGENET_STD, NormalizedFloat

    step = NormalizedFloat(IMAGENET_MEAN, IMAGENET_STD)
    reference = v2.Compose(
        [
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([m / 255 for m in IMAGENET_MEAN], [s / 255 for s in IMAGENET_STD]),
        ]
    )
    hwc = torch.randint(0, 256, (20, 30, 3), dtype=torch.uint8)
    image = v2.functional.to_image(hwc.numpy())  # a CHW view of HWC memory, as ToImage gives
    out = step(image)
    assert out.is_contiguous() and out.dtype == torch.float32 and type(out) is type(image)
    torch.testing.assert_close(out, reference(image), rtol=1e-6, atol=1e-6)
    as_float = v2.functional.to_dtype(image, torch.float32, scale=True)
    torch.testing.assert_close(step(as_float), reference(image), rtol=1e-5, atol=1e-5)
    gray = image[:1]  # one channel, three means: broadcast as torchvision does
    torch.testing.assert_close(step(gray), reference(gray), rtol=1e-6, atol=1e-6)
    assert eval_transform(16, crop_pct=1.0)(Image.new("L", (20, 20))).shape == (3, 16, 16)


# ---------------------------------------------------------------------------------------------
# loaders


def epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_is_deterministic(digits):
    # 4 batches of 64: a resume two batches in still leaves two to compare
    ds = ImageFolderDataset(digits, "val", train_transform(16), num_samples=256)
    a = build_loader(ds, batch_size=64, shuffle=True, drop_remainder=True, seed=7)
    b = build_loader(ds, batch_size=64, shuffle=True, drop_remainder=True, seed=7)
    assert len(a) == len(ds) // 64
    a0, a1 = epoch_batches(a, 0), epoch_batches(a, 1)
    b1 = epoch_batches(b, 1)  # resuming at epoch 1 with a fresh loader
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a1, b1, strict=True))
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a1, b1, strict=True))
    assert not torch.equal(a0[0][1], a1[0][1])  # a new order each epoch
    b0 = epoch_batches(b, 0)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a0, b0, strict=True))
    # resuming mid-epoch: the remaining batches, augmentations included
    b.set_epoch(1, start=2 * 64)
    rest = [(x, y) for x, y in b]
    assert len(rest) == len(a1) - 2
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a1[2:], rest, strict=True))
    c = build_loader(ds, batch_size=64, shuffle=True, drop_remainder=True, seed=8)
    assert not torch.equal(epoch_batches(c, 0)[0][1], a0[0][1])
    # loading leaves the caller's RNG where it was
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    epoch_batches(a, 2)
    assert torch.equal(torch.rand(3), expected)


def test_loader_same_batches_with_workers(digits):
    ds = ImageFolderDataset(digits, "val", train_transform(16), num_samples=96)
    serial = build_loader(ds, batch_size=32, seed=3, num_workers=0)
    parallel = build_loader(ds, batch_size=32, seed=3, num_workers=2)
    for epoch in (0, 1):
        for (x0, y0), (x1, y1) in zip(
            epoch_batches(serial, epoch), epoch_batches(parallel, epoch), strict=True
        ):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)


class Draws:
    """A transform whose output is a draw from each RNG: shows how the sample was seeded."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.tensor(draws(), dtype=torch.float64)


def test_seeded_per_sample_and_main_rngs_untouched(digits):
    ds = ImageFolderDataset(digits, "val", Draws(), num_samples=40)
    serial = build_loader(ds, batch_size=16, seed=3)
    states = rng_states()
    batches = epoch_batches(serial, 1)
    assert rng_states() == states  # every RNG of the training loop is where it was
    parallel = build_loader(ds, batch_size=16, seed=3, num_workers=2)
    for (x0, _), (x1, _) in zip(batches, epoch_batches(parallel, 1), strict=True):
        assert torch.equal(x0, x1)
    # a sample read alone gets the augmentation it gets in its batch
    key = list(serial.sampler)[0]
    assert torch.equal(serial.dataset[key][0], batches[0][0][0])
    assert rng_states() == states
    assert len({tuple(x.tolist()) for x in batches[0][0]}) == 16


def test_sampler_order_and_ranks():
    s = EpochSampler(10, shuffle=False)
    assert s.indices() == list(range(10))
    s = EpochSampler(10, seed=1)
    s.set_epoch(3)
    order = s.indices()
    assert sorted(order) == list(range(10)) and [i for i, _ in s] == order
    ranks = [EpochSampler(10, seed=1, num_replicas=3, rank=r) for r in range(3)]
    for r in ranks:
        r.set_epoch(3)
    parts = [r.indices() for r in ranks]
    assert [len(p) for p in parts] == [4, 4, 4] and set(sum(parts, [])) == set(range(10))
    # each sample's augmentation seed is the same whichever rank or position it lands on
    seeds = {i: sd for r in ranks for i, sd in r}
    assert all(seeds[i] == sd for i, sd in s)


# ---------------------------------------------------------------------------------------------
# bundled demo set


def test_digits_folder(digits):
    train = ImageFolderDataset(digits, "train")
    val = ImageFolderDataset(digits, "val")
    assert len(train) + len(val) == 1797
    assert train.num_classes == val.num_classes == 10 and train.classes == [
        str(i) for i in range(10)
    ]
    assert 0.19 < len(val) / 1797 < 0.21
    counts = np.bincount(val.targets, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified
    image, _ = train[0]
    assert image.size == (32, 32) and image.mode == "RGB"


def test_digits_folder_is_written_once(digits, tmp_path):
    marker = digits / MARKER
    before = marker.stat().st_mtime_ns
    assert write_digits_folder(digits) == digits
    assert marker.stat().st_mtime_ns == before
    with pytest.raises(DataError, match="choose another path"):
        write_digits_folder(digits, seed=1)
    rgb(tmp_path / "mine" / "photo.png")
    with pytest.raises(DataError, match="not a digits demo folder"):
        write_digits_folder(tmp_path / "mine")
    assert [p.name for p in digits.parent.iterdir()] == ["digits"]  # no temporary folders left


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]"])
def test_digits_folder_with_a_foreign_marker_is_refused_in_one_line(tmp_path, content):
    root = tmp_path / "digits"
    root.mkdir()
    (root / MARKER).write_bytes(content)
    with pytest.raises(DataError, match="is not the digits' JSON marker"):
        write_digits_folder(root)


def test_digits_marker_is_read_at_its_own_name(tmp_path):
    root = tmp_path / "digits"
    root.mkdir()
    (tmp_path / "big").write_bytes(b" " * (1 << 20))
    (root / MARKER).symlink_to(tmp_path / "big")
    with pytest.raises(FileRefused, match=re.escape(str(root / MARKER))):
        write_digits_folder(root)


LEFTOVER_WORKERS = """
import torch
from torch.utils.data import DataLoader
from res2net.data.loader import ignore_stop_signals

loader = DataLoader(range(64), batch_size=2, num_workers=2, worker_init_fn=ignore_stop_signals)
KEPT = iter(loader)  # an iterator that outlives the work: its workers are still alive at exit
next(KEPT)
print("exiting", flush=True)
"""


def test_end_workers_ends_the_persistent_workers_of_a_loader_in_a_reference_cycle():
    """The training loop ends its loader's workers with `end_workers`: left to the garbage
    collector, a loader in a reference cycle loses its queues' feeder threads before its
    iterator's shutdown runs, and workers that ignore SIGTERM then outlive it."""
    from torch.utils.data import DataLoader

    from res2net.data.loader import end_workers, ignore_stop_signals

    loader = DataLoader(
        range(8), batch_size=2, num_workers=2, persistent_workers=True,
        worker_init_fn=ignore_stop_signals,
    )  # fmt: skip
    assert len(list(loader)) == 4  # the workers stay for the next epoch
    workers = list(loader._iterator._workers)
    assert all(w.is_alive() for w in workers)
    loader.itself = loader  # a reference cycle: only the garbage collector would free it
    end_workers(loader)
    assert loader._iterator is None
    assert not any(w.is_alive() for w in workers)
    end_workers(loader)  # nothing left to end
    end_workers(object())  # not a DataLoader: nothing to do


def test_exit_ends_loader_workers_that_ignore_sigterm():
    """Workers ignore SIGTERM (a signal to the group reaches the main process alone), which is
    all multiprocessing's exit handler sends them before waiting for them: an iterator kept
    alive until exit must not hang the process."""
    proc = subprocess.run(
        [sys.executable, "-c", LEFTOVER_WORKERS], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "exiting" in proc.stdout, proc.stderr
