"""Image transforms with MindCV's recipe keys, built from torchvision.transforms.v2.

`train_transform` and `eval_transform` follow MindCV's `transforms_imagenet_train/_eval`: the same
steps in the same order, with mean/std in MindCV's 0..255 units. Both map an RGB PIL image to a
float32 CHW tensor. The auto_augment policies are MindCV's, built from timm's implementation
(MindCV's is a port of it) and run on PIL images. `mixup_cutmix` is the batch-level step
(MindCV's `mixup`, `cutmix`, `cutmix_prob` keys) applied by the training loop after collation.
"""

from __future__ import annotations

import logging
import math
import random
import types
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from ..errors import DataError
from ..schema import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, parse_auto_augment
from .decode import TENSOR_INTERPOLATIONS, DecodeRandomResizedCrop
from .folders import ResizeCrop

logger = logging.getLogger(__name__)

DEFAULT_CROP_PCT = 0.875

# The schema's interpolation names (MindSpore's `Inter` and PIL's), in its order, to modes.
_MODES = ("NEAREST", "BILINEAR", "BILINEAR", "BICUBIC", "BICUBIC", "BICUBIC", "BOX", "BOX")
_INTERPOLATIONS = dict(
    zip(INTERPOLATIONS, [InterpolationMode[m] for m in (*_MODES, "HAMMING", "LANCZOS", "LANCZOS")])
)


def interpolation_mode(name: str | InterpolationMode) -> InterpolationMode:
    """torchvision's mode for a MindCV/PIL interpolation name ("bilinear", "bicubic", ...)."""
    if isinstance(name, InterpolationMode):
        return name
    try:
        return _INTERPOLATIONS[name.lower()]
    except KeyError:
        raise DataError(
            f"unknown interpolation {name!r}; choose one of {', '.join(_INTERPOLATIONS)}"
        ) from None


class NormalizedFloat(v2.Transform):
    """uint8 image -> contiguous float32 CHW tensor normalized with mean/std in MindCV's 0..255
    units: what `ToDtype(float32, scale=True)` and `Normalize` give, in one conversion and one
    in-place multiply-add instead of four passes over the pixels (about 40 us less per 224x224
    image, 7% of a sample read from raw-pixel shards), and contiguous whatever the input's
    strides (`ToImage` gives a PIL image's pixels as an HWC-strided view)."""

    # images, and a plain tensor taken as the image (torchvision's rule, as in `Normalize`)
    _transformed_types = (tv_tensors.Image, v2.functional.is_pure_tensor)

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.scale = torch.tensor([1 / s for s in std]).view(-1, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(-1, 1, 1)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if inpt.dtype == torch.uint8:
            pixels = inpt.to(torch.float32, memory_format=torch.contiguous_format)
        else:  # other integer or float ranges, through torchvision's scaling
            pixels = v2.functional.to_dtype(inpt, torch.float32, scale=True).mul(255).contiguous()
        scale, shift = self.scale.to(pixels.device), self.shift.to(pixels.device)
        if pixels.shape[-3] == scale.shape[0]:
            normalized = pixels.mul_(scale).add_(shift)
        else:  # e.g. one channel and three means: broadcast to three channels, as Normalize does
            normalized = pixels * scale + shift
        return tv_tensors.wrap(normalized, like=inpt)


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """PIL image or uint8 tensor -> float tensor normalized with MindCV's 0..255 mean/std."""
    return [v2.ToImage(), NormalizedFloat(mean, std)]


# MindCV's RandAugment op lists (mindcv/data/auto_augment.py) in timm's op names: timm's own lists
# add SolarizeAdd, and MindCV's translations are relative to the image size (timm's "...Rel").
_RAND_OPS = [
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
]
_RAND_INCREASING_OPS = [
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
]
# MindCV's op weights for "w0" (its _RAND_CHOICE_WEIGHTS_0; timm 1.x dropped the "w" option)
_RAND_WEIGHTS = {
    "Rotate": 0.3,
    "ShearX": 0.2,
    "ShearY": 0.2,
    "TranslateXRel": 0.1,
    "TranslateYRel": 0.1,
    "Color": 0.025,
    "Sharpness": 0.025,
    "AutoContrast": 0.025,
    "Solarize": 0.005,
    "Contrast": 0.005,
    "Brightness": 0.005,
    "Equalize": 0.005,
    "Posterize": 0.005,
    "Invert": 0.0,
}
# MindCV's policy names -> timm's
_AUTOAUG_POLICIES = {"autoaug": "original", "autoaugr": "originalr", "3a": "3a"}
# PIL's affine transforms resample with nearest, bilinear or bicubic only; MindCV uses bilinear
# for the names MindSpore's Inter lacks (box, hamming, lanczos)
_PIL_RESAMPLE = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
}


