"""ImageNet-style image folders: `data_dir/<split>/<class>/<image>`.

`ImageFolderDataset` is torchvision's `DatasetFolder` with three things added that training on
real-world folders needs:

* errors that show the expected tree when `data_dir` is wrong (`find_split`);
* a file walk that follows symlinks but never enters a folder twice (nor one that contains the
  class folder), so a symlink loop cannot make it run forever (torchvision walks with
  `os.walk(followlinks=True)`, which has no guard);
* an image loader that normalises every PIL mode to RGB, applies EXIF rotation, refuses
  decompression bombs, and turns any failure into a `DataError` naming the file. Given the
  eval transform's geometry (`ResizeCrop`), it decodes straight to what that transform keeps,
  in at most the source's own bytes per pixel (`decode_resized`): `predict` and `serve` use it.

Bad images (`on_bad_image`):

* ``"error"`` (default): reading a bad image raises `DataError` naming the file. Items are
  ``(image, target)``, as in torchvision.
* ``"skip"``: a bad image is replaced by a black substitute of the same shape and flagged. Items
  are ``(image, target, valid, index)``: `valid` is False for a substitute and `index` is the
  sample's position in `dataset.samples`. Both survive DataLoader worker processes because they
  travel in the batch; the training loop drops invalid samples and counts them in the main
  process (see `BadImageReport`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import itertools
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, TiffImagePlugin
from torch.utils.data import Dataset, Subset
from torchvision.datasets import DatasetFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from ..errors import DataError, ImageTooLarge
from ..guards import printable, read_regular_file

logger = logging.getLogger(__name__)

# PIL's default `Image.MAX_IMAGE_PIXELS` (about 89.5 megapixels, a 9459 x 9459 image).
DEFAULT_MAX_PIXELS = 89_478_485
# An image file's bytes: room for DEFAULT_MAX_PIXELS of uncompressed RGBA (358 MB) and a header.
MAX_IMAGE_BYTES = 512 << 20

# Decoders tried on a file's content. Limited to raster formats so that a file named .jpg cannot
# reach e.g. PIL's EPS plugin, which runs Ghostscript. (Camera MPO files open as JPEG.)
IMAGE_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP", "GIF")


OnBadImage = Literal["error", "skip"]


# ---------------------------------------------------------------------------------------------
# Folder layout


def expected_tree(data_dir: str | os.PathLike, splits: Sequence[str] = ("train", "val")) -> str:
    """The folder layout `data_dir` should have, as an indented tree for error messages."""
    lines = [f"  {Path(data_dir)}{os.sep}"]
    lines += [f"    {split}/<class>/<image>..." for split in splits]
    return "\n".join(lines)


def _layout_error(data_dir: Path, split: str, problem: str) -> DataError:
    splits = ["train", "val"] + ([split] if split not in ("train", "val") else [])
    return DataError(f"{problem}. Expected:\n{expected_tree(data_dir, splits)}")


def visible_entries(folder: Path) -> list[os.DirEntry]:
    """The entries of `folder` by name, hidden ones left out: ".DS_Store",
    ".ipynb_checkpoints", macOS "._x.jpg" are never data."""
    with os.scandir(folder) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _found(entries: list[os.DirEntry], limit: int = 5) -> str:
    names = [e.name + ("/" if e.is_dir() else "") for e in entries[:limit]]
    more = f", ... ({len(entries)} entries)" if len(entries) > limit else ""
    return ", ".join(names) + more


def find_split(data_dir: str | os.PathLike, split: str) -> Path:
    """`data_dir/split` if it exists and holds class folders; otherwise a `DataError` whose one
    message says what is wrong and shows the expected tree."""
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise _layout_error(root, split, f"data_dir '{root}' does not exist")
    if not root.is_dir():
        raise _layout_error(root, split, f"data_dir '{root}' is not a folder")
    entries = visible_entries(root)
    if not entries:
        raise _layout_error(root, split, f"data_dir '{root}' is empty")
    split_dir = root / split
    if not split_dir.is_dir():
        raise _layout_error(
            root, split, f"data_dir '{root}' has no '{split}' folder (found: {_found(entries)})"
        )
    if not any(e.is_dir() for e in visible_entries(split_dir)):
        raise _layout_error(root, split, f"'{split_dir}' has no class folders")
    return split_dir


def walk_files(top: str | os.PathLike[str]) -> Iterator[str]:
    """Paths of all visible regular files under `top` (no named pipes or devices, whose open()
    could block for ever), in sorted order, following symlinks but entering
    each real folder once and never a folder that contains `top`: a symlink loop, or two links
    to one folder, cannot repeat files or make the walk endless. (torchvision's `make_dataset`
    uses `os.walk(followlinks=True)` with no such guard, which is why this walk is written out.)"""
    top_real = os.path.realpath(top)
    seen = {top_real}

    def enter(path: str) -> bool:
        real = os.path.realpath(path)
        is_ancestor = top_real.startswith(real.rstrip(os.sep) + os.sep)
        if real in seen or is_ancestor or not os.path.isdir(real):
            return False  # seen, a folder containing top (a loop), or dangling / unreadable
        seen.add(real)
        return True

    for root, dirnames, filenames in os.walk(top, followlinks=True):
        # os.walk descends only into the names left in `dirnames`
        dirnames[:] = [
            d for d in sorted(dirnames) if not d.startswith(".") and enter(os.path.join(root, d))
        ]
        for f in sorted(filenames):
            path = os.path.join(root, f)
            if not f.startswith(".") and os.path.isfile(path):
                yield path


# ---------------------------------------------------------------------------------------------
# Images


@functools.cache
def _available_formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin once; WEBP may be missing from a PIL build
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


try:
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png, decode_webp

    _TENSOR_DECODERS: dict[str, Callable[..., torch.Tensor]] = {
        "JPEG": decode_jpeg,
        "MPO": decode_jpeg,  # a camera's multi-picture JPEG: its first picture
        "PNG": decode_png,
        "WEBP": decode_webp,
    }
    _RGB_READ_MODE = ImageReadMode.RGB
except ImportError:  # a torchvision without its image decoders: PIL decodes everything
    _TENSOR_DECODERS = {}

_HIGH_BIT_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I" is read as 16-bit values too
_BLOCK_PIXELS = 1 << 18  # pixels of a high-bit-depth image rescaled at once (a few MB)
_BAND_PIXELS = 1 << 16  # pixels of a band converted at once by `decode_resized` (about 1 MB)
# What decoding one image for the eval transform may hold, with its encoded bytes: this many bytes
# per pixel of `max_pixels` (judged from the header before decoding; see `decode_resized`).
MEMORY_PER_PIXEL = 4


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """A 16/32-bit grayscale image as 8-bit "L", each value v in 0..65535 mapped to
    round(v / 257) (below 0: 0, above: 255). PIL's own `convert("L")` clips at 255 (nearly white
    images). Done a block of pixels at a time, in integers: beside the source the conversion
    holds the 1-byte result and one block, never a float copy of the image."""
    width, height = im.size
    cols = min(width, _BLOCK_PIXELS)
    rows = max(1, _BLOCK_PIXELS // cols)
    out = np.empty((height, width), dtype=np.uint8)
    for top in range(0, height, rows):
        for left in range(0, width, cols):
            box = (left, top, min(width, left + cols), min(height, top + rows))
            block = np.asarray(im.crop(box)).astype(np.int32)
            np.clip(block, 0, 65535, out=block)
            block += 128
            block //= 257  # round(v / 257): v / 257 is never a tie
            out[box[1] : box[3], box[0] : box[2]] = block
    return Image.fromarray(out)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; 16/32-bit grayscale is rescaled (`_to_8bit_gray`)."""
    if im.mode in _HIGH_BIT_GRAY:
        im = _to_8bit_gray(im)
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # avoids PIL's warning about palette transparency
    if im.mode != "RGB":
        # Alpha is dropped, as torchvision's and timm's loaders do; CMYK, L, LA, 1, YCbCr...
        # convert directly.
        im = im.convert("RGB")
    return im


