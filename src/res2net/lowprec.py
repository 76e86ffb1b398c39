"""Low-precision inference: bfloat16 weights and activations on CPUs with native bf16 math, and
int8 by post-training static quantization calibrated on a folder of images.

int8 uses PyTorch's PT2E flow from torchao (`torch.export`, `prepare_pt2e` with the
`X86InductorQuantizer`, calibration, `convert_pt2e`) and compiles the result with Inductor
and frozen weights, which lowers each quantize-conv-dequantize pattern to one oneDNN int8
convolution (VNNI) fused with its ReLU and residual add. Weights are quantized per output
channel (symmetric int8), activations per tensor (affine uint8) from the ranges seen on the
calibration images. The input of each channel split (the multi-scale groups of a Res2Net
block) is quantized as well, so the 1x1 conv before it writes uint8 instead of float32, as
OpenVINO's int8 graph does. torchao's `quantize_` configs are not used: they quantize `nn.Linear`
layers, and nearly all of a Res2Net's work is in convolutions.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, MissingFile
from .schema import PRECISIONS

Calibration = str | os.PathLike | torch.Tensor | Iterable[torch.Tensor]


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """Whether `device` computes in bfloat16 natively: a CUDA GPU that supports it, or a CPU
    with AVX-512 BF16 or AMX (elsewhere oneDNN emulates bf16, slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def check_bf16(device: torch.device | str = "cpu") -> None:
    """One clear line when bf16 would be emulated (slower than fp32) on `device`."""
    if not bf16_supported(device):
        raise ConfigError(
            f"precision='bf16' needs native bfloat16 math and this {torch.device(device).type} has "
            "none (on CPUs: AVX-512 BF16 or AMX): use precision='fp32', or 'int8' on x86 CPUs"
        )


class CastInput(nn.Module):
    """Runs `module` in `dtype`: inputs are cast to it, outputs cast back to float32, so callers
    feed and read float32 tensors whatever precision the weights are in."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.dtype = dtype

    def train(self, mode: bool = True) -> CastInput:
        if mode:
            raise RuntimeError("this module was made by optimize_for_inference and is eval-only")
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        y = self.module(x.to(self.dtype))
        return y.float() if isinstance(y, torch.Tensor) else [t.float() for t in y]


def to_bf16(model: nn.Module) -> nn.Module:
    """`model` (already eval-only) with bfloat16 weights, taking and returning float32."""
    check_bf16(next(model.parameters()).device)
    return CastInput(model.to(torch.bfloat16), torch.bfloat16)


def image_files(folder: str | os.PathLike) -> list[str]:
    """The image files (by extension) under `folder`, sorted; a clear error when there are none."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from .data import walk_files

    if not Path(folder).is_dir():
        raise MissingFile(f"calibration folder {str(folder)!r} does not exist or is not a folder")
    files = [f for f in walk_files(folder) if f.lower().endswith(IMG_EXTENSIONS)]
    if not files:
        raise ConfigError(
            f"calibration folder {str(folder)!r} holds no images "
            f"({', '.join(IMG_EXTENSIONS[:4])}, ...): "
            "give a folder of typical inputs, e.g. the training images"
        )
    return files


def calibration_batches(
    source: Calibration,
    *,
    image_size: int = 224,
    crop_pct: float = 0.875,
    batch_size: int = 8,
    max_images: int = 64,
) -> list[torch.Tensor]:
    """Calibration input as a list of NCHW float batches: from a folder of images (up to
    `max_images`, spread evenly over the sorted files so that every class folder contributes,
    each through the evaluation transform), from one NCHW tensor, or from an iterable of them."""
    if isinstance(source, (str, os.PathLike)):
        from .data import eval_transform, load_image

        files = image_files(source)
        n = min(max_images, len(files))
        files = [files[i * len(files) // n] for i in range(n)]
        transform = eval_transform(image_size, crop_pct=crop_pct)
        images = torch.stack([transform(load_image(f)) for f in files])
        return list(images.split(batch_size))
    batches = list(source.split(batch_size)) if isinstance(source, torch.Tensor) else list(source)
    if not batches or any(not isinstance(b, torch.Tensor) or b.dim() != 4 for b in batches):
        raise ConfigError("calibration must be a folder of images, an NCHW tensor or NCHW batches")
    return batches


def quantize_int8(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """int8 post-training static quantization of an eval-only CPU model (PT2E with the
    X86InductorQuantizer), calibrated on `batches`; the result still computes in fake-quantized
    float until compiled (see `FrozenCompiled`). The batch dimension stays dynamic."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as e:
        raise ImportError(
            f"precision='int8' needs torchao ({e}): pip install 'res2net[lowprec]'"
        ) from None

    # Inductor's int8 convolution lowering copies a tensor with torch.tensor(t) and warns about
    # it at every compile: PyTorch's own note, nothing the user can act on.
    warnings.filterwarnings(
        "ignore",
        message="To copy construct from a tensor",
        category=UserWarning,
        module=r"torch\._inductor",
    )
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ConfigError(
            f"precision='int8' runs on x86 CPUs (oneDNN int8 kernels), not {device.type}: "
            "move the model to the CPU, or use precision='bf16' on GPUs"
        )
    example = batches[0].float()
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        graph = torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
        quantizer = _splits_quantized(xiq)()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(graph, quantizer)
        for b in batches:
            prepared(b.float())
        return convert_pt2e(prepared)


SPLITS = (torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default)


def _splits_quantized(xiq: Any) -> type:
    """`X86InductorQuantizer` (module `xiq`, imported lazily) that also quantizes the input of
    each channel split: the stock one leaves it float, so the conv before a split writes
    float32 (4 bytes a value instead of 1) and every group is quantized again on its own."""

    class SplitsQuantized(xiq.X86InductorQuantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().annotate(model)
            for node in model.graph.nodes:
                if node.target in SPLITS and xiq.QUANT_ANNOTATION_KEY not in node.meta:
                    node.meta[xiq.QUANT_ANNOTATION_KEY] = xiq._X86InductorQuantizationAnnotation(
                        input_qspec_map={node.args[0]: xiq.get_input_act_qspec(self.global_config)},
                        _annotated=True,
                    )
            return model

    return SplitsQuantized
