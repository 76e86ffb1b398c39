"""The fused decode-and-crop of `train_transform(fast_decode=True)`: the same crop boxes as
torchvision's `RandomResizedCrop` on PIL images, the same pixels (to PIL's rounding) when the
JPEG is decoded at full size, close ones when it is decoded at reduced size, EXIF orientation,
every image mode, and bad images handled as by `load_image`."""

from __future__ import annotations

import io
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from res2net.config import Config
from res2net.data import (
    DataError,
    ImageFolderDataset,
    ImageTooLarge,
    decode,
    load_image,
    train_transform,
    write_digits_folder,
)
from res2net.data.decode import DecodeRandomResizedCrop, _scale_box
from res2net.data.folders import EncodedImage, decode_image, image_for, read_file
from res2net.engine.distributed import DistInfo
from res2net.engine.train import build_loaders

from .memory_probe import run_probes

skimage_data = pytest.importorskip("skimage.data")


def photo(path: Path, size: tuple[int, int], exif_orientation: int | None = None) -> Path:
    """scikit-image's astronaut photo resized to `size` (w, h), saved as a JPEG."""
    image = Image.fromarray(skimage_data.astronaut()).resize(size, Image.Resampling.BICUBIC)
    exif = Image.Exif()
    if exif_orientation is not None:
        exif[0x0112] = exif_orientation
    image.save(path, quality=90, exif=exif)
    return path


def encoded(path: Path, max_pixels: int | None = None) -> EncodedImage:
    return EncodedImage(read_file(path), str(path), max_pixels)


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.int() - b.int()).abs()


# PIL and torch round differently: by one level (bilinear) or two (bicubic); nearest takes the
# neighbouring row or column where the source position falls on a pixel edge.
@pytest.mark.parametrize(
    "interpolation, tolerance, share", [("bilinear", 1, 0), ("bicubic", 2, 0), ("nearest", 0, 0.1)]
)
def test_full_size_decode_gives_pils_pixels(tmp_path, interpolation, tolerance, share):
    path = photo(tmp_path / "a.jpg", (300, 200))
    mode = v2.InterpolationMode(interpolation)
    # output 112: no crop of a 300x200 image is twice that, so nothing is decoded at reduced size
    reference = v2.Compose(
        [v2.RandomResizedCrop(112, interpolation=mode, antialias=True), v2.PILToTensor()]
    )
    fast = DecodeRandomResizedCrop(112, interpolation=mode)
    for seed in range(12):
        torch.manual_seed(seed)
        expected = reference(load_image(path))
        next_expected = torch.rand(())
        torch.manual_seed(seed)
        got = fast(encoded(path))
        assert got.dtype == torch.uint8 and got.shape == (3, 112, 112)
        assert (levels(got, expected) > tolerance).float().mean() <= share
        assert torch.rand(()) == next_expected  # the same random numbers were drawn


def test_reduced_size_decode_is_close(tmp_path):
    path = photo(tmp_path / "big.jpg", (1000, 800))
    full = load_image(path)
    fast = DecodeRandomResizedCrop(64, scale=(0.5, 1.0))
    assert fast._reduction((0, 0, 600, 700)) == 8
    assert fast._reduction((0, 0, 300, 600)) == 4
    assert fast._reduction((0, 0, 127, 600)) == 1
    for seed in range(6):
        torch.manual_seed(seed)
        box = fast._box(800, 1000)
        torch.manual_seed(seed)
        got = fast(encoded(path))
        assert got.shape == (3, 64, 64)
        # decoded at 1/8 size by the DCT; the box moves to whole reduced pixels (at most 4 pixels)
        r = fast._reduction(box)
        assert r == 8
        top, left, height, width = (r * v for v in _scale_box(box, r, (100, 125)))
        assert max(abs(a - b) for a, b in zip((top, left, height, width), box)) <= r / 2
        expected = v2.functional.pil_to_tensor(
            full.crop((left, top, left + width, top + height)).resize(
                (64, 64), Image.Resampling.BILINEAR
            )
        )
        assert levels(got, expected).float().mean() < 2.5


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("size", [(120, 90), (1000, 800)])  # decoded at full and at 1/8 size
def test_exif_orientation_as_pil(tmp_path, size, orientation):
    path = photo(tmp_path / "rot.jpg", size, exif_orientation=orientation)
    upright = load_image(path)  # PIL's exif_transpose
    h, w = upright.height, upright.width
    whole = dict(scale=(1.0, 1.0), ratio=(w / h, w / h))  # the box is the whole image
    expected = v2.functional.pil_to_tensor(
        v2.RandomResizedCrop((64, 48), antialias=True, **whole)(upright)
    )
    got = DecodeRandomResizedCrop((64, 48), **whole)(encoded(path))
    assert got.shape == (3, 64, 48)
    assert levels(got, expected).float().mean() < (0.5 if size[0] < 500 else 2.5)


