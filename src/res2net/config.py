"""One typed schema for every run: MindCV's recipe keys plus a few PyTorch-only keys.

A run is one YAML file with MindCV's flat ``key: value`` layout (``configs/res2net/``) and
overrides (``cli/train.py`` reads them from ``--key value``): ``load_config(path, {"lr": 0.2})``.
Each key is declared once, as a :class:`Config` field: its type (a ``Literal`` for choices),
default and :class:`Key` (help line, bounds, MindCV status, and trust: a key that decides what is
moved aside, contacted or written outside the run folder is the command line's, never a recipe's)
feed the coercion, the value checks, ``cli/train.py``'s ``--help`` and README table and
``engine/train.py``'s notes. Dataclass field metadata rather than pydantic (only a dependency of
the ``tracking`` extra): the coercion follows MindCV's argparse and YAML 1.1 quirks (``1e-6`` and
``None`` read as text, ``0.5,2`` for a pair) and every message names its key and source in one
line; pydantic would need those quirks as pre-processing and its errors translated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import operator
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Literal, NoReturn, Union

import yaml

from . import schema as s
from .errors import ConfigError
from .guards import printable, read_yaml, short
from .schema import IMAGENET_MEAN, IMAGENET_STD, REFERENCE_BATCH_SIZE

__all__ = ["Config", "ConfigError", "Key", "KEYS", "TYPES", "choices", "load_config", "read_recipe"]

# An optional key's "no value" (YAML maps only null and ~ to None; `auto_augment: ""`: no policy)
_NONE_STRINGS = ("", "None", "none", "null", "Null", "NULL", "~")
_TRUE_STRINGS, _FALSE_STRINGS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")  # `pipe:`, `https:`; not `C:`
MAX_CONFIG_BYTES, MAX_YAML_NODES = 1 << 20, 10_000


@dataclass(frozen=True)
class Key:
    """What a recipe key means beyond its type and default (``Config`` field metadata)."""

    help: str
    group: str = ""  # set on the first key of each of MindCV's groups
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    rule: str = ""  # the message when a choice fails, where the generated one is terse
    mapped: str = ""  # how a key with no reader of its own takes effect
    ignored: str = ""  # why a MindCV key has no effect here (reported when set)
    trust: str = ""  # what a command-line-only value decides
    untrusted: Callable[[Any], bool] | None = None  # which values; default: any but the default

    def bounds(self) -> list[tuple[str, float]]:
        """(operator, value) of each bound, lower first."""
        pairs = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
        return [(op, v) for op, v in pairs if v is not None]


def key(default: Any, help: str, **meta: Any) -> Any:
    """A Config field: its default and its :class:`Key`."""
    return dataclasses.field(default=default, metadata={"key": Key(help, **meta)})


def _outside(path: str) -> bool:
    return os.path.isabs(path) or path.startswith("~") or ".." in PurePath(path).parts


def _command(value: str) -> bool:
    return _SCHEME_RE.match(value) is not None and not value.startswith("file:")


def _hub(name: str) -> bool:
    return name.startswith(("hf-hub:", "local-dir:"))


_MS, _MA = "MindSpore-only", "MindSpore-only (ModelArts)"
_CONTACTS = "chooses what is contacted and where run data goes"
_RUNS_PROGRAM = "is a URL or command (reading it would run a program)"
_NO_DOWNLOAD = "must be False: ImageNet-style folders are read from data_dir, never downloaded"
_NO_SPLITS = "must be 0 (AugMix splits with a JSD loss are not implemented; 'augmix' is)"


@dataclass(frozen=True)
class Config:
    """Every setting of a training or validation run, with MindCV's names and defaults (its
    ``config.py``): a MindCV recipe loads unchanged. Immutable (:meth:`replace` derives a checked
    copy), sequences are tuples; ``mean``/``std`` stay in MindCV's 0..255 pixel units."""

    # One line per key: default, help line, bounds (ge/gt/le/lt; some le only catch typos, far
    # above any real run), MindCV status (`mapped`/`ignored` and why), `trust` (command line only).
    # fmt: off
    config: str = key("", "YAML recipe whose keys set the defaults (-c)", group="System parameters",
                      mapped="the recipe path, read by load_config")
    mode: Literal[0, 1] = key(0, "0: GRAPH_MODE -> torch.compile on CUDA (eager on CPU); 1: eager "
                              "everywhere", mapped="use_compile()")
    distribute: bool = key(False, "DistributedDataParallel from torchrun's environment")
    val_while_train: bool = key(False, "validate on val_split while training")
    val_interval: int = key(1, "validate every this many epochs", ge=1)
    log_interval: int = key(100, "log (and write metrics) every this many steps", ge=1)
    seed: int = key(42, "seed of every random number (order, augmentations, weights)", ge=0,
                    le=2**32 - 1)
    device_target: str = key("Ascend", "Ascend/GPU/CPU", ignored=f"{_MS}; see 'device'")
    jit_level: s.JitLevel = key("O2", "graph compile level", ignored=_MS)

    dataset: Literal["imagenet"] = key("imagenet", "dataset type: an ImageNet-style folder or "
                                       "shards", group="Dataset parameters", mapped="checked only")
    data_dir: str = key("./", "folder with <train_split>/<class>/* and <val_split>/<class>/*, or "
                        "shards", untrusted=_command, trust=_RUNS_PROGRAM)
    train_split: str = key("train", "training sub-folder of data_dir")
    val_split: str = key("val", "validation sub-folder of data_dir")
    dataset_download: Literal[False] = key(False, "MindCV downloads MNIST/CIFAR only",
                                           mapped="checked only", rule=_NO_DOWNLOAD)
    num_parallel_workers: int = key(8, "DataLoader worker processes per rank", ge=0, le=256)
    shuffle: bool = key(True, "shuffle the training set every epoch")
    num_samples: int | None = key(None, "train on this many images (a seeded subset); None: all",
                                  ge=1)
    batch_size: int = key(128, "images per device per step", ge=1, le=1 << 16)
    drop_remainder: bool = key(True, "drop the last incomplete training batch")

    image_resize: int = key(224, "training crop and evaluation size (pixels)", ge=1, le=4096,
                            group="Augmentation parameters")
    scale: tuple[float, float] = key((0.08, 1.0), "random resized crop area range [low, high]")
    ratio: tuple[float, float] = key((0.75, 1.333), "random resized crop aspect ratio range")
    hflip: float = key(0.5, "horizontal flip probability", ge=0, le=1)
    vflip: float = key(0.0, "vertical flip probability", ge=0, le=1)
    color_jitter: float | tuple[float, ...] | None = key(0.4, "brightness/contrast/saturation "
                                                         "factor, or [b, c, s(, hue)]", ge=0)
    interpolation: s.Interpolation = key("bilinear", "resize interpolation")
    auto_augment: str | None = key(None, "policy: randaug-m9-n2-mstd0.5-inc1, autoaug(-mstd0.5), "
                                   "autoaugr, trivialaugwide(-m31), augmix-m3-w3, 3a; None: off")
    aug_splits: Literal[0] = key(0, "AugMix splits with a JSD loss: not implemented",
                                 mapped="checked only", rule=_NO_SPLITS)
    re_prob: float = key(0.0, "random erasing probability", ge=0, le=1)
    re_scale: tuple[float, float] = key((0.02, 0.33), "random erasing area range")
    re_ratio: tuple[float, float] = key((0.3, 3.3), "random erasing aspect ratio range")
    re_value: float | str = key(0, "random erasing fill: a pixel value or 'random' (noise)")
    re_max_attempts: int = key(10, "random erasing: boxes tried", ge=1, le=1000,
                               ignored="torchvision's RandomErasing always tries 10 boxes")
    mean: tuple[float, ...] = key(IMAGENET_MEAN, "per-channel mean in 0..255 units")
    std: tuple[float, ...] = key(IMAGENET_STD, "per-channel std in 0..255 units", gt=0)
    crop_pct: float = key(0.875, "evaluation: resize to image_resize / crop_pct, center crop "
                          "(above 1 pads it)", gt=0, le=2)
    mixup: float = key(0.0, "mixup beta(alpha, alpha); 0: off", ge=0)
    cutmix: float = key(0.0, "cutmix beta(alpha, alpha); 0: off", ge=0)
    cutmix_prob: float = key(1.0, "probability that a batch is mixed (mixup and/or cutmix)", ge=0,
                             le=1)
    aug_repeats: int = key(0, "repeated augmentation: draws of each image per epoch (0/1: off)",
                           ge=0, le=64)

    # MindCV's default model is "mobilenet_v2_035_224", which this package does not have.
    model: str = key("res2net50", "model name (res2net models)", group="Model parameters",
                     untrusted=_hub, trust="is fetched from the Hugging Face Hub or a folder")
    num_classes: int | None = key(None, "classes; None: from the training folders", ge=1,
                                  le=1 << 20)
    in_channels: int = key(3, "input channels", ge=1, le=64)
    drop_rate: float | None = key(None, "dropout before the classifier", ge=0, lt=1)
    drop_path_rate: float | None = key(None, "stochastic depth rate", ge=0, lt=1)
    pretrained: bool = key(False, "start from published weights")
    ckpt_path: str = key("", "start from this checkpoint (any format)")
    resume_opt: bool = key(False, "with ckpt_path: also restore optimizer and lr position")
    keep_checkpoint_max: int = key(10, "epoch checkpoints kept", ge=1, le=10_000)
    ckpt_save_dir: str = key("./ckpt", "checkpoint and run output folder", untrusted=_outside,
                             trust="is outside the folder the run starts in (absolute, ~ or ..)")
    ckpt_save_interval: int = key(1, "save an epoch checkpoint every this many epochs", ge=1)
    ckpt_save_policy: s.CkptSavePolicy | None = key("latest_k", "epoch checkpoints kept: the "
                                                    "latest or the best by val top-1")
    epoch_size: int = key(90, "training epochs", ge=1, le=100_000)
    dataset_sink_mode: bool = key(True, "data sinking", ignored=_MS)
    ema: bool = key(False, "keep an exponential moving average of the weights")
    ema_decay: float = key(0.9999, "EMA decay per step", gt=0, lt=1)
    clip_grad: bool = key(False, "clip the gradient norm")
    clip_value: float = key(15.0, "gradient norm limit with clip_grad", gt=0)
    layer_decay: float | None = key(None, "layer-wise lr decay: lr x layer_decay^(5 - k) for "
                                    "stem(0), layer1..4, head(5)", gt=0, le=1)
    gradient_accumulation_steps: int = key(1, "batches per optimizer step", ge=1, le=1 << 16)

    opt: s.Optimizer = key("adam", "optimizer", group="Optimizer parameters")
    momentum: float = key(0.9, "momentum (sgd, momentum, nesterov, rmsprop)", ge=0)
    weight_decay: float = key(1e-6, "weight decay", ge=0)
    use_nesterov: bool = key(False, "Nesterov momentum (sgd, momentum, nesterov)")
    weight_decay_filter: s.WeightDecayFilter = key("disable", "no decay for: nothing, norm layers "
                                                 "(auto), or norm layers and biases")
    filter_bias_and_bn: bool | None = key(None, "older MindCV key: True -> weight_decay_filter "
                                          "norm_and_bias", mapped="-> weight_decay_filter")
    eps: float = key(1e-10, "rmsprop's epsilon (MindCV passes it to rmsprop only)", gt=0)

    scheduler: s.Scheduler = key("cosine_decay", "lr schedule", group="Scheduler parameters")
    lr: float = key(0.001, "peak learning rate", gt=0, le=100.0)
    min_lr: float = key(1e-6, "final lr of cosine; lower bound of cyclic and one_cycle", ge=0,
                        le=100.0)
    warmup_epochs: int = key(3, "linear warmup epochs (before the schedule proper)", ge=0,
                             le=100_000)
    warmup_factor: float = key(0.0, "warmup starts at lr x warmup_factor", ge=0, le=1)
    decay_epochs: int = key(100, "cosine: epochs per cycle; step_decay: epochs between decays",
                            ge=0, le=100_000)
    decay_rate: float = key(0.9, "step/multi_step/exponential factor; polynomial power", gt=0)
    multi_step_decay_milestones: tuple[int, ...] = key((30, 60, 90), "epochs (counted after "
                                                       "warmup) where lr x decay_rate",
                                                       ge=0, le=100_000)
    lr_epoch_stair: bool = key(False, "hold lr constant within each epoch")
    num_cycles: int = key(1, "cosine and cyclic: number of cycles", ge=1, le=100_000)
    cycle_decay: float = key(1.0, "cosine: peak lr factor per cycle", gt=0)

    loss: s.Loss = key("CE", "cross entropy or binary cross entropy, any case",
                     group="Loss parameters")
    label_smoothing: float = key(0.0, "label smoothing", ge=0, lt=1)
    aux_factor: float = key(0.0, "weight of auxiliary logits' loss", ge=0,
                            ignored="Res2Net models have no auxiliary head")
    reduction: s.Reduction = key("mean", "loss reduction")

    amp_level: s.AmpLevel = key("O0", "O0: fp32; O1-O3: torch.autocast (bf16 where supported, else "
                              "fp16)", mapped="amp_dtype()",
                              group="Auto mixing precision parameters")
    val_amp_level: s.AmpLevel = key("O0", "amp_level for validation",
                                  mapped="amp_dtype(validation=True)")
    amp_cast_list: str | None = key(None, "cast list", ignored=f"{_MS}; autocast has its own")
    loss_scale_type: s.LossScaleType = key("fixed", "GradScaler (fp16 only) is always dynamic",
                                         mapped="use_grad_scaler(): GradScaler is dynamic")
    loss_scale: float = key(1.0, "GradScaler's initial scale (fp16 only)", ge=1, le=2.0**32,
                            mapped="grad_scaler_init_scale()")
    dynamic_loss_scale: bool | None = key(None, "older MindCV key: True -> loss_scale_type "
                                          "dynamic", mapped="-> loss_scale_type")
    drop_overflow_update: bool = key(False, "skip steps whose gradients overflow",
                                     ignored="GradScaler always skips them")
    eval_shuffle: bool = key(False, "shuffle evaluation data",
                             ignored="the order of evaluation images does not change the metrics")

    enable_modelarts: bool = key(False, "Huawei ModelArts", ignored=_MA,
                                 group="ModelArts (MindSpore-only, ignored)")
    multi_data_url: str = key("/cache/data/", "ModelArts", ignored=_MA)
    data_url: str = key("/cache/data/", "ModelArts", ignored=_MA)
    ckpt_url: str = key("/cache/output/", "ModelArts", ignored=_MA)
    train_url: str = key("/cache/output/", "ModelArts", ignored=_MA)

    resume: str = key("", "'' fresh run, 'auto' (last.pt in ckpt_save_dir) or a checkpoint path",
                      group="PyTorch-only parameters")
    lr_scale: s.LrScale = key("none", f"linear: lr x global batch / {REFERENCE_BATCH_SIZE}",
                            mapped="lr_scale_factor()")
    channels_last: bool = key(False, "channels_last memory format")
    compile: bool = key(False, "torch.compile on any device", mapped="use_compile()")
    on_bad_image: s.OnBadImage = key("skip", "skip (log) or error on images that fail to decode")
    min_readable_images: float = key(0.5, "an epoch fails when a smaller fraction of its images "
                                     "decode", ge=0, le=1)
    overwrite: bool = key(False, "a fresh run moves to <dir>.replaced-<time> the run "
                          "files already in ckpt_save_dir",
                          trust="moves the run files already in ckpt_save_dir aside")
    fast_decode: bool = key(True, "decode training crops at reduced size, resize as tensors")
    device: str = key("auto", "auto, cpu, cuda, cuda:N, mps")
    zero_init_last: bool = key(False, "start each residual branch at zero")
    sync_bn: bool = key(False, "BatchNorm statistics over the global batch (CUDA, distributed)")
    freeze_bn: bool = key(False, "BatchNorm uses and keeps its running statistics")
    dist_timeout: float = key(600.0, "seconds a rank waits for the others before the job fails",
                              gt=0, le=7 * 24 * 3600.0)
    log: str = key("", "experiment trackers: mlflow, wandb, or mlflow,wandb", trust=_CONTACTS)
    log_uri: str = key("", "MLflow tracking URI ('' = SQLite in ./mlruns)", trust=_CONTACTS)
    log_project: str = key("res2net", "MLflow experiment / W&B project", trust=_CONTACTS)
    # fmt: on

    def __post_init__(self) -> None:
        for name in TYPES:
            object.__setattr__(self, name, _coerce(name, getattr(self, name)))
        # Older MindCV spellings of current keys.
        if self.filter_bias_and_bn and self.weight_decay_filter == "disable":
            object.__setattr__(self, "weight_decay_filter", "norm_and_bias")
        if self.dynamic_loss_scale and self.loss_scale_type == "fixed":
            object.__setattr__(self, "loss_scale_type", "dynamic")
        _check_rules(self)

    def replace(self, **changes: Any) -> Config:
        """A copy with `changes` applied (checked like any Config)."""
        for name in changes:
            if name not in TYPES:
                raise _unknown_key_error(name, "in replace()")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """All fields in declaration order as plain YAML/JSON values (tuples become lists)."""
        values = {name: getattr(self, name) for name in TYPES}
        return {name: list(v) if isinstance(v, tuple) else v for name, v in values.items()}

    def to_yaml(self) -> str:
        """The whole config as a YAML recipe; :func:`load_config` reads it back unchanged."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


#: Every key's declared type.
TYPES: dict[str, Any] = typing.get_type_hints(Config)
#: Every key's declaration, in MindCV's order (``cli/train.py`` renders them as help).
KEYS: dict[str, Key] = {f.name: f.metadata["key"] for f in dataclasses.fields(Config)}


def choices(name: str) -> tuple[Any, ...]:
    """The values key `name`'s ``Literal`` allows (besides None where it is optional), or ()."""
    tp = TYPES[name]
    args = typing.get_args(tp) if _is_union(tp) else (tp,)
    return next((typing.get_args(a) for a in args if typing.get_origin(a) is Literal), ())


