"""Data: ImageNet-style folders, the bundled digits demo set, MindCV-style transforms and
deterministic loaders."""

from .demo import write_digits_folder
from .folders import (
    DEFAULT_MAX_PIXELS,
    BadImageReport,
    DataError,
    ImageFolderDataset,
    expected_tree,
    find_split,
    load_image,
    subset,
    walk_files,
)
from .loader import EpochSampler, SeededDataset, build_loader
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MixupCutmix,
    auto_augment_transform,
    eval_transform,
    interpolation_mode,
    mixup_cutmix,
    train_transform,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BadImageReport",
    "DataError",
    "EpochSampler",
    "ImageFolderDataset",
    "MixupCutmix",
    "SeededDataset",
    "auto_augment_transform",
    "build_loader",
    "eval_transform",
    "expected_tree",
    "find_split",
    "interpolation_mode",
    "load_image",
    "mixup_cutmix",
    "subset",
    "train_transform",
    "walk_files",
    "write_digits_folder",
]
