"""Using a trained model: class names, top-k prediction on image files, and
`optimize_for_inference` (BatchNorm folding, fused convolutions, channels_last, compile)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from . import fileio
from .data import DataError, Geometry, load_image
from .errors import CheckpointError, MissingFile
from .factory import create_model
from .guards import check_regular_file, quoted, read_regular_file
from .lowprec import Calibration, calibration_batches, check_precision, quantize_int8, to_bf16
from .models import Bottle2neck, DlaBottle2neck
from .models.base import Res2NetBase
from .models.layers import res2_forward
from .weights.entry import EvalTransform, describe_sources, get_weights, resolve_eval_transform
from .weights.hubfolder import is_hub_name
from .weights.loading import Checkpoint, load_checkpoint, read_checkpoint

log = logging.getLogger("res2net.inference")


def imagenet_classes() -> list[str]:
    """ImageNet-1K's 1000 class names, from torchvision's package data (no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


MAX_CLASS_FILE_BYTES = 16 << 20  # ImageNet-21k's names take about 1 MB


def class_names(
    classes: str | None, num_classes: int, checkpoint: Checkpoint | None = None
) -> list[str]:
    """Names for the model's outputs: from `classes` (a training folder or a text file), the
    checkpoint's own (a training checkpoint's list, a Hub model's label names), ImageNet's for
    1000 classes, else the indices."""
    if classes:
        path = Path(classes)
        if path.is_dir():
            names = sorted(
                p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")
            )
        elif path.exists():
            data = read_regular_file(path, "--classes", max_bytes=MAX_CLASS_FILE_BYTES)
            try:
                text = data.decode()
            except UnicodeDecodeError:
                raise DataError(
                    f"--classes {quoted(path)} is not UTF-8 text: write one name per line"
                ) from None
            names = [line.strip() for line in text.splitlines() if line.strip()]
        else:
            raise MissingFile(f"--classes {classes!r} is neither a folder nor a file")
        if len(names) != num_classes:
            raise DataError(
                f"--classes gives {len(names)} names but the model has {num_classes} classes"
            )
        return names
    stored = checkpoint.classes if checkpoint is not None else None
    if stored is not None and len(stored) == num_classes:
        return list(stored)
    if num_classes == 1000:
        return imagenet_classes()
    return [str(i) for i in range(num_classes)]


def find_images(inputs: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """(image path, name relative to its folder without suffix) for image files and for every
    image inside folders (recursively). A missing path, or a folder without images, is an error."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    from .data import walk_files

    found: list[tuple[Path, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            inside = [
                Path(f) for f in walk_files(path) if has_file_allowed_extension(f, IMG_EXTENSIONS)
            ]
            if not inside:
                raise MissingFile(f"no images in folder '{path}'")
            found += [(f, f.relative_to(path).with_suffix("")) for f in sorted(inside)]
        elif path.exists():  # a file; a FIFO or device is refused before anything reads it
            found.append((check_regular_file(path, "image"), Path(path.stem)))
        else:
            raise MissingFile(f"no such image or folder: '{path}'")
    return found


def load_found_image(
    path: Path, named: set[Path], resize: Geometry | None = None
) -> Image.Image | str:
    """`load_image(path, resize=resize)` for an image `find_images` found. For one inside a
    folder that cannot be read, the reason instead: the caller skips it and the others still get
    their results. An image file named on the command line (in `named`) that cannot be read
    raises its `DataError`."""
    try:
        return load_image(path, resize=resize)
    except DataError as e:
        if path in named:
            raise
        return str(e)


def unused_path(path: Path, taken: set[Path]) -> Path:
    """`path`, or `<stem>_2<suffix>`, `_3`, ... when `taken` (resolved paths: the run's inputs
    and its earlier outputs) holds it, so that an output never replaces an input image or an
    earlier output of the same run (x.png and x.jpg in one folder; a/x.png and b/x.png given
    as files). The chosen path is added to `taken`."""
    candidate, n = path, 1
    while candidate.resolve() in taken:
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    taken.add(candidate.resolve())
    return candidate


def planned_outputs(out_dir: Path, files: list[tuple[Path, Path]], suffix: str) -> list[Path]:
    """The output path of each image `find_images` found, `out_dir/<name><suffix>` (renamed by
    `unused_path`: never an input, never twice), each checked now (`fileio.check_below`: no
    link, pipe or folder at its name or its folders), so that a bad output is refused before the
    model is read and built, not after."""
    taken = {path.resolve() for path, _ in files}  # never written over
    targets = []
    for _, rel in files:
        target = unused_path(out_dir / rel.parent / f"{rel.name}{suffix}", taken)
        fileio.check_below(out_dir, target.relative_to(out_dir))
        targets.append(target)
    return targets


def read_weights(
    model_name: str, *, ckpt_path: str | None = None, pretrained: str | bool = False
) -> Checkpoint | None:
    """The weights a command uses, read once: `ckpt_path`, the published weights (`pretrained`),
    or a Hub model's own (`hf-hub:`/`local-dir:` names); None when none is given."""
    if is_hub_name(model_name):
        if ckpt_path or pretrained:
            raise DataError(f"{model_name} brings its weights: drop --ckpt_path/--pretrained")
        return read_checkpoint(model_name)
    if ckpt_path:
        if pretrained:
            raise DataError("give either --ckpt_path or --pretrained, not both")
        return read_checkpoint(ckpt_path, model=model_name)
    if pretrained:
        return read_checkpoint(get_weights(model_name, pretrained))
    return None


def trained_model(model_name: str, checkpoint: Checkpoint | None) -> Res2NetBase:
    """The model to predict with, in eval mode, with the checkpoint's classifier (which must
    load whole: a classifier that does not fit is an error here, not a freshly initialised one
    giving confident nonsense). Without a checkpoint it has random weights, and one warning
    says so."""
    if checkpoint is None:
        log.warning("no --ckpt_path or --pretrained: random weights, its outputs mean nothing")
        return create_model(model_name).eval()
    if not checkpoint.num_classes:
        raise CheckpointError(
            f"{checkpoint.origin}: no classifier in this checkpoint, so nothing to predict "
            "classes with; give a checkpoint of a whole classifier (a training checkpoint, or "
            "converted weights)"
        )
    arch = str(checkpoint.arch) if is_hub_name(model_name) else model_name
    model = create_model(arch, num_classes=checkpoint.num_classes)
    load_checkpoint(model, checkpoint)  # strict, and never a fresh classifier
    if checkpoint.hub_config is not None:
        model.hub_config = checkpoint.hub_config
    return model.eval()


def model_classes_and_transform(
    model: Res2NetBase,
    checkpoint: Checkpoint | None,
    *,
    classes: str | None = None,
    image_resize: int | None = None,
    crop_pct: float | None = None,
) -> tuple[list[str], EvalTransform]:
    """The class names and the eval transform of a `trained_model`: `classes` and the flags
    when given, else what its checkpoint carries (its own, the published entry's, or a Hub
    config's), else the defaults."""
    given = (("image_resize", image_resize), ("crop_pct", crop_pct))
    flags = {k: v for k, v in given if v is not None}
    stored = checkpoint.eval_transform if checkpoint is not None else None
    spec, where = resolve_eval_transform(flags=flags, checkpoint=stored)
    names = class_names(classes, model.num_classes, checkpoint)
    log.info(describe_sources(spec, where))
    return names, spec


class Prediction(NamedTuple):
    """The top classes of one image file, or why it could not be read (`top` then empty)."""

    image: str
    top: list[tuple[str, float]]
    error: str | None = None


def iter_predictions(
    images: list[str],
    model_name: str,
    *,
    ckpt_path: str | None = None,
    pretrained: str | bool = False,
    classes: str | None = None,
    topk: int = 5,
    image_resize: int | None = None,
    crop_pct: float | None = None,
) -> Iterator[Prediction]:
    """Top-`topk` (class name, probability) of each image file (and each image in folders), one
    at a time. An image found in a folder that cannot be read gives its error instead, and the
    rest go on; an image file named in `images` is a `DataError`. The transform is
    `model_classes_and_transform`'s: `image_resize`/`crop_pct` when given, else the weights'."""
    files = find_images(images)
    named = {Path(image) for image in images}
    checkpoint = read_weights(model_name, ckpt_path=ckpt_path, pretrained=pretrained)
    model = trained_model(model_name, checkpoint)
    names, spec = model_classes_and_transform(
        model,
        checkpoint,
        classes=classes,
        image_resize=image_resize,
        crop_pct=crop_pct,
    )
    transform, resize = spec.transform(), spec.resize_crop()
    for path, _ in files:
        image = load_found_image(path, named, resize)  # decoded straight to the input size
        if isinstance(image, str):
            yield Prediction(str(path), [], image)
            continue
        with torch.no_grad():
            probs = model(transform(image).unsqueeze(0)).softmax(dim=1)[0]
        p, idx = probs.topk(min(topk, len(names)))
        top = [(names[i], float(v)) for v, i in zip(p.tolist(), idx.tolist())]
        yield Prediction(str(path), top)


def concat_convs(convs: list[nn.Conv2d]) -> nn.Conv2d:
    """One grouped conv equal to `convs` applied to consecutive channel slices of its input:
    the convs' weights (and biases) concatenated, groups = len(convs) * their groups."""
    first = convs[0]
    if len(convs) == 1:
        return first
    fused = nn.Conv2d(
        first.in_channels * len(convs),
        first.out_channels * len(convs),
        kernel_size=_pair(first.kernel_size),
        stride=_pair(first.stride),
        padding=first.padding if isinstance(first.padding, str) else _pair(first.padding),
        dilation=_pair(first.dilation),
        groups=first.groups * len(convs),
        bias=first.bias is not None,
    )
    fused.weight = nn.Parameter(torch.cat([c.weight.detach() for c in convs]), requires_grad=False)
    if first.bias is not None:
        biases = [c.bias.detach() for c in convs if c.bias is not None]  # all have one, as first
        fused.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
    return fused


def _pair(value: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's stored geometry (typed tuple[int, ...]) as the (h, w) its constructor takes."""
    height, width = value
    return height, width


def _either(value: int | tuple[int, ...]) -> tuple[int, ...]:
    """A pool's kernel size, stride or padding, given as one int or per dimension, as a tuple."""
    return (value, value) if isinstance(value, int) else tuple(value)


def _fold(conv: nn.Module, norm: nn.Module) -> nn.Conv2d:
    """`fuse_conv_bn_eval` on a block's conv and norm layer. torch types `norm` as a BatchNorm,
    but it reads only running_mean/var, eps, weight and bias, which `FrozenBatchNorm2d` has too."""
    assert isinstance(conv, nn.Conv2d)
    return fuse_conv_bn_eval(conv, norm)  # type: ignore[arg-type]  # see the docstring


def fold_batchnorms(module: nn.Module) -> None:
    """Fold, in place, each BatchNorm2d into the conv that feeds it: a Conv2d directly followed by
    a BatchNorm2d in an `nn.Sequential`, and the attribute pairs `conv`/`bn` and `conv1`/`bn1`
    (where `conv1` may be a Sequential ending in a conv, as in the deep stem). The BatchNorm
    becomes an `nn.Identity`."""
    for m in list(module.modules()):
        if isinstance(m, nn.Sequential):
            for i in range(len(m) - 1):
                first, second = m[i], m[i + 1]
                if isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d):
                    m[i] = fuse_conv_bn_eval(first, second)
                    m[i + 1] = nn.Identity()
        for conv_name, bn_name in (("conv", "bn"), ("conv1", "bn1")):
            conv, bn = getattr(m, conv_name, None), getattr(m, bn_name, None)
            if not isinstance(bn, nn.BatchNorm2d):
                continue
            if isinstance(conv, nn.Conv2d):
                setattr(m, conv_name, fuse_conv_bn_eval(conv, bn))
            elif isinstance(conv, nn.Sequential) and isinstance(conv[-1], nn.Conv2d):
                conv[-1] = fuse_conv_bn_eval(conv[-1], bn)
            else:
                continue
            setattr(m, bn_name, nn.Identity())


def pool_as_conv(pool: nn.Module | None, conv: nn.Conv2d) -> nn.Conv2d | None:
    """`pool` as a conv shaped like `conv` (the stage-first block's 3x3 convs), when it is one:
    an `AvgPool2d(3, stride, padding=1)` that counts the padding is a 3x3 conv of stride
    `stride` whose weight is 1/9 from each channel to itself. None for any other pool, or when
    `conv`'s geometry differs (dilated blocks)."""
    if not (
        isinstance(pool, nn.AvgPool2d)
        and conv.kernel_size == (3, 3)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and _either(pool.kernel_size) == (3, 3)
        and _either(pool.stride) == conv.stride
        and _either(pool.padding) == (1, 1)
        and pool.count_include_pad
        and not pool.ceil_mode
        and pool.divisor_override is None
    ):
        return None
    pooled = copy.deepcopy(conv)  # the same geometry, groups and bias
    channels = torch.arange(conv.out_channels)
    weight = torch.zeros_like(conv.weight)
    weight[channels, channels % (conv.in_channels // conv.groups)] = 1.0 / 9.0
    pooled.weight = nn.Parameter(weight, requires_grad=False)
    if conv.bias is not None:
        pooled.bias = nn.Parameter(torch.zeros_like(conv.bias), requires_grad=False)
    return pooled


class FusedRes2Block(nn.Module):
    """Eval-only form of a Res2Net bottleneck (`Bottle2neck` or `DlaBottle2neck`).

    Every BatchNorm is folded into the conv before it, and in the first block of a stage the
    `scale - 1` independent 3x3 convs become one grouped conv. With `pool_in_conv`, the average
    pool of the last group joins that conv too (groups = scale * cardinality; the pool is a conv
    of weight 1/9, and the ReLU after it changes nothing as its input is a ReLU's output), so no
    split, pool or concatenation is left; where the pool is not such a conv (dilated blocks),
    it stays apart. The outputs equal the block's eval outputs up to float rounding.
    """

    def __init__(self, block: Bottle2neck | DlaBottle2neck, *, pool_in_conv: bool) -> None:
        super().__init__()
        self.stage_first = block.stage_first
        self.conv1 = _fold(block.conv1, block.bn1)
        convs = [_fold(c, b) for c, b in zip(block.convs, block.bns)]
        pooled = pool_as_conv(block.pool, convs[0]) if block.stage_first and pool_in_conv else None
        self.whole = pooled is not None  # one grouped conv computes the whole multi-scale core
        if pooled is not None:
            convs.append(pooled)
        # the grouped conv reads all the channels the separate convs (and the pool) read
        self.width = block.width * len(convs) if block.stage_first else block.width
        self.convs = nn.ModuleList([concat_convs(convs)] if block.stage_first else convs)
        self.no_bns = (nn.Identity(),) * len(self.convs)  # folded into the convs
        self.pool = None if self.whole else block.pool
        self.conv3 = _fold(block.conv3, block.bn3)
        self.downsample = getattr(block, "downsample", None)
        if self.downsample is not None:
            fold_batchnorms(self.downsample)

    def train(self, mode: bool = True) -> FusedRes2Block:
        if mode:
            raise RuntimeError("this module was made by optimize_for_inference and is eval-only")
        return super().train(False)

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.relu_(self.conv1(x))
        if self.whole:
            out = torch.relu_(self.convs[0](out))
        else:
            out = res2_forward(
                out, self.width, self.convs, self.no_bns, self.pool, self.stage_first, torch.relu_
            )
        out = self.conv3(out)
        if self.downsample is not None:
            shortcut = self.downsample(x)
        out += x if shortcut is None else shortcut
        return torch.relu_(out)


def _replace_blocks(module: nn.Module, *, pool_in_conv: bool) -> None:
    for name, child in module.named_children():
        if isinstance(child, (Bottle2neck, DlaBottle2neck)):
            setattr(module, name, FusedRes2Block(child, pool_in_conv=pool_in_conv))
        else:
            _replace_blocks(child, pool_in_conv=pool_in_conv)


def optimize_for_inference(
    model: nn.Module,
    *,
    precision: str = "fp32",
    calibration: Calibration | None = None,
    channels_last: bool = True,
    compile: bool = False,
) -> nn.Module:
    """An eval-only copy of a Res2Net/DLA model (classifier or features_only) that computes the
    same outputs as `model.eval()` (up to float rounding), faster on CPUs and, on GPUs, at small
    batches (at large ones cuDNN's unfused kernels win; see docs/benchmarks.md).

    BatchNorms are folded into the convs, the independent 3x3 convs of each stage's first block
    become one grouped conv (compiled, with its average pool as part of that conv), and weights
    and activations use `channels_last`. `compile=True` wraps the result in `FrozenCompiled`
    (`torch.compile` with frozen weights; the first call compiles, which takes about a minute
    for a 50-layer net on 2 CPU cores).

    `precision="bf16"` stores weights and computes in bfloat16 (inputs and outputs stay float32);
    it needs native bf16 math (CPUs with AVX-512 BF16 or AMX, most GPUs) and refuses otherwise.
    `precision="int8"` (x86 CPUs) quantizes by post-training static quantization calibrated on
    `calibration` (a folder of images read at 224x224, or for other sizes the batches of
    `res2net.lowprec.calibration_batches(folder, image_size=N)`) and is always compiled: the
    first call takes a minute or two.
    `model` itself is not changed; calling `.train()` on the result raises.
    """
    check_precision(precision)
    if precision == "int8" and calibration is None:
        raise DataError("precision='int8' needs calibration=: a folder of typical input images")
    optimized = copy.deepcopy(model).eval()
    # compiled, the stage-first blocks' average pool costs more than running it as a share of
    # their grouped conv; eager, less (docs/benchmarks.md)
    _replace_blocks(optimized, pool_in_conv=compile or precision == "int8")
    fold_batchnorms(optimized)
    left = [
        n for n, m in optimized.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if left:
        raise DataError(
            f"cannot fold these BatchNorm layers (no conv before them): {', '.join(left)}"
        )
    optimized.requires_grad_(False)
    if channels_last:
        optimized = optimized.to(memory_format=torch.channels_last)
    if precision == "bf16":
        optimized = to_bf16(optimized)
    elif precision == "int8":
        assert calibration is not None  # refused above
        return FrozenCompiled(quantize_int8(optimized, calibration_batches(calibration)))
    return FrozenCompiled(optimized) if compile else optimized


class FrozenCompiled(nn.Module):
    """`torch.compile` of an eval-only module with its weights frozen into the graph (Inductor's
    `freezing`: constants folded, weights prepacked, convolutions fused with the ReLUs and adds
    after them) and a C++ wrapper calling the kernels (`cpp_wrapper`, measurably faster on CPU
    than the Python one). Runs without autograd; the first call compiles."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.compiled = torch.compile(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        # both options are read when a graph is compiled, and freezing needs autograd off
        with torch.no_grad(), torch._inductor.config.patch(freezing=True, cpp_wrapper=True):
            return self.compiled(x)