def jpeg_bytes(**save_args) -> bytes:
    """A 400x40 JPEG of noise, saved with `save_args` (exif=, xmp=)."""
    out = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (40, 400, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out, "JPEG", quality=95, **save_args)
    return out.getvalue()


def orientation_in_xmp_only() -> bytes:
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
        b'22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
        b'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    )
    return jpeg_bytes(xmp=xmp)


def exif_after_another_app1_segment() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = jpeg_bytes(exif=exif.tobytes())
    payload = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta xmlns:x='adobe:ns:meta/'/>"
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def orientation_as_big_endian_long() -> bytes:
    ifd = struct.pack(">H", 1) + struct.pack(">HHII", 0x0112, 4, 1, 6) + struct.pack(">I", 0)
    return jpeg_bytes(exif=b"Exif\x00\x00MM\x00\x2a" + struct.pack(">I", 8) + ifd)


@pytest.mark.parametrize(
    "make",
    [orientation_in_xmp_only, exif_after_another_app1_segment, orientation_as_big_endian_long],
)
def test_orientation_is_the_one_pil_reads(make):
    """torchvision's decoder finds the orientation in fewer places than PIL: the fast path
    turns the pixels with the orientation PIL read, so both give the same upright image."""
    data = make()
    upright = decode_image(data, "x.jpg")
    assert upright.size == (40, 400)
    reference = v2.Compose([v2.RandomResizedCrop(32, antialias=True), v2.PILToTensor()])
    for seed in range(3):
        torch.manual_seed(seed)
        expected = reference(upright)
        torch.manual_seed(seed)
        got = DecodeRandomResizedCrop(32)(EncodedImage(data, "x.jpg", None))
        assert levels(got, expected).max() <= 1


def test_every_mode_and_format_as_the_reference(bad_tree):
    _, files = bad_tree
    reference = v2.Compose([v2.RandomResizedCrop(8, antialias=True), v2.PILToTensor()])
    fast = DecodeRandomResizedCrop(8)
    for kind, (status, path) in files.items():
        if status == "good":  # PNG, grayscale PNG and JPEG, CMYK JPEG, 16-bit, palette, RGBA, LA
            torch.manual_seed(0)
            expected = reference(load_image(path))
            torch.manual_seed(0)
            assert levels(fast(encoded(path)), expected).max() <= 1, kind


