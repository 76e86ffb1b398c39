"""Validation: top-1, top-5 and loss over a loader, exactly once per image."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sized
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from ..console import progress_bar
from ..data.loader import ignore_stop_signals, stop_signals_blocked
from .distributed import DistInfo, all_reduce_sum


@dataclass
class EvalResult:
    """Sums over the evaluated images; `top1`/`top5` in percent."""

    n: int = 0
    correct1: int = 0
    correct5: int = 0
    loss_sum: float = 0.0
    class_total: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    class_correct: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    # images predicted (top-1) as each class: with the two above, per-class precision and recall
    class_predicted: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    extra: dict[str, float] = field(default_factory=dict)  # report figures (ReaL top-1, ...)

    @property
    def top1(self) -> float:
        return 100.0 * self.correct1 / max(1, self.n)

    @property
    def top5(self) -> float:
        return 100.0 * self.correct5 / max(1, self.n)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.n)

    def as_dict(self) -> dict[str, float]:
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "n": self.n, **self.extra}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable,
    *,
    device: torch.device,
    num_classes: int,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    predictions: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    progress: bool = False,
) -> EvalResult:
    """Run `model` in eval mode over `batches` of (images, labels[, valid]) and count hits.

    Samples whose `valid` flag is False (images that failed to decode) are not counted.
    `predictions`, when given, receives (top-k classes, labels, valid) of every batch, invalid
    samples included, in loader order (for the reports of `engine/report.py`); `progress`: a bar
    on a terminal."""
    was_training = model.training
    model.eval()
    zeros = torch.zeros(num_classes, dtype=torch.long)
    result = EvalResult(
        class_total=zeros.clone(), class_correct=zeros.clone(), class_predicted=zeros.clone()
    )
    k = min(5, num_classes)
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    )
    total = len(batches) if isinstance(batches, Sized) else None
    with stop_signals_blocked():  # loader workers start here
        batch_iter = iter(batches)
    shown = progress_bar(batch_iter, total=total, desc="validation", enabled=progress, unit="batch")
    for batch in shown:
        images, labels = batch[0], batch[1]
        keep = batch[2].bool() if len(batch) > 2 else torch.ones(labels.shape[0], dtype=torch.bool)
        all_labels = labels
        if len(batch) > 2:
            images, labels = images[keep], labels[keep]
        if labels.numel() == 0:
            if predictions is not None:
                predictions.append((torch.full((len(keep), k), -1), all_labels.cpu(), keep.cpu()))
            continue
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with autocast:
            logits = model(images)
        logits = logits.float()
        result.loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        topk = logits.topk(k, dim=1).indices
        hit1 = topk[:, 0] == labels
        if predictions is not None:
            full = torch.full((len(keep), k), -1)
            full[keep] = topk.cpu()
            predictions.append((full, all_labels.cpu(), keep.cpu()))
        result.correct1 += int(hit1.sum())
        result.correct5 += int((topk == labels[:, None]).any(dim=1).sum())
        result.n += labels.numel()
        result.class_total += torch.bincount(labels.cpu(), minlength=num_classes)
        result.class_correct += torch.bincount(labels[hit1].cpu(), minlength=num_classes)
        result.class_predicted += torch.bincount(topk[:, 0].cpu(), minlength=num_classes)
    model.train(was_training)
    return result


def eval_loader(
    dataset: Dataset, *, batch_size: int, num_workers: int, dist: DistInfo
) -> DataLoader:
    """A loader over this rank's share of `dataset`: every world_size-th image from its rank,
    with no padding, so that across ranks each image is evaluated exactly once."""
    indices = range(dist.rank, len(dataset), dist.world_size)  # type: ignore[arg-type]
    return DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=dist.device.type == "cuda",
        worker_init_fn=ignore_stop_signals,
    )


def reduce_result(result: EvalResult, dist: DistInfo) -> EvalResult:
    """Sum the counts of every rank (the result itself when not distributed)."""
    if not dist.enabled:
        return result
    device = dist.device
    counts = torch.tensor(
        [result.n, result.correct1, result.correct5], dtype=torch.float64, device=device
    )
    counts = all_reduce_sum(counts, dist)
    loss = all_reduce_sum(torch.tensor([result.loss_sum], dtype=torch.float64, device=device), dist)
    total = all_reduce_sum(result.class_total.to(device), dist).cpu()
    correct = all_reduce_sum(result.class_correct.to(device), dist).cpu()
    predicted = all_reduce_sum(result.class_predicted.to(device), dist).cpu()
    n, c1, c5 = (int(v) for v in counts.tolist())
    return EvalResult(n, c1, c5, loss.item(), total, correct, predicted)
