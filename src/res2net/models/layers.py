"""Small building blocks shared by the Res2Net nets: the Res2Net split/convolve/concat core,
the layer-builder types, the CPU layout hook, and the classifier/feature-map plumbing both
net families expose."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError

NormLayer = Callable[[int], nn.Module]
"""Builds a normalisation layer for a channel count (`nn.BatchNorm2d`, `FrozenBatchNorm2d`...)."""
ActLayer = Callable[..., nn.Module]
"""Builds an activation; called with `inplace=True` (`nn.ReLU`, `nn.SiLU`...)."""


def channels_last_on_cpu(
    module: nn.Module, args: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, ...]:
    """Forward pre-hook that `create_model` installs by default: a 4-d CPU input is made
    channels_last, the layout in which oneDNN's convolutions (and BatchNorm, ReLU and pooling)
    run natively, so a training step or forward pass is measurably faster (docs/benchmarks.md);
    elsewhere the caller's layout is kept. Values are unchanged; only the strides differ."""
    x, *rest = args
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last), *rest)
    return args


def res2_forward(
    x: torch.Tensor,
    width: int,
    convs: Sequence[nn.Module] | nn.ModuleList,
    bns: Sequence[nn.Module] | nn.ModuleList,
    pool: nn.Module | None,
    stage_first: bool,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The multi-scale core of a Res2Net block (paper, Fig. 2), shared by both net families.

    `x` is split into groups of `width` channels. Group i > 0 goes through a 3x3 conv after
    adding the output of group i-1, so later groups see ever larger receptive fields; the last
    group is passed on unchanged. In the first block of a stage (`stage_first`) the groups are
    convolved independently with the stage's stride and the last group goes through `pool`
    to reach the same resolution. The outputs are concatenated back to `x`'s channel count.
    """
    groups = torch.split(x, width, dim=1)
    outs = []
    sp = groups[0]
    for i, (conv, bn) in enumerate(zip(convs, bns)):
        sp = groups[i] if i == 0 or stage_first else sp + groups[i]
        sp = act(bn(conv(sp)))
        outs.append(sp)
    if len(groups) > 1:
        outs.append(pool(groups[-1]) if pool is not None else groups[-1])
    return torch.cat(outs, dim=1)


def init_weights(module: nn.Module, zero_init_last: bool) -> None:
    """ResNet-lineage init: Kaiming normal (fan_out) convs, BatchNorm weight 1 / bias 0, and
    optionally a zero last BN in each residual branch so every block starts as the identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.in_features)
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)
    if zero_init_last:
        for m in module.modules():
            if hasattr(m, "bn3"):
                weight = m.get_submodule("bn3").weight
                assert isinstance(weight, torch.Tensor)
                nn.init.zeros_(weight)


def check_out_indices(out_indices: Sequence[int]) -> tuple[int, ...]:
    """Validate `out_indices` (0 = stem at stride 2, 1..4 = stages at strides 4, 8, 16, 32)."""
    out = tuple(int(i) for i in out_indices)
    if not out or any(i < 0 or i > 4 for i in out) or len(set(out)) != len(out):
        raise ConfigError(
            f"out_indices={tuple(out_indices)} is invalid: give distinct indices in 0..4 "
            "(0 = stem, stride 2; 1..4 = stages, strides 4, 8, 16, 32)"
        )
    return out
