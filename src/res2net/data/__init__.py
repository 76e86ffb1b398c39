"""Data: ImageNet-style folders, WebDataset shards, the bundled digits demo set, MindCV-style
transforms and deterministic loaders."""

from .demo import write_digits_folder
from .folders import (
    DEFAULT_MAX_PIXELS,
    BadImageReport,
    DataError,
    ImageFolderDataset,
    decode_image,
    expected_tree,
    find_split,
    load_image,
    subset,
    walk_files,
)
from .loader import EpochSampler, SeededDataset, build_loader, cap_workers
from .shards import (
    ShardDataset,
    ShardIndex,
    ShardLoader,
    build_shard_loader,
    is_shard_dir,
    iter_shard_samples,
    write_shards,
)
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
    "cap_workers",
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BadImageReport",
    "DataError",
    "EpochSampler",
    "ImageFolderDataset",
    "MixupCutmix",
    "SeededDataset",
    "ShardDataset",
    "ShardIndex",
    "ShardLoader",
    "auto_augment_transform",
    "build_loader",
    "build_shard_loader",
    "decode_image",
    "eval_transform",
    "expected_tree",
    "find_split",
    "interpolation_mode",
    "is_shard_dir",
    "iter_shard_samples",
    "load_image",
    "mixup_cutmix",
    "subset",
    "train_transform",
    "walk_files",
    "write_digits_folder",
    "write_shards",
]
