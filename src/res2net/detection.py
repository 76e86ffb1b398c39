"""Res2Net as a detection backbone for torchvision's detectors (the paper's Faster R-CNN and
Mask R-CNN experiments), with torchvision's own FPN.

`res2net_fpn_backbone` turns a model name into a feature-pyramid backbone with the interface
torchvision's `FasterRCNN`, `MaskRCNN`, `RetinaNet` and `FCOS` expect (a module returning an
ordered dict of maps, with an `out_channels` attribute), in the usual fine-tuning setup: the stem
and the first stages frozen, and every BatchNorm replaced by `FrozenBatchNorm2d`. The builders
(`fasterrcnn_res2net50_fpn`, ...) mirror torchvision's `*_resnet50_fpn` ones.

`num_classes` counts the background, as in torchvision (COCO: 91). Load ImageNet weights into
the backbone with `checkpoint_path=` (any format `create_model` reads) or `pretrained=`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from .errors import ConfigError
from .factory import create_backbone
from .models.base import Res2NetBase
from .models.dla import DLA
from .models.layers import channels_last_on_cpu

Norm = Literal["frozen_bn", "bn"]
log = logging.getLogger(__name__)


def _stem_and_stages(model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Top-level module names of the stem and of the four stages (strides 4..32)."""
    if isinstance(model, DLA):
        return ("base_layer", "level0", "level1"), ("level2", "level3", "level4", "level5")
    return ("conv1", "bn1"), ("layer1", "layer2", "layer3", "layer4")


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every `BatchNorm2d` in `module` by a `FrozenBatchNorm2d` holding the same affine
    parameters and running statistics (in place; the module is returned for chaining)."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        if module.track_running_stats:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = freeze_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def freeze_stages(model: nn.Module, trainable_layers: int, last_stage: int = 4) -> None:
    """Freeze (requires_grad False) all but the last `trainable_layers` of the five parts
    [stem, stage1..stage4], as torchvision does for ResNets; stages after `last_stage` are
    unused by the backbone and frozen too."""
    if not 0 <= trainable_layers <= 5:
        raise ConfigError(
            f"trainable_layers={trainable_layers} is invalid: choose 0..5 (of stem + 4 stages)"
        )
    stem, stages = _stem_and_stages(model)
    parts = [stem, *((s,) for s in stages)][5 - trainable_layers :]
    used = set(stem) | set(stages[:last_stage])
    train = {name for part in parts for name in part} & used
    for name, param in model.named_parameters():
        param.requires_grad_(name.split(".", 1)[0] in train)


