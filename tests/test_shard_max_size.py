"""`data shard --max-size`: large images re-encoded at a bounded longer side, small ones copied."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("webdataset")

from res2net.data import iter_shard_samples, write_shards  # noqa: E402


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