def auto_augment_hparams(
    interpolation: str | InterpolationMode = "bilinear",
    mean: Sequence[float] = IMAGENET_MEAN,
    image_resize: int | Sequence[int] = 224,
) -> dict[str, Any]:
    """The hparams MindCV's `create_transforms` hands its auto-augment policies: the fill color
    (`img_mean`, the mean in 0..255), `translate_const` and the recipe's interpolation."""
    interp = interpolation_mode(interpolation)
    if interp not in _PIL_RESAMPLE:
        logger.info(
            "auto_augment: rotations, shears and translations use bilinear, not %s", interp.value
        )
    size_min = min(image_resize) if isinstance(image_resize, Sequence) else image_resize
    return {
        "translate_const": int(size_min * 0.45),
        "img_mean": tuple(min(255, round(m)) for m in mean),
        "interpolation": _PIL_RESAMPLE.get(interp, Image.Resampling.BILINEAR),
    }


def _timm_aa() -> types.ModuleType:
    """timm's auto_augment module, imported when a policy is built or applied: importing timm
    imports its model zoo and wandb, about a second that every command would pay otherwise."""
    from timm.data import auto_augment

    return auto_augment


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize keeping at least one bit: Pillow refuses 0 (which timm's increasing
    posterize asks for at magnitude 10), and MindCV keeps at least one bit too."""
    return _timm_aa().posterize(img, max(bits_to_keep, 1), **kwargs)


def _keep_a_bit(ops: Sequence[Any]) -> None:
    """Give timm's posterize ops `_posterize`, on these instances only."""
    posterize = _timm_aa().posterize
    for op in ops:
        if op.aug_fn is posterize:
            op.aug_fn = _posterize


