"""The recipe schema's word lists and shared constants, declared once.

Every choice a recipe key accepts is a ``Literal`` here; ``config.Config`` declares its keys
with these types, and the transforms, schedules and optimizers dispatch on the same names, so
a name accepted by the config is a name the engine implements. This module imports only the
project's error types: every layer may use it.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from .errors import ConfigError

#: ImageNet's per-channel statistics in 0..1 units (torchvision, timm, published weights) ...
IMAGENET_MEAN_01 = (0.485, 0.456, 0.406)
IMAGENET_STD_01 = (0.229, 0.224, 0.225)
#: ... and in MindCV's 0..255 pixel units (recipes' ``mean``/``std``).
IMAGENET_MEAN = tuple(m * 255 for m in IMAGENET_MEAN_01)
IMAGENET_STD = tuple(s * 255 for s in IMAGENET_STD_01)
#: Global batch size that ``lr`` refers to with ``lr_scale: linear`` (MindCV's Res2Net recipes:
#: 32 images per device x 8 devices with lr 0.1).
REFERENCE_BATCH_SIZE = 256
PRECISIONS = ("fp32", "bf16", "int8")  # optimize_for_inference's (serve, benchmark)

#: MindCV's ``create_optimizer`` names (matched case-insensitively).
Optimizer = Literal[
    "sgd", "momentum", "nesterov", "adam", "adamw", "lion", "nadam", "adan", "rmsprop",
    "adagrad", "lamb",
]  # fmt: skip
#: MindCV's ``create_scheduler`` names.
Scheduler = Literal[
    "constant", "cosine_decay", "warmup_cosine_decay", "step_decay", "multi_step_decay",
    "exponential_decay", "polynomial_decay", "one_cycle", "cyclic",
]  # fmt: skip
#: MindSpore's ``Inter`` names and PIL's (``pilcubic``/``antialias`` are MindSpore's).
Interpolation = Literal[
    "nearest", "bilinear", "linear", "bicubic", "cubic", "pilcubic", "area", "box", "hamming",
    "lanczos", "antialias",
]  # fmt: skip
Loss = Literal["CE", "BCE"]
AmpLevel = Literal["O0", "O1", "O2", "O3"]
WeightDecayFilter = Literal["disable", "auto", "norm_and_bias"]
CkptSavePolicy = Literal["latest_k", "top_k"]
LossScaleType = Literal["fixed", "dynamic", "auto"]
Reduction = Literal["mean", "sum", "none"]
LrScale = Literal["none", "linear"]
OnBadImage = Literal["skip", "error"]
JitLevel = Literal["O0", "O1", "O2"]

OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)
INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)
WEIGHT_DECAY_FILTERS: tuple[str, ...] = get_args(WeightDecayFilter)

# auto_augment's policies ("randaug-m9-n2-mstd0.5-inc1"): the options MindCV's parser accepts (m
# magnitude, n ops, mstd noise (no effect: see data.transforms), mmax magnitude cap, inc increasing
# severity, w op weights, d depth, a alpha) and m's (lowest, highest, default); AugMix's severity
# starts at 1, TrivialAugmentWide divides by m.
_AA_POLICIES: dict[str, tuple[set[str], tuple[float, float, float]]] = {
    "randaug": ({"m", "n", "mstd", "mmax", "inc", "w"}, (0, 10, 10)),
    "autoaug": ({"mstd"}, (0, 10, 10)),
    "autoaugr": ({"mstd"}, (0, 10, 10)),
    "trivialaugwide": ({"m"}, (1, 31, 31)),
    "augmix": ({"m", "w", "d", "a"}, (1, 10, 3)),
    "3a": ({"mstd"}, (0, 10, 10)),
}
AUTO_AUGMENTS = tuple(_AA_POLICIES)


def parse_auto_augment(spec: str) -> tuple[str, dict[str, float]]:
    """'randaug-m9-mstd0.5-inc1' -> ('randaug', {'m': 9.0, 'mstd': 0.5, 'inc': 1.0}).

    Raises ValueError naming the policy or option that is not one MindCV accepts."""
    name, *parts = re.split(r"-(?!\d)", spec.strip().lower())  # "d-1": a negative value
    if name == "trivialaug":
        name = "trivialaugwide"
    if name not in _AA_POLICIES:
        raise ConfigError(
            f"unknown auto_augment policy {name!r} in {spec!r}; use one of "
            f"{', '.join(AUTO_AUGMENTS)} (e.g. 'randaug-m9-mstd0.5-inc1')"
        )
    options, (low, high, default) = _AA_POLICIES[name]
    params: dict[str, float] = {}
    for part in parts:
        match = re.fullmatch(r"([a-z]+)(-?\d+(?:\.\d+)?)", part)
        if match is None or match.group(1) not in options:
            raise ConfigError(
                f"auto_augment {spec!r}: option {part!r} is not one {name} accepts "
                f"({', '.join(sorted(options))})"
            )
        params[match.group(1)] = float(match.group(2))
    high = max(high, params.get("mmax", high))  # RandAugment clips at mmax, 10 by default
    if not low <= params.get("m", default) <= high:
        raise ConfigError(f"auto_augment {spec!r}: magnitude m must be in {low}..{high:g}")
    if name == "randaug" and params.get("w", 0) != 0:
        raise ConfigError(f"auto_augment {spec!r}: w must be 0 (MindCV has one set of op weights)")
    return name, params
