"""`decode_image(resize=...)`, the decode of `predict` and `serve`: an image decoded straight to
what the eval transform keeps gives that transform's input to within resampling rounding, for
every mode, EXIF orientation and shape (a 1-pixel-high strip included), refuses decompression
bombs from the header, and takes at most 4 bytes per pixel of the pixel cap with its body: an
image whose decoder would take more is refused from its header."""

from __future__ import annotations

import io
import re
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, ImageFile
from torchvision.transforms import v2

from res2net.data import (
    DataError,
    ImageTooLarge,
    ResizeCrop,
    ResizeTo,
    decode_image,
    eval_resize_crop,
    folders,
)

from .memory_probe import run_probes

GEOMETRY = eval_resize_crop(32, crop_pct=0.875)  # resize the shorter side to 36, crop 32
SERVED = eval_resize_crop(224, crop_pct=0.875)  # 256, crop 224: no DCT scaling below 512


def pattern(width: int, height: int) -> np.ndarray:
    """A smooth picture with edges (H x W x 3 uint8): resampling differences show, and it
    compresses well (a file at the pixel cap stays small)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127 + 120 * np.sin(x / max(width, 1) * 7) * np.cos(y / max(height, 1) * 5)
    g = np.where((x // max(width // 9, 1) + y // max(height // 7, 1)) % 2 == 0, 40, 210)
    b = 255 * x / max(width - 1, 1)
    return np.stack([r, g, b], axis=-1).round().clip(0, 255).astype(np.uint8)


def high_bit(pixels: np.ndarray, mode: str) -> Image.Image:
    values = pixels[..., 0].astype(np.int64) * 257 + pixels[..., 1] // 4
    if mode == "I;16":
        return Image.frombytes("I;16", pixels.shape[1::-1], values.astype("<u2").tobytes())
    values = values * 3 // 2 - 2000  # beyond 0..65535 at both ends: clipped
    return Image.frombytes("I", pixels.shape[1::-1], values.astype("<i4").tobytes(), "raw", "I")


def png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body).to_bytes(4, "big")
    return len(body).to_bytes(4, "big") + kind + body + crc


def png16(pixels: np.ndarray) -> bytes:
    """A PNG of 16 bits per channel (PIL writes 16-bit gray only) of an H x W x 3 or 4 picture:
    each 8-bit value v as v * 257 plus a low byte, so that the low byte matters."""
    height, width, channels = pixels.shape
    values = pixels.astype(np.uint16) * 257 - (pixels > 127)  # 0..65534, low byte not v
    rows = values.astype(">u2").view(np.uint8).reshape(height, -1)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1)  # filter 0 per row
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    header += bytes([16, {3: 2, 4: 6}[channels], 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + png_chunk(b"IEND", b"")
    )


def tiff_by_tifffile(pixels: np.ndarray, **options) -> bytes:
    """A TIFF of a layout PIL does not write: in tiles, or planes stored apart."""
    buffer = io.BytesIO()
    options = {"photometric": "rgb", "compression": "zlib", **options}
    tifffile.imwrite(buffer, pixels, **options)
    return buffer.getvalue()


# name -> the file of an H x W x 3 picture, for the kinds PIL does not write
ENCODERS: dict[str, Callable[[np.ndarray], bytes]] = {
    "rgb16_png": png16,
    "rgba16_png": lambda p: png16(np.dstack([p, p[..., 1]])),
    "tiled_tiff": lambda p: tiff_by_tifffile(p, tile=(64, 64)),
    "planar_tiff": lambda p: tiff_by_tifffile(
        p.transpose(2, 0, 1), planarconfig="separate", rowsperstrip=64
    ),
}

# name -> (the image of an H x W x 3 picture, its format, save options)
KINDS: dict[str, tuple[Callable[[np.ndarray], Image.Image], str, dict]] = {
    "rgb_png": (Image.fromarray, "PNG", {}),
    "rgba_png": (lambda p: Image.fromarray(np.dstack([p, p[..., 1]])), "PNG", {}),
    "la_png": (lambda p: Image.fromarray(p).convert("LA"), "PNG", {}),
    "palette_png": (lambda p: Image.fromarray(p).quantize(64), "PNG", {"transparency": 0}),
    "gray_png": (lambda p: Image.fromarray(p).convert("L"), "PNG", {}),
    "gray16_png": (lambda p: high_bit(p, "I;16"), "PNG", {}),
    "gray32_tiff": (lambda p: high_bit(p, "I"), "TIFF", {"compression": "tiff_deflate"}),
    "rgb_jpeg": (Image.fromarray, "JPEG", {"quality": 95}),
    "gray_jpeg": (lambda p: Image.fromarray(p).convert("L"), "JPEG", {"quality": 95}),
    "cmyk_jpeg": (lambda p: Image.fromarray(p).convert("CMYK"), "JPEG", {"quality": 95}),
    "webp": (Image.fromarray, "WEBP", {"lossless": True}),
    "lossy_webp": (Image.fromarray, "WEBP", {"quality": 90}),
    "progressive_jpeg": (Image.fromarray, "JPEG", {"quality": 95, "progressive": True}),
    "cmyk_tiff": (
        lambda p: Image.fromarray(p).convert("CMYK"),
        "TIFF",
        {"compression": "tiff_lzw"},
    ),
    "rgb_tiff_one_strip": (Image.fromarray, "TIFF", {}),  # uncompressed: read a band at a time
    "bmp": (Image.fromarray, "BMP", {}),
    "ppm": (Image.fromarray, "PPM", {}),
}


def encode(kind: str, pixels: np.ndarray, **options) -> bytes:
    if kind in ENCODERS:
        return ENCODERS[kind](pixels)
    make, fmt, defaults = KINDS[kind]
    buffer = io.BytesIO()
    make(pixels).save(buffer, format=fmt, **defaults, **options)
    return buffer.getvalue()


def eval_pixels(image: Image.Image, geometry: ResizeCrop = GEOMETRY) -> torch.Tensor:
    """The eval transform's uint8 pixels (resize, center crop): what it normalizes."""
    mode = v2.InterpolationMode[geometry.resample.name]
    steps = [v2.Resize(geometry.size, interpolation=mode, antialias=True)]
    return v2.Compose([*steps, v2.CenterCrop(geometry.crop), v2.PILToTensor()])(image)


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.int() - b.int()).abs().float()


