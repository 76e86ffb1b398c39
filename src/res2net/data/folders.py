"""ImageNet-style image folders: `data_dir/<split>/<class>/<image>`.

`ImageFolderDataset` is torchvision's `DatasetFolder` with three things added that training on
real-world folders needs:

* errors that show the expected tree when `data_dir` is wrong (`find_split`);
* a file walk that follows symlinks but never enters a folder twice (nor one that contains the
  class folder), so a symlink loop cannot make it run forever (torchvision walks with
  `os.walk(followlinks=True)`, which has no guard);
* an image loader that normalises every PIL mode to RGB, applies EXIF rotation, refuses
  decompression bombs, and turns any failure into a `DataError` naming the file.

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
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Subset
from torchvision.datasets import DatasetFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from ..errors import DataError
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


_HIGH_BIT_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I" is read as 16-bit values too
_BLOCK_PIXELS = 1 << 18  # pixels of a high-bit-depth image rescaled at once (a few MB)


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


def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open `path` as an 8-bit RGB PIL image, upright per its EXIF orientation.

    Raises `DataError` naming the file when it cannot be decoded, or when it has more than
    `max_pixels` pixels (a decompression bomb: a small file that expands to gigabytes). The limit
    is checked from the header, before decoding. `None` disables this check; PIL's own global
    limit (`Image.MAX_IMAGE_PIXELS`, refused above twice its value) still applies."""
    return decode_image(read_file(path), str(path), max_pixels)


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
    data: bytes, name: str = "<bytes>", max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """`load_image` for encoded bytes (e.g. a sample of a shard); errors name `name`."""
    with decoding(name):
        return finish_image(open_image(data, name, max_pixels), name)


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
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise DataError(f"cannot read image '{name}': {type(e).__name__}: {e}") from e


def open_image(data: bytes, name: str, max_pixels: int | None) -> Image.Image:
    """`data` opened by PIL without decoding the pixels: the format is one of `IMAGE_FORMATS`
    and the size is within `max_pixels` (`DataError` otherwise). Call inside `decoding(name)`."""
    im = Image.open(io.BytesIO(data), formats=_available_formats())
    if max_pixels is not None and im.width * im.height > max_pixels:
        raise DataError(
            f"image '{name}' has {im.width}x{im.height} pixels, more than the limit of "
            f"{max_pixels} (a possible decompression bomb)"
        )
    return im


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