# --- reading a recipe -------------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: Mapping[str, Any] | None = None,
    *,
    source: str = "in overrides",
) -> Config:
    """A MindCV-style YAML recipe (or none: defaults) with `overrides`, checked: a ConfigError
    names key and source (the file, or `source`) in one line. `overrides` map keys (``data_dir``
    or ``data-dir``) to values, text too (``"0.2"``, ``"[0.08, 1]"``, ``"None"``); they win over
    the file and may set the keys a recipe may not."""
    path = os.fspath(path) if path is not None else ""
    recipe = read_recipe(path) if path else {}
    flags = {str(k).strip().replace("-", "_"): v for k, v in (overrides or {}).items()}
    sources = {name: f"in {printable(path)}" for name in recipe} | dict.fromkeys(flags, source)
    for name, where in sources.items():
        if name not in TYPES:
            raise _unknown_key_error(name, where)
    try:
        cfg = Config(**(recipe | flags | ({"config": path} if path else {})))
    except ConfigError as e:
        if e.key not in sources:
            raise
        raise ConfigError(f"{e} ({sources[e.key]})", key=e.key) from None
    # A recipe is a shared, untrusted file: it tunes a run, but what is moved aside, contacted
    # or written outside the run folder is the command line's to say.
    for name in (n for n in recipe if n not in flags and KEYS[n].trust):
        k, value = KEYS[name], getattr(cfg, name)
        if k.untrusted(value) if k.untrusted else value != getattr(_DEFAULTS, name):
            flag = f"--{name}" if value is True else f"--{name} ..."
            raise ConfigError(f"{printable(path)}: {name} {short(value)} {k.trust}; only the "
                              f"command line may set it: pass {flag}", key=name)  # fmt: skip
    return cfg


