"""DLA-60 (Yu et al., "Deep Layer Aggregation", CVPR 2018) built from Res2Net bottlenecks, as in
the Res2Net paper's DLA experiments (`dla60_res2net`, `dla60_res2next`).

Parameter names follow timm's DLA (`base_layer`, `level0`..`level5`, `tree1`, `tree2`, `root`,
`project`, and a 1x1-conv `fc`), so its state dicts load unchanged.
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


class DlaBottle2neck(nn.Module):
    """Res2Net bottleneck in DLA's form: the residual branch is supplied by the tree (`shortcut`),
    and the mid width is floor(outplanes * base_width / 64) * cardinality / 2."""

    expansion = 2

    def __init__(
        self,
        inplanes: int,
        outplanes: int,
        stride: int = 1,
        cardinality: int = 1,
        base_width: int = 28,
        scale: int = 4,
        drop_path: float = 0.0,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = nn.ReLU,
    ) -> None:
        super().__init__()
        width = int(math.floor(outplanes * (base_width / 64.0)) * cardinality) // self.expansion
        self.width = width
        self.stage_first = stride > 1
        n_convs = max(1, scale - 1)
        self.conv1 = nn.Conv2d(inplanes, width * scale, kernel_size=1, bias=False)
        self.bn1 = norm_layer(width * scale)
        self.convs = nn.ModuleList(
            nn.Conv2d(
                width,
                width,
                kernel_size=3,
                stride=stride,
                padding=1,
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
        self.drop_path = StochasticDepth(drop_path, mode="row") if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        shortcut = x if shortcut is None else shortcut
        out = self.relu(self.bn1(self.conv1(x)))
        out = res2_forward(
            out, self.width, self.convs, self.bns, self.pool, self.stage_first, self.relu
        )
        out = self.drop_path(self.bn3(self.conv3(out)))
        out += shortcut  # in place: no new buffer (BatchNorm's backward does not need its output)
        return self.relu(out)


class DlaRoot(nn.Module):
    """Aggregation node: 1x1 conv + BN + ReLU over the concatenated children."""

    def __init__(
        self, in_channels: int, out_channels: int, norm_layer: NormLayer, act_layer: ActLayer
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = norm_layer(out_channels)
        self.relu = act_layer(inplace=True)

    def forward(self, children: list[torch.Tensor]) -> torch.Tensor:
        return self.relu(self.bn(self.conv(torch.cat(children, 1))))


class DlaTree(nn.Module):
    """Hierarchical deep aggregation: a binary tree of blocks of depth `levels`, whose leaves are
    joined by `DlaRoot` nodes. A `level_root` tree also feeds its (downsampled) input to the root.
    `block_kw` holds the blocks' arguments, `norm_layer` and `act_layer` included."""

    def __init__(
        self,
        levels: int,
        in_channels: int,
        out_channels: int,
        stride: int,
        block_kw: dict,
        drop_paths: list[float],
        level_root: bool = False,
        root_dim: int = 0,
    ) -> None:
        super().__init__()
        if root_dim == 0:
            root_dim = 2 * out_channels
        if level_root:
            root_dim += in_channels
        self.level_root = level_root
        # ceil_mode keeps odd sizes aligned with the strided convs (same result on even sizes)
        self.downsample = (
            nn.MaxPool2d(stride, stride=stride, ceil_mode=True) if stride > 1 else nn.Identity()
        )
        self.project: nn.Module = nn.Identity()
        norm_layer, act_layer = block_kw["norm_layer"], block_kw["act_layer"]
        if levels == 1:
            self.tree1: nn.Module = DlaBottle2neck(
                in_channels, out_channels, stride, drop_path=drop_paths.pop(0), **block_kw
            )
            self.tree2: nn.Module = DlaBottle2neck(
                out_channels, out_channels, 1, drop_path=drop_paths.pop(0), **block_kw
            )
            if in_channels != out_channels:
                self.project = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                    norm_layer(out_channels),
                )
            self.root: DlaRoot | None = DlaRoot(root_dim, out_channels, norm_layer, act_layer)
        else:
            self.tree1 = DlaTree(
                levels - 1, in_channels, out_channels, stride, block_kw, drop_paths
            )
            self.tree2 = DlaTree(
                levels - 1,
                out_channels,
                out_channels,
                1,
                block_kw,
                drop_paths,
                root_dim=root_dim + out_channels,
            )
            self.root = None

    def forward(self, x: torch.Tensor, children: list[torch.Tensor] | None = None) -> torch.Tensor:
        children = [] if children is None else children
        bottom = self.downsample(x)
        if self.level_root:
            children.append(bottom)
        if self.root is not None:
            x1 = self.tree1(x, self.project(bottom))
            x2 = self.tree2(x1)
            return self.root([x2, x1] + children)
        x1 = self.tree1(x)
        children.append(x1)
        return self.tree2(x1, children)