def load_image(
    path: str | os.PathLike,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    *,
    resize: Geometry | None = None,
) -> Image.Image:
    """Open `path` as an 8-bit RGB PIL image, upright per its EXIF orientation.

    Raises `DataError` naming the file when it cannot be decoded, or when it has more than
    `max_pixels` pixels (a decompression bomb: a small file that expands to gigabytes). The limit
    is checked from the header, before decoding. `None` disables this check; PIL's own global
    limit (`Image.MAX_IMAGE_PIXELS`, refused above twice its value) still applies.

    With `resize` (the eval transform's geometry) the image comes back already resized and
    trimmed to what that transform keeps (see `decode_image`)."""
    return decode_image(read_file(path), str(path), max_pixels, resize=resize)


def read_file(path: str | os.PathLike) -> bytes:
    """The bytes of an image file; `DataError` naming it when it cannot be read, is not a
    regular file (a named pipe or device) or holds more than MAX_IMAGE_BYTES (a sparse file
    of any length takes a few kilobytes of disk)."""
    try:
        return read_regular_file(path, "image", max_bytes=MAX_IMAGE_BYTES)
    except ValueError as e:  # NotARegularFile too
        raise DataError(str(e)) from None
    except OSError as e:
        raise DataError(f"cannot read image '{path}': {type(e).__name__}: {e}") from e


def decode_image(
    data: bytes,
    name: str = "<bytes>",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    *,
    resize: Geometry | None = None,
) -> Image.Image:
    """`load_image` for encoded bytes (e.g. a sample of a shard); errors name `name`.

    Without `resize`: the whole image at full size (training, validation). With `resize`: only
    what the eval transform keeps, already resized (`decode_resized`), so that decoding takes at
    most `MEMORY_PER_PIXEL` bytes per pixel of `max_pixels` with `data` (an image that would
    take more is refused from its header: `ImageTooLarge`); its `info["source_size"]` is the
    size of the file's image."""
    with decoding(name):
        im = open_image(data, name, max_pixels)
        if resize is None:
            return finish_image(im, name)
        return decode_resized(im, data, resize, max_pixels=max_pixels, name=name)


@contextlib.contextmanager
def decoding(name: str) -> Iterator[None]:
    """Turns any failure of the decoders inside into one `DataError` naming the image."""
    try:
        with warnings.catch_warnings():
            # Sizes are judged by `open_image` against `max_pixels`, not by PIL's global warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except DataError:
        raise
    except Image.UnidentifiedImageError:  # its message names an in-memory buffer, not the file
        raise DataError(f"cannot read image '{name}': not an image format Pillow knows") from None
    except Image.DecompressionBombError as e:  # above twice PIL's own limit, whatever max_pixels
        raise ImageTooLarge(f"cannot read image '{name}': {e}") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise DataError(f"cannot read image '{name}': {type(e).__name__}: {e}") from e


def open_image(data: bytes, name: str, max_pixels: int | None) -> Image.Image:
    """`data` opened by PIL without decoding the pixels: the format is one of `IMAGE_FORMATS`
    and the size is within `max_pixels` (`DataError` otherwise). Call inside `decoding(name)`."""
    im = Image.open(io.BytesIO(data), formats=_available_formats())
    if max_pixels is not None and im.width * im.height > max_pixels:
        raise ImageTooLarge(
            f"image '{name}' has {im.width}x{im.height} pixels, more than the limit of "
            f"{max_pixels} (a possible decompression bomb)"
        )
    return im


Box = tuple[float, float, float, float]  # (left, top, right, bottom), in pixels


