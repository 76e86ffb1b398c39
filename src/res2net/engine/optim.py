"""Optimizers by MindCV name, with MindCV's hyper-parameter mapping, `weight_decay_filter` and
`layer_decay`.

Each MindCV optimizer maps to torch's own where torch has the same update rule, else to timm's
(a maintained library with the rules MindSpore uses and torch lacks):

========== ======================================================================================
sgd        ``torch.optim.SGD(momentum, nesterov=use_nesterov, fused=True)`` (see below)
momentum,  ``torch.optim.SGD(momentum, nesterov=use_nesterov)`` (MindSpore's ``nn.Momentum``; as
nesterov   in MindCV, ``opt: nesterov`` is Nesterov only with ``use_nesterov: True``)
adam       ``torch.optim.Adam`` (betas 0.9/0.999, eps 1e-8; L2 weight decay as MindSpore's)
adamw      ``torch.optim.AdamW`` (eps 1e-8; decoupled decay as MindCV's AdamW)
nadam      ``torch.optim.NAdam(momentum_decay=4e-3)`` (MindCV's ``schedule_decay``)
adagrad    ``torch.optim.Adagrad(initial_accumulator_value=0.1, eps=0)`` (MindSpore's ``accum``)
rmsprop    ``timm.optim.RMSpropTF(alpha=0.9, eps=eps, momentum)``: MindSpore's RMSProp adds eps
           inside the square root, starts the mean square at one and keeps lr in the momentum
           buffer; torch's RMSprop does none of these
lion       ``timm.optim.Lion`` (betas 0.9/0.99, decoupled decay; torch has no Lion)
adan       ``timm.optim.Adan`` (betas 0.98/0.92/0.99, eps 1e-8; torch has no Adan)
lamb       ``timm.optim.Lamb(eps=1e-6, max_grad_norm=None, always_adapt=True)``: MindSpore's Lamb
           neither clips gradients nor skips the trust ratio of undecayed parameters
========== ======================================================================================

MindCV passes ``eps`` to rmsprop only; the other optimizers keep their own.

SGD runs torch's fused kernel (one pass over each parameter, its gradient and its momentum)
wherever it exists (CPU and CUDA). On CPUs torch otherwise picks its per-tensor loop (the
multi-tensor one is for GPUs), which makes a pass over memory per operation: for Res2Net-50
(25.7 M parameters) that step took three times the CPU time of the fused one, about a quarter
of a whole training step at batch 8 on 2 cores. The updates are the same formulas.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..schema import OPTIMIZERS, WEIGHT_DECAY_FILTERS

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
NUM_LAYER_GROUPS = 6  # stem, layer1..layer4, head


def _no_decay_names(model: nn.Module, weight_decay_filter: str) -> set[str]:
    """Names of the parameters `weight_decay_filter` exempts from weight decay: MindSpore's
    "auto" exempts normalization layers (its default filter: gamma and beta), "norm_and_bias"
    also every bias."""
    if weight_decay_filter not in WEIGHT_DECAY_FILTERS:
        raise ConfigError(
            f"weight_decay_filter={weight_decay_filter!r} is unknown; choose one of "
            f"{', '.join(WEIGHT_DECAY_FILTERS)}"
        )
    if weight_decay_filter == "disable":
        return set()
    names = set()
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            norm = isinstance(module, _NORMS)
            if norm or (weight_decay_filter == "norm_and_bias" and name == "bias"):
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


def layer_id(name: str, *, in_head: bool) -> int:
    """The layer-decay group of parameter `name`: 0 stem, 1..4 the stages (``layerK`` of
    ResNet-style models, ``level2``..``level5`` of DLA), 5 the classifier head."""
    if in_head:
        return NUM_LAYER_GROUPS - 1
    match = re.match(r"(layer|level)(\d+)\.", name)
    if match is None:
        return 0
    k = int(match.group(2))
    return k if match.group(1) == "layer" else max(k - 1, 0)


def param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    weight_decay_filter: str = "disable",
    layer_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups with their ``weight_decay`` and ``lr_scale`` (1, or
    ``layer_decay ** (5 - layer_id)`` with layer-wise lr decay); see :func:`set_lr`."""
    no_decay = _no_decay_names(model, weight_decay_filter) if weight_decay else set()
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = 0
        if layer_decay is not None:
            lid = layer_id(name, in_head=id(p) in head_ids)
        decay = name not in no_decay
        if (lid, decay) not in groups:
            scale = 1.0 if layer_decay is None else layer_decay ** (NUM_LAYER_GROUPS - 1 - lid)
            groups[(lid, decay)] = {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
            }
        groups[(lid, decay)]["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to `lr` times its ``lr_scale`` (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _fusable(groups: list[dict[str, Any]]) -> bool:
    """Whether torch's fused optimizer kernels can update every parameter of `groups`: floating
    point, on the CPU or a CUDA device."""
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )


def build_optimizer(
    model: nn.Module,
    *,
    opt: str,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
    eps: float = 1e-10,
    weight_decay_filter: str = "disable",
    layer_decay: float | None = None,
) -> torch.optim.Optimizer:
    """The optimizer MindCV's ``create_optimizer(opt=...)`` builds, as torch/timm (see the module
    docstring), over :func:`param_groups`. `opt` is matched case-insensitively."""
    opt = opt.lower()
    if opt not in OPTIMIZERS:
        raise ConfigError(f"opt={opt!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
    groups = param_groups(
        model,
        weight_decay=weight_decay,
        weight_decay_filter=weight_decay_filter,
        layer_decay=layer_decay,
    )
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    if opt in ("sgd", "momentum", "nesterov"):
        return torch.optim.SGD(
            groups, lr=lr, momentum=momentum, nesterov=nesterov, fused=_fusable(groups) or None
        )
    if opt == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if opt == "nadam":
        return torch.optim.NAdam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, momentum_decay=4e-3)
    if opt == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr, initial_accumulator_value=0.1, eps=0.0)
    from timm import optim as timm_optim

    if opt == "rmsprop":
        return timm_optim.RMSpropTF(
            groups, lr=lr, alpha=0.9, eps=eps, momentum=momentum, lr_in_momentum=True
        )
    if opt == "lion":
        return timm_optim.Lion(groups, lr=lr, betas=(0.9, 0.99))
    if opt == "adan":
        return timm_optim.Adan(groups, lr=lr, betas=(0.98, 0.92, 0.99), eps=1e-8)
    return timm_optim.Lamb(
        groups, lr=lr, betas=(0.9, 0.999), eps=1e-6, max_grad_norm=None, always_adapt=True
    )