def read_recipe(path: str) -> dict[str, Any]:
    """The keys and values of YAML recipe `path`, as written (checked by :func:`load_config`)."""
    data = read_yaml(path, "config file", MAX_CONFIG_BYTES, MAX_YAML_NODES) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{printable(path)}: expected a mapping of 'key: value' lines at the "
                          f"top level, got {type(data).__name__}")  # fmt: skip
    return {str(k): v for k, v in data.items()}


def _unknown_key_error(name: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(name[:100], list(TYPES), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {short(name)} ({where}){hint}", key=name)


# --- coercion to the declared types and the value checks --------------------------------------

_MISMATCH = (TypeError, ValueError, OverflowError)  # what the conversions below raise


def _coerce(name: str, value: Any) -> Any:
    """`value` as key `name`'s type, spelled as MindCV's YAML or argparse may spell it (``1e-6``
    and ``None`` as text, ``0.5,2`` for a pair), within its declared choices and bounds; else a
    ConfigError naming key and value."""
    tp, k = TYPES[name], KEYS[name]
    try:
        out = _convert(value, tp)
    except _MISMATCH:
        _fail(name, value, f"expects {_type_name(tp)}")
    if isinstance(out, str) and "\x00" in out:
        raise ConfigError(f"config key {name!r} contains a NUL character: {short(out)}", key=name)
    options = choices(name)
    if isinstance(out, str):  # MindCV matches the names in any case: `SGD`, `ce`, `o2`
        out = next((o for o in options if isinstance(o, str) and o.lower() == out.lower()), out)
    if options and out is not None and out not in options:
        _fail(name, out, k.rule or "must be one of " + ", ".join(map(repr, options)))
    numbers = out if isinstance(out, tuple) else (out,) if isinstance(out, (int, float)) else ()
    for op, bound in k.bounds():
        if not all(_OPS[op](number, bound) for number in numbers):
            optional = "None or " if type(None) in typing.get_args(tp) else ""
            _fail(name, out, f"must be {optional}{op} {bound}")
    return out


def _convert(value: Any, tp: Any) -> Any:
    """`value` as type `tp`, or one of `_MISMATCH`."""
    args, text = typing.get_args(tp), value.strip() if isinstance(value, str) else None
    if typing.get_origin(tp) is Literal:  # _coerce compares it with the choices
        return _convert(value, type(args[0]))
    if _is_union(tp):
        if type(None) in args and (value is None or value in _NONE_STRINGS):
            return None
        for arg in (a for a in args if a is not type(None)):
            with contextlib.suppress(*_MISMATCH):
                return _convert(value, arg)
        raise TypeError
    if typing.get_origin(tp) is tuple:
        if text is not None and (text[:1] in ("[", "(") or "," in text):  # "[0.08, 1]", "0.08,1"
            text = text.strip("[]()").strip()
            value = [part.strip() for part in text.split(",")] if text else []
        if not isinstance(value, (list, tuple)):
            raise TypeError
        items = args[:1] * len(value) if args[1:] == (...,) else args
        if len(items) != len(value):
            raise ValueError
        return tuple(_convert(v, t) for v, t in zip(value, items))
    if tp is bool:
        if text is not None and text.lower() in _TRUE_STRINGS + _FALSE_STRINGS:
            return text.lower() in _TRUE_STRINGS
        if isinstance(value, int) and value in (0, 1):  # True and False too
            return bool(value)
        raise TypeError
    if tp is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        if isinstance(value, (int, float)):
            return str(value)
        raise TypeError
    if text is not None:  # YAML 1.1 reads 1e-6 as text
        value = int(text) if tp is int and re.fullmatch(r"[-+]?\d{1,100}", text) else float(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError
    if tp is int and isinstance(value, float) and not value.is_integer():
        raise ValueError
    return tp(value)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        return _type_name(type(args[0]))
    if _is_union(tp):
        return " or ".join("None" if a is type(None) else _type_name(a) for a in args)
    if typing.get_origin(tp) is tuple:
        item = "integers" if args[0] is int else "numbers"
        return f"a list of {item}" if args[1:] == (...,) else f"a list of {len(args)} {item}"
    return {bool: "a bool (true/false)", int: "an integer", float: "a number", str: "a string"}[tp]


def _fail(name: str, value: Any, rule: str) -> NoReturn:
    raise ConfigError(f"config key {name!r} {rule}, got {short(value)}", key=name)


def _check_rules(c: Config) -> None:
    """The checks that span a key's parts or several keys."""

    def check(ok: bool, name: str, rule: str) -> None:
        if not ok:
            _fail(name, getattr(c, name), rule)

    for name in ("scale", "ratio", "re_scale", "re_ratio"):
        low, high = getattr(c, name)
        check(0 < low <= high, name, "must be two increasing positive numbers [low, high]")
    cj = c.color_jitter
    check(not isinstance(cj, tuple) or len(cj) == 3 or (len(cj) == 4 and cj[3] <= 0.5),
          "color_jitter", "must be None, a number >= 0, or 3-4 numbers >= 0 [brightness, "
          "contrast, saturation(, hue <= 0.5)]")  # fmt: skip
    try:
        s.parse_auto_augment(c.auto_augment) if c.auto_augment is not None else None
    except ValueError as e:
        raise ConfigError(f"config key 'auto_augment' is invalid: {e}", key="auto_augment") from e
    check(not isinstance(c.re_value, str) or c.re_value == "random", "re_value",
          "must be a pixel value or 'random'")  # fmt: skip
    for name in ("mean", "std"):
        check(len(getattr(c, name)) == c.in_channels, name,
              f"must have in_channels={c.in_channels} values")  # fmt: skip
    check(c.model != "", "model", "must name a model")
    check(not (c.opt == "adam" and c.use_nesterov), "use_nesterov", "must be False with opt "
          "'adam' (MindSpore's Nesterov Adam has no torch counterpart; opt 'nadam' is the "
          "closest)")  # fmt: skip
    check(c.scheduler != "one_cycle" or c.min_lr > 0, "min_lr",
          "must be > 0 with scheduler one_cycle (its final lr)")  # fmt: skip
    check(c.decay_epochs >= (c.scheduler == "step_decay"), "decay_epochs",
          "must be >= 1 for step_decay (>= 0 otherwise)")  # fmt: skip
    ms = c.multi_step_decay_milestones
    check(list(ms) == sorted(set(ms)), "multi_step_decay_milestones", "must be increasing epochs")
    check(c.scheduler != "multi_step_decay" or len(ms) > 0, "multi_step_decay_milestones",
          "must not be empty with scheduler multi_step_decay")  # fmt: skip
    for name, off in (("warmup_epochs", "0"), ("lr_epoch_stair", "False")):
        check(c.scheduler not in ("one_cycle", "cyclic") or not getattr(c, name), name,
              f"must be {off} with scheduler {c.scheduler} (as in MindCV)")  # fmt: skip
    trackers = [t.strip().lower() for t in c.log.split(",")] if c.log else []
    check(all(t in ("mlflow", "wandb", "none") for t in trackers), "log",
          "must be mlflow, wandb or both, comma-separated")  # fmt: skip
    check(re.fullmatch(r"(auto|cpu|mps|cuda(:\d+)?|xpu(:\d+)?)", c.device) is not None, "device",
          "must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")  # fmt: skip


_DEFAULTS = Config()