class ResizeCrop(NamedTuple):
    """The eval transform's geometry (`eval_transform`): the shorter side resized to `size`
    (the longer one to int(size * long / short), as torchvision computes it), then the center
    `crop` x `crop` kept."""

    size: int
    crop: int
    resample: Image.Resampling = Image.Resampling.BILINEAR

    def kept(self, width: int, height: int) -> tuple[tuple[int, int], Box]:
        """(output size, source box) for a `width` x `height` image: the resized image trimmed
        along its longer side to what the center crop needs, and the part of the source it
        covers. The trim takes a multiple of 4 pixels, so that the center crop of the trimmed
        image starts where torchvision's (banker's) rounding puts it in the untrimmed one."""
        short, long = min(width, height), max(width, height)
        new_long = int(self.size * long / short)
        least = max(self.size, self.crop)
        keep = new_long if new_long <= least else least + (new_long - least) % 4
        scale = long / new_long
        start = (new_long - keep) / 2 * scale
        if width <= height:
            return (self.size, keep), (0.0, start, float(width), start + keep * scale)
        return (keep, self.size), (start, 0.0, start + keep * scale, float(height))


class ResizeTo(NamedTuple):
    """A resize of the whole image to `width` x `height` (aspect not kept), as the saliency
    transform's: for `decode_image(resize=...)` like `ResizeCrop`."""

    width: int
    height: int
    resample: Image.Resampling = Image.Resampling.BILINEAR

    def kept(self, width: int, height: int) -> tuple[tuple[int, int], Box]:
        """(output size, source box): the whole `width` x `height` image."""
        return (self.width, self.height), (0.0, 0.0, float(width), float(height))


Geometry = ResizeCrop | ResizeTo  # what `decode_image(resize=...)` decodes to


# What turns an image upright for each EXIF orientation (as `ImageOps.exif_transpose`), and
# where a point (x, y) of the upright image is in the stored one of size (w, h).
_UPRIGHT: dict[
    int, tuple[Image.Transpose, Callable[[float, float, int, int], tuple[float, float]]]
] = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT, lambda x, y, w, h: (w - x, y)),
    3: (Image.Transpose.ROTATE_180, lambda x, y, w, h: (w - x, h - y)),
    4: (Image.Transpose.FLIP_TOP_BOTTOM, lambda x, y, w, h: (x, h - y)),
    5: (Image.Transpose.TRANSPOSE, lambda x, y, w, h: (y, x)),
    6: (Image.Transpose.ROTATE_270, lambda x, y, w, h: (y, h - x)),
    7: (Image.Transpose.TRANSVERSE, lambda x, y, w, h: (w - y, h - x)),
    8: (Image.Transpose.ROTATE_90, lambda x, y, w, h: (w - y, x)),
}
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations turned by 90 degrees
_EXIF_ORIENTATION = 0x0112
_REDUCING_GAP = 2  # reduce by whole factors while the result keeps twice the output size
_DCT_SCALES = (8, 4, 2, 1)  # the reductions libjpeg decodes at directly


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation (1-8) PIL's `exif_transpose` applies; 1 for none or broken EXIF."""
    return _orientation(im.getexif)


