"""Res2Net on the ResNet / ResNeXt skeleton (Gao et al., arXiv:1904.01169), classic and v1b.

Parameter names follow the official repository and timm (`conv1`, `bn1`, `layer1.0.convs.0`,
`downsample`, `fc`), so their state dicts load unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from ..errors import ConfigError
from .base import Res2NetBase
from .layers import ActLayer, NormLayer, init_weights, res2_forward


class Bottle2neck(nn.Module):
    """The Res2Net bottleneck: 1x1 conv -> hierarchical 3x3 convs over `scale` groups -> 1x1 conv,
    plus the residual shortcut. `width` channels per group = floor(planes * base_width / 64)
    times `cardinality` (ResNeXt groups inside each 3x3 conv)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        cardinality: int = 1,
        base_width: int = 26,
        scale: int = 4,
        dilation: int = 1,
        first_dilation: int | None = None,
        drop_path: float = 0.0,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = nn.ReLU,
    ) -> None:
        super().__init__()
        width = int(math.floor(planes * (base_width / 64.0))) * cardinality
        outplanes = planes * self.expansion
        first_dilation = first_dilation or dilation
        self.width = width
        self.stage_first = stride > 1 or downsample is not None

        self.conv1 = nn.Conv2d(inplanes, width * scale, kernel_size=1, bias=False)
        self.bn1 = norm_layer(width * scale)
        n_convs = max(1, scale - 1)
        self.convs = nn.ModuleList(
            nn.Conv2d(
                width,
                width,
                kernel_size=3,
                stride=stride,
                padding=first_dilation,
                dilation=first_dilation,
                groups=cardinality,
                bias=False,
            )
            for _ in range(n_convs)
        )
        self.bns = nn.ModuleList(norm_layer(width) for _ in range(n_convs))
        self.pool = (
            nn.AvgPool2d(kernel_size=3, stride=stride, padding=1)
            if self.stage_first and scale > 1
            else None
        )
        self.conv3 = nn.Conv2d(width * scale, outplanes, kernel_size=1, bias=False)
        self.bn3 = norm_layer(outplanes)
        self.relu = act_layer(inplace=True)
        self.downsample = downsample
        self.drop_path = StochasticDepth(drop_path, mode="row") if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = res2_forward(
            out, self.width, self.convs, self.bns, self.pool, self.stage_first, self.relu
        )
        out = self.drop_path(self.bn3(self.conv3(out)))
        # the shortcut last and added in place: fewer large buffers alive at once, none new for
        # the sum (BatchNorm's backward does not need its output)
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


def _downsample(
    inplanes: int, outplanes: int, stride: int, dilation: int, avg_down: bool, norm_layer: NormLayer
) -> nn.Sequential:
    """The projection shortcut. Classic: strided 1x1 conv + BN (`downsample.0/.1`). v1b: average
    pool to the new resolution, then a 1x1 conv + BN (`downsample.0` pool, `.1` conv, `.2` BN)."""
    if not avg_down:
        return nn.Sequential(
            nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=stride, bias=False),
            norm_layer(outplanes),
        )
    pool_stride = stride if dilation == 1 else 1
    pool: nn.Module = (
        nn.AvgPool2d(2, pool_stride, ceil_mode=True, count_include_pad=False)
        if pool_stride > 1
        else nn.Identity()
    )
    return nn.Sequential(
        pool, nn.Conv2d(inplanes, outplanes, kernel_size=1, bias=False), norm_layer(outplanes)
    )


class Res2Net(Res2NetBase):
    """ResNet-style Res2Net. `layers` = blocks per stage ([3, 4, 6, 3] is the 50-layer net);
    `deep_stem`/`avg_down` make the v1b variant (three 3x3 stem convs 32-32-64, average-pool
    shortcuts); `output_stride` 16 or 8 replaces the last strides by dilation. `norm_layer`
    (called with a channel count) and `act_layer` (called with `inplace=True`) build every
    normalisation and activation: `FrozenBatchNorm2d` for detection, for example."""

    # the four stages, added with add_module in __init__
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(
        self,
        layers: Sequence[int],
        base_width: int = 26,
        scale: int = 4,
        cardinality: int = 1,
        deep_stem: bool = False,
        avg_down: bool = False,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        zero_init_last: bool = False,
        output_stride: int = 32,
        out_indices: Sequence[int] | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = nn.ReLU,
    ) -> None:
        super().__init__()
        if scale < 1:
            raise ConfigError(f"scale={scale} is invalid: it must be >= 1")
        if base_width < 1 or cardinality < 1:
            raise ConfigError(f"base_width={base_width} and cardinality={cardinality} must be >= 1")
        if output_stride not in (8, 16, 32):
            raise ConfigError(f"output_stride={output_stride} is invalid: choose 8, 16 or 32")
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ConfigError(f"layers={list(layers)} is invalid: give four positive block counts")

        if deep_stem:
            self.conv1: nn.Module = nn.Sequential(
                nn.Conv2d(in_chans, 32, kernel_size=3, stride=2, padding=1, bias=False),
                norm_layer(32),
                act_layer(inplace=True),
                nn.Conv2d(32, 32, kernel_size=3, stride=1, padding=1, bias=False),
                norm_layer(32),
                act_layer(inplace=True),
                nn.Conv2d(32, 64, kernel_size=3, stride=1, padding=1, bias=False),
            )
        else:
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.act1 = act_layer(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        block_dprs = torch.linspace(0, drop_path_rate, sum(layers), device="cpu").tolist()
        inplanes, net_stride, dilation = 64, 4, 1
        self.feature_info = [dict(num_chs=64, reduction=2)]
        for i, (n_blocks, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            prev_dilation = dilation
            if net_stride >= output_stride and stride > 1:
                dilation *= stride
                stride = 1
            net_stride *= stride
            outplanes = planes * Bottle2neck.expansion
            downsample = None
            if stride != 1 or inplanes != outplanes:
                downsample = _downsample(
                    inplanes, outplanes, stride, dilation, avg_down, norm_layer
                )
            blocks = []
            for j in range(n_blocks):
                blocks.append(
                    Bottle2neck(
                        inplanes,
                        planes,
                        stride=stride if j == 0 else 1,
                        downsample=downsample if j == 0 else None,
                        cardinality=cardinality,
                        base_width=base_width,
                        scale=scale,
                        dilation=dilation,
                        first_dilation=prev_dilation if j == 0 else dilation,
                        drop_path=block_dprs.pop(0),
                        norm_layer=norm_layer,
                        act_layer=act_layer,
                    )
                )
                inplanes = outplanes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=outplanes, reduction=net_stride))
        self.num_features = inplanes

        init_weights(self, zero_init_last)
        self._build_head(
            num_classes,
            drop_rate,
            None if out_indices is None else tuple(out_indices),
            conv_fc=False,
        )
        if self.fc is not None:
            init_weights(self.fc, zero_init_last=False)

    def forward_stages(self, x: torch.Tensor, last: int = 4) -> list[torch.Tensor]:
        x = self.act1(self.bn1(self.conv1(x)))
        maps = [x]
        x = self.maxpool(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4)[:last]:
            x = layer(x)
            maps.append(x)
        return maps
