"""Small building blocks shared by the Res2Net nets: the Res2Net split/convolve/concat core,
stochastic depth, and the classifier/feature-map plumbing both net families expose."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability `p` while
    training, scaling the kept ones by 1/(1-p) so the expectation is unchanged."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def compute_layout(x: torch.Tensor) -> torch.Tensor:
    """The memory layout the nets compute in: channels_last on CPU, where oneDNN's convolutions
    (and BatchNorm, ReLU and pooling) run natively in it and a training step or forward pass is
    measurably faster (docs/benchmarks.md); elsewhere the caller's layout is kept. Values are
    unchanged; only the strides differ."""
    if x.device.type == "cpu" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def res2_forward(
    x: torch.Tensor,
    width: int,
    convs: Sequence[nn.Module],
    bns: Sequence[nn.Module],
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
                nn.init.zeros_(m.bn3.weight)


def check_out_indices(out_indices: Sequence[int]) -> tuple[int, ...]:
    """Validate `out_indices` (0 = stem at stride 2, 1..4 = stages at strides 4, 8, 16, 32)."""
    out = tuple(int(i) for i in out_indices)
    if not out or any(i < 0 or i > 4 for i in out) or len(set(out)) != len(out):
        raise ValueError(
            f"out_indices={tuple(out_indices)} is invalid: give distinct indices in 0..4 "
            "(0 = stem, stride 2; 1..4 = stages, strides 4, 8, 16, 32)"
        )
    return out
