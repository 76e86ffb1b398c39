"""Optimizers by MindCV name, with MindCV's `weight_decay_filter`."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, weight_decay_filter: str) -> list[dict]:
    """One group with decay, and (unless the filter is 'disable') one without it for norm
    weights and biases: every parameter with fewer than two dimensions."""
    if weight_decay_filter == "disable" or weight_decay == 0:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    if weight_decay_filter not in ("auto", "norm_and_bias"):
        raise ValueError(f"weight_decay_filter={weight_decay_filter!r} is unknown; choose disable, auto or norm_and_bias")
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module,
    *,
    opt: str,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
    eps: float = 1e-8,
    weight_decay_filter: str = "disable",
) -> torch.optim.Optimizer:
    """`momentum`/`sgd` (SGD with momentum, Nesterov if asked), `nesterov`, `adamw`, `adam`."""
    groups = param_groups(model, weight_decay, weight_decay_filter)
    opt = opt.lower()
    if opt in ("momentum", "sgd", "nesterov"):
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov or opt == "nesterov")
    if opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, eps=eps)
    if opt == "adam":
        return torch.optim.Adam(groups, lr=lr, eps=eps)
    raise ValueError(f"opt={opt!r} is unknown; choose momentum, sgd, nesterov, adamw or adam")