def _orientation(exif: Callable[[], Image.Exif]) -> int:
    try:
        orientation = int(exif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # broken EXIF: `finish_image` ignores it too
        return 1
    return orientation if orientation in _UPRIGHT else 1


def decode_resized(
    im: Image.Image,
    data: bytes,
    resize: Geometry,
    *,
    max_pixels: int | None = None,
    name: str = "<bytes>",
) -> Image.Image:
    """Opened image `im` (of encoded `data`) decoded straight to what `resize` keeps: 8-bit RGB,
    upright, the shorter side `resize.size` and the longer one trimmed (`ResizeCrop.kept`), so
    that the eval transform after it only crops and normalizes (or `ResizeTo`'s size).

    The source is decoded once, in the fewest bytes per pixel on offer: a JPEG at 1/2, 1/4 or
    1/8 size when that leaves twice the output size (libjpeg's DCT scaling, as PIL's `draft`);
    8-bit gray, palette and 16/32-bit gray images in their own mode by PIL (1, 1, 2 and 4 bytes
    per pixel); 8-bit RGB(A) PNG, WebP and other colour JPEGs by torchvision's decoders, which
    give 3 bytes per pixel where PIL takes 4; a TIFF in strips or tiles a band of them at a
    time; the rest whole by PIL. Then only the kept part is converted to RGB, a band of rows at
    a time, each band first reduced by a whole factor that leaves twice the output size (PIL's
    `reduce`, a box average, as `resize(reducing_gap=2)` does), and resized last. The EXIF turn
    is applied to the small result.

    With `max_pixels`, what the chosen decoder will hold (`_decoder_bytes`, from the header)
    plus `data` must stay within `MEMORY_PER_PIXEL` bytes per pixel of it; an image that would
    take more (a lossless WebP or an uncompressed file above 4/7 of the limit, a 16-bit RGB PNG
    near it) is refused
    before any pixel is decoded (`ImageTooLarge` naming `name`)."""
    stored = im.size

    def charge(held: int) -> None:
        if max_pixels is not None and held + len(data) > MEMORY_PER_PIXEL * max_pixels:
            raise _too_costly(im, data, name, held + len(data), max_pixels)

    if isinstance(im, JpegImagePlugin.JpegImageFile):  # EXIF in the header: reduce first
        out, box = _stored_geometry(resize, stored, exif_orientation(im))
        if (factor := _reduction(box, out, resize.resample)) > 1:
            dct = next(f for f in _DCT_SCALES if f <= factor)
            scaled = -(-im.width // dct) * -(-im.height // dct)
            charge(_PIL_BYTES_PER_PIXEL * scaled + _jpeg_coefficients(im))
            if im.draft("RGB", (im.width // dct, im.height // dct)) is not None:
                im.load()
                bands = functools.partial(_pil_band, im)
                return _resized(bands, im, resize, stored, scale=im.decoderconfig[0])
    if (decoder := _tensor_decoder(im)) is not None:
        charge(_decoder_bytes(im, data, tensor=True))
        if (pixels := _rgb_tensor(decoder, data)) is not None:
            # the EXIF PIL finds without decoding (for a PNG: before its pixels, where it belongs)
            orientation = _orientation(lambda: Image.Image.getexif(im))
            bands = functools.partial(_tensor_band, pixels)
            return _resized(bands, im, resize, stored, orientation=orientation)
    tiff = im if isinstance(im, TiffImagePlugin.TiffImageFile) else None
    if tiff is not None and (strips := _tiff_bands(tiff, data)) is not None:
        charge(_tiff_band_bytes(tiff))
    elif (strips := _raw_bands(im, data)) is None:
        charge(_decoder_bytes(im, data, tensor=False))
        im.load()
        strips = functools.partial(_pil_band, im)
    return _resized(strips, im, resize, stored)


# Bytes per pixel of PIL's image modes: 1 for "1", "L" and "P", 2 for "I;16*", 4 for the rest
# (RGB is held as RGBX).
_PIL_BYTES_PER_PIXEL = 4


def _pil_bytes(mode: str) -> int:
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else _PIL_BYTES_PER_PIXEL


def _decoder_bytes(im: Image.Image, data: bytes, *, tensor: bool) -> int:
    """What decoding `im` whole holds at its peak, besides `data`, read from its header: with
    torchvision's decoders (`tensor`) 3 bytes per pixel, PIL's `_pil_bytes` otherwise; plus the
    whole-image buffers of the decoders that keep one: a progressive JPEG's coefficients,
    libwebp's for a lossless WebP, libtiff's strip (of a TIFF in one strip: the image)."""
    pixels = im.width * im.height
    held = 3 * pixels if tensor else _pil_bytes(im.mode) * pixels
    if isinstance(im, JpegImagePlugin.JpegImageFile):
        held += _jpeg_coefficients(im)
    elif im.format == "WEBP":
        # PIL decodes a WebP by libwebp's animation decoder, into two canvases of 4 bytes per
        # pixel; torchvision a lossless one (VP8L) beside a buffer of 4, a lossy one by rows
        if not tensor:
            held += 8 * pixels
        elif _webp_lossless(data):
            held += 4 * pixels
    elif isinstance(im, TiffImagePlugin.TiffImageFile) and im.tile:
        # libtiff decodes a compressed TIFF a strip at a time into a buffer of its own (the whole
        # image for a TIFF in one strip); PIL reads uncompressed ones a row at a time
        if im.tile[0].codec_name == "libtiff":
            held += _tiff_strip_bytes(im)
    return held


def _jpeg_coefficients(im: JpegImagePlugin.JpegImageFile) -> int:
    """The bytes libjpeg holds for a progressive JPEG's DCT coefficients, 2 per sample of every
    component over the whole image (its scans refine them all), also when it decodes scaled;
    0 for a baseline JPEG, decoded a row of blocks at a time."""
    if not im.info.get("progressive"):
        return 0
    layers = getattr(im, "layer", None) or [("", 1, 1, 0)]  # (id, h sampling, v sampling, table)
    h_max, v_max = max(layer[1] for layer in layers), max(layer[2] for layer in layers)
    blocks = 0
    for _, h, v, _ in layers:
        blocks += -(-im.width * h // (8 * h_max)) * -(-im.height * v // (8 * v_max))
    return 2 * 64 * blocks


def _webp_lossless(data: bytes) -> bool:
    """Whether a WebP's image is lossless (VP8L): libwebp decodes those whole, in 4 bytes per
    pixel beside its output. Its first image chunk tells (an animation's frames: lossless)."""
    pos = 12  # after "RIFF", the size and "WEBP"
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if chunk == b"VP8 ":
            return False
        if chunk in (b"VP8L", b"ANMF"):
            return True
        pos += 8 + size + (size & 1)
    return True


def _tiff_band_bytes(im: TiffImagePlugin.TiffImageFile) -> int:
    """What `_tiff_bands` holds: the strips (rows of tiles) a band is in, 2 beyond its rows at
    most, decoded by PIL, and libtiff's buffer of one."""
    tags = im.tag_v2
    rows = min(im.height, int(tags.get(_TILE_LENGTH, tags.get(_ROWS_PER_STRIP, im.height))))
    return 2 * (_pil_bytes(im.mode) * rows * im.width + _tiff_strip_bytes(im))


def _tiff_strip_bytes(im: TiffImagePlugin.TiffImageFile) -> int:
    """The decoded bytes of one strip of a TIFF (of one plane, for planes stored apart): what
    libtiff holds while PIL decodes it. 0 for tiles, which are small."""
    if _TILE_OFFSETS in im.tag_v2:
        return 0
    bits = im.tag_v2.get(_BITS_PER_SAMPLE, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    rows = min(im.height, int(im.tag_v2.get(_ROWS_PER_STRIP, im.height)))
    if im.tag_v2.get(_PLANAR, 1) == 2:  # one plane at a time
        return -(-max(bits) * im.width // 8) * rows
    return -(-sum(bits) * im.width // 8) * rows


def _too_costly(
    im: Image.Image, data: bytes, name: str, held: int, max_pixels: int
) -> ImageTooLarge:
    """The refusal of `im`, whose decoding would hold `held` bytes with `data`."""
    kind, advice = f"{im.format} {im.mode}", "save it as an 8-bit JPEG or PNG, or make it smaller"
    rawmode = im.tile[0].args if isinstance(im, ImageFile.ImageFile) and im.tile else None
    if im.format == "WEBP" and _webp_lossless(data):
        kind, advice = "lossless WebP", "save it as a JPEG or a lossy WebP, or make it smaller"
    elif isinstance(rawmode, str) and ";16" in rawmode and im.mode != "I":
        kind, advice = f"16-bit {im.mode} {im.format}", "convert it to 8 bits per channel"
    elif isinstance(im, TiffImagePlugin.TiffImageFile) and _TILE_OFFSETS in im.tag_v2:
        kind = f"{im.mode} TIFF in tiles"
    budget = MEMORY_PER_PIXEL * max_pixels
    return ImageTooLarge(
        f"image '{name}' ({kind}, {im.width}x{im.height} pixels) takes {held / 1e6:.1f} MB to "
        f"decode with its bytes, more than the {budget / 1e6:.1f} MB allowed ({MEMORY_PER_PIXEL} "
        f"bytes per pixel of the limit of {max_pixels} pixels): {advice}"
    )


def _resized(
    bands: Callable[[tuple[int, int, int, int]], Image.Image],
    im: Image.Image,
    resize: Geometry,
    stored: tuple[int, int],
    *,
    scale: int = 1,
    orientation: int | None = None,
) -> Image.Image:
    """`decode_resized` of the decoded image whose RGB regions `bands` gives, of `im`'s size:
    `scale` times smaller than the `stored` one (JPEG's draft); `orientation` PIL's unless
    given."""
    if orientation is None:
        orientation = exif_orientation(im)
    out, box = _stored_geometry(resize, stored, orientation)
    box = (box[0] / scale, box[1] / scale, box[2] / scale, box[3] / scale)
    small = _reduced_rgb(bands, im.size, box, out, resize.resample)
    if orientation != 1:
        small = small.transpose(_UPRIGHT[orientation][0])
    small.info["source_size"] = stored[::-1] if orientation in _TRANSPOSED else stored
    return small


def _pil_band(im: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """The (left, top, right, bottom) region of decoded `im` as 8-bit RGB."""
    return _to_rgb(im.crop(box))


def _stored_geometry(
    resize: Geometry, stored: tuple[int, int], orientation: int
) -> tuple[tuple[int, int], Box]:
    """`resize.kept` for the upright image, in the orientation of the stored one of size
    `stored`."""
    out, box = resize.kept(*(stored[::-1] if orientation in _TRANSPOSED else stored))
    if orientation == 1:
        return out, box
    to_stored = _UPRIGHT[orientation][1]
    corners = [to_stored(x, y, *stored) for x in box[::2] for y in box[1::2]]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    if orientation in _TRANSPOSED:
        out = (out[1], out[0])
    return out, (min(xs), min(ys), max(xs), max(ys))


def _reduction(box: Box, out: tuple[int, int], resample: Image.Resampling) -> int:
    """The largest whole factor that leaves `box` at least `_REDUCING_GAP` times `out`; 1 for
    nearest-neighbour resizing, which picks pixels rather than averaging them (as PIL's
    `reducing_gap`)."""
    if resample == Image.Resampling.NEAREST:
        return 1
    least = min((box[2] - box[0]) / out[0], (box[3] - box[1]) / out[1])
    return max(1, int(least / _REDUCING_GAP))


def _reduced_rgb(
    band_of: Callable[[tuple[int, int, int, int]], Image.Image],
    size: Sequence[int],
    box: Box,
    out: tuple[int, int],
    resample: Image.Resampling,
) -> Image.Image:
    """The `box` of a decoded image of `size` (w, h) resized to `out`, as 8-bit RGB. `band_of`
    gives the RGB pixels of a (left, top, right, bottom) region. Each band of rows is reduced
    (see `decode_resized`) and resized across as it comes; the rows are resized last. PIL
    resizes in these two passes too (across, then down), so this is its resize of the whole
    region, while only one band and an `out`-wide strip are held. The region reaches a few
    output pixels beyond the box, so that the filter sees the neighbours it would in a resize
    of the whole image."""
    factor = _reduction(box, out, resample)
    margin = 4 * max((box[2] - box[0]) / out[0], (box[3] - box[1]) / out[1], 1.0)
    left, top = max(0, int(box[0] - margin)), max(0, int(box[1] - margin))
    right = min(size[0], math.ceil(box[2] + margin))
    bottom = min(size[1], math.ceil(box[3] + margin))
    across = ((box[0] - left) / factor, (box[2] - left) / factor)
    strip = Image.new("RGB", (out[0], -(-(bottom - top) // factor)))
    rows = max(1, _BAND_PIXELS // (right - left) // factor) * factor
    for y in range(top, bottom, rows):
        band = band_of((left, y, right, min(bottom, y + rows)))
        if factor > 1:
            band = band.reduce(factor)
        band = band.resize(
            (out[0], band.height), resample, box=(across[0], 0, across[1], band.height)
        )
        strip.paste(band, (0, (y - top) // factor))
    down = ((box[1] - top) / factor, (box[3] - top) / factor)
    return strip.resize(out, resample, box=(0, down[0], out[0], down[1]))


def _tensor_decoder(im: Image.Image) -> Callable[..., torch.Tensor] | None:
    """The torchvision decoder of opened `im` when it gives PIL's pixels in 3 bytes per pixel
    where PIL takes 4: 8-bit RGB, RGBA and gray+alpha PNGs (alpha dropped, as `_to_rgb` drops
    it), WebP, and colour (YCbCr) JPEGs; None for other images."""
    decoder = _TENSOR_DECODERS.get(str(im.format))
    tile = getattr(im, "tile", None) or []
    if decoder is None or (im.format != "WEBP" and len(tile) != 1):
        return None
    if im.format == "PNG" and (im.mode not in ("RGB", "RGBA", "LA") or tile[0].args != im.mode):
        return None  # gray and palette images are smaller in PIL; 16-bit ones PIL turns to 8
    if isinstance(im, JpegImagePlugin.JpegImageFile) and im.mode != "RGB":
        return None  # gray is smaller in PIL; CMYK is converted by PIL's rules
    return decoder


def _rgb_tensor(decoder: Callable[..., torch.Tensor], data: bytes) -> torch.Tensor | None:
    """RGB pixels (CHW uint8, as stored: no EXIF turn) of `data` by a `_tensor_decoder`; None
    when it cannot decode them (PIL then has the last word on whether the file is bad)."""
    with warnings.catch_warnings():
        # the decoders only read the buffer; torchvision 0.29 announces TorchCodec for them
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        encoded = torch.frombuffer(data, dtype=torch.uint8)
        try:
            pixels = decoder(encoded, mode=_RGB_READ_MODE)
        except RuntimeError:
            return None
    return pixels if pixels.dtype == torch.uint8 and pixels.shape[0] == 3 else None


# The tags a TIFF's pixels are decoded with (baseline and extension numbers); the others
# (EXIF, subfiles, descriptions) stay behind when a band of strips is decoded on its own.
_TIFF_PIXEL_TAGS = (
    256, 258, 259, 262, 266, 277, 284, 317, 320, 322, 323, 332, 338, 339, 347, 529, 530,
)  # fmt: skip
_IMAGE_LENGTH, _STRIP_OFFSETS, _ROWS_PER_STRIP, _STRIP_BYTES, _PLANAR = 257, 273, 278, 279, 284
_BITS_PER_SAMPLE, _SAMPLES_PER_PIXEL = 258, 277
_TILE_WIDTH, _TILE_LENGTH, _TILE_OFFSETS, _TILE_BYTES = 322, 323, 324, 325
_LONG = 4  # TIFF's 32-bit unsigned type


def _tiff_bands(
    im: Image.Image, data: bytes
) -> Callable[[tuple[int, int, int, int]], Image.Image] | None:
    """For a TIFF stored in strips of rows (libtiff writes 64 KB strips) or in tiles, a reader
    of the RGB pixels of a region that decodes only the strips, or the rows of tiles, its rows
    are in, as a TIFF of their own (each strip and tile is compressed on its own; planes stored
    apart are taken plane by plane): the whole image is never held. The last rows decoded are
    kept for the next region. None for other TIFFs (one strip), which PIL decodes whole."""
    if not isinstance(im, TiffImagePlugin.TiffImageFile) or getattr(im, "n_frames", 1) != 1:
        return None
    orders: dict[bytes, Literal["little", "big"]] = {b"II*\x00": "little", b"MM\x00*": "big"}
    order = orders.get(data[:4])  # None for BigTIFF
    tags = im.tag_v2
    tiled = _TILE_OFFSETS in tags
    if tiled:
        offset_tag, count_tag, rows = _TILE_OFFSETS, _TILE_BYTES, tags.get(_TILE_LENGTH)
        tile_width = tags.get(_TILE_WIDTH)
        across = -(-im.width // tile_width) if isinstance(tile_width, int) and tile_width > 0 else 0
    else:
        offset_tag, count_tag, rows = _STRIP_OFFSETS, _STRIP_BYTES, tags.get(_ROWS_PER_STRIP)
        rows, across = im.height if rows is None else rows, 1
    offsets, counts = tags.get(offset_tag), tags.get(count_tag)
    planes = tags.get(_SAMPLES_PER_PIXEL, 1) if tags.get(_PLANAR, 1) == 2 else 1
    if (
        order is None
        or not isinstance(rows, int)
        or not 0 < rows < (2**31 if tiled else im.height)
        or not isinstance(planes, int)
        or across < 1
        or not isinstance(offsets, tuple)
        or not isinstance(counts, tuple)
    ):
        return None
    down = -(-im.height // rows)
    if len(offsets) != planes * down * across or len(counts) != len(offsets):
        return None

    def segments(first: int, last: int) -> Image.Image:
        """Strips (rows of tiles) first..last-1 as a TIFF image of their rows (not decoded)."""
        picks = [
            (plane * down + row) * across + column
            for plane in range(planes)
            for row in range(first, last)
            for column in range(across)
        ]
        pixels = [data[offsets[i] : offsets[i] + counts[i]] for i in picks]
        header = data[:4] + (8).to_bytes(4, order)  # the file's byte order: its samples'
        ifd = TiffImagePlugin.ImageFileDirectory_v2(ifh=header)
        for tag in _TIFF_PIXEL_TAGS:
            if tag in tags:
                ifd[tag] = tags[tag]
                ifd.tagtype[tag] = tags.tagtype[tag]
        ifd[_IMAGE_LENGTH] = min(last * rows, im.height) - first * rows
        if not tiled:
            ifd[_ROWS_PER_STRIP] = rows
        # relative to the end of the directory: PIL's `tobytes` adds where that is to strips'
        starts = tuple(itertools.accumulate(map(len, pixels[:-1]), initial=0))
        ifd[offset_tag], ifd[count_tag] = starts, tuple(map(len, pixels))
        for tag in (_IMAGE_LENGTH, _ROWS_PER_STRIP, offset_tag, count_tag):
            ifd.tagtype[tag] = _LONG
        directory = ifd.tobytes(8)
        if tiled:  # ... and not to tiles': the same directory again, with where they are
            ifd[offset_tag] = tuple(8 + len(directory) + start for start in starts)
            ifd.tagtype[offset_tag] = _LONG
            directory = ifd.tobytes(8)
        tiff = header + directory + b"".join(pixels)
        return Image.open(io.BytesIO(tiff), formats=("TIFF",))

    first = segments(0, 1)
    if first.mode != im.mode or first.size != (im.width, min(rows, im.height)):
        return None  # not a layout this reader knows: PIL decodes the file whole
    held: list[Any] = [0, 0, None]  # the rows of segments decoded last: first, last, image

    def band(box: tuple[int, int, int, int]) -> Image.Image:
        left, top, right, bottom = box
        first, last = top // rows, -(-bottom // rows)
        if not held[0] <= first < last <= held[1]:
            held[:] = first, last, None  # the last image goes before the next is decoded
            held[2] = segments(first, last)
        part = held[2]
        top, bottom = top - held[0] * rows, bottom - held[0] * rows
        return _to_rgb(part.crop((left, top, right, bottom)))

    return band


# Bits per pixel of the uncompressed layouts `_raw_bands` reads when a file gives no row length.
_RAW_BITS = {"L": 8, "RGB": 24, "RGBA": 32, "RGBX": 32, "CMYK": 32, "I;16": 16, "I;16B": 16}


def _raw_bands(
    im: Image.Image, data: bytes
) -> Callable[[tuple[int, int, int, int]], Image.Image] | None:
    """For an uncompressed image in one piece (BMP, PPM, a TIFF in one strip), a reader of the
    RGB pixels of a region that decodes its rows straight from `data`: the file's body is its
    pixels, and only a band of them is decoded at a time. None for other images (palette
    images, which PIL holds in 1 byte per pixel, included)."""
    tile = getattr(im, "tile", None) or []
    if len(tile) != 1 or tile[0].codec_name != "raw" or im.mode in ("P", "1"):
        return None
    if tuple(tile[0].extents or ()) != (0, 0, im.width, im.height):
        return None
    args = tile[0].args
    rawmode, stride, step = (args, 0, 1) if isinstance(args, str) else (*args, 0, 1)[:3]
    if not isinstance(rawmode, str) or not isinstance(stride, int) or step not in (1, -1):
        return None
    if stride == 0 and (bits := _RAW_BITS.get(rawmode)) is not None:
        stride = -(-bits * im.width // 8)
    if stride <= 0:
        return None

    def band(box: tuple[int, int, int, int]) -> Image.Image:
        left, top, right, bottom = box
        first = top if step == 1 else im.height - bottom  # rows stored bottom up for -1
        start = tile[0].offset + first * stride
        rows = data[start : start + (bottom - top) * stride]
        size = (im.width, bottom - top)
        part = Image.frombytes(im.mode, size, rows, "raw", rawmode, stride, step)
        return _to_rgb(part.crop((left, 0, right, bottom - top)))

    return band


def _tensor_band(pixels: torch.Tensor, box: tuple[int, int, int, int]) -> Image.Image:
    """The (left, top, right, bottom) region of CHW uint8 `pixels` as an RGB PIL image."""
    left, top, right, bottom = box
    return Image.fromarray(pixels[:, top:bottom, left:right].permute(1, 2, 0).numpy())


def finish_image(im: Image.Image, name: str) -> Image.Image:
    """Decode an opened image: pixels loaded, turned upright per EXIF, converted to RGB."""
    im.load()
    try:
        ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of an upright image
    except Exception:  # broken EXIF: the pixels are still good
        logger.debug("ignoring unreadable EXIF orientation of %s", name, exc_info=True)
    if im.mode in _HIGH_BIT_GRAY:
        # rebinding `im` frees the 2-4 bytes per pixel of the source (when the caller passed
        # its only reference, as `decode_image` does) before the RGB copy is made
        im = _to_8bit_gray(im)
    return _to_rgb(im)


class EncodedImage(NamedTuple):
    """An image file's bytes, as read, for a transform that decodes them itself."""

    data: bytes
    name: str  # names the image in errors
    max_pixels: int | None


def substitute_image(name: str | os.PathLike) -> Image.Image:
    """The black image that stands in for unreadable `name` under `on_bad_image: skip` (the
    sample is flagged invalid; the transform gives it the usual shape)."""
    logger.debug("bad image replaced by a substitute: %s", name, exc_info=True)
    return Image.new("RGB", (256, 256))


def image_for(
    transform: Callable | None, data: bytes, name: str, max_pixels: int | None
) -> EncodedImage | Image.Image:
    """What a dataset hands `transform`: the bytes when it (or the first step of its
    `v2.Compose`) has `takes_encoded` set, such as `DecodeRandomResizedCrop`; otherwise the
    decoded RGB PIL image (`DataError` naming `name` when it cannot be decoded)."""
    steps = getattr(transform, "transforms", None)
    first = steps[0] if steps else transform
    if getattr(first, "takes_encoded", False):
        return EncodedImage(data, name, max_pixels)
    return decode_image(data, name, max_pixels)


# ---------------------------------------------------------------------------------------------
# Dataset


def _seeded_indices(n: int, num_samples: int, seed: int) -> list[int]:
    """A fixed random choice of `num_samples` of range(n), kept in order."""
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:num_samples].tolist())


class ImageFolderDataset(DatasetFolder):
    """Images in `data_dir/<split>/<class>/*`, labelled by class folder (sorted names -> 0, 1, ...).

    Args:
        data_dir: folder holding one folder per split.
        split: the split folder to read ("train", "val", ...).
        transform: applied to the RGB PIL image (e.g. `train_transform()`).
        target_transform: applied to the class index.
        class_to_idx: a fixed mapping (e.g. the training split's, for validation); class folders
            of this split must be in it, and classes without a folder here are allowed.
        on_bad_image: "error" raises `DataError` on an unreadable image; "skip" returns a flagged
            substitute (see the module docstring).
        max_pixels: images with more pixels are refused as bad (see `load_image`).
        num_samples: keep only this many samples, a fixed random choice given `seed`.
        seed: seed of that choice.
        extensions: file endings counted as images (case-insensitive).
        allow_empty: allow class folders with no images.

    Hidden files and folders (names starting with ".") are ignored.
    """

    samples: list[tuple[str, int]]  # (path, class index), set by DatasetFolder

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        *,
        class_to_idx: dict[str, int] | None = None,
        on_bad_image: OnBadImage = "error",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        num_samples: int | None = None,
        seed: int = 0,
        extensions: tuple[str, ...] = IMG_EXTENSIONS,
        allow_empty: bool = False,
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise DataError(f"on_bad_image must be 'error' or 'skip', not {on_bad_image!r}")
        self.data_dir = Path(data_dir).expanduser()
        self.split = split
        self._fixed_class_to_idx = class_to_idx
        self.on_bad_image = on_bad_image
        self.max_pixels = max_pixels
        super().__init__(
            str(find_split(self.data_dir, split)),
            loader=load_image,
            extensions=tuple(extensions),
            transform=transform,
            target_transform=target_transform,
            allow_empty=allow_empty,
        )
        self.imgs = self.samples  # torchvision's ImageFolder name for the same list
        if num_samples is not None:
            self._keep(_seeded_indices(len(self.samples), num_samples, seed))

    # DatasetFolder hooks -----------------------------------------------------------------

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        """Class folders of the split (hidden ones ignored), or the fixed `class_to_idx`."""
        folders = [e.name for e in visible_entries(Path(directory)) if e.is_dir()]
        mapping = self._fixed_class_to_idx
        if mapping is None:
            return folders, {name: i for i, name in enumerate(folders)}
        unknown = sorted(set(folders) - set(mapping))
        if unknown:
            raise DataError(
                f"'{directory}' has class folders that are not in the given classes: "
                f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}"
            )
        return sorted(mapping, key=mapping.__getitem__), dict(mapping)

    def make_dataset(
        self,
        directory: str | os.PathLike,
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        """(path, class index) for every image, walking each class folder with `walk_files`."""
        if is_valid_file is None:
            exts = extensions or IMG_EXTENSIONS

            def is_valid_file(p: str) -> bool:
                return has_file_allowed_extension(p, exts)

        samples: list[tuple[str, int]] = []
        empty: list[str] = []
        for name in sorted(class_to_idx):
            folder = os.path.join(directory, name)
            if not os.path.isdir(folder):  # only possible with a fixed class_to_idx
                continue
            found = [(p, class_to_idx[name]) for p in walk_files(folder) if is_valid_file(p)]
            if not found:
                empty.append(name)
            samples += found
        if not samples:
            raise _layout_error(
                self.data_dir,
                self.split,
                f"'{directory}' has class folders but no images "
                f"(extensions: {' '.join(extensions or IMG_EXTENSIONS)})",
            )
        if empty and not allow_empty:
            raise DataError(
                f"class folders without images in '{directory}': {', '.join(empty[:10])}"
                f"{' ...' if len(empty) > 10 else ''} (pass allow_empty=True to accept them)"
            )
        return samples

    # Dataset API -------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """Number of classes (class folders, or entries of the fixed `class_to_idx`)."""
        return len(self.classes)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        path, target = self.samples[index]
        valid = True
        try:
            # A transform that decodes the bytes itself raises `DataError` for a bad image too.
            image = image_for(self.transform, read_file(path), path, self.max_pixels)
            if self.transform is not None:
                image = self.transform(image)
        except DataError:
            if self.on_bad_image == "error":
                raise
            valid = False
            image = substitute_image(path)
            if self.transform is not None:
                image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        if self.on_bad_image == "error":
            return image, target
        return image, target, valid, index

    def _keep(self, indices: Sequence[int]) -> None:
        self.samples = [self.samples[i] for i in indices]
        self.targets = [s[1] for s in self.samples]
        self.imgs = self.samples

    def extra_repr(self) -> str:
        return (
            f"Split: {self.split}\nClasses: {self.num_classes}\nOn bad image: {self.on_bad_image}"
        )


def subset(dataset: Dataset, num_samples: int | None, seed: int = 0) -> Dataset:
    """`num_samples` samples of `dataset`, a fixed random choice given `seed` (kept in dataset
    order); the dataset itself when `num_samples` is None or not smaller than it.

    An `ImageFolderDataset` gives back an `ImageFolderDataset` (classes and `samples` intact, so
    bad-image indices still name files); other datasets a `torch.utils.data.Subset`."""
    n = len(dataset)  # type: ignore[arg-type]
    if num_samples is None or num_samples >= n:
        return dataset
    if num_samples < 0:
        raise DataError(f"num_samples must be >= 0, not {num_samples}")
    indices = _seeded_indices(n, num_samples, seed)
    if isinstance(dataset, ImageFolderDataset):
        out = copy.copy(dataset)
        out._keep(indices)
        return out
    return Subset(dataset, indices)


# ---------------------------------------------------------------------------------------------
# Reporting bad images in the training loop


class BadImageReport:
    """Drops substitute samples from batches and remembers which files they came from.

    Lives in the main process; the flags arrive in the batches, so it works with any number of
    DataLoader workers. Typical use, once per epoch::

        report = BadImageReport(dataset)
        for batch in loader:
            images, targets = report.filter(batch)
            if len(targets) == 0:
                continue
            ...
        if (message := report.summary()) is not None:
            logger.warning(message)
        report.reset()

    `filter` accepts both batch forms: ``(images, targets)`` (on_bad_image="error") passes through.
    """

    def __init__(self, dataset: Any, keep: int = 5) -> None:
        self.samples = getattr(dataset, "samples", None)  # to name files; optional
        self.keep = keep
        self.reset()

    def reset(self) -> None:
        """Forget what was seen (call at the start of each epoch)."""
        self.count = 0
        self.first: list[str] = []

    def filter(self, batch: Sequence[Any]) -> tuple[Any, Any]:
        """(images, targets) of the valid samples of `batch`; counts and records the others."""
        if len(batch) == 2:
            return batch[0], batch[1]
        images, targets, valid, index = batch
        valid = torch.as_tensor(valid, dtype=torch.bool)
        if bool(valid.all()):
            return images, targets
        bad = torch.as_tensor(index)[~valid].tolist()
        self.count += len(bad)
        for i in bad[: max(0, self.keep - len(self.first))]:
            self.first.append(
                printable(self.samples[i][0]) if self.samples is not None else f"#{i}"
            )
        return images[valid], targets[valid]

    def summary(self) -> str | None:
        """'N images failed to decode: first ones ...', or None when none failed."""
        if self.count == 0:
            return None
        noun = "image" if self.count == 1 else "images"
        return (
            f"{self.count} {noun} failed to decode and were skipped: "
            f"first ones {', '.join(self.first)}"
        )
