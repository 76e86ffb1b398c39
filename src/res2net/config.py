"""One typed schema for every run: MindCV's recipe keys plus a few PyTorch-only keys.

A run is one YAML file with MindCV's flat ``key: value`` layout (see ``configs/res2net/``),
optionally changed from the command line::

    cfg = load_config("configs/res2net/res2net_50_gpu.yaml", ["--data_dir", "/data", "--lr=0.2"])

Every :class:`Config` is type-checked and range-checked when it is built, so the layers that
consume it never see a malformed value. Keys that only mean something on MindSpore are
accepted (recipes load unchanged) and reported by :meth:`Config.notes`; keys whose meaning
has a PyTorch counterpart are mapped, as documented on the helper methods:

* ``mode`` 0 (GRAPH_MODE) -> :meth:`Config.use_compile` (``torch.compile`` on CUDA).
* ``amp_level`` / ``val_amp_level`` -> :meth:`Config.amp_dtype` (``torch.autocast`` dtype).
* ``loss_scale`` / ``loss_scale_type`` -> :meth:`Config.use_grad_scaler` and
  :meth:`Config.grad_scaler_init_scale` (``torch.amp.GradScaler``).
* ``distribute`` -> ``torch.distributed`` set up from torchrun's environment.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import yaml

from .errors import ConfigError
from .guards import read_regular_file, short
from .schema import (
    AMP_LEVELS,
    CKPT_SAVE_POLICIES,
    HELP,
    INTERPOLATIONS,
    JIT_LEVELS,
    LOSS_SCALE_TYPES,
    LOSSES,
    LR_SCALES,
    ON_BAD_IMAGE,
    OPTIMIZERS,
    REDUCTIONS,
    SCHEDULERS,
    WEIGHT_DECAY_FILTERS,
    parse_auto_augment,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "given_keys",
    "keys_help",
    "REFERENCE_BATCH_SIZE",
]

#: Global batch size that ``lr`` refers to when ``lr_scale: linear`` (MindCV's Res2Net
#: recipes: 32 images per device x 8 devices with lr 0.1).
REFERENCE_BATCH_SIZE = 256

# The word lists live in schema.py (one source for config, transforms, schedules, optimizers).
_DEVICE_RE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?|xpu(:\d+)?)")
# Strings that mean None for Optional fields (YAML itself already maps null and ~).
_NONE_STRINGS = ("None", "none", "null", "Null", "NULL", "~")
_TRUE_STRINGS = ("true", "yes", "on", "1")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")  # `pipe:`, `https:`; not `C:`
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_NODES = 10_000
#: Upper bounds checked at load (lower bounds are in `_validate`): far above any real run, low
#: enough that a hostile recipe cannot ask for absurd memory, processes or time.
LIMITS: dict[str, float] = {
    "seed": 2**32 - 1,
    "lr": 100.0,
    "min_lr": 100.0,
    "image_resize": 4096,
    "epoch_size": 100_000,
    "warmup_epochs": 100_000,
    "decay_epochs": 100_000,
    "multi_step_decay_milestones": 100_000,
    "num_parallel_workers": 256,
    "batch_size": 1 << 16,
    "num_classes": 1 << 20,
    "in_channels": 64,
    "keep_checkpoint_max": 10_000,
    "gradient_accumulation_steps": 1 << 16,
    "re_max_attempts": 1000,
    "aug_repeats": 64,
    "num_cycles": 100_000,
    "loss_scale": 2.0**32,
    "dist_timeout": 7 * 24 * 3600.0,
}
_FALSE_STRINGS = ("false", "no", "off", "0")


@dataclass(frozen=True)
class Config:
    """Every setting of a training or validation run.

    Field names and defaults are MindCV's (its ``config.py``), so a MindCV recipe loads
    unchanged; deviations are marked "PyTorch:". Sequences are tuples (the object is
    immutable: use :meth:`replace` to derive a changed copy, which is validated again).
    ``mean``/``std`` stay in MindCV's 0..255 pixel units.
    """

    # --- (no group) ---
    config: str = ""  # the YAML file this config was read from ("" when none)

    # --- System parameters ---
    mode: int = 0  # 0: GRAPH_MODE, 1: PYNATIVE_MODE; 0 -> torch.compile on CUDA, see use_compile()
    distribute: bool = False  # -> torch.distributed from torchrun's environment
    val_while_train: bool = False
    val_interval: int = 1  # epochs
    log_interval: int = 100  # steps
    seed: int = 42
    device_target: str = "Ascend"  # MindSpore-only, ignored: the device comes from `device`
    jit_level: str = "O2"  # MindSpore-only (graph compile level), ignored

    # --- Dataset parameters ---
    dataset: str = "imagenet"
    data_dir: str = "./"
    train_split: str = "train"
    val_split: str = "val"
    dataset_download: bool = False
    num_parallel_workers: int = 8  # -> DataLoader num_workers
    shuffle: bool = True
    num_samples: int | None = None
    batch_size: int = 128  # per device
    drop_remainder: bool = True

    # --- Augmentation parameters ---
    image_resize: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 1.333)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float | tuple[float, ...] | None = 0.4  # a factor, or [b, c, s(, hue)]
    interpolation: str = "bilinear"
    auto_augment: str | None = None  # e.g. "randaug-m9-mstd0.5-inc1", "autoaug-mstd0.5"
    aug_splits: int = 0
    re_prob: float = 0.0
    re_scale: tuple[float, float] = (0.02, 0.33)
    re_ratio: tuple[float, float] = (0.3, 3.3)
    re_value: float | str = 0  # a pixel value, or "random"
    re_max_attempts: int = 10
    mean: tuple[float, ...] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
    std: tuple[float, ...] = (0.229 * 255, 0.224 * 255, 0.225 * 255)
    crop_pct: float = 0.875
    mixup: float = 0.0
    cutmix: float = 0.0
    cutmix_prob: float = 1.0
    aug_repeats: int = 0

    # --- Model parameters ---
    # PyTorch: MindCV's default model is "mobilenet_v2_035_224", which this package does not have.
    model: str = "res2net50"
    num_classes: int | None = None
    in_channels: int = 3
    drop_rate: float | None = None
    drop_path_rate: float | None = None
    pretrained: bool = False
    ckpt_path: str = ""
    resume_opt: bool = False
    keep_checkpoint_max: int = 10
    ckpt_save_dir: str = "./ckpt"  # also the run's output directory
    ckpt_save_interval: int = 1  # epochs
    ckpt_save_policy: str | None = "latest_k"
    epoch_size: int = 90
    dataset_sink_mode: bool = True  # MindSpore-only, ignored
    ema: bool = False
    ema_decay: float = 0.9999
    clip_grad: bool = False
    clip_value: float = 15.0
    layer_decay: float | None = None
    gradient_accumulation_steps: int = 1

    # --- Optimizer parameters ---
    opt: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 1e-6
    use_nesterov: bool = False
    weight_decay_filter: str = "disable"
    filter_bias_and_bn: bool | None = None  # older MindCV key; True/False -> weight_decay_filter
    eps: float = 1e-10

    # --- Scheduler parameters ---
    scheduler: str = "cosine_decay"
    lr: float = 0.001
    min_lr: float = 1e-6
    warmup_epochs: int = 3
    warmup_factor: float = 0.0
    decay_epochs: int = 100
    decay_rate: float = 0.9
    multi_step_decay_milestones: tuple[int, ...] = (30, 60, 90)
    lr_epoch_stair: bool = False
    num_cycles: int = 1
    cycle_decay: float = 1.0

    # --- Loss parameters ---
    loss: str = "CE"
    label_smoothing: float = 0.0
    aux_factor: float = 0.0
    reduction: str = "mean"

    # --- Auto mixing precision parameters ---
    amp_level: str = "O0"  # -> torch.autocast, see amp_dtype()
    val_amp_level: str = "O0"
    amp_cast_list: str | None = None  # MindSpore-only, ignored: autocast keeps its own op lists
    loss_scale_type: str = "fixed"
    loss_scale: float = 1.0  # -> GradScaler init_scale in float16, see use_grad_scaler()
    dynamic_loss_scale: bool | None = None  # older MindCV key; True -> loss_scale_type "dynamic"
    drop_overflow_update: bool = False
    eval_shuffle: bool = False

    # --- ModelArts (Huawei cloud; MindSpore-only, ignored) ---
    enable_modelarts: bool = False
    multi_data_url: str = "/cache/data/"
    data_url: str = "/cache/data/"
    ckpt_url: str = "/cache/output/"
    train_url: str = "/cache/output/"

    # --- PyTorch-only parameters (this project) ---
    resume: str = ""  # "" (fresh run), "auto" (latest in ckpt_save_dir) or a checkpoint path
    lr_scale: str = "none"  # "none" or "linear": lr *= global batch / REFERENCE_BATCH_SIZE
    channels_last: bool = False
    compile: bool = False  # torch.compile on any device; see use_compile()
    on_bad_image: str = "skip"  # "skip" (log and skip unreadable images) or "error"
    min_readable_images: float = 0.5  # an epoch fails when a smaller fraction of its images decode
    overwrite: bool = False  # a fresh run may delete the run files already in ckpt_save_dir
    fast_decode: bool = (
        True  # train crops decoded at reduced size, resized as tensors (data/decode.py)
    )
    device: str = "auto"  # "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:N", "mps"
    zero_init_last: bool = False  # start each residual branch at zero (last BN weight 0)
    sync_bn: bool = False  # distributed: BatchNorm statistics over the global batch (CUDA only)
    freeze_bn: bool = False  # BatchNorm keeps and uses its running statistics while training
    dist_timeout: float = 600.0  # seconds a rank waits for the others before the job fails
    log: str = ""  # experiment trackers: "mlflow", "wandb" or "mlflow,wandb" (engine/tracking.py)
    log_uri: str = ""  # MLflow tracking URI; "" = a SQLite store in ./mlruns
    log_project: str = "res2net"  # MLflow experiment / W&B project

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _coerce(f.name, getattr(self, f.name), _FIELD_TYPES[f.name])
            object.__setattr__(self, f.name, value)
        # Spellings MindCV itself accepts in any case.
        object.__setattr__(self, "opt", self.opt.lower())
        object.__setattr__(self, "loss", self.loss.upper())
        object.__setattr__(self, "scheduler", self.scheduler.lower())
        object.__setattr__(self, "interpolation", self.interpolation.lower())
        for key in ("amp_level", "val_amp_level", "jit_level"):
            object.__setattr__(self, key, getattr(self, key).upper())
        # Older MindCV spellings of current keys.
        if self.filter_bias_and_bn is not None and self.weight_decay_filter == "disable":
            filt = "norm_and_bias" if self.filter_bias_and_bn else "disable"
            object.__setattr__(self, "weight_decay_filter", filt)
        if self.dynamic_loss_scale and self.loss_scale_type == "fixed":
            object.__setattr__(self, "loss_scale_type", "dynamic")
        _validate(self)
        _check_limits(self)

    # --- derived values -------------------------------------------------------------------

    def replace(self, **changes: Any) -> Config:
        """A copy with `changes` applied (validated like any Config)."""
        unknown = [k for k in changes if k not in _FIELD_TYPES]
        if unknown:
            raise _unknown_key_error(unknown[0], "in replace()")
        return dataclasses.replace(self, **changes)

    def amp_dtype(
        self, device_type: str, *, validation: bool = False, bf16_supported: bool | None = None
    ) -> torch.dtype | None:
        """The ``torch.autocast`` dtype for `device_type` ("cpu", "cuda", ...), or None for fp32.

        Mapping of MindSpore's levels (``val_amp_level`` when `validation`): O0 -> None (no
        autocast); O1, O2 and O3 -> autocast in bfloat16 on CPU and on CUDA devices that
        support it, else float16. O3 ("everything in float16") is treated like O2: weights,
        optimizer state and BatchNorm stay float32 under autocast, which is what makes it safe.
        `bf16_supported` overrides the CUDA capability query (for tests and planning).
        """
        level = self.val_amp_level if validation else self.amp_level
        if level == "O0":
            return None
        import torch

        if device_type == "cpu":
            return torch.bfloat16
        if device_type == "cuda":
            if bf16_supported is None:
                bf16_supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            return torch.bfloat16 if bf16_supported else torch.float16
        return torch.float16

    def use_grad_scaler(self, device_type: str, *, bf16_supported: bool | None = None) -> bool:
        """Whether training needs ``torch.amp.GradScaler``: exactly when it autocasts to float16.

        MindCV's fixed ``loss_scale`` (1024 in the Res2Net recipes) exists to keep float16
        gradients from underflowing; PyTorch's GradScaler does the same job dynamically, so it
        is used for every float16 run (even with ``loss_scale: 1``) and never for bfloat16/fp32.
        Start it at :meth:`grad_scaler_init_scale`.
        """
        import torch

        return self.amp_dtype(device_type, bf16_supported=bf16_supported) == torch.float16

    def grad_scaler_init_scale(self) -> float:
        """GradScaler's ``init_scale``: ``loss_scale`` when > 1, else PyTorch's 2**16."""
        return self.loss_scale if self.loss_scale > 1 else 2.0**16

    def use_compile(self, device_type: str | None = None) -> bool:
        """Whether to wrap the model in ``torch.compile``.

        True when ``compile: true`` (any device), or when ``mode: 0`` (MindSpore's GRAPH_MODE,
        also MindCV's default) and the device is CUDA. On CPU, graph mode alone does not
        compile: warming up torch.compile for these networks takes minutes, which costs more
        than it saves on CPU. Pass ``--mode 1`` for eager execution everywhere.
        `device_type` defaults to the type of ``device`` ("auto" -> cuda when available).
        """
        if self.compile:
            return True
        if device_type is None:
            device_type = self.device_type()
        return self.mode == 0 and device_type == "cuda"

    def device_type(self) -> str:
        """The torch device type ``device`` names ("auto": "cuda" when available, else "cpu")."""
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device.split(":")[0]

    def lr_scale_factor(self, world_size: int = 1) -> float:
        """Factor for ``lr`` (and ``min_lr``): global batch / REFERENCE_BATCH_SIZE with
        ``lr_scale: linear``, else 1. The global batch is batch_size x world_size x
        gradient_accumulation_steps."""
        if world_size < 1:
            raise ConfigError(f"world_size must be >= 1, got {world_size}")
        if self.lr_scale == "none":
            return 1.0
        global_batch = self.batch_size * world_size * self.gradient_accumulation_steps
        return global_batch / REFERENCE_BATCH_SIZE

    # --- reporting ------------------------------------------------------------------------

    def notes(self) -> list[str]:
        """Human-readable lines about MindCV keys that are ignored (only when set to a
        non-default value) or mapped to a PyTorch counterpart. Callers log them."""
        out: list[str] = []
        d = _DEFAULTS
        if self.mode == 0:
            out.append(
                "mode: 0 (MindSpore GRAPH_MODE) -> torch.compile on CUDA, eager on CPU; "
                "--mode 1 runs eager everywhere"
            )
        for key, why in IGNORED_KEYS.items():
            if getattr(self, key) != getattr(d, key):
                out.append(f"{key}: {getattr(self, key)!r} is ignored ({why})")
        if self.eps != d.eps and self.opt != "rmsprop":
            out.append(
                f"eps: {self.eps:g} is used by rmsprop only, as in MindCV; "
                f"{self.opt} keeps its own epsilon"
            )
        if self.opt == "nesterov" and not self.use_nesterov:
            out.append(
                "opt: 'nesterov' is momentum without Nesterov unless use_nesterov: True "
                "(as in MindCV)"
            )
        if self.filter_bias_and_bn is not None:
            out.append(
                f"filter_bias_and_bn: {self.filter_bias_and_bn} (older MindCV key) -> "
                f"weight_decay_filter: {self.weight_decay_filter!r}"
            )
        if self.dynamic_loss_scale is not None:
            out.append(
                f"dynamic_loss_scale: {self.dynamic_loss_scale} (older MindCV key) -> "
                f"loss_scale_type: {self.loss_scale_type!r}"
            )
        for key in ("amp_level", "val_amp_level"):
            level = getattr(self, key)
            if level != "O0":
                extra = (
                    "; MindSpore's O3 casts BatchNorm too, here it stays float32"
                    if level == "O3"
                    else ""
                )
                out.append(
                    f"{key}: {level} -> torch.autocast in bfloat16 (CPU, and CUDA with "
                    f"bf16 support) else float16; weights stay float32{extra}"
                )
        scaling_set = self.loss_scale != d.loss_scale or self.loss_scale_type != d.loss_scale_type
        if self.amp_level != "O0" and scaling_set:  # no GradScaler without autocast
            out.append(
                f"loss_scale: {self.loss_scale:g} ({self.loss_scale_type}) -> dynamic "
                f"torch GradScaler starting at {self.grad_scaler_init_scale():g} when "
                "autocast runs in float16; unused in bfloat16/float32"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """All fields in declaration order as plain YAML/JSON values (tuples become lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        """The whole config as a YAML recipe; :func:`load_config` reads it back unchanged."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def diff_from_defaults(self) -> dict[str, Any]:
        """The fields whose value differs from ``Config()``'s, as plain values, in field order."""
        return {
            f.name: _plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(_DEFAULTS, f.name)
        }


#: Keys accepted so that MindCV recipes load, with no effect here: why (reported by notes()).
IGNORED_KEYS: dict[str, str] = {
    "device_target": "MindSpore-only; the device comes from 'device'",
    "jit_level": "MindSpore-only graph compile level",
    "dataset_sink_mode": "MindSpore-only data sinking",
    "amp_cast_list": "MindSpore-only; torch.autocast keeps its own op lists",
    "enable_modelarts": "MindSpore-only (ModelArts)",
    "multi_data_url": "MindSpore-only (ModelArts)",
    "data_url": "MindSpore-only (ModelArts)",
    "ckpt_url": "MindSpore-only (ModelArts)",
    "train_url": "MindSpore-only (ModelArts)",
    "aux_factor": "Res2Net models have no auxiliary head",
    "re_max_attempts": "torchvision's RandomErasing always tries 10 boxes",
    "eval_shuffle": "the order of evaluation images does not change the metrics",
    "drop_overflow_update": "GradScaler always skips steps whose gradients overflow",
}

#: Keys with no field of their own downstream: read through Config's methods (see notes()).
MAPPED_KEYS: dict[str, str] = {
    "config": "the recipe path, read by load_config",
    "mode": "use_compile()",
    "compile": "use_compile()",
    "amp_level": "amp_dtype()",
    "val_amp_level": "amp_dtype(validation=True)",
    "loss_scale": "grad_scaler_init_scale()",
    "loss_scale_type": "use_grad_scaler(): GradScaler is dynamic",
    "dynamic_loss_scale": "-> loss_scale_type",
    "filter_bias_and_bn": "-> weight_decay_filter",
    "lr_scale": "lr_scale_factor()",
    "dataset": "validated: 'imagenet' only",
    "dataset_download": "validated: False only",
    "aug_splits": "validated: 0 only",
}


def keys_help() -> str:
    """Every recipe key, grouped as MindCV groups them, with its default and one line of help
    (the text of ``res2net train --help``)."""
    lines = ["recipe keys (in the YAML file, or on the command line as --key value):"]
    for group, keys in HELP.items():
        lines.append(f"\n{group}:")
        for key, text in keys.items():
            default = _plain(getattr(_DEFAULTS, key))
            lines.append(f"  --{key} (default: {default!r})\n      {text}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# loading


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Config:
    """Read a MindCV-style YAML recipe (or none: defaults), apply `overrides`, validate.

    `overrides` is either an argv-style list -- ``["--lr", "0.2", "--data-dir=/x",
    "--scale", "[0.08, 1.0]", "--distribute", "False"]``; keys in MindCV's underscore
    spelling or with dashes; values parsed as YAML, then coerced to the field's type; a bare
    boolean flag (``--ema``) means True; ``-c PATH``/``--config PATH`` names the recipe and
    wins over `path` -- or a dict of key -> value. Later overrides win over earlier ones and
    over the file. Raises :class:`ConfigError` (a ValueError) with a one-line message.
    """
    if isinstance(overrides, dict):
        where = "in overrides"
        pairs = [(_normalize_key(str(k)), v) for k, v in overrides.items()]
    else:
        where = "on the command line"
        pairs = _parse_argv(list(overrides or []))
    for key, value in pairs:
        if key in ("c", "config"):
            path = value

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None and str(path) != "":
        path = os.fspath(path)
        file_where = f"in {path}"
        for key, value in _read_yaml(path).items():
            key = str(key)
            if key not in _FIELD_TYPES:
                raise _unknown_key_error(key, file_where)
            values[key] = _coerce(key, value, _FIELD_TYPES[key], file_where)
            sources[key] = file_where
        values["config"] = path
    for key, value in pairs:
        if key in ("c", "config"):
            continue
        if key not in _FIELD_TYPES:
            raise _unknown_key_error(key, where)
        if isinstance(value, str) and not isinstance(overrides, dict):
            value = _override_value(key, value)
        values[key] = _coerce(key, value, _FIELD_TYPES[key], where)
        sources[key] = where
    if path is not None and sources.get("data_dir") == f"in {path}":
        _refuse_commands(values, os.fspath(path))
    try:
        return Config(**values)
    except ConfigError as e:
        if e.key in sources:
            raise ConfigError(f"{e} ({sources[e.key]})", key=e.key) from None
        raise


def _refuse_commands(values: dict[str, Any], path: str) -> None:
    """A recipe is a shared, untrusted file: its `data_dir` may not be a URL or a `pipe:`
    command, which would run a program (curl, a shell); those come from the command line."""
    value = values.get("data_dir")
    if isinstance(value, str) and _SCHEME_RE.match(value) and not value.startswith("file:"):
        raise ConfigError(
            f"{path}: data_dir {short(value)} is a URL or command; a recipe may only name a local "
            "folder (reading it would run a program). Pass it on the command line: --data_dir ...",
            key="data_dir",
        )


def given_keys(
    path: str | os.PathLike[str] | None, argv: list[str] | None = None
) -> dict[str, str]:
    """Which keys the recipe and the command line set, and where: ``{"image_resize":
    "command line", "crop_pct": "recipe configs/x.yaml"}`` (the command line wins). Lets a
    caller rank the run's values against others, e.g. a checkpoint's own eval transform."""
    pairs = _parse_argv(list(argv or []))
    for key, value in pairs:
        if key in ("c", "config"):
            path = value
    given: dict[str, str] = {}
    if path is not None and str(path) != "":
        given = {str(k): f"recipe {os.fspath(path)}" for k in _read_yaml(os.fspath(path))}
    given.update({key: "command line" for key, _ in pairs if key not in ("c", "config")})
    return given


def _read_yaml(path: str) -> dict[Any, Any]:
    """The top-level mapping of a YAML file, read with ``yaml.SafeLoader`` once its node graph,
    aliases expanded, is known to hold at most MAX_YAML_NODES nodes (no "billion laughs")."""
    try:
        text = read_regular_file(path, "config file", MAX_CONFIG_BYTES).decode("utf-8")
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
                raise ConfigError(
                    f"{path}: more than {MAX_YAML_NODES} values once its aliases (*name) are "
                    "expanded; a recipe is a flat list of keys"
                )
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except FileNotFoundError as e:
        missing = "does not exist" in str(e)
        raise ConfigError(f"config file not found: {path}" if missing else str(e)) from None
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        if isinstance(e, UnicodeDecodeError):
            raise ConfigError(f"{path}: not UTF-8 text") from None
        raise ConfigError(str(e)) from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply; a recipe is a flat list of keys") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at = f"{path}: line {mark.line + 1}" if mark is not None else path
        problem = short(getattr(e, "problem", None) or str(e), 200).strip("'\"")
        if "python/" in problem:
            raise ConfigError(
                f"{at}: Python-specific YAML tags (like !!python/object) are not allowed in "
                "config files; write plain values"
            ) from None
        if isinstance(e, yaml.constructor.ConstructorError):
            raise ConfigError(f"{at}: unsupported YAML tag: {problem}") from None
        raise ConfigError(f"{at}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of 'key: value' lines at the top level, "
            f"got {type(data).__name__}"
        )
    return data


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Nodes in `node` with every alias expanded, counted without expanding anything (each
    shared node is counted once per use from its memoized size); a cycle counts as too many."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    sizes[key] = MAX_YAML_NODES + 1  # seen again before it is done: a cycle
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    sizes[key] = min(total, MAX_YAML_NODES + 1)
    return sizes[key]


def _parse_argv(argv: list[str]) -> list[tuple[str, Any]]:
    """``["--a", "1", "--b=2", "--flag"]`` -> ``[("a", "1"), ("b", "2"), ("flag", True)]``."""
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not (token.startswith("--") or token == "-c"):
            raise ConfigError(
                f"unexpected command-line argument {token!r}; "
                "options look like --key value or --key=value"
            )
        name, eq, inline = token.lstrip("-").partition("=")
        key = _normalize_key(name)
        if eq:
            pairs.append((key, inline))
            i += 1
        elif i + 1 < len(argv) and not (argv[i + 1].startswith("--") or argv[i + 1] == "-c"):
            pairs.append((key, argv[i + 1]))
            i += 2
        elif _FIELD_TYPES.get(key) in (bool, bool | None):
            pairs.append((key, True))  # bare flag, as MindCV's str2bool(nargs='?', const=True)
            i += 1
        else:
            raise ConfigError(f"command-line option {token} needs a value", key=key)
    return pairs


def _normalize_key(name: str) -> str:
    return name.strip().replace("-", "_")


def _override_value(key: str, raw: str) -> Any:
    """Parse one command-line value: plain strings stay as typed; the rest is read as YAML."""
    tp = _FIELD_TYPES.get(key, str)
    if tp is str:
        return raw
    if _is_optional(tp) and raw in _NONE_STRINGS:
        return None
    if tp == str | None:
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw  # coercion reports it if it does not fit the field


def _unknown_key_error(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key[:100], list(_FIELD_TYPES), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {short(key)} ({where}){hint}", key=key)


# ------------------------------------------------------------------------------------------
# coercion to the field types


class _Mismatch(Exception):
    pass


def _coerce(key: str, value: Any, tp: Any, where: str = "") -> Any:
    """`value` converted to type `tp`, or a ConfigError naming the key, value and type."""
    try:
        return _convert(value, tp)
    except _Mismatch:
        suffix = f" ({where})" if where else ""
        raise ConfigError(
            f"config key {key!r} expects {_type_name(tp)}, got {short(value)}{suffix}", key=key
        ) from None


def _convert(value: Any, tp: Any) -> Any:
    if _is_union(tp):
        args = typing.get_args(tp)
        if type(None) in args:
            if value is None or (isinstance(value, str) and value in _NONE_STRINGS):
                return None
            if value == "" and str in args:
                return None  # `auto_augment: ""` means no policy
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS + _FALSE_STRINGS:
            return value.strip().lower() in _TRUE_STRINGS
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
            try:
                value = float(value)
            except ValueError:
                raise _Mismatch from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, str):
            try:
                value = float(value.strip())  # YAML 1.1 reads 1e-6 as a string
            except ValueError:
                raise _Mismatch from None
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            text = value.strip().strip("[]()").strip()
            value = [part.strip() for part in text.split(",")] if text else []
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_convert(v, a) for v, a in zip(value, args))
    raise TypeError(f"unsupported field type {tp!r}")  # a bug in the schema, not in the input


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _is_optional(tp: Any) -> bool:
    return _is_union(tp) and type(None) in typing.get_args(tp)


def _type_name(tp: Any) -> str:
    if _is_union(tp):
        args = typing.get_args(tp)
        return " or ".join("None" if a is type(None) else _type_name(a) for a in args)
    if tp is bool:
        return "a bool (true/false)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        item = "integers" if args[0] is int else "numbers"
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {item}"
        return f"a list of {len(args)} {item}"
    return repr(tp)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ------------------------------------------------------------------------------------------
# validation


def _validate(c: Config) -> None:
    """Range and choice checks; the first failure raises a ConfigError naming the key."""

    def check(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"config key {key!r} {rule}, got {getattr(c, key)!r}", key=key)

    def choice(key: str, options: tuple[Any, ...]) -> None:
        check(getattr(c, key) in options, key, "must be one of " + ", ".join(map(repr, options)))

    def span(key: str) -> None:
        lo_hi = getattr(c, key)
        check(0 < lo_hi[0] <= lo_hi[1], key, "must be two increasing positive numbers [low, high]")

    def probability(key: str) -> None:
        check(0.0 <= getattr(c, key) <= 1.0, key, "must be in [0, 1]")

    # system
    choice("mode", (0, 1))
    check(c.val_interval >= 1, "val_interval", "must be >= 1")
    check(c.log_interval >= 1, "log_interval", "must be >= 1")
    check(c.seed >= 0, "seed", "must be >= 0")
    choice("jit_level", JIT_LEVELS)
    check(
        math.isfinite(c.dist_timeout) and c.dist_timeout > 0,
        "dist_timeout",
        "must be a positive number of seconds",
    )
    # dataset
    choice("dataset", ("imagenet",))
    check(
        not c.dataset_download,
        "dataset_download",
        "must be False: ImageNet-style folders are read from data_dir, never downloaded",
    )
    check(c.num_parallel_workers >= 0, "num_parallel_workers", "must be >= 0")
    check(c.num_samples is None or c.num_samples >= 1, "num_samples", "must be None or >= 1")
    check(c.batch_size >= 1, "batch_size", "must be >= 1")
    # augmentation
    check(c.image_resize >= 1, "image_resize", "must be >= 1")
    span("scale")
    span("ratio")
    probability("hflip")
    probability("vflip")
    cj = c.color_jitter
    cj_ok = cj is None or (
        cj >= 0
        if isinstance(cj, float)
        else len(cj) in (3, 4) and min(cj) >= 0 and (len(cj) == 3 or cj[3] <= 0.5)
    )
    check(
        cj_ok,
        "color_jitter",
        "must be None, a number >= 0, or 3-4 numbers >= 0 "
        "[brightness, contrast, saturation(, hue <= 0.5)]",
    )
    choice("interpolation", INTERPOLATIONS)
    if c.auto_augment is not None:
        try:
            parse_auto_augment(c.auto_augment)
        except ValueError as e:
            raise ConfigError(
                f"config key 'auto_augment' is invalid: {e}", key="auto_augment"
            ) from None
    check(
        c.aug_splits == 0,
        "aug_splits",
        "must be 0 (AugMix splits with a JSD loss are not implemented; auto_augment 'augmix' is)",
    )
    probability("re_prob")
    span("re_scale")
    span("re_ratio")
    check(
        not isinstance(c.re_value, str) or c.re_value == "random",
        "re_value",
        "must be a pixel value or 'random'",
    )
    check(c.re_max_attempts >= 1, "re_max_attempts", "must be >= 1")
    check(len(c.mean) == c.in_channels, "mean", f"must have in_channels={c.in_channels} values")
    check(len(c.std) == c.in_channels, "std", f"must have in_channels={c.in_channels} values")
    check(all(s > 0 for s in c.std), "std", "must be > 0")
    check(0.0 < c.crop_pct <= 2.0, "crop_pct", "must be in (0, 2] (above 1 pads the center crop)")
    check(c.mixup >= 0, "mixup", "must be >= 0")
    check(c.cutmix >= 0, "cutmix", "must be >= 0")
    probability("cutmix_prob")
    check(c.aug_repeats >= 0, "aug_repeats", "must be >= 0")
    # model
    check(c.model != "", "model", "must name a model")
    check(c.num_classes is None or c.num_classes >= 1, "num_classes", "must be None or >= 1")
    check(c.in_channels >= 1, "in_channels", "must be >= 1")
    for key in ("drop_rate", "drop_path_rate"):
        value = getattr(c, key)
        check(value is None or 0.0 <= value < 1.0, key, "must be None or in [0, 1)")
    check(c.keep_checkpoint_max >= 1, "keep_checkpoint_max", "must be >= 1")
    check(c.ckpt_save_interval >= 1, "ckpt_save_interval", "must be >= 1")
    choice("ckpt_save_policy", (*CKPT_SAVE_POLICIES, None))
    check(c.epoch_size >= 1, "epoch_size", "must be >= 1")
    check(0.0 < c.ema_decay < 1.0, "ema_decay", "must be in (0, 1)")
    check(c.clip_value > 0, "clip_value", "must be > 0")
    check(
        c.layer_decay is None or 0.0 < c.layer_decay <= 1.0,
        "layer_decay",
        "must be None or in (0, 1]",
    )
    check(c.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
    # optimizer
    choice("opt", OPTIMIZERS)
    check(
        not (c.opt == "adam" and c.use_nesterov),
        "use_nesterov",
        "must be False with opt 'adam' (MindSpore's Nesterov Adam has no torch "
        "counterpart; opt 'nadam' is the closest)",
    )
    check(c.momentum >= 0, "momentum", "must be >= 0")
    check(c.weight_decay >= 0, "weight_decay", "must be >= 0")
    choice("weight_decay_filter", WEIGHT_DECAY_FILTERS)
    check(c.eps > 0, "eps", "must be > 0")
    # scheduler
    choice("scheduler", SCHEDULERS)
    check(c.lr > 0, "lr", "must be > 0")
    check(c.min_lr >= 0, "min_lr", "must be >= 0")
    check(
        c.scheduler != "one_cycle" or c.min_lr > 0,
        "min_lr",
        "must be > 0 with scheduler one_cycle (its final lr)",
    )
    check(c.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
    probability("warmup_factor")
    check(
        c.decay_epochs >= (1 if c.scheduler == "step_decay" else 0),
        "decay_epochs",
        "must be >= 1 for step_decay (>= 0 otherwise)",
    )
    check(c.decay_rate > 0, "decay_rate", "must be > 0")
    ms = c.multi_step_decay_milestones
    check(
        all(m >= 0 for m in ms) and list(ms) == sorted(set(ms)),
        "multi_step_decay_milestones",
        "must be increasing epochs >= 0",
    )
    check(
        c.scheduler != "multi_step_decay" or len(ms) > 0,
        "multi_step_decay_milestones",
        "must not be empty with scheduler multi_step_decay",
    )
    for key, off in (("warmup_epochs", "0"), ("lr_epoch_stair", "False")):
        check(
            c.scheduler not in ("one_cycle", "cyclic") or not getattr(c, key),
            key,
            f"must be {off} with scheduler {c.scheduler} (as in MindCV)",
        )
    check(c.num_cycles >= 1, "num_cycles", "must be >= 1")
    check(c.cycle_decay > 0, "cycle_decay", "must be > 0")
    # loss
    choice("loss", LOSSES)
    check(0.0 <= c.label_smoothing < 1.0, "label_smoothing", "must be in [0, 1)")
    check(c.aux_factor >= 0, "aux_factor", "must be >= 0")
    choice("reduction", REDUCTIONS)
    # amp
    choice("amp_level", AMP_LEVELS)
    choice("val_amp_level", AMP_LEVELS)
    choice("loss_scale_type", LOSS_SCALE_TYPES)
    check(c.loss_scale >= 1, "loss_scale", "must be >= 1")
    # project
    choice("lr_scale", LR_SCALES)
    choice("on_bad_image", ON_BAD_IMAGE)
    probability("min_readable_images")
    trackers = [t.strip().lower() for t in c.log.split(",")] if c.log else []
    check(
        all(t in ("mlflow", "wandb", "none") for t in trackers),
        "log",
        "must be mlflow, wandb or both, comma-separated",
    )
    check(
        _DEVICE_RE.fullmatch(c.device) is not None,
        "device",
        "must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'",
    )


def _check_limits(c: Config) -> None:
    """Upper bounds (`LIMITS`): a value past them is a typo or an attack, never a real run."""
    for key, high in LIMITS.items():
        value = getattr(c, key)
        values = value if isinstance(value, tuple) else (value,)
        if any(v is not None and v > high for v in values):
            limit = f"{high:g}" if isinstance(high, float) else str(high)
            raise ConfigError(
                f"config key {key!r} must be at most {limit}, got {short(value)}", key=key
            )


_FIELD_TYPES: dict[str, Any] = typing.get_type_hints(Config)
_DEFAULTS = Config()
