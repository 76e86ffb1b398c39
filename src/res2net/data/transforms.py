"""Image transforms with MindCV's recipe keys, built from torchvision.transforms.v2.

`train_transform` and `eval_transform` follow MindCV's `transforms_imagenet_train/_eval`: the same
steps in the same order, with mean/std in MindCV's 0..255 units. Both map an RGB PIL image to a
float32 CHW tensor. `mixup_cutmix` is the batch-level step (MindCV's `mixup`, `cutmix`,
`cutmix_prob` keys) applied by the training loop after collation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from ..schema import parse_auto_augment
from .decode import TENSOR_INTERPOLATIONS, DecodeRandomResizedCrop

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
DEFAULT_CROP_PCT = 0.875

# MindCV's interpolation names (MindSpore's `Inter`) and PIL's, to torchvision modes.
_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "linear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "cubic": InterpolationMode.BICUBIC,
    "pilcubic": InterpolationMode.BICUBIC,
    "area": InterpolationMode.BOX,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
    "lanczos": InterpolationMode.LANCZOS,
    "antialias": InterpolationMode.LANCZOS,
}


def interpolation_mode(name: str | InterpolationMode) -> InterpolationMode:
    """torchvision's mode for a MindCV/PIL interpolation name ("bilinear", "bicubic", ...)."""
    if isinstance(name, InterpolationMode):
        return name
    try:
        return _INTERPOLATIONS[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown interpolation {name!r}; choose one of {', '.join(_INTERPOLATIONS)}"
        ) from None


class ContiguousImage(v2.Transform):
    """Images in CHW memory order. `ToImage` gives a PIL image's pixels as an HWC-strided view;
    without this step every later one, and the batch collation, works through that layout."""

    _transformed_types = (tv_tensors.Image,)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return tv_tensors.wrap(inpt.contiguous(), like=inpt)


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """PIL image -> float tensor in 0..1 -> normalized with MindCV's 0..255 mean/std."""
    return [
        v2.ToImage(),
        ContiguousImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=[m / 255 for m in mean], std=[s / 255 for s in std]),
    ]


def auto_augment_transform(
    spec: str,
    interpolation: str | InterpolationMode = "bilinear",
    fill: Sequence[int] | None = None,
) -> v2.Transform:
    """torchvision's policy for a MindCV/timm auto_augment string.

    * "randaug-m9-n2-..." -> RandAugment(num_ops=n (2), magnitude=m (9)) with 11 magnitude bins,
      so that m counts tenths of the maximum strength as in MindCV/timm (torchvision's default of
      31 bins would make m9 about a third as strong).
    * "autoaug...", "autoaugr..." -> AutoAugment(IMAGENET).
    * "trivialaug...", "trivialaugwide..." -> TrivialAugmentWide().
    * "augmix-m3-w3-d-1" -> AugMix(severity=m, mixture_width=w, chain_depth=d).
    * "3a" -> one of grayscale, solarize(128), gaussian blur (DeiT III's 3-Augment).

    Options torchvision has no equivalent for (mstd, inc, mmax, w of randaug, ...) are accepted
    and ignored, with a log message.
    """
    name, params = parse_auto_augment(spec)
    interp = interpolation_mode(interpolation)
    if interp not in (
        InterpolationMode.NEAREST,
        InterpolationMode.BILINEAR,
        InterpolationMode.BICUBIC,
    ):
        interp = InterpolationMode.BILINEAR  # rotations and shears support only these three
    fill_arg: Any = list(fill) if fill is not None else None
    used: set[str] = set()

    def take(key: str, default: float) -> float:
        used.add(key)
        return params.get(key, default)

    if name == "randaug":
        t: v2.Transform = v2.RandAugment(
            num_ops=int(take("n", 2)),
            magnitude=int(take("m", 9)),
            num_magnitude_bins=11,
            interpolation=interp,
            fill=fill_arg,
        )
    elif name in ("autoaug", "autoaugr"):
        t = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=interp, fill=fill_arg)
    elif name == "trivialaugwide":
        t = v2.TrivialAugmentWide(interpolation=interp, fill=fill_arg)
    elif name == "augmix":
        if interp == InterpolationMode.BICUBIC:
            # torchvision's AugMix works on tensors, which it rotates and shears with
            # nearest or bilinear only
            logger.info("auto_augment %r: bilinear instead of bicubic for AugMix", spec)
            interp = InterpolationMode.BILINEAR
        t = v2.AugMix(
            severity=int(take("m", 3)),
            mixture_width=int(take("w", 3)),
            chain_depth=int(take("d", -1)),
            interpolation=interp,
            fill=fill_arg,
        )
    else:  # "3a"
        t = v2.RandomChoice(
            [
                v2.Grayscale(num_output_channels=3),
                v2.RandomSolarize(threshold=128, p=1.0),
                v2.GaussianBlur(kernel_size=13, sigma=(0.1, 2.0)),
            ]
        )
    ignored = sorted(set(params) - used)
    if ignored or name == "autoaugr":
        logger.info(
            "auto_augment %r: %s not reproduced by torchvision's %s",
            spec,
            ", ".join(ignored) if ignored else "increasing posterize",
            type(t).__name__,
        )
    return t


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
        fill = [min(255, round(m)) for m in mean]
        if crop_type is DecodeRandomResizedCrop and interp == InterpolationMode.BICUBIC:
            # torchvision rotates and shears tensors with nearest/bilinear only; PIL has bicubic
            steps.append(v2.ToPILImage())
        steps.append(auto_augment_transform(auto_augment, interpolation=interp, fill=fill))
    elif color_jitter:
        factors = (
            (float(color_jitter),) * 3
            if isinstance(color_jitter, (int, float))
            else tuple(color_jitter)
        )
        if len(factors) not in (3, 4):
            raise ValueError(f"color_jitter must be a number or 3-4 numbers, not {color_jitter!r}")
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
    if not 0 < crop_pct <= 2:
        raise ValueError(f"crop_pct must be in (0, 2], not {crop_pct}")
    interp = interpolation_mode(interpolation)
    return v2.Compose(
        [
            v2.Resize(
                int(math.floor(image_resize / crop_pct)), interpolation=interp, antialias=True
            ),
            v2.CenterCrop(image_resize),
            *_normalize(mean, std),
        ]
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
            raise ValueError("MixupCutmix needs mixup_alpha > 0 or cutmix_alpha > 0")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), not {label_smoothing}")
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
