"""The saliency training loss: pixel-wise binary cross-entropy plus a soft IoU term."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def iou_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft IoU of sigmoid(logits) and `target` (N, 1, H, W) in 0..1, averaged over images.
    `eps` smooths the ratio so that images without salient pixels are defined."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1).to(p.dtype)
    inter = (p * t).sum(dim=1)
    union = (p + t - p * t).sum(dim=1)
    return (1 - (inter + eps) / (union + eps)).mean()


def bce_iou_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy (per pixel) + IoU loss (per image), as used for salient object
    detection: the first sharpens each pixel, the second the mask as a whole."""
    bce = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))
    return bce + iou_loss(logits, target)
