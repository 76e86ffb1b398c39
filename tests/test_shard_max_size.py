"""`data shard --max-size`: large images re-encoded at a bounded longer side, small ones copied;
with `--raw`, every image stored as uncompressed RGB pixels that training reads undecoded."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("webdataset")

from res2net.data import iter_shard_samples, write_shards  # noqa: E402
from res2net.data.decode import DecodeRandomResizedCrop  # noqa: E402
from res2net.data.folders import DataError, EncodedImage  # noqa: E402


def test_max_size_bounds_the_longer_side_and_keeps_small_images(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "src" / "train" / "a").mkdir(parents=True)
    big, small = tmp_path / "src/train/a/big.png", tmp_path / "src/train/a/small.jpg"
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(big)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(small, quality=90)
    write_shards(
        tmp_path / "src", tmp_path / "out", splits=("train",), max_size=64, shuffle_splits=()
    )
    samples = {s.key: s for s in iter_shard_samples(tmp_path / "out", "train")}
    resized = samples["a/big"]
    assert resized.ext == "jpg" and Image.open(io.BytesIO(resized.data)).size == (64, 43)
    assert samples["a/small"].data == small.read_bytes()
    with pytest.raises(ValueError, match="max_size must be >= 16"):
        write_shards(tmp_path / "src", tmp_path / "out2", splits=("train",), max_size=8)


def _source(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "src" / "train" / "a").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(
        tmp_path / "src/train/a/big.png"
    )
    small = tmp_path / "src/train/a/small.jpg"
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(small, quality=90)
    return small


def test_raw_stores_bounded_upright_rgb_pixels_that_pil_opens(tmp_path):
    small = _source(tmp_path)
    write_shards(
        tmp_path / "src",
        tmp_path / "out",
        splits=("train",),
        max_size=64,
        raw=True,
        shuffle_splits=(),
    )
    samples = {s.key: s for s in iter_shard_samples(tmp_path / "out", "train")}
    assert {s.ext for s in samples.values()} == {"ppm"}
    big = Image.open(io.BytesIO(samples["a/big"].data))
    assert (big.format, big.mode, big.size) == ("PPM", "RGB", (64, 43))
    stored = np.asarray(Image.open(io.BytesIO(samples["a/small"].data)))
    np.testing.assert_array_equal(stored, np.asarray(Image.open(small).convert("RGB")))
    with pytest.raises(ValueError, match="raw pixels need a max_size"):
        write_shards(tmp_path / "src", tmp_path / "out2", splits=("train",), raw=True)


def test_raw_pixels_give_the_crops_of_decoded_pixels(tmp_path):
    """The undecoded fast path and PIL's decoding of the same PPM give the same crops."""
    import torch

    rng = np.random.default_rng(2)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(out, "PPM")
    crop = DecodeRandomResizedCrop(32)
    for seed in range(5):
        torch.manual_seed(seed)
        fast = crop(EncodedImage(out.getvalue(), "x.ppm", None))
        torch.manual_seed(seed)
        decoded = crop(Image.open(io.BytesIO(out.getvalue())).convert("RGB"))
        assert torch.equal(fast, decoded)


def test_a_truncated_raw_image_is_one_clear_error():
    out = io.BytesIO()
    Image.new("RGB", (40, 30)).save(out, "PPM")
    with pytest.raises(DataError, match="cut.ppm"):
        DecodeRandomResizedCrop(16)(EncodedImage(out.getvalue()[:-100], "cut.ppm", None))
