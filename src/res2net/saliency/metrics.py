"""Salient object detection metrics, as the benchmarks compute them.

* MAE: mean absolute difference between the saliency map (0..1) and the binary ground truth,
  per image, averaged over images.
* max F-measure: the map is quantized to 0..255 and binarized at each of the 256 thresholds
  (salient = value >= t); per image, F = (1 + b2) P R / (b2 P + R) with b2 = beta^2 = 0.3 gives a
  curve over thresholds; the curves are averaged over images and the maximum is reported.
  (Precision is 0 when nothing is predicted salient; recall counts at least one salient pixel.)

Maps are used as given (no per-image min-max rescaling); ground truth is salient where > 0.5.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

BETA2 = 0.3


def _as_maps(x: torch.Tensor) -> torch.Tensor:
    """(H, W), (N, H, W) or (N, 1, H, W) -> (N, H*W) float."""
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ConfigError(f"expected one-channel maps, got shape {tuple(x.shape)}")
        x = x[:, 0]
    if x.ndim != 3:
        raise ConfigError(
            f"expected (H, W), (N, H, W) or (N, 1, H, W) maps, got shape {tuple(x.shape)}"
        )
    return x.flatten(1).float()


def _check(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p, g = _as_maps(pred), _as_maps(gt)
    if p.shape != g.shape:
        raise ConfigError(
            f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape"
        )
    if bool((p < 0).any()) or bool((p > 1).any()):
        raise ConfigError("saliency maps must be probabilities in 0..1 (apply sigmoid to logits)")
    return p, g > 0.5


def mae(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of each map (0..1) against its binary ground truth: shape (N,)."""
    p, g = _check(pred, gt)
    return (p - g.float()).abs().mean(dim=1)


def f_measure_curve(pred: torch.Tensor, gt: torch.Tensor, beta2: float = BETA2) -> torch.Tensor:
    """F-measure of each map at thresholds 0..255 (index t: salient where round-down(255 p) >= t):
    shape (N, 256)."""
    p, g = _check(pred, gt)
    q = (p * 255).long().clamp(0, 255)
    curves = []
    for qi, gi in zip(q, g):
        fg_hist = torch.bincount(qi[gi], minlength=256).double()
        all_hist = torch.bincount(qi, minlength=256).double()
        tp = fg_hist.flip(0).cumsum(0).flip(0)  # salient pixels with value >= t
        predicted = all_hist.flip(0).cumsum(0).flip(0)
        precision = tp / predicted.clamp_min(1)
        recall = tp / max(int(gi.sum()), 1)
        num = (1 + beta2) * precision * recall
        den = beta2 * precision + recall
        curves.append(torch.where(num > 0, num / den.clamp_min(1e-12), torch.zeros_like(num)))
    return torch.stack(curves).float()


class SaliencyMetrics:
    """Accumulates MAE and the F-measure curve over images; `compute()` gives
    {"mae": ..., "max_f": ..., "images": ...}."""

    def __init__(self, beta2: float = BETA2) -> None:
        self.beta2 = beta2
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.mae_sum = 0.0
        self.f_sum = torch.zeros(256, dtype=torch.float64)

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """Add maps `pred` (0..1) and ground truths `gt` of the same shape (one or a batch)."""
        pred, gt = pred.detach().cpu(), gt.detach().cpu()
        self.mae_sum += float(mae(pred, gt).double().sum())
        curves = f_measure_curve(pred, gt, self.beta2)
        self.f_sum += curves.double().sum(dim=0)
        self.count += curves.shape[0]

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ConfigError("no images were added to the metrics")
        curve = self.f_sum / self.count
        return {"mae": self.mae_sum / self.count, "max_f": float(curve.max()), "images": self.count}
