"""The recipe schema's word lists and help texts, declared once.

Every choice a recipe key accepts is a ``Literal`` here; ``config.py`` validates against it,
and the transforms, schedules and optimizers dispatch on the same names, so a name accepted by
the config is a name the engine implements. ``HELP`` gives every key its MindCV group and one
line of help (``res2net train --help`` prints it).
"""

from __future__ import annotations

import re
from typing import Literal, get_args

__all__ = [
    "Optimizer",
    "Scheduler",
    "Interpolation",
    "AutoAugment",
    "Loss",
    "AmpLevel",
    "OPTIMIZERS",
    "SCHEDULERS",
    "INTERPOLATIONS",
    "AUTO_AUGMENTS",
    "LOSSES",
    "AMP_LEVELS",
    "parse_auto_augment",
    "HELP",
]

#: MindCV's ``create_optimizer`` names (matched case-insensitively).
Optimizer = Literal[
    "sgd",
    "momentum",
    "nesterov",
    "adam",
    "adamw",
    "lion",
    "nadam",
    "adan",
    "rmsprop",
    "adagrad",
    "lamb",
]
#: MindCV's ``create_scheduler`` names.
Scheduler = Literal[
    "constant",
    "cosine_decay",
    "warmup_cosine_decay",
    "step_decay",
    "multi_step_decay",
    "exponential_decay",
    "polynomial_decay",
    "one_cycle",
    "cyclic",
]
#: MindSpore's ``Inter`` names and PIL's (``pilcubic``/``antialias`` are MindSpore's).
Interpolation = Literal[
    "nearest",
    "bilinear",
    "linear",
    "bicubic",
    "cubic",
    "pilcubic",
    "area",
    "box",
    "hamming",
    "lanczos",
    "antialias",
]
#: auto_augment policy families; options follow as "-m9-n2-mstd0.5-inc1" (see parse_auto_augment).
AutoAugment = Literal["randaug", "autoaug", "autoaugr", "trivialaugwide", "augmix", "3a"]
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
AUTO_AUGMENTS: tuple[str, ...] = get_args(AutoAugment)
LOSSES: tuple[str, ...] = get_args(Loss)
AMP_LEVELS: tuple[str, ...] = get_args(AmpLevel)
WEIGHT_DECAY_FILTERS: tuple[str, ...] = get_args(WeightDecayFilter)
CKPT_SAVE_POLICIES: tuple[str, ...] = get_args(CkptSavePolicy)
LOSS_SCALE_TYPES: tuple[str, ...] = get_args(LossScaleType)
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
LR_SCALES: tuple[str, ...] = get_args(LrScale)
ON_BAD_IMAGE: tuple[str, ...] = get_args(OnBadImage)
JIT_LEVELS: tuple[str, ...] = get_args(JitLevel)

# The options MindCV's parser accepts for each policy (others fail there): m magnitude, n ops,
# mstd magnitude noise, mmax magnitude cap, inc increasing severity, w op weights, d depth,
# a alpha. mstd is accepted but without effect (see data.transforms.auto_augment_transform).
_AA_OPTIONS = {
    "randaug": {"m", "n", "mstd", "mmax", "inc", "w"},
    "autoaug": {"mstd"},
    "autoaugr": {"mstd"},
    "3a": {"mstd"},
    "trivialaugwide": {"m"},
    "augmix": {"m", "w", "d", "a"},
}
# The magnitudes each policy's m supports (AugMix's severity starts at 1; TrivialAugmentWide
# divides by m, so 0 is no magnitude at all): (lowest, highest, default), mmax may raise highest.
_AA_MAGNITUDES: dict[str, tuple[float, float, float]] = {
    "randaug": (0, 10, 10),
    "augmix": (1, 10, 3),
    "trivialaugwide": (1, 31, 31),
}