class TrivialAugmentWide:
    """MindCV's TrivialAugmentWide on PIL images, with timm's ops (MindCV's differs from
    torchvision's and timm has none): one of MindCV's 14 RandAugment ops, always applied, at a
    magnitude drawn uniformly from [0, 1] of its range: rotate +-135 degrees, shear +-0.99,
    translate 0..0.15 of the size (never negative, as in MindCV), color/contrast/brightness/
    sharpness 0.01..2, posterize to 2..8 bits, solarize above 0..255. `m` only scales the draw
    (MindCV divides the magnitude by it again)."""

    def __init__(self, magnitude: int = 31, hparams: dict[str, Any] | None = None) -> None:
        self.magnitude = magnitude
        self.kwargs = {
            "fillcolor": (hparams or {}).get("img_mean", (128, 128, 128)),
            "resample": (hparams or {}).get("interpolation", Image.Resampling.BILINEAR),
        }

    @staticmethod
    def _signed(value: float) -> float:
        return -value if random.random() > 0.5 else value  # MindCV's _randomly_negate

    def _args(self, name: str, level: float) -> tuple[float, ...]:
        if name == "Rotate":
            return (self._signed(level * 135.0),)
        if name in ("ShearX", "ShearY"):
            return (self._signed(level * 0.99),)
        if name in ("TranslateXRel", "TranslateYRel"):
            return (level * 0.15,)
        if name == "Posterize":
            return (int(level * 6) + 2,)
        if name == "Solarize":
            return (int(level * 255),)
        if name in ("Color", "Contrast", "Brightness", "Sharpness"):
            return (level * 1.99 + 0.01,)
        return ()

    def __call__(self, img: Image.Image) -> Image.Image:
        name = _RAND_OPS[np.random.randint(len(_RAND_OPS))]
        level = min(max(random.uniform(0, self.magnitude), 0.0), self.magnitude) / self.magnitude
        op = _timm_aa().NAME_TO_OP[name]
        return op(img, *self._args(name, level), **self.kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(magnitude={self.magnitude})"


def auto_augment_transform(
    spec: str,
    interpolation: str | InterpolationMode = "bilinear",
    mean: Sequence[float] = IMAGENET_MEAN,
    image_resize: int | Sequence[int] = 224,
) -> Callable[[Image.Image], Image.Image]:
    """The PIL-image transform MindCV builds for an auto_augment string, from timm's
    implementation (which MindCV's is a port of), with MindCV's arguments (see
    `auto_augment_hparams`) and MindCV's quirks:

    * "randaug-m9-n2-inc1-mmax10-w0": MindCV's 14 ops (timm's without SolarizeAdd), each applied
      with probability 0.5; magnitude noise is always 0.5 (MindCV presets it before reading
      `mstd`, so `mstd` has no effect), `inc` with any value selects the increasing ops.
    * "autoaug", "autoaugr", "3a" (mstd as above): timm's "original", "originalr", "3a".
    * "augmix-m3-w3-d-1-a1": timm's AugMix with MindCV's translate_pct 0.3 and uniform magnitudes.
    * "trivialaugwide-m31": MindCV's own `TrivialAugmentWide`.
    """
    name, params = parse_auto_augment(spec)
    timm_aa = _timm_aa()
    hparams = auto_augment_hparams(interpolation, mean=mean, image_resize=image_resize)
    if name == "trivialaugwide":
        return TrivialAugmentWide(int(params.get("m", 31)), hparams=hparams)
    if name == "augmix":
        hparams.update(translate_pct=0.3, magnitude_std=float("inf"))
        ops = timm_aa.augmix_ops(magnitude=int(params.get("m", 3)), hparams=hparams)
        _keep_a_bit(ops)
        return timm_aa.AugMixAugment(
            ops,
            alpha=params.get("a", 1.0),
            width=int(params.get("w", 3)),
            depth=int(params.get("d", -1)),
        )
    hparams["magnitude_std"] = 0.5
    if name in _AUTOAUG_POLICIES:
        policy = timm_aa.auto_augment_policy(_AUTOAUG_POLICIES[name], hparams)
        for sub_policy in policy:
            _keep_a_bit(sub_policy)
        return timm_aa.AutoAugment(policy)
    if "mmax" in params:
        hparams["magnitude_max"] = int(params["mmax"])
    ops = _RAND_INCREASING_OPS if "inc" in params else _RAND_OPS
    weights = None
    if "w" in params:
        weights = np.array([_RAND_WEIGHTS[op] for op in _RAND_OPS])
        weights = weights / weights.sum()
    ra_ops = timm_aa.rand_augment_ops(
        magnitude=int(params.get("m", 10)), prob=0.5, hparams=hparams, transforms=ops
    )
    _keep_a_bit(ra_ops)
    return timm_aa.RandAugment(
        ra_ops,
        num_layers=int(params.get("n", 2)),
        choice_weights=weights,
    )


def train_transform(
    image_resize: int = 224,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (0.75, 1.333),
    interpolation: str = "bilinear",
    hflip: float = 0.5,
    vflip: float = 0.0,
    color_jitter: float | Sequence[float] | None = 0.4,
    auto_augment: str | None = None,
    re_prob: float = 0.0,
    re_scale: tuple[float, float] = (0.02, 0.33),
    re_ratio: tuple[float, float] = (0.3, 3.3),
    re_value: float | Sequence[float] | str = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    fast_decode: bool = False,
) -> Callable[[Any], Tensor]:
    """MindCV's ImageNet training pipeline: random resized crop -> flips -> auto_augment, or
    color jitter when there is none -> normalize -> random erasing.

    `color_jitter` is one factor for brightness/contrast/saturation, or 3-4 factors (adds hue);
    None or 0 disables it. `mean`/`std` are in 0..255 units, as in MindCV recipes.

    `fast_decode`: the crop is a `DecodeRandomResizedCrop`, which the datasets hand the encoded
    bytes: the same crops, decoded at reduced size where the crop allows and resized as uint8
    tensors (about 1.5x the images per second; at full size, PIL's pixels to one level of
    rounding). Only for nearest, bilinear and bicubic interpolation; the others keep PIL."""
    interp = interpolation_mode(interpolation)
    crop_type = v2.RandomResizedCrop
    if fast_decode and interp in TENSOR_INTERPOLATIONS:
        crop_type = DecodeRandomResizedCrop
    elif fast_decode:
        logger.info(
            "fast_decode does not support %s interpolation; decoding with PIL", interp.value
        )
    steps: list[Any] = [
        crop_type(image_resize, scale=scale, ratio=ratio, interpolation=interp, antialias=True)
    ]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=hflip))
    if vflip > 0:
        steps.append(v2.RandomVerticalFlip(p=vflip))
    if auto_augment:
        if crop_type is DecodeRandomResizedCrop:
            steps.append(v2.ToPILImage())  # MindCV's policies are timm's, which work on PIL images
        steps.append(
            auto_augment_transform(
                auto_augment, interpolation=interp, mean=mean, image_resize=image_resize
            )
        )
    elif color_jitter:
        factors = (
            (float(color_jitter),) * 3
            if isinstance(color_jitter, (int, float))
            else tuple(color_jitter)
        )
        if len(factors) not in (3, 4):
            raise DataError(f"color_jitter must be a number or 3-4 numbers, not {color_jitter!r}")
        steps.append(v2.ColorJitter(*factors))
    steps += _normalize(mean, std)
    if re_prob > 0:
        steps.append(v2.RandomErasing(p=re_prob, scale=re_scale, ratio=re_ratio, value=re_value))
    return v2.Compose(steps)


