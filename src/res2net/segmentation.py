"""Res2Net as a dilated segmentation backbone for torchvision's DeepLabV3 and FCN heads (the
paper's semantic segmentation experiments).

The last stages keep their resolution by dilation (`output_stride` 8 or 16), and the models are
torchvision's own `DeepLabV3` / `FCN`, so they return its dict: {"out": (N, num_classes, H, W)}
plus "aux" (from stage 3, through an `FCNHead`) when `aux_loss=True`. BatchNorm stays trainable
(convert to SyncBatchNorm for multi-GPU training).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.segmentation import FCN, DeepLabV3
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from .errors import ConfigError
from .factory import create_backbone
from .models.base import Res2NetBase
from .models.layers import channels_last_on_cpu

# ASPP rates per output stride (DeepLabV3 paper: 6/12/18 at stride 16, doubled at stride 8)
ATROUS_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}


class SegmentationBackbone(nn.Module):
    """A (dilated) Res2Net trunk returning torchvision's segmentation backbone dict:
    {"out": stage-4 map, "aux": stage-3 map}."""

    def __init__(self, body: Res2NetBase) -> None:
        super().__init__()
        self.body = body
        self.out_channels = body.feature_info[4]["num_chs"]
        self.aux_channels = body.feature_info[3]["num_chs"]
        self.output_stride = body.feature_info[4]["reduction"]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body.forward_stages(x)
        return OrderedDict(out=maps[4], aux=maps[3])


def segmentation_backbone(
    backbone: str | Res2NetBase,
    output_stride: int = 8,
    checkpoint_path: str | Path | None = None,
    pretrained: bool | str = False,
    **model_kwargs: Any,
) -> SegmentationBackbone:
    """The dilated trunk for model name `backbone` (or an already built features_only model,
    whose own output stride is used) with optional ImageNet weights."""
    if not isinstance(backbone, nn.Module):
        if output_stride not in ATROUS_RATES:
            raise ConfigError(f"output_stride={output_stride} is invalid: choose 8 or 16")
        model_kwargs["output_stride"] = output_stride
    body = create_backbone(backbone, (3, 4), checkpoint_path, pretrained, **model_kwargs)
    trunk = SegmentationBackbone(body)
    trunk.register_forward_pre_hook(channels_last_on_cpu)  # the trunk's maps are read directly
    return trunk


def deeplabv3_res2net50(
    num_classes: int,
    *,
    output_stride: int = 8,
    aux_loss: bool = False,
    backbone: str | Res2NetBase = "res2net50",
    checkpoint_path: str | Path | None = None,
    pretrained: bool | str = False,
    **model_kwargs: Any,
) -> DeepLabV3:
    """torchvision's DeepLabV3 (ASPP head, rates for the output stride) on a dilated Res2Net-50.
    `checkpoint_path`/`pretrained` load ImageNet weights into the backbone."""
    body = segmentation_backbone(
        backbone, output_stride, checkpoint_path, pretrained, **model_kwargs
    )
    rates = ATROUS_RATES.get(body.output_stride, ATROUS_RATES[8])
    aux = FCNHead(body.aux_channels, num_classes) if aux_loss else None
    return DeepLabV3(body, DeepLabHead(body.out_channels, num_classes, rates), aux)


def fcn_res2net50(
    num_classes: int,
    *,
    output_stride: int = 8,
    aux_loss: bool = False,
    backbone: str | Res2NetBase = "res2net50",
    checkpoint_path: str | Path | None = None,
    pretrained: bool | str = False,
    **model_kwargs: Any,
) -> FCN:
    """torchvision's FCN (a 3x3-conv head) on a dilated Res2Net-50.
    `checkpoint_path`/`pretrained` load ImageNet weights into the backbone."""
    body = segmentation_backbone(
        backbone, output_stride, checkpoint_path, pretrained, **model_kwargs
    )
    aux = FCNHead(body.aux_channels, num_classes) if aux_loss else None
    return FCN(body, FCNHead(body.out_channels, num_classes), aux)
