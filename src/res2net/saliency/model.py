"""The saliency network: a Res2Net trunk and a compact FPN-style decoder."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..factory import create_backbone
from ..models.base import Res2NetBase
from ..models.layers import channels_last_on_cpu

log = logging.getLogger(__name__)


def _conv_bn_relu(cin: int, cout: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SaliencyDecoder(nn.Module):
    """Top-down decoder over multi-scale maps (finest first): a 1x1 lateral conv brings each map
    to `channels`; from the coarsest, each level is upsampled, added to the next finer lateral
    and smoothed by a 3x3 conv-BN-ReLU; a 1x1 conv gives one logit per pixel of the finest map."""

    def __init__(self, in_channels: Sequence[int], channels: int = 64) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(_conv_bn_relu(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(_conv_bn_relu(channels, channels, 3) for _ in in_channels)
        self.predict = nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.smooth[-1](self.lateral[-1](maps[-1]))
        for i in range(len(maps) - 2, -1, -1):
            lat = self.lateral[i](maps[i])
            x = F.interpolate(x, size=lat.shape[-2:], mode="bilinear", align_corners=False)
            x = self.smooth[i](lat + x)
        return self.predict(x)


class SaliencyNet(nn.Module):
    """Res2Net trunk (stages 1-4, strides 4..32) + `SaliencyDecoder`. `forward` returns
    (N, 1, H, W) logits at the input resolution; `sigmoid` gives the saliency map."""

    def __init__(self, body: Res2NetBase, decoder_channels: int = 64) -> None:
        super().__init__()
        self.body = body
        self.decoder = SaliencyDecoder(
            [body.feature_info[i]["num_chs"] for i in (1, 2, 3, 4)], decoder_channels
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.body.forward_stages(x)[1:]
        logits = self.decoder(maps)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def saliency_res2net(
    backbone: str | Res2NetBase = "res2net50",
    *,
    decoder_channels: int = 64,
    checkpoint_path: str | Path | None = None,
    pretrained: bool | str = False,
    **model_kwargs: Any,
) -> SaliencyNet:
    """A saliency network on model `backbone` (a name, or a features_only model);
    `checkpoint_path`/`pretrained` load ImageNet weights into the trunk."""
    if isinstance(backbone, str) and checkpoint_path is None and not pretrained:
        log.warning(
            "%s trunk without ImageNet weights: saliency training from random weights "
            "rarely converges; pass checkpoint_path= (--ckpt_path) or pretrained=",
            backbone,
        )
    body = create_backbone(backbone, (1, 2, 3, 4), checkpoint_path, pretrained, **model_kwargs)
    net = SaliencyNet(body, decoder_channels)
    net.register_forward_pre_hook(channels_last_on_cpu)  # the trunk's maps are read directly
    return net