def eval_transform(
    image_resize: int = 224,
    *,
    crop_pct: float = DEFAULT_CROP_PCT,
    interpolation: str = "bilinear",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Any], Tensor]:
    """MindCV's evaluation pipeline: resize the shorter side to int(image_resize / crop_pct)
    (256 for 224 at 0.875), center crop image_resize, normalize (mean/std in 0..255 units)."""
    geometry = eval_resize_crop(image_resize, crop_pct=crop_pct, interpolation=interpolation)
    return v2.Compose(
        [
            v2.Resize(
                geometry.size, interpolation=interpolation_mode(interpolation), antialias=True
            ),
            v2.CenterCrop(image_resize),
            *_normalize(mean, std),
        ]
    )


def eval_resize_crop(
    image_resize: int = 224, *, crop_pct: float = DEFAULT_CROP_PCT, interpolation: str = "bilinear"
) -> ResizeCrop:
    """The resize and center crop of `eval_transform`, for `decode_image(resize=...)` to decode
    only what they keep: the transform then finds the image already at its size."""
    if not 0 < crop_pct <= 2:
        raise DataError(f"crop_pct must be in (0, 2], not {crop_pct}")
    mode = interpolation_mode(interpolation)
    return ResizeCrop(
        int(math.floor(image_resize / crop_pct)), image_resize, Image.Resampling[mode.name]
    )


class MixupCutmix:
    """Batch-level MixUp / CutMix with label smoothing: (images, labels) -> (images, soft targets).

    With probability `prob` a batch is mixed, by CutMix with probability `switch_prob` when both
    are enabled (else MixUp), as MindCV/timm's `Mixup` in batch mode; otherwise labels are only
    one-hot encoded. Label smoothing is then applied to the soft targets,
    t * (1 - label_smoothing) + label_smoothing / num_classes, which equals smoothing each label
    before mixing. Uses torch's global RNG (the training loop's, seeded by it).
    Pairs are consecutive samples, so batches must be shuffled (they are in training)."""

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
    ) -> None:
        ops: list[v2.Transform] = []
        weights: list[float] = []
        if mixup_alpha > 0:
            ops.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
            weights.append(1.0 - switch_prob if cutmix_alpha > 0 else 1.0)
        if cutmix_alpha > 0:
            ops.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
            weights.append(switch_prob if mixup_alpha > 0 else 1.0)
        if not ops:
            raise DataError("MixupCutmix needs mixup_alpha > 0 or cutmix_alpha > 0")
        if not 0 <= label_smoothing < 1:
            raise DataError(f"label_smoothing must be in [0, 1), not {label_smoothing}")
        self.num_classes = num_classes
        self.prob = prob
        self.label_smoothing = label_smoothing
        self.mix: v2.Transform = ops[0] if len(ops) == 1 else v2.RandomChoice(ops, p=weights)

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.prob >= 1 or float(torch.rand(())) < self.prob:
            images, targets = self.mix(images, labels)
        else:
            targets = F.one_hot(labels, self.num_classes).float()
        if self.label_smoothing > 0:
            targets = targets * (1 - self.label_smoothing) + self.label_smoothing / self.num_classes
        return images, targets

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mix={self.mix}, prob={self.prob}, "
            f"label_smoothing={self.label_smoothing})"
        )


def mixup_cutmix(
    num_classes: int,
    *,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    cutmix_prob: float = 1.0,
    label_smoothing: float = 0.0,
    switch_prob: float = 0.5,
) -> MixupCutmix | None:
    """The batch step for MindCV's `mixup`, `cutmix`, `cutmix_prob` keys, or None when both alphas
    are 0. When it is not None, its targets are already smoothed: train with soft-target cross
    entropy and no further label smoothing in the loss."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    return MixupCutmix(
        num_classes,
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        prob=cutmix_prob,
        switch_prob=switch_prob,
        label_smoothing=label_smoothing,
    )