class Res2NetFPN(nn.Module):
    """A Res2Net trunk plus torchvision's `FeaturePyramidNetwork`, like torchvision's
    `BackboneWithFPN`: returns an ordered dict of `out_channels`-channel maps named "0", "1", ...
    (one per returned stage, finest first) and those of `extra_blocks` ("pool" or "p6", "p7")."""

    def __init__(
        self,
        body: Res2NetBase,
        returned_layers: Sequence[int] = (1, 2, 3, 4),
        out_channels: int = 256,
        extra_blocks: ExtraFPNBlock | None = None,
        norm_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        layers = tuple(int(i) for i in returned_layers)
        if not layers or any(i < 1 or i > 4 for i in layers) or list(layers) != sorted(set(layers)):
            raise ConfigError(
                f"returned_layers={tuple(returned_layers)} is invalid: give increasing stages in "
                "1..4"
            )
        self.body = body
        self.returned_layers = layers
        self.in_channels_list = [body.feature_info[i]["num_chs"] for i in layers]
        self.fpn = FeaturePyramidNetwork(
            self.in_channels_list,
            out_channels,
            extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks,
            norm_layer=norm_layer,
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body.forward_stages(x, max(self.returned_layers))
        return self.fpn(OrderedDict((str(k), maps[i]) for k, i in enumerate(self.returned_layers)))


def res2net_fpn_backbone(
    name: str | Res2NetBase,
    trainable_layers: int = 3,
    norm: Norm = "frozen_bn",
    returned_layers: Sequence[int] = (1, 2, 3, 4),
    checkpoint_path: str | Path | None = None,
    *,
    pretrained: bool | str = False,
    extra_blocks: ExtraFPNBlock | None = None,
    out_channels: int = 256,
    **model_kwargs: Any,
) -> Res2NetFPN:
    """A feature-pyramid backbone from model `name` (or a features_only model) for torchvision's
    detectors.

    - `trainable_layers`: how many of [stage4, stage3, stage2, stage1, stem] train (0..5); the
      rest get `requires_grad=False`.
    - `norm`: "frozen_bn" replaces every BatchNorm by `FrozenBatchNorm2d` (its statistics and
      affine parameters fixed, as detection fine-tuning with small batches expects); "bn" keeps
      trainable BatchNorm (e.g. to convert to SyncBatchNorm for large-batch training).
    - `returned_layers`: the stages (1..4, strides 4..32) fed to the FPN.
    - `extra_blocks`: torchvision's `LastLevelMaxPool()` (default, for the R-CNNs) or
      `LastLevelP6P7(out_channels, out_channels)` (RetinaNet, FCOS).
    - `checkpoint_path` / `pretrained`: ImageNet weights for the trunk; other keyword arguments
      go to the architecture (e.g. drop_path_rate).
    """
    if norm not in ("frozen_bn", "bn"):
        raise ConfigError(f"norm={norm!r} is invalid: choose 'frozen_bn' or 'bn'")
    if norm == "frozen_bn" and not isinstance(name, nn.Module):
        model_kwargs = dict(model_kwargs, norm_layer=FrozenBatchNorm2d)
    body = create_backbone(name, returned_layers, checkpoint_path, pretrained, **model_kwargs)
    if norm == "frozen_bn":
        if isinstance(name, str) and checkpoint_path is None and not pretrained:
            log.warning(
                "%s backbone without weights: its frozen BatchNorm layers keep random "
                "statistics; pass checkpoint_path= or pretrained= (or norm='bn' to train "
                "from scratch)",
                name,
            )
        freeze_batchnorm(body)  # a model passed in built: its BatchNorms are swapped in place
    freeze_stages(body, trainable_layers, last_stage=max(returned_layers))
    fpn = Res2NetFPN(body, returned_layers, out_channels, extra_blocks)
    fpn.register_forward_pre_hook(channels_last_on_cpu)  # the trunk's maps are read directly
    return fpn


def fasterrcnn_res2net50_fpn(
    num_classes: int,
    *,
    backbone: str | Res2NetBase = "res2net50",
    trainable_layers: int = 3,
    norm: Norm = "frozen_bn",
    checkpoint_path: str | Path | None = None,
    pretrained: bool | str = False,
    **kwargs: Any,
) -> FasterRCNN:
    """torchvision's Faster R-CNN on a Res2Net-50 FPN backbone (stages 1-4 + max-pool level).
    Other keyword arguments go to `FasterRCNN` (min_size, max_size, box_score_thresh, ...)."""
    fpn = res2net_fpn_backbone(
        backbone, trainable_layers, norm, (1, 2, 3, 4), checkpoint_path, pretrained=pretrained
    )
    return FasterRCNN(fpn, num_classes=num_classes, **kwargs)


def maskrcnn_res2net50_fpn(
    num_classes: int,
    *,
    backbone: str | Res2NetBase = "res2net50",
    trainable_layers: int = 3,
    norm: Norm = "frozen_bn",
    checkpoint_path: str | Path | None = None,
    pretrained: bool | str = False,
    **kwargs: Any,
) -> MaskRCNN:
    """torchvision's Mask R-CNN on a Res2Net-50 FPN backbone. Other keyword arguments go to
    `MaskRCNN`."""
    fpn = res2net_fpn_backbone(
        backbone, trainable_layers, norm, (1, 2, 3, 4), checkpoint_path, pretrained=pretrained
    )
    return MaskRCNN(fpn, num_classes=num_classes, **kwargs)


def retinanet_res2net50_fpn(
    num_classes: int,
    *,
    backbone: str | Res2NetBase = "res2net50",
    trainable_layers: int = 3,
    norm: Norm = "frozen_bn",
    checkpoint_path: str | Path | None = None,
    pretrained: bool | str = False,
    **kwargs: Any,
) -> RetinaNet:
    """torchvision's RetinaNet on a Res2Net-50 FPN backbone (stages 2-4 + P6, P7 from P5).
    Other keyword arguments go to `RetinaNet`."""
    fpn = res2net_fpn_backbone(
        backbone,
        trainable_layers,
        norm,
        (2, 3, 4),
        checkpoint_path,
        pretrained=pretrained,
        extra_blocks=LastLevelP6P7(256, 256),
    )
    return RetinaNet(fpn, num_classes=num_classes, **kwargs)


def fcos_res2net50_fpn(
    num_classes: int,
    *,
    backbone: str | Res2NetBase = "res2net50",
    trainable_layers: int = 3,
    norm: Norm = "frozen_bn",
    checkpoint_path: str | Path | None = None,
    pretrained: bool | str = False,
    **kwargs: Any,
) -> FCOS:
    """torchvision's FCOS on a Res2Net-50 FPN backbone (stages 2-4 + P6, P7 from P5).
    Other keyword arguments go to `FCOS`."""
    fpn = res2net_fpn_backbone(
        backbone,
        trainable_layers,
        norm,
        (2, 3, 4),
        checkpoint_path,
        pretrained=pretrained,
        extra_blocks=LastLevelP6P7(256, 256),
    )
    return FCOS(fpn, num_classes=num_classes, **kwargs)
