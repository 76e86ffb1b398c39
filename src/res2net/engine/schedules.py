"""Learning-rate schedules as pure functions of the global step, the way MindCV builds them.

MindCV precomputes one lr per iteration; we compute the same value on demand, so resuming needs
nothing but the step counter."""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass, field


@dataclass(frozen=True)
class LrSchedule:
    """lr at a global step (0-based), with a linear warmup from `warmup_factor * lr` to `lr` over
    `warmup_epochs`, followed by:

    - `cosine_decay` / `warmup_cosine_decay`: half-cosine from `lr` to `min_lr` over
      `decay_epochs` (in `num_cycles` cycles, each peak scaled by `cycle_decay`), then `min_lr`;
    - `step_decay`: multiplied by `decay_rate` every `decay_epochs`;
    - `multi_step_decay`: multiplied by `decay_rate` at each epoch in `milestones`;
    - `constant`: `lr`.

    `lr_epoch_stair` holds the lr constant within an epoch (updated at its first step).
    """

    scheduler: str
    _: KW_ONLY
    lr: float
    steps_per_epoch: int
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    warmup_factor: float = 0.0
    decay_epochs: float = 100.0
    decay_rate: float = 0.9
    milestones: tuple[int, ...] = field(default_factory=tuple)
    num_cycles: int = 1
    cycle_decay: float = 1.0
    lr_epoch_stair: bool = False

    def __post_init__(self) -> None:
        known = ("cosine_decay", "warmup_cosine_decay", "step_decay", "multi_step_decay", "constant")
        if self.scheduler not in known:
            raise ValueError(f"scheduler={self.scheduler!r} is unknown; choose one of {', '.join(known)}")
        if self.steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1 (is the dataset smaller than one batch?)")

    def __call__(self, step: int) -> float:
        spe = self.steps_per_epoch
        if self.lr_epoch_stair:
            step = (step // spe) * spe
        warmup_steps = round(self.warmup_epochs * spe)
        if step < warmup_steps:
            return self.lr * (self.warmup_factor + (1.0 - self.warmup_factor) * step / warmup_steps)
        t = step - warmup_steps
        if self.scheduler in ("cosine_decay", "warmup_cosine_decay"):
            cycle_steps = max(1, round(self.decay_epochs * spe))
            cycle = t // cycle_steps
            if cycle >= self.num_cycles:
                return self.min_lr
            peak = self.lr * self.cycle_decay**cycle
            t_cur = t - cycle * cycle_steps
            return self.min_lr + 0.5 * (peak - self.min_lr) * (1.0 + math.cos(math.pi * t_cur / cycle_steps))
        if self.scheduler == "step_decay":
            return self.lr * self.decay_rate ** (t // max(1, round(self.decay_epochs * spe)))
        if self.scheduler == "multi_step_decay":
            epoch = step // spe
            return self.lr * self.decay_rate ** sum(epoch >= m for m in self.milestones)
        return self.lr