@pytest.mark.parametrize("kind", [*KINDS, *ENCODERS])
@pytest.mark.parametrize("size", [(40, 30), (30, 301), (300, 40), (900, 700)])
def test_the_eval_transform_gets_the_same_pixels(kind, size):
    """Against the whole image decoded and resized by the eval transform: the same pixels to
    PIL's rounding (one level) where nothing is reduced; where the image is reduced first (a
    box average, or libjpeg's DCT scaling for a JPEG) the mean differs by under one level."""
    data = encode(kind, pattern(*size))
    expected = eval_pixels(decode_image(data, kind))
    image = decode_image(data, kind, resize=GEOMETRY)
    assert image.mode == "RGB" and image.info["source_size"] == size
    assert min(image.size) == GEOMETRY.size and max(image.size) < GEOMETRY.size + 4
    got = eval_pixels(image)
    assert got.shape == expected.shape == (3, 32, 32)
    if min(size) < 4 * GEOMETRY.size:  # not reduced
        assert levels(got, expected).max() <= 1, kind
    else:
        assert levels(got, expected).mean() < 1.0, kind


@pytest.mark.parametrize("kind", ["rgb_jpeg", "rgb_png", "gray16_png"])
@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("size", [(90, 40), (700, 500)])
def test_exif_orientation_is_applied_as_pil_does(kind, orientation, size):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(kind, pattern(*size), exif=exif)
    upright = decode_image(data, kind)  # PIL's exif_transpose
    image = decode_image(data, kind, resize=GEOMETRY)
    assert image.info["source_size"] == upright.size
    diff = levels(eval_pixels(image), eval_pixels(upright))
    assert (diff.max() <= 1) if min(size) < 4 * GEOMETRY.size else (diff.mean() < 1.0)