def parse_auto_augment(spec: str) -> tuple[str, dict[str, float]]:
    """'randaug-m9-mstd0.5-inc1' -> ('randaug', {'m': 9.0, 'mstd': 0.5, 'inc': 1.0}).

    Raises ValueError naming the policy or option that is not one MindCV accepts."""
    name, *parts = spec.strip().lower().split("-")
    if name == "trivialaug":
        name = "trivialaugwide"
    if name not in _AA_OPTIONS:
        raise ValueError(
            f"unknown auto_augment policy {name!r} in {spec!r}; use one of "
            f"{', '.join(AUTO_AUGMENTS)} (e.g. 'randaug-m9-mstd0.5-inc1')"
        )
    params: dict[str, float] = {}
    i = 0
    while i < len(parts):
        part = parts[i]
        if part.isalpha() and i + 1 < len(parts) and parts[i + 1][:1].isdigit():
            part, i = f"{part}-{parts[i + 1]}", i + 1  # "d-1": a negative value
        match = re.fullmatch(r"([a-z]+)(-?\d+(?:\.\d+)?)", part)
        if match is None or match.group(1) not in _AA_OPTIONS[name]:
            raise ValueError(
                f"auto_augment {spec!r}: option {part!r} is not one {name} accepts "
                f"({', '.join(sorted(_AA_OPTIONS[name])) or 'none'})"
            )
        params[match.group(1)] = float(match.group(2))
        i += 1
    low, high, default = _AA_MAGNITUDES.get(name, (0, 10, 10))
    high = max(high, params.get("mmax", high))  # RandAugment clips at mmax, 10 by default
    if not low <= params.get("m", default) <= high:
        raise ValueError(f"auto_augment {spec!r}: magnitude m must be in {low}..{high:g}")
    if name == "randaug" and params.get("w", 0) != 0:
        raise ValueError(f"auto_augment {spec!r}: w must be 0 (MindCV has one set of op weights)")
    return name, params


