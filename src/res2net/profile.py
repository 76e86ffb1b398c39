"""Cheap facts about a model: parameter count, FLOPs and forward time."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; BatchNorm statistics are buffers and not counted."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_flops(model: nn.Module, image_size: int = 224, in_chans: int = 3) -> int:
    """FLOPs of one forward pass on one image (a multiply-add counts as 2, as PyTorch's
    FlopCounterMode does; the paper's "4.2 GFLOPs" for Res2Net-50 counts multiply-adds once)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_chans, image_size, image_size, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops()


@torch.no_grad()
def time_forward(model: nn.Module, batch_size: int = 1, image_size: int = 224, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock milliseconds of an eval forward pass, after `warmup` untimed passes."""
    model.eval()
    x = torch.randn(batch_size, 3, image_size, image_size, device=next(model.parameters()).device)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)