@pytest.mark.parametrize("size", [(1, 100_000), (100_000, 1), (3, 50_000)])
def test_a_long_thin_strip_is_not_blown_up(size):
    """The eval transform resizes the shorter side: a 1 x 100,000 strip would become a
    36 x 3,600,000 image before its center crop (over 500 MB). Decoded for the eval transform,
    only the part the crop keeps is resized."""
    pixels = np.full((size[1], size[0], 3), (10, 120, 200), dtype=np.uint8)
    data = encode("rgb_png", pixels)
    image = decode_image(data, "strip.png", resize=GEOMETRY)
    assert min(image.size) == GEOMETRY.size and max(image.size) < GEOMETRY.size + 4
    got = eval_pixels(image)
    assert got.shape == (3, 32, 32) and (got == torch.tensor([10, 120, 200]).view(3, 1, 1)).all()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` pixels, with a few bytes of pixel data."""
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    pixels = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", pixels)
        + png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("resize", [None, GEOMETRY])
def test_a_decompression_bomb_is_refused_from_its_header(resize):
    """A PNG of under 200 bytes declaring 10,000 x 10,000 pixels (400 MB of RGB) is refused
    before any pixel is decoded, by the default limit; one declaring 100,000 x 100,000 by PIL's
    own limit too, which still holds with `max_pixels=None`."""
    data = png_declaring(10_000, 10_000)
    assert len(data) < 200
    with pytest.raises(ImageTooLarge, match="'bomb.png' has 10000x10000 pixels, more than the"):
        decode_image(data, "bomb.png", resize=resize)
    huge = png_declaring(100_000, 100_000)
    for limit in (1000, None):
        with pytest.raises(DataError, match="bomb.png.*decompression bomb"):
            decode_image(huge, "bomb.png", limit, resize=resize)


MEMORY_PROBE = """
import sys
from pathlib import Path
from res2net.data import decode_image, eval_resize_crop

def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024

geometry = eval_resize_crop(224, crop_pct=0.875)
big, small = Path(sys.argv[1]).read_bytes(), Path(sys.argv[2]).read_bytes()
cap = int(sys.argv[3])
decode_image(small, "warm-up", resize=geometry)  # the decoders' libraries and buffers
Path("/proc/self/clear_refs").write_text("5")  # the peak resident memory starts again here
before = rss("VmRSS:")
decode_image(big, "big", cap, resize=geometry)
print((rss("VmHWM:") - before + len(big)) / cap)
"""

CAP = 2000 * 2000  # the pixel cap, scaled down from the default 40 M pixels
# (width, height) at the cap, or at the most the kind's decoder is allowed within 4 bytes per
# pixel of it with the file's bytes (`decode_resized`): 7 bytes per pixel of the image for a
# lossless WebP (libwebp's 4 beside the 3 of its output); 4 for those PIL decodes whole in RGB
# (16-bit colour PNG, a CMYK JPEG too thin for DCT scaling), beside the body; 6 for a
# progressive JPEG too thin (its coefficients, 2 bytes per sample: 3 per pixel, beside the 3 of
# the RGB output), 4 at 1/2 size (the coefficients and 1 of PIL's RGB at a quarter of the
# pixels). The long JPEGs are too thin for DCT scaling (their shorter side is under 2 x 256).
AT_THE_CAP = {kind: (2000, 2000) for kind in [*KINDS, *ENCODERS]}
AT_THE_CAP.update(
    {
        "webp": (1450, 1450),
        "rgb16_png": (1800, 1800),
        "rgba16_png": (1800, 1800),
        "progressive_jpeg": (1800, 1800),  # DCT-scaled by 2: its coefficients and 1 byte
        "long_rgb_jpeg": (8000, 500),
        "long_cmyk_jpeg": (6000, 500),
        "long_progressive_jpeg": (4000, 500),
    }
)


def measure(kinds: dict[str, tuple[int, int]], cap: int, folder: Path) -> dict[str, float]:
    """Per kind: the rise of the peak resident memory decoding a `kind` image of its size for
    the 224-pixel eval transform at pixel cap `cap` (in a process of its own, see
    `memory_probe`), plus its encoded bytes, per pixel of the cap."""
    jobs = []
    for kind, size in kinds.items():
        source = kind.removeprefix("long_")
        (folder / f"{kind}.big").write_bytes(encode(source, pattern(*size)))
        (folder / f"{kind}.small").write_bytes(encode(source, pattern(64, 48)))
        jobs.append([folder / f"{kind}.big", folder / f"{kind}.small", cap])
    return dict(zip(kinds, map(float, run_probes(MEMORY_PROBE, jobs))))


# One kind per decoding path runs in `make test` (each measurement is a process of its own that
# decodes an image of millions of pixels); every kind runs in `make test-slow`.
MEASURED_FAST = (
    "rgb_jpeg",  # DCT-scaled by libjpeg
    "progressive_jpeg",  # libjpeg's whole-image coefficients
    "rgb_png",  # torchvision's decoder
    "gray16_png",  # PIL in its own 16-bit mode
    "lossy_webp",
    "tiled_tiff",  # a band of tiles at a time
    "bmp",  # rows read straight from the file
)


@pytest.fixture(scope="module")
def measured_fast(tmp_path_factory) -> dict[str, float]:
    """The MEASURED_FAST kinds at the cap, measured together (one interpreter's imports)."""
    kinds = {kind: AT_THE_CAP[kind] for kind in MEASURED_FAST}
    return measure(kinds, CAP, tmp_path_factory.mktemp("at_the_cap"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
@pytest.mark.parametrize(
    "kind",
    [k if k in MEASURED_FAST else pytest.param(k, marks=pytest.mark.slow) for k in AT_THE_CAP],
)
def test_memory_at_the_pixel_cap_is_at_most_4_bytes_per_pixel(kind, tmp_path, request):
    """Decoding one image at the pixel cap (or at the most its kind may have) for the eval
    transform: the rise of the peak resident memory plus the encoded bytes the request holds,
    per pixel of the cap. The source is decoded once in its own mode, never as a full-size RGB
    copy."""
    if kind in MEASURED_FAST:
        per_pixel = request.getfixturevalue("measured_fast")[kind]
    else:
        per_pixel = measure({kind: AT_THE_CAP[kind]}, CAP, tmp_path)[kind]
    print(f"{kind}: {per_pixel:.2f} bytes per pixel")
    assert per_pixel <= 4.0


# The kinds that may not have the whole cap: an image of them at the cap is refused.
COSTLY = {
    "webp": "lossless WebP.*save it as a JPEG or a lossy WebP",
    "rgb16_png": "16-bit RGB PNG.*convert it to 8 bits per channel",
    "rgba16_png": "16-bit RGBA PNG.*convert it to 8 bits per channel",
    "long_cmyk_jpeg": "JPEG CMYK",
    "long_progressive_jpeg": "JPEG RGB",
}


@pytest.mark.parametrize("kind", list(COSTLY))
def test_an_image_whose_decoder_takes_more_is_refused_from_its_header(kind, monkeypatch):
    """At a cap of its own pixels, an image whose decoder holds more than 4 bytes per pixel
    is refused in one line naming it and saying what to do, before any pixel is decoded (the
    decoders fail here if called); at twice the cap it is decoded."""
    size = (1600, 100) if kind.startswith("long_") else (400, 300)
    data = encode(kind.removeprefix("long_"), pattern(*size))
    cap = size[0] * size[1]
    decoded = decode_image(data, kind, 2 * cap, resize=SERVED)
    assert decoded.info["source_size"] == size

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(folders, "_rgb_tensor", no_decoding)
    with pytest.raises(ImageTooLarge) as refused:
        decode_image(data, "x.img", cap, resize=SERVED)
    message = str(refused.value)
    assert re.search(f"image 'x.img' \\({COSTLY[kind]}", message) and "\n" not in message
    assert f"4 bytes per pixel of the limit of {cap} pixels" in message


@pytest.mark.parametrize("kind", ["rgb_png", "rgb_jpeg", "gray16_png", "lossy_webp"])
def test_the_common_kinds_have_the_whole_cap(kind):
    data = encode(kind, pattern(1000, 800))
    assert decode_image(data, kind, 1000 * 800, resize=SERVED).size == (256, 256)


# The main kinds at the default cap of 40 M pixels (docs/serving.md's table); a lossless WebP
# at the most it may have.
AT_THE_DEFAULT_CAP = {
    "rgb_jpeg": (8000, 5000),
    "rgb_png": (8000, 5000),
    "gray16_png": (8000, 5000),
    "lossy_webp": (8000, 5000),
    "webp": (5600, 3800),
}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
@pytest.mark.parametrize("kind", list(AT_THE_DEFAULT_CAP))
def test_memory_at_the_default_cap(kind, tmp_path):
    per_pixel = measure({kind: AT_THE_DEFAULT_CAP[kind]}, 40_000_000, tmp_path)[kind]
    print(f"{kind} at 40 M pixels: {per_pixel:.2f} bytes per pixel")
    assert per_pixel <= 4.0


def test_resize_to_a_size_decodes_the_whole_image_to_it():
    """`ResizeTo` (the saliency transform's resize): the whole image to a size, aspect not
    kept, upright: PIL's resize of the whole image to PIL's rounding where nothing is reduced,
    under one level on average where it is."""
    exif = Image.Exif()
    exif[0x0112] = 6  # turned by 90 degrees
    for kind, size in [("rgb_png", (90, 60)), ("rgb_jpeg", (900, 700)), ("gray16_png", (80, 90))]:
        data = encode(kind, pattern(*size), **({"exif": exif} if kind == "rgb_jpeg" else {}))
        whole = decode_image(data, kind)
        image = decode_image(data, kind, resize=ResizeTo(48, 40))
        assert image.size == (48, 40) and image.info["source_size"] == whole.size
        expected = torch.from_numpy(np.array(whole.resize((48, 40), Image.Resampling.BILINEAR)))
        diff = levels(torch.from_numpy(np.array(image)), expected)
        assert (diff.max() <= 1) if min(size) < 4 * 48 else (diff.mean() < 1.0), kind


def tiff(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF", **options)
    return buffer.getvalue()


def tiff_layouts() -> dict[str, bytes]:
    picture = pattern(300, 200)
    gray16 = high_bit(picture, "I;16")
    big_endian = Image.frombytes("I;16B", gray16.size, np.asarray(gray16).astype(">u2").tobytes())
    small = {"strip_size": 3000}  # libtiff's strips of 3 KB: many strips, as at 64 KB in big ones
    return {
        "32-bit deflate": tiff(high_bit(picture, "I"), compression="tiff_deflate", **small),
        "16-bit deflate, predictor": tiff(gray16, compression="tiff_deflate", predictor=2, **small),
        "16-bit big-endian": tiff(big_endian, tiffinfo={278: 7}),  # uncompressed, 7-row strips
        "float": tiff(high_bit(picture, "I").convert("F"), compression="tiff_deflate", **small),
        "CMYK LZW": tiff(Image.fromarray(picture).convert("CMYK"), compression="tiff_lzw", **small),
        "RGB JPEG": tiff(Image.fromarray(picture), compression="jpeg", **small),
        "palette packbits": tiff(Image.fromarray(picture).quantize(32), compression="packbits"),
        "bilevel group4": tiff(Image.fromarray(picture).convert("1"), compression="group4"),
        "RGB one strip": tiff(Image.fromarray(picture)),
        "RGB tiles": tiff_by_tifffile(picture, tile=(64, 48)),  # partial tiles at both edges
        "16-bit tiles": tiff_by_tifffile(np.asarray(gray16), tile=(32, 32), photometric=None),
        "RGB planes in strips": tiff_by_tifffile(
            picture.transpose(2, 0, 1), planarconfig="separate", rowsperstrip=9
        ),
        "RGB planes in tiles": tiff_by_tifffile(
            picture.transpose(2, 0, 1), planarconfig="separate", tile=(48, 48)
        ),
    }


@pytest.mark.parametrize("layout", list(tiff_layouts()))
def test_every_tiff_layout_as_pil_decodes_it_whole(layout):
    """A TIFF in strips or tiles is decoded a band of them at a time, each band as a TIFF of its
    own: the same pixels as the whole file decoded by PIL, whatever the samples, compression,
    predictor, byte order, tiles and planes (at a size where nothing is reduced, to PIL's
    rounding)."""
    data = tiff_layouts()[layout]
    geometry = eval_resize_crop(96, crop_pct=1.0)  # 200 rows to 96: no reduction
    expected = eval_pixels(decode_image(data, layout), geometry)
    got = eval_pixels(decode_image(data, layout, resize=geometry), geometry)
    assert got.shape == (3, 96, 96) and levels(got, expected).max() <= 1
