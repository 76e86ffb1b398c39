"""WebDataset shards: the writer and reader round-trip a folder (same bytes, pixels and labels),
training streams cover every sample once per epoch across ranks and workers, validation sees
every sample exactly once, URLs, bad images, interrupted writes and the `res2net data` CLI."""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("webdataset")

from res2net.cli import data as data_cli  # noqa: E402
from res2net.data import (  # noqa: E402
    BadImageReport,
    DataError,
    ImageFolderDataset,
    ShardDataset,
    ShardIndex,
    build_shard_loader,
    is_shard_dir,
    iter_shard_samples,
    load_image,
    write_shards,
)
from res2net.errors import FileRefused  # noqa: E402

from .conftest import draws, rng_states  # noqa: E402

CLASSES = ("cat", "dog", "eel")
PER_CLASS = 7  # 21 images per split: shards of 5 hold 5, 5, 5, 5, 1


def make_folder(root: Path, splits=("train", "val")) -> Path:
    rng = np.random.default_rng(0)
    for split in splits:
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(PER_CLASS):
                pixels = rng.integers(0, 256, (9 + i, 11 + 3 * i, 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                if i % 3 == 0:
                    image.save(root / split / c / f"img{i}.png")
                elif i % 3 == 1:
                    image.save(root / split / c / f"img{i}.JPEG", quality=90)
                else:  # extra dots, grayscale
                    image.convert("L").save(root / split / c / f"img.v{i}.jpg")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("folder") / "data")


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "out"
    write_shards(folder, out, shard_size=5, seed=3)
    return out


def folder_pairs(folder: Path, split: str) -> Counter:
    ds = ImageFolderDataset(folder, split)
    return Counter((Path(p).read_bytes(), t) for p, t in ds.samples)


def pixels(image: Image.Image) -> tuple:
    return image.size, np.asarray(image).tobytes()


class ToTensor:
    """Pixel sum and a draw from each RNG: a batchable transform whose output shows its seeding."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.tensor([float(np.asarray(image).sum()), *draws()], dtype=torch.float64)


def indices(batches) -> list[int]:
    return [i for batch in batches for i in batch[3].tolist()]


# ---------------------------------------------------------------------------------------------
# writing and round trip


def test_round_trip_same_bytes_and_labels(folder, shards):
    for split in ("train", "val"):
        raw = list(iter_shard_samples(shards, split))
        assert Counter((s.data, int(s.cls)) for s in raw) == folder_pairs(folder, split)
        # keys name the source files; extensions are the originals, lower-cased
        keys = {s.key: s.ext for s in raw}
        assert (
            keys["cat/img0"] == "png" and keys["dog/img1"] == "jpeg" and keys["eel/img_v2"] == "jpg"
        )
        assert [s.index for s in raw] == list(range(21))


def test_round_trip_decoded_pixels_equal_the_loader(folder, shards):
    for split, training in (("train", True), ("val", False)):
        ds = ShardDataset(shards, split, training=training, on_bad_image="skip")
        got = Counter((pixels(im), t) for im, t, valid, _ in ds if valid)
        files = ImageFolderDataset(folder, split)
        want = Counter((pixels(load_image(p)), t) for p, t in files.samples)
        assert got == want and sum(got.values()) == 21


def test_index_json(folder, shards):
    for split, shuffled in (("train", True), ("val", False)):
        index = json.loads((shards / split / "index.json").read_text())
        assert index["classes"] == list(CLASSES)
        assert index["total"] == 21 and index["shuffled"] is shuffled
        assert [s["count"] for s in index["shards"]] == [5, 5, 5, 5, 1]
        assert [s["name"] for s in index["shards"]] == [f"{split}-{k:06d}.tar" for k in range(5)]
        for s in index["shards"]:
            assert (shards / split / s["name"]).stat().st_size == s["bytes"]
    labels = [int(s.cls) for s in iter_shard_samples(shards, "train")]
    assert any(len(set(labels[k : k + 5])) > 1 for k in range(0, 21, 5))  # shards mix classes
    val_files = [
        Path(p).relative_to(folder / "val") for p, _ in ImageFolderDataset(folder, "val").samples
    ]
    val_keys = [s.key for s in iter_shard_samples(shards, "val")]
    assert val_keys == [f"{f.parent}/{f.stem.replace('.', '_')}" for f in val_files]  # folder order


def test_writing_is_reproducible_and_replaces_old_shards(folder, tmp_path):
    a = write_shards(folder, tmp_path / "a", splits=("train",), shard_size=5, seed=3)
    write_shards(folder, tmp_path / "b", splits=("train",), shard_size=2)  # 11 shards, then 5
    b = write_shards(folder, tmp_path / "b", splits=("train",), shard_size=5, seed=3)
    assert a["train"]["shards"] == b["train"]["shards"]
    names = sorted(p.name for p in (tmp_path / "b" / "train").iterdir())
    assert names == sorted(["index.json"] + [s["name"] for s in b["train"]["shards"]])
    for s in a["train"]["shards"]:
        assert (tmp_path / "a/train" / s["name"]).read_bytes() == (
            tmp_path / "b/train" / s["name"]
        ).read_bytes()


def test_max_bytes_caps_shards_and_progress_is_reported(folder, tmp_path):
    calls = []
    index = write_shards(
        folder,
        tmp_path,
        splits=("val",),
        shard_size=1000,
        max_bytes=6000,
        progress=lambda *a: calls.append(a),
    )["val"]
    assert len(index["shards"]) > 1 and sum(s["count"] for s in index["shards"]) == 21
    assert all(s["bytes"] <= 6000 + 10240 for s in index["shards"])  # + tar's end-of-archive record
    assert calls[0] == ("val", 0, 21) and calls[-1] == ("val", 21, 21)


def test_interrupted_or_damaged_writes_are_refused(folder, shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    (copy / "val" / "index.json").unlink()
    with pytest.raises(DataError, match="interrupted"):
        ShardDataset(copy, "val")
    with pytest.raises(DataError, match="no shards at"):
        ShardDataset(copy, "test")
    shard = copy / "train" / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:-3000])
    with pytest.raises(DataError, match="incomplete copy"):
        ShardDataset(copy, "train")


def test_is_shard_dir(folder, shards):
    assert is_shard_dir(shards, "train") and not is_shard_dir(folder, "train")
    assert not is_shard_dir(shards, "test")
    assert is_shard_dir("pipe:cat /x/{}", "train") and is_shard_dir("https://host/data", "val")


# ---------------------------------------------------------------------------------------------
# streaming


def run_epoch(
    shards,
    epoch,
    rank,
    world_size,
    num_workers,
    training=True,
    batch_size=3,
    start=0,
    split="default",
    **kw,
):
    split = ("train" if training else "val") if split == "default" else split
    loader, steps = build_shard_loader(
        shards,
        transform=ToTensor(),
        batch_size=batch_size,
        num_workers=num_workers,
        seed=7,
        training=training,
        rank=rank,
        world_size=world_size,
        split=split,
        on_bad_image="skip",
        pin_memory=False,
        **kw,
    )
    loader.set_epoch(epoch, start=start)
    batches = list(loader)
    assert len(batches) == steps - start // batch_size == len(loader) - start // batch_size
    return batches


def test_training_two_ranks_two_workers_cover_every_sample_each_epoch(shards):
    orders = []
    for epoch in (0, 1):
        per_rank = [run_epoch(shards, epoch, rank, 2, 2) for rank in (0, 1)]
        assert len(per_rank[0]) == len(per_rank[1]) == 4  # ceil(21 / 2) = 11 samples: 3+3+3+2
        seen = Counter(indices(per_rank[0]) + indices(per_rank[1]))
        assert set(seen) == set(range(21))
        assert sum(seen.values()) == 22 and max(seen.values()) == 2  # one repeat fills rank 1
        orders.append(indices(per_rank[0]) + indices(per_rank[1]))
    assert orders[0] != orders[1]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_training_drop_last_and_more_workers_than_batches(shards):
    batches = run_epoch(shards, 0, 0, 2, 4, drop_last=True)  # 11 samples -> 3 full batches
    assert [len(b[1]) for b in batches] == [3, 3, 3]


def test_resume_mid_epoch_gives_the_remaining_batches_in_order(shards):
    full = run_epoch(shards, 1, 0, 2, 2)
    for done in (1, 2, 3):
        rest = run_epoch(shards, 1, 0, 2, 2, start=done * 3)
        assert len(rest) == len(full) - done
        for a, b in zip(full[done:], rest):
            assert torch.equal(a[3], b[3]) and torch.equal(
                a[0], b[0]
            )  # same samples, same augmentation


def test_augmentation_depends_on_sample_not_on_workers(shards):
    def by_index(batches):
        return {i: tuple(x.tolist()) for b in batches for i, x in zip(b[3].tolist(), b[0])}

    one = by_index(run_epoch(shards, 2, 0, 1, 0))
    two = by_index(run_epoch(shards, 2, 0, 1, 2))
    assert one == two and len(one) == 21
    assert one != by_index(run_epoch(shards, 3, 0, 1, 0))  # a new epoch, new augmentations
    states = rng_states()
    run_epoch(shards, 2, 0, 1, 0)
    assert rng_states() == states  # the training loop's RNGs are untouched


@pytest.mark.parametrize("shard_size", [5, 100])  # 5 shards, and 1 shard for 4 readers
def test_validation_sees_every_sample_exactly_once(folder, tmp_path, shard_size):
    out = write_shards(folder, tmp_path, splits=("val",), shard_size=shard_size)["val"]["dir"]
    seen = []
    for rank in (0, 1):
        batches = run_epoch(out, 0, rank, 2, 2, training=False, batch_size=4, split=None)
        seen += indices(batches)
    assert sorted(seen) == list(range(21))
    # and the same with three ranks, one worker each
    seen = [
        i
        for rank in range(3)
        for i in indices(run_epoch(out, 0, rank, 3, 0, training=False, batch_size=4, split=None))
    ]
    assert sorted(seen) == list(range(21))


def test_validation_labels_use_the_training_classes(folder, tmp_path):
    data = tmp_path / "data"
    make_folder(data, splits=("train",))
    shutil.copytree(folder / "val" / "eel", data / "val" / "eel")
    out = tmp_path / "out"
    write_shards(data, out, shard_size=4)
    val = ShardDataset(out, "val", training=False, class_to_idx={"cat": 0, "dog": 1, "eel": 2})
    assert {t for _, t in val} == {2} and val.num_classes == 3
    with pytest.raises(DataError, match="not in the given classes"):
        ShardDataset(out, "train", class_to_idx={"cat": 0})


def test_urls_file_and_pipe(shards):
    local = [(s.key, s.data) for s in iter_shard_samples(shards, "val")]
    assert [(s.key, s.data) for s in iter_shard_samples(shards.resolve().as_uri(), "val")] == local
    assert [(s.key, s.data) for s in iter_shard_samples(f"pipe:cat {shards}/{{}}", "val")] == local
    assert [(s.key, s.data) for s in iter_shard_samples(f"pipe:cat {shards}/val/{{}}")] == local
    # a training stream through a pipe, stopping inside shards (2 ranks)
    piped = [indices(run_epoch(f"pipe:cat {shards}/{{}}", 0, r, 2, 0)) for r in (0, 1)]
    assert piped == [indices(run_epoch(shards, 0, r, 2, 0)) for r in (0, 1)]
    with pytest.raises(DataError, match="needs '{}'"):
        ShardDataset(f"pipe:cat {shards}/val/index.json", None)
    with pytest.raises(DataError, match="use a pipe: command"):
        ShardDataset("s3://bucket/imagenet", "val")


def test_bad_image_is_flagged_not_fatal(tmp_path):
    data = make_folder(tmp_path / "data", splits=("train",))
    (data / "train" / "dog" / "img1.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out"
    write_shards(data, out, splits=("train",), shard_size=4)
    loader, _ = build_shard_loader(
        out,
        transform=ToTensor(),
        batch_size=4,
        num_workers=2,
        split="train",
        on_bad_image="skip",
        pin_memory=False,
    )
    loader.set_epoch(0)
    report = BadImageReport(loader.dataset)
    kept = 0
    for batch in loader:
        images, labels = report.filter(batch)
        kept += len(labels)
    assert kept == 20 and report.count == 1
    assert "train-0000" in report.summary()
    with pytest.raises(DataError, match="dog/img1"):
        list(ShardDataset(out, "train"))  # on_bad_image="error"


# ---------------------------------------------------------------------------------------------
# CLI


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    data_cli.add_parser(parser)
    return data_cli.run(parser.parse_args(argv), [])


def test_cli_shard_and_check(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        cli(
            "shard",
            str(folder),
            str(out),
            "--shard-size",
            "6",
            "--splits",
            "train,val",
            "--seed",
            "1",
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("train: 21 images, 3 classes -> 4 shards") and "shuffled" in lines[0]
    assert (
        lines[1].startswith("val: 21 images, 3 classes -> 4 shards") and "folder order" in lines[1]
    )
    assert ShardIndex.load(out, "train").counts == (6, 6, 6, 3)

    assert cli("check", str(folder), "--workers", "1") == 0
    text = capsys.readouterr().out
    assert "train: 21 images, 3 classes (7-7 per class)" in text and text.strip().endswith("ok")
    assert cli("check", str(out), "--workers", "2") == 0
    assert "21 images in 4 shards" in capsys.readouterr().out


def test_cli_check_lists_problems(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    bad = data / "val" / "cat" / "img0.png"
    bad.write_bytes(b"\x89PNG broken")
    (data / "train" / "fox").mkdir()
    assert cli("check", str(data), "--workers", "2") == 1
    text = capsys.readouterr().out
    assert f"{bad}: cannot read image" in text
    assert "class folders without images (1): fox" in text
    assert "2 problems found" in text
    assert cli("check", str(data), "--splits", "test") == 1
    assert "test: unusable" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# hostile shards


def tar_member(name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = len(data), kind
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)


def one_shard_split(root: Path, members: bytes, count: int) -> Path:
    """`root/train`: one shard of these tar members, and an index that says `count` samples."""
    split = root / "train"
    split.mkdir(parents=True)
    (split / "train-000000.tar").write_bytes(members + b"\0" * 1024)
    shard = {"name": "train-000000.tar", "count": count, "bytes": len(members) + 1024}
    index = {"format": "res2net-webdataset", "version": 1, "classes": ["a"], "shards": [shard]}
    (split / "index.json").write_text(json.dumps(index))
    return root


def test_a_huge_extended_tar_header_is_refused_at_once(tmp_path):
    """tarfile reads a pax header whole, and parses it in quadratic time on Pythons without the
    fix of CVE-2024-6232 (128 KB: about 10 s)."""
    pax = tar_member("PaxHeader", b"1" * 128_000, tarfile.XHDTYPE)
    root = one_shard_split(tmp_path, pax + tar_member("k.ppm", b"x"), count=1)
    start = time.monotonic()
    with pytest.raises(DataError, match=r"train-000000.tar.*extended header of 128000 bytes"):
        next(iter(ShardDataset(root, "train", training=False)))
    assert time.monotonic() - start < 2


def test_a_long_member_name_still_reads(tmp_path):
    folder = make_folder(tmp_path / "data", splits=("train",))
    long_dir = folder / "train" / "cat" / ("d" * 200)
    long_dir.mkdir()
    next(folder.glob("train/cat/*.png")).rename(long_dir / "img.png")  # a pax header per member
    out = write_shards(folder, tmp_path / "out", splits=("train",))["train"]["dir"]
    assert len(list(ShardDataset(out, None, training=False))) == 3 * PER_CLASS


def test_an_absurd_sample_count_in_the_index_is_not_looped_over(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, "PNG")
    sample = tar_member("k.png", png.getvalue()) + tar_member("k.cls", b"0")
    root = one_shard_split(tmp_path, sample, count=10**12)
    start = time.monotonic()
    image, target = next(iter(ShardDataset(root, "train", training=False)))
    assert image.size == (4, 4) and target == 0 and time.monotonic() - start < 5


def test_the_writer_refuses_a_sample_the_reader_would(tmp_path):
    from res2net.data.shards import MAX_SAMPLE_BYTES

    folder = make_folder(tmp_path / "data", splits=("train",))
    big = folder / "train" / "cat" / "big.png"
    with open(big, "wb") as f:
        f.truncate(MAX_SAMPLE_BYTES + 1)  # sparse: no disk used
    with pytest.raises(
        DataError, match=rf"big.png' has {MAX_SAMPLE_BYTES + 1} bytes; a shard sample"
    ):
        write_shards(folder, tmp_path / "out", splits=("train",))
    assert not list((tmp_path / "out").rglob("*.tar"))  # nothing half-written is left


def test_check_lists_a_sample_too_large_to_read(shards, monkeypatch, capsys):
    from res2net.data import shards as shards_module

    monkeypatch.setattr(shards_module, "MAX_SAMPLE_BYTES", 64)  # every image here is larger
    assert cli("check", str(shards), "--splits", "val", "--workers", "1") == 1
    assert "holds more than 64 bytes" in capsys.readouterr().out


def test_shards_never_write_through_a_linked_split_folder(folder, tmp_path):
    """`OUT/train` planted as a link to another folder: refused in one line naming it; the
    files there (shard-like names included) are neither deleted nor replaced."""
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in ("train-000007.tar", "index.json"):
        (victim / name).write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "train").symlink_to(victim)
    with pytest.raises(FileRefused, match=re.escape(str(out / "train"))):
        write_shards(folder, out, splits=("train",), shard_size=5)
    assert sorted(p.name for p in victim.iterdir()) == ["index.json", "train-000007.tar"]
    assert all(p.read_text() == "precious" for p in victim.iterdir())


def test_rewriting_shards_deletes_only_what_the_previous_index_listed(folder, tmp_path):
    out = tmp_path / "out"
    first = write_shards(folder, out, splits=("train",), shard_size=2)["train"]  # 11 shards
    split = out / "train"
    (split / "train-000099.tar").write_text("not listed")  # a shard-like name of someone else
    write_shards(folder, out, splits=("train",), shard_size=5)  # 5 shards: the rest go
    names = {p.name for p in split.iterdir()}
    assert "train-000010.tar" in {s["name"] for s in first["shards"]}
    assert "train-000010.tar" not in names
    assert (split / "train-000099.tar").read_text() == "not listed"
    (split / "index.json").write_text("not an index")  # no proof: nothing goes
    (split / "train-000010.tar").write_text("kept")
    write_shards(folder, out, splits=("train",), shard_size=5)
    assert (split / "train-000010.tar").read_text() == "kept"