#: Every recipe key: its MindCV group and one line of help, in MindCV's order.
HELP: dict[str, dict[str, str]] = {
    "System parameters": {
        "config": "YAML recipe whose keys set the defaults (-c)",
        "mode": "0: GRAPH_MODE -> torch.compile on CUDA (eager on CPU); 1: eager everywhere",
        "distribute": "DistributedDataParallel from torchrun's environment",
        "val_while_train": "validate on val_split while training",
        "val_interval": "validate every this many epochs",
        "log_interval": "log (and write metrics) every this many steps",
        "seed": "seed of every random number (order, augmentations, weights)",
        "device_target": "MindSpore-only (Ascend/GPU/CPU); ignored, see 'device'",
        "jit_level": "MindSpore-only graph compile level; ignored",
    },
    "Dataset parameters": {
        "dataset": "dataset type; 'imagenet' (an ImageNet-style folder or shards)",
        "data_dir": "folder with <train_split>/<class>/* and <val_split>/<class>/*, or shards",
        "train_split": "training sub-folder of data_dir",
        "val_split": "validation sub-folder of data_dir",
        "dataset_download": "MindCV downloads MNIST/CIFAR only; must be False here",
        "num_parallel_workers": "DataLoader worker processes per rank",
        "shuffle": "shuffle the training set every epoch",
        "num_samples": "train on this many images (a seeded subset); None: all",
        "batch_size": "images per device per step",
        "drop_remainder": "drop the last incomplete training batch",
    },
    "Augmentation parameters": {
        "image_resize": "training crop and evaluation size (pixels)",
        "scale": "random resized crop area range [low, high]",
        "ratio": "random resized crop aspect ratio range [low, high]",
        "hflip": "horizontal flip probability",
        "vflip": "vertical flip probability",
        "color_jitter": "brightness/contrast/saturation factor, or [b, c, s(, hue)]; "
        "used without auto_augment",
        "interpolation": "resize interpolation: " + ", ".join(INTERPOLATIONS),
        "auto_augment": "policy: randaug-m9-n2-mstd0.5-inc1, autoaug(-mstd0.5), autoaugr, "
        "trivialaugwide(-m31), augmix-m3-w3, 3a; None: off",
        "aug_splits": "AugMix splits with a JSD loss: not implemented, 0 only",
        "re_prob": "random erasing probability",
        "re_scale": "random erasing area range",
        "re_ratio": "random erasing aspect ratio range",
        "re_value": "random erasing fill: a pixel value or 'random' (normal noise per pixel)",
        "re_max_attempts": "random erasing: boxes tried before giving up",
        "mean": "per-channel mean in 0..255 units",
        "std": "per-channel std in 0..255 units",
        "crop_pct": "evaluation: resize to image_resize / crop_pct, then center crop",
        "mixup": "mixup beta(alpha, alpha); 0: off",
        "cutmix": "cutmix beta(alpha, alpha); 0: off",
        "cutmix_prob": "probability that a batch is mixed (mixup and/or cutmix)",
        "aug_repeats": "repeated augmentation: each image drawn this many times per epoch "
        "(0/1: off)",
    },
    "Model parameters": {
        "model": "model name (res2net models)",
        "num_classes": "classes; None: from the training folders",
        "in_channels": "input channels",
        "drop_rate": "dropout before the classifier",
        "drop_path_rate": "stochastic depth rate",
        "pretrained": "start from published weights",
        "ckpt_path": "start from this checkpoint (any format)",
        "resume_opt": "with ckpt_path: also restore optimizer and lr position",
        "keep_checkpoint_max": "epoch checkpoints kept",
        "ckpt_save_dir": "checkpoint and run output folder",
        "ckpt_save_interval": "save an epoch checkpoint every this many epochs",
        "ckpt_save_policy": "which epoch checkpoints to keep: latest_k or top_k (val top-1)",
        "epoch_size": "training epochs",
        "dataset_sink_mode": "MindSpore-only data sinking; ignored",
        "ema": "keep an exponential moving average of the weights",
        "ema_decay": "EMA decay per step",
        "clip_grad": "clip the gradient norm",
        "clip_value": "gradient norm limit with clip_grad",
        "layer_decay": "layer-wise lr decay: lr x layer_decay^(5 - k) for stem(0), "
        "layer1..4, head(5)",
        "gradient_accumulation_steps": "batches accumulated per optimizer step",
    },
    "Optimizer parameters": {
        "opt": "optimizer: " + ", ".join(OPTIMIZERS),
        "momentum": "momentum (sgd, momentum, nesterov, rmsprop)",
        "weight_decay": "weight decay",
        "use_nesterov": "Nesterov momentum (sgd, momentum, nesterov)",
        "weight_decay_filter": "no decay for: disable (none), auto (norm layers), "
        "norm_and_bias (norm layers and biases)",
        "filter_bias_and_bn": "older MindCV key: True -> weight_decay_filter norm_and_bias",
        "eps": "rmsprop's epsilon (MindCV passes it to rmsprop only)",
    },
    "Scheduler parameters": {
        "scheduler": "lr schedule: " + ", ".join(SCHEDULERS),
        "lr": "peak learning rate",
        "min_lr": "final lr of cosine; lower bound of cyclic and one_cycle",
        "warmup_epochs": "linear warmup epochs (before the schedule proper)",
        "warmup_factor": "warmup starts at lr x warmup_factor",
        "decay_epochs": "cosine: epochs per cycle; step_decay: epochs between decays",
        "decay_rate": "step/multi_step/exponential factor; polynomial power",
        "multi_step_decay_milestones": "epochs (counted after warmup) where lr x decay_rate",
        "lr_epoch_stair": "hold lr constant within each epoch",
        "num_cycles": "cosine and cyclic: number of cycles",
        "cycle_decay": "cosine: peak lr factor per cycle",
    },
    "Loss parameters": {
        "loss": "CE (cross entropy) or BCE (binary cross entropy), any case",
        "label_smoothing": "label smoothing",
        "aux_factor": "weight of auxiliary logits' loss (models with an aux head only)",
        "reduction": "loss reduction: mean, sum or none",
    },
    "Auto mixing precision parameters": {
        "amp_level": "O0: fp32; O1-O3: torch.autocast (bf16 where supported, else fp16)",
        "val_amp_level": "amp_level for validation",
        "amp_cast_list": "MindSpore-only cast list; ignored",
        "loss_scale_type": "fixed/dynamic/auto: GradScaler (fp16 only) is always dynamic",
        "loss_scale": "GradScaler's initial scale (fp16 only)",
        "dynamic_loss_scale": "older MindCV key: True -> loss_scale_type dynamic",
        "drop_overflow_update": "GradScaler always skips overflowing steps; ignored",
        "eval_shuffle": "shuffle evaluation data (no effect on metrics); ignored",
    },
    "ModelArts (MindSpore-only, ignored)": {
        "enable_modelarts": "Huawei ModelArts; ignored",
        "multi_data_url": "ModelArts; ignored",
        "data_url": "ModelArts; ignored",
        "ckpt_url": "ModelArts; ignored",
        "train_url": "ModelArts; ignored",
    },
    "PyTorch-only parameters": {
        "resume": "'' fresh run, 'auto' (last.pt in ckpt_save_dir) or a checkpoint path",
        "lr_scale": "none, or linear: lr x global batch / 256",
        "channels_last": "channels_last memory format",
        "compile": "torch.compile on any device",
        "on_bad_image": "skip (log) or error on images that fail to decode",
        "min_readable_images": "an epoch fails when a smaller fraction of its images decode",
        "overwrite": "a fresh run may delete the run files already in ckpt_save_dir",
        "fast_decode": "decode training crops at reduced size, resize as uint8 tensors",
        "device": "auto, cpu, cuda, cuda:N, mps",
        "zero_init_last": "start each residual branch at zero",
        "sync_bn": "BatchNorm statistics over the global batch (CUDA, distributed)",
        "freeze_bn": "BatchNorm uses and keeps its running statistics",
        "dist_timeout": "seconds a rank waits for the others before the job fails",
        "log": "experiment trackers: mlflow, wandb, or mlflow,wandb",
        "log_uri": "MLflow tracking URI ('' = a SQLite store in ./mlruns)",
        "log_project": "MLflow experiment / W&B project",
    },
}