class DLA(Res2NetBase):
    """DLA with Res2Net bottlenecks. `levels`/`channels` give the depth and width of the six
    levels (DLA-60: levels (1, 1, 1, 2, 3, 1), channels (16, 32, 128, 256, 512, 1024)).
    `norm_layer` and `act_layer` build every normalisation and activation, as in `Res2Net`."""

    def __init__(
        self,
        levels: Sequence[int] = (1, 1, 1, 2, 3, 1),
        channels: Sequence[int] = (16, 32, 128, 256, 512, 1024),
        base_width: int = 28,
        scale: int = 4,
        cardinality: int = 1,
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
        if output_stride != 32:
            raise ConfigError(
                f"output_stride={output_stride} is not supported by DLA models: use 32"
            )
        self.base_layer = nn.Sequential(
            nn.Conv2d(in_chans, channels[0], kernel_size=7, stride=1, padding=3, bias=False),
            norm_layer(channels[0]),
            act_layer(inplace=True),
        )
        norms = dict(norm_layer=norm_layer, act_layer=act_layer)
        self.level0 = _conv_level(channels[0], channels[0], levels[0], stride=1, **norms)
        self.level1 = _conv_level(channels[0], channels[1], levels[1], stride=2, **norms)
        block_kw = dict(cardinality=cardinality, base_width=base_width, scale=scale, **norms)
        n_blocks = sum(2**n for n in levels[2:])  # a tree of depth n has 2**n blocks
        drop_paths = torch.linspace(0, drop_path_rate, n_blocks, device="cpu").tolist()
        self.level2 = DlaTree(
            levels[2], channels[1], channels[2], 2, block_kw, drop_paths, level_root=False
        )
        self.level3 = DlaTree(
            levels[3], channels[2], channels[3], 2, block_kw, drop_paths, level_root=True
        )
        self.level4 = DlaTree(
            levels[4], channels[3], channels[4], 2, block_kw, drop_paths, level_root=True
        )
        self.level5 = DlaTree(
            levels[5], channels[4], channels[5], 2, block_kw, drop_paths, level_root=True
        )
        self.feature_info = [dict(num_chs=channels[1], reduction=2)] + [
            dict(num_chs=c, reduction=2 ** (i + 2)) for i, c in enumerate(channels[2:])
        ]
        self.num_features = channels[-1]

        init_weights(self, zero_init_last)
        self._build_head(
            num_classes,
            drop_rate,
            None if out_indices is None else tuple(out_indices),
            conv_fc=True,
        )

    def forward_stages(self, x: torch.Tensor, last: int = 4) -> list[torch.Tensor]:
        x = self.level1(self.level0(self.base_layer(x)))
        maps = [x]
        for level in (self.level2, self.level3, self.level4, self.level5)[:last]:
            x = level(x)
            maps.append(x)
        return maps


def _conv_level(
    inplanes: int,
    planes: int,
    n_convs: int,
    *,
    stride: int,
    norm_layer: NormLayer,
    act_layer: ActLayer,
) -> nn.Sequential:
    """`n_convs` plain 3x3 conv + BN + ReLU layers, the first with `stride`."""
    modules: list[nn.Module] = []
    for i in range(n_convs):
        modules += [
            nn.Conv2d(
                inplanes,
                planes,
                kernel_size=3,
                stride=stride if i == 0 else 1,
                padding=1,
                bias=False,
            ),
            norm_layer(planes),
            act_layer(inplace=True),
        ]
        inplanes = planes
    return nn.Sequential(*modules)
