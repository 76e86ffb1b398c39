"""Decoding fused with the training crop: an image is decoded only as large as its crop needs.

torchvision's pipeline decodes every JPEG at full size with PIL, then crops and resizes the PIL
image. `DecodeRandomResizedCrop` is the same random resized crop taking the encoded bytes
(`EncodedImage`) instead:

* the crop box is drawn from the header's size, with the same random numbers as
  `v2.RandomResizedCrop` (so a seeded sample gets the same box either way);
* when the box is at least 2, 4 or 8 times the output size, the JPEG is decoded at 1/2, 1/4 or
  1/8 size by libjpeg's DCT scaling (PIL's draft mode), which skips most of the decoding work;
* otherwise JPEGs are decoded by torchvision's libjpeg-turbo decoder straight into a tensor
  with PIL's pixels (with the crop below, 0.95 against 1.25 ms through PIL on ImageNet-sized
  photos); uncompressed RGB pixels (binary PPM, as `data shard --raw` stores them) are read
  straight from their bytes; other formats go through PIL as before;
* the box is cut from the uint8 tensor and resized with torch's antialiased uint8 kernels,
  about three times faster than PIL's resize.

Every check of `load_image` still applies: allowed formats, the decompression-bomb limit read
from the header, EXIF orientation, any decoding failure as one `DataError` naming the image.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from PIL import Image, ImageFile
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..errors import DataError
from .folders import EncodedImage, decoding, exif_orientation, finish_image, open_image

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # a torchvision without its image decoders: JPEGs go through PIL
    decode_jpeg = None

# The interpolations torch resizes uint8 tensors with; the others need PIL.
TENSOR_INTERPOLATIONS = (
    InterpolationMode.NEAREST,
    InterpolationMode.BILINEAR,
    InterpolationMode.BICUBIC,
)
_DCT_SCALES = (8, 4, 2)  # the reductions libjpeg decodes at directly
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations turned by 90 degrees
# the dims each EXIF orientation flips, after the transpose of `_TRANSPOSED` ones
_FLIPS = {2: (-1,), 3: (-2, -1), 4: (-2,), 6: (-1,), 7: (-2, -1), 8: (-2,)}


class DecodeRandomResizedCrop(v2.RandomResizedCrop):
    """`v2.RandomResizedCrop` that also accepts an `EncodedImage` and decodes only what the crop
    needs (see the module docstring). Returns a uint8 `tv_tensors.Image` for any input (an
    `EncodedImage`, a PIL image or a uint8 tensor); the steps after it run on tensors.

    Supports the interpolations in `TENSOR_INTERPOLATIONS`; antialiasing is always on."""

    takes_encoded = True  # datasets hand it `EncodedImage`s (see `folders.image_for`)
    interpolation: InterpolationMode

    def __init__(self, size: int | tuple[int, int], *args: Any, **kwargs: Any) -> None:
        if kwargs.pop("antialias", True) is not True:
            raise DataError(f"{type(self).__name__} always antialiases")
        super().__init__(size, *args, antialias=True, **kwargs)
        self.interpolation = InterpolationMode(self.interpolation)  # the default is a str
        if self.interpolation not in TENSOR_INTERPOLATIONS:
            names = ", ".join(m.value for m in TENSOR_INTERPOLATIONS)
            raise DataError(
                f"{type(self).__name__} supports {names}, not {self.interpolation.value}"
            )

    def forward(self, image: EncodedImage | Image.Image | Tensor) -> tv_tensors.Image:
        if isinstance(image, EncodedImage):
            with decoding(image.name):
                return self._decode_crop(image)
        tensor: Tensor = TF.pil_to_tensor(image) if isinstance(image, Image.Image) else image
        height, width = tensor.shape[-2:]
        return self._crop_resize(tensor, self._box(height, width))

    def _box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a random crop of a `height` x `width` image, drawn
        exactly as `v2.RandomResizedCrop` draws it."""
        params = self.make_params([torch.empty((0, height, width), dtype=torch.uint8)])
        return params["top"], params["left"], params["height"], params["width"]

    def _decode_crop(self, encoded: EncodedImage) -> tv_tensors.Image:
        im = open_image(encoded.data, encoded.name, encoded.max_pixels)
        width, height = im.size
        orientation = exif_orientation(im)
        if orientation in _TRANSPOSED:
            width, height = height, width
        box = self._box(height, width)
        pixels = _raw_rgb(im, encoded.data)
        if pixels is None and im.format == "JPEG":
            if (reduction := self._reduction(box)) > 1:
                im.draft("RGB", (im.width // reduction, im.height // reduction))
                pixels = TF.pil_to_tensor(finish_image(im, encoded.name))
                box = _scale_box(box, reduction, pixels.shape[-2:])
            elif decode_jpeg is not None and (stored := _decode_jpeg(encoded.data)) is not None:
                pixels = _upright(stored, orientation)
        if pixels is None:  # other formats, or a JPEG torchvision cannot decode: PIL decides
            pixels = TF.pil_to_tensor(finish_image(im, encoded.name))
        return self._crop_resize(pixels, box)

    def _reduction(self, box: tuple[int, int, int, int]) -> int:
        """The largest DCT reduction that still leaves the box at least the output size."""
        out_h, out_w = self.size
        for r in _DCT_SCALES:
            if box[2] >= r * out_h and box[3] >= r * out_w:
                return r
        return 1

    def _crop_resize(self, pixels: Tensor, box: tuple[int, int, int, int]) -> tv_tensors.Image:
        top, left, height, width = box
        crop = pixels[..., top : top + height, left : left + width]
        # torch's NEAREST picks the pixel left of PIL's; NEAREST_EXACT picks PIL's.
        mode = self.interpolation
        if mode == InterpolationMode.NEAREST:
            mode = InterpolationMode.NEAREST_EXACT
        out = TF.resize(crop, list(self.size), interpolation=mode, antialias=True)
        return tv_tensors.Image(out)


def _raw_rgb(im: Image.Image, data: bytes) -> Tensor | None:
    """The pixels of an uncompressed 8-bit RGB image (binary PPM, as `data shard --raw` writes)
    read straight from its bytes, HWC viewed as CHW; None for any other image, or one whose
    bytes are short (PIL then reports it)."""
    if im.format != "PPM" or not isinstance(im, ImageFile.ImageFile) or len(im.tile) != 1:
        return None
    tile = im.tile[0]
    if tile.codec_name != "raw" or tile.args not in ("RGB", ("RGB", 0, 1)):
        return None
    width, height = im.size
    end = tile.offset + width * height * 3
    if len(data) < end:
        return None
    pixels = torch.frombuffer(bytearray(memoryview(data)[tile.offset : end]), dtype=torch.uint8)
    return pixels.view(height, width, 3).permute(2, 0, 1)


def _decode_jpeg(data: bytes) -> Tensor | None:
    """RGB pixels as stored, by torchvision's libjpeg-turbo decoder (PIL's pixels); None when
    it fails, so that PIL's decoder has the last word on whether the file is bad. Not turned
    upright here: torchvision reads the orientation from fewer places than PIL (not from XMP,
    nor from an Exif segment after another APP1 one), so `_upright` applies PIL's."""
    with warnings.catch_warnings():
        # torchvision 0.29 announces that TorchCodec will take over its image decoders; until
        # then they serve, and PIL takes over where they are gone (see the import).
        warnings.simplefilter("ignore", DeprecationWarning)
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            return decode_jpeg(buffer, mode=ImageReadMode.RGB)
        except RuntimeError:
            return None


def _upright(pixels: Tensor, orientation: int) -> Tensor:
    """CHW `pixels` as stored, turned upright for EXIF `orientation` as PIL's
    `ImageOps.exif_transpose` turns an image (5-8: transposed, then flipped)."""
    if orientation in _TRANSPOSED:
        pixels = pixels.transpose(-2, -1)
    flips = _FLIPS.get(orientation, ())
    return pixels.flip(flips) if flips else pixels


def _scale_box(
    box: tuple[int, int, int, int], reduction: int, size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """`box` in the coordinates of the image decoded at 1/`reduction` scale, of `size` (h, w):
    reduced pixel i covers original pixels [i * reduction, (i + 1) * reduction)."""
    top, left = round(box[0] / reduction), round(box[1] / reduction)
    height = max(1, min(round(box[2] / reduction), size[0] - top))
    width = max(1, min(round(box[3] / reduction), size[1] - left))
    return top, left, height, width
