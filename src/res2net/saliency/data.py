"""Folders of image/mask pairs: DIR/images/<name>.<ext> with DIR/masks/<name>.<ext>."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from ..data import IMAGENET_MEAN, IMAGENET_STD, DataError, load_image

LAYOUT = "DIR/images/<name>.jpg with DIR/masks/<name>.png (same stem; white = salient)"


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMG_EXTENSIONS
    )


def find_pairs(root: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, mask) paths of a saliency folder, in name order. Raises `DataError` when the
    layout is wrong or an image has no mask."""
    root = Path(root).expanduser()
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise DataError(f"'{root}' is not a saliency folder: expected {LAYOUT}")
    masks = {p.stem: p for p in _images_in(masks_dir)}
    images = _images_in(images_dir)
    if not images:
        raise DataError(f"no images in '{images_dir}' (expected {LAYOUT})")
    missing = [p.name for p in images if p.stem not in masks]
    if missing:
        raise DataError(
            f"{len(missing)} images in '{images_dir}' have no mask of the same name in "
            f"'{masks_dir}': "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    return [(p, masks[p.stem]) for p in images]


def load_mask(path: str | os.PathLike) -> torch.Tensor:
    """A mask file as a (H, W) bool tensor: salient where the gray value is above 127."""
    return pil_to_tensor(load_image(path).convert("L"))[0] > 127


def saliency_transform(image_size: int, train: bool = False) -> Callable[..., Any]:
    """Resize to image_size x image_size (masks with nearest neighbour), random horizontal flip
    when training, image to float and ImageNet-normalized. Takes an image or (image, mask)."""
    steps: list[Any] = [v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)]
    if train:
        steps.append(v2.RandomHorizontalFlip())
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([m / 255 for m in IMAGENET_MEAN], [s / 255 for s in IMAGENET_STD]),
    ]
    return v2.Compose(steps)


class SaliencyFolder(Dataset):
    """Image/mask pairs of `root` (see `find_pairs`), as (image (3, S, S) normalized,
    mask (1, S, S) float 0/1) with S = `image_size`; flipped at random when `train`."""

    def __init__(self, root: str | os.PathLike, image_size: int = 352, train: bool = False) -> None:
        self.root = Path(root)
        self.pairs = find_pairs(root)
        self.image_size = image_size
        self.transform = saliency_transform(image_size, train)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image = load_image(image_path)
        mask = load_mask(mask_path)
        if mask.shape != (image.height, image.width):
            mask_image = Image.fromarray(mask.numpy()).resize(image.size, Image.Resampling.NEAREST)
            mask = pil_to_tensor(mask_image)[0] > 0
        x, m = self.transform(
            tv_tensors.Image(pil_to_tensor(image)), tv_tensors.Mask(mask[None].to(torch.uint8))
        )
        return x.as_subclass(torch.Tensor), m.as_subclass(torch.Tensor).float()