def test_pil_and_tensor_inputs():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    fast = DecodeRandomResizedCrop(16)
    torch.manual_seed(1)
    from_pil = fast(image)
    torch.manual_seed(1)
    from_tensor = fast(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    torch.manual_seed(1)
    expected = v2.functional.pil_to_tensor(v2.RandomResizedCrop(16, antialias=True)(image))
    assert torch.equal(from_pil, from_tensor) and levels(from_pil, expected).max() <= 1


def test_bad_images_raise_or_are_substituted(bad_tree):
    root, files = bad_tree
    tf = train_transform(16, color_jitter=None, fast_decode=True)
    for on_bad_image in ("error", "skip"):
        ds = ImageFolderDataset(
            root, "train", transform=tf, on_bad_image=on_bad_image, max_pixels=5000
        )
        for i, (path, _) in enumerate(ds.samples):
            status = files[Path(path).stem][0]
            if on_bad_image == "error" and status == "bad":
                with pytest.raises(DataError, match=str(path)):
                    ds[i]
            elif on_bad_image == "skip":
                image, _, valid, _ = ds[i]
                assert image.shape == (3, 16, 16) and valid == (status == "good")
    with pytest.raises(DataError, match="decompression bomb"):
        tf(encoded(files["bomb"][1], max_pixels=5000))


def test_dataset_hands_bytes_only_to_transforms_that_decode(tmp_path):
    path = photo(tmp_path / "a.jpg", (60, 40))
    fast, slow = train_transform(16, fast_decode=True), train_transform(16)
    assert isinstance(image_for(fast, read_file(path), "a", None), EncodedImage)
    assert isinstance(image_for(slow, read_file(path), "a", None), Image.Image)
    assert isinstance(image_for(None, read_file(path), "a", None), Image.Image)
    # interpolations torch cannot resize uint8 tensors with keep the PIL pipeline
    assert (
        type(train_transform(16, interpolation="lanczos", fast_decode=True).transforms[0])
        is v2.RandomResizedCrop
    )
    with pytest.raises(ValueError, match="supports"):
        DecodeRandomResizedCrop(16, interpolation=v2.InterpolationMode.LANCZOS)


def test_training_uses_it_unless_switched_off(tmp_path):
    data = write_digits_folder(tmp_path / "digits")
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    for fast in (True, False):
        _, train_ds, _ = build_loaders(
            Config(
                data_dir=str(data), fast_decode=fast, val_while_train=False, num_parallel_workers=0
            ),
            dist,
        )
        assert isinstance(train_ds.transform.transforms[0], DecodeRandomResizedCrop) == fast
        image, target, valid, _ = train_ds[0]
        assert image.shape == (3, 224, 224) and valid


def test_shards_decode_in_the_transform(tmp_path):
    pytest.importorskip("webdataset")
    from res2net.data import ShardDataset, write_shards

    for i in range(4):
        (tmp_path / "data" / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        photo(tmp_path / "data" / "train" / f"c{i % 2}" / f"{i}.jpg", (90 + 10 * i, 70))
    data = (tmp_path / "data" / "train" / "c0" / "0.jpg").read_bytes()
    (tmp_path / "data" / "train" / "c1" / "bad.jpg").write_bytes(data[: len(data) // 2])
    write_shards(tmp_path / "data", tmp_path / "shards", splits=("train",), shard_size=3)

    def items(fast: bool) -> list[tuple]:
        tf = train_transform(48, color_jitter=0.4, fast_decode=fast)  # crops of < 96: full size
        return list(
            ShardDataset(tmp_path / "shards", "train", transform=tf, seed=5, on_bad_image="skip")
        )

    fast, slow = items(True), items(False)
    assert [item[1:] for item in fast] == [item[1:] for item in slow]  # targets, valid, index
    assert sum(not item[2] for item in fast) == 1  # the truncated JPEG, substituted and flagged
    for (a, *_), (b, *_) in zip(fast, slow):
        # seeded per sample: the same crop, flip and jitter (on PIL or on tensors, which round
        # differently); pixels within a few levels
        assert a.shape == (3, 48, 48) and (a - b).abs().max() * 255 * 0.225 < 4


def test_pil_decides_where_torchvision_cannot_decode(tmp_path, monkeypatch):
    path = photo(tmp_path / "a.jpg", (120, 90))
    fast = DecodeRandomResizedCrop(100)
    torch.manual_seed(0)
    expected = fast(encoded(path))
    monkeypatch.setattr(decode, "_decode_jpeg", lambda data: None)  # e.g. a variant it lacks
    torch.manual_seed(0)
    assert levels(fast(encoded(path)), expected).max() <= 1


def high_bit_gray(fmt: str, side: int, width: int | None = None) -> tuple[bytes, np.ndarray]:
    """A 16-bit grayscale PNG or a 32-bit (mode "I") deflated TIFF with values over and beyond
    0..65535, and the 8-bit values expected: round(v / 257), clipped."""
    width = width or side
    if fmt == "PNG":
        values = (np.arange(side * width, dtype=np.int64) * 7 % 65536).reshape(side, width)
        im = Image.frombytes("I;16", (width, side), values.astype("<u2").tobytes())
        options: dict = {}
    else:
        values = (np.arange(side * width, dtype=np.int64) * 7 % 70000 - 100).reshape(side, width)
        im = Image.frombytes("I", (width, side), values.astype("<i4").tobytes(), "raw", "I")
        options = {"compression": "tiff_deflate"}
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **options)
    expected = np.round(np.clip(values, 0, 65535) / 257).astype(np.uint8)
    return buffer.getvalue(), expected


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_high_bit_depth_grayscale_is_rescaled_exactly_block_by_block(fmt, monkeypatch):
    from res2net.data import folders

    monkeypatch.setattr(folders, "_BLOCK_PIXELS", 50)  # several rows, and rows cut in columns
    for side, width in ((23, 17), (3, 120)):
        data, expected = high_bit_gray(fmt, side, width)
        got = np.asarray(decode_image(data, f"x.{fmt}"))
        assert got.shape == (side, width, 3)
        assert (got == expected[..., None]).all()


# the bytes per pixel of each format's high-bit-depth image as PIL decodes it ("I;16", "I")
HIGH_BIT_FORMATS = {"PNG": 2, "TIFF": 4}
MEMORY_PROBE = """
import sys
from pathlib import Path
from res2net.data import decode_image

def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024

data = open(sys.argv[1], "rb").read()
pixels = int(sys.argv[2])
decode_image(open(sys.argv[3], "rb").read(), "warm-up").resize((8, 8))
Path("/proc/self/clear_refs").write_text("5")  # the peak resident memory starts again here
before = rss("VmRSS:")
decode_image(data, "big", pixels).resize((32, 32))
print((rss("VmHWM:") - before) / pixels)
"""


@pytest.fixture(scope="module")
def high_bit_depth_at_the_cap(tmp_path_factory) -> dict[str, float]:
    """Per format, the rise of the peak resident memory decoding a 2000 x 2000 high-bit-depth
    image, per pixel, each in a process of its own (forked from one interpreter, see
    `memory_probe`)."""
    folder = tmp_path_factory.mktemp("high_bit")
    side, jobs = 2000, []
    for fmt in HIGH_BIT_FORMATS:
        (folder / f"{fmt}.big").write_bytes(high_bit_gray(fmt, side)[0])
        (folder / f"{fmt}.small").write_bytes(high_bit_gray(fmt, 16)[0])
        jobs.append([folder / f"{fmt}.big", side * side, folder / f"{fmt}.small"])
    return dict(zip(HIGH_BIT_FORMATS, map(float, run_probes(MEMORY_PROBE, jobs))))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
@pytest.mark.parametrize("fmt", list(HIGH_BIT_FORMATS))
def test_high_bit_depth_at_the_pixel_cap_takes_no_float_copies(fmt, high_bit_depth_at_the_cap):
    """A 16-bit PNG or 32-bit TIFF at the pixel cap: the rise of the peak memory of decoding
    it is PIL's image in its own mode (2 or 4 bytes per pixel), the 8-bit gray image (1) and
    its RGB copy (PIL stores RGB in 4 bytes): 7 or 9 bytes per pixel, with 2 to spare, where a
    float32 copy adds 4 and float64 copies took 19-22. (The peak since the process started
    measured nothing: the imports' peak is higher.)"""
    assert high_bit_depth_at_the_cap[fmt] < HIGH_BIT_FORMATS[fmt] + 5 + 2


def test_an_image_above_pils_own_limit_is_too_large_whatever_max_pixels(monkeypatch):
    """PIL refuses an image above twice `Image.MAX_IMAGE_PIXELS` by itself: that refusal is an
    `ImageTooLarge` too (413 in `serve`), not a generic unreadable image."""
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buffer, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageTooLarge, match="'big.png'.*decompression bomb"):
        decode_image(buffer.getvalue(), "big.png", max_pixels=None)
