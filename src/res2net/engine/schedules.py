"""Learning-rate schedules as pure functions of the global step, the way MindCV builds them.

MindCV's ``create_scheduler`` precomputes one lr per step: a linear warmup of
``warmup_epochs`` followed by the schedule proper, which is built for the remaining
``epochs - warmup_epochs`` epochs and so counts its own epochs (milestones included) from the
end of warmup. We compute the same value on demand, so resuming needs nothing but the step
counter."""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import KW_ONLY, dataclass, field

from ..errors import ConfigError
from ..schema import SCHEDULERS

_NEEDS_EPOCHS = ("polynomial_decay", "one_cycle", "cyclic")


@dataclass(frozen=True)
class LrSchedule:
    """lr at a global step (0-based), MindCV's ``create_scheduler`` step by step.

    Warmup: linear from ``warmup_factor * lr`` towards ``lr`` over `warmup_epochs`. Then, with
    e the (fractional) epoch counted from the end of warmup:

    - `cosine_decay` / `warmup_cosine_decay`: half-cosine from `lr` to `min_lr` over
      `decay_epochs`, `num_cycles` times (peak x `cycle_decay` per cycle), then `min_lr`;
    - `step_decay`: ``lr * decay_rate ** (floor(e) // decay_epochs)``;
    - `multi_step_decay`: ``lr * decay_rate ** (milestones <= floor(e))``;
    - `exponential_decay`: ``lr * decay_rate ** e``;
    - `polynomial_decay`: ``lr * (1 - e / main_epochs) ** decay_rate``;
    - `one_cycle`: torch's OneCycle (cosine, 30% up) from lr/25 to `lr` to `min_lr`;
    - `cyclic`: triangular cycles between `min_lr` and `lr`, `num_cycles` of them;
    - `constant`: `lr`.

    `lr_epoch_stair` holds warmup, cosine, exponential and polynomial constant within an epoch
    (step and multi-step always are). `epochs` (the run's length) is needed by polynomial,
    one_cycle and cyclic; steps past the end keep the last step's lr.
    """

    scheduler: str
    _: KW_ONLY
    lr: float
    steps_per_epoch: int
    min_lr: float = 0.0
    warmup_epochs: int = 0
    warmup_factor: float = 0.0
    decay_epochs: int = 100
    decay_rate: float = 0.9
    milestones: tuple[int, ...] = field(default_factory=tuple)
    num_cycles: int = 1
    cycle_decay: float = 1.0
    lr_epoch_stair: bool = False
    epochs: int | None = None

    def __post_init__(self) -> None:
        name = self.scheduler
        if name not in SCHEDULERS:
            raise ConfigError(
                f"scheduler={name!r} is unknown; choose one of {', '.join(SCHEDULERS)}"
            )
        if self.steps_per_epoch < 1:
            raise ConfigError(
                "steps_per_epoch must be >= 1 (is the dataset smaller than one batch?)"
            )
        if name in _NEEDS_EPOCHS and self.epochs is None:
            raise ConfigError(f"scheduler {name} needs the number of epochs")
        if name in ("one_cycle", "cyclic") and (self.warmup_epochs > 0 or self.lr_epoch_stair):
            raise ConfigError(f"scheduler {name} allows neither warmup_epochs nor lr_epoch_stair")
        if name == "polynomial_decay" and self._main_epochs() < 1:
            raise ConfigError("polynomial_decay needs epoch_size > warmup_epochs")
        if name == "cyclic" and self._cyclic_half() < 1:
            raise ConfigError(
                f"cyclic: {self.num_cycles} cycles do not fit in "
                f"{self._main_steps()} steps; lower num_cycles"
            )
        if name == "one_cycle" and self.min_lr <= 0:
            raise ConfigError("one_cycle needs min_lr > 0")

    def _main_epochs(self) -> int:
        return (self.epochs or 0) - self.warmup_epochs

    def _main_steps(self) -> int:
        return self._main_epochs() * self.steps_per_epoch

    def _cyclic_half(self) -> int:
        return int(self._main_steps() / self.num_cycles / 2)

    def __call__(self, step: int) -> float:
        spe = self.steps_per_epoch
        if self.epochs is not None:
            step = min(step, max(self.epochs * spe - 1, 0))
        warmup_steps = self.warmup_epochs * spe
        if step < warmup_steps:
            e = step // spe if self.lr_epoch_stair else step / spe
            start = self.lr * self.warmup_factor
            return start + min(e, self.warmup_epochs) / self.warmup_epochs * (self.lr - start)
        i = step - warmup_steps
        e = i // spe if self.lr_epoch_stair else i / spe
        name = self.scheduler
        if name in ("cosine_decay", "warmup_cosine_decay"):
            return self._cosine(e)
        if name == "step_decay":
            return self.lr * self.decay_rate ** ((i // spe) // self.decay_epochs)
        if name == "multi_step_decay":
            return self.lr * self.decay_rate ** bisect_right(sorted(self.milestones), i // spe)
        if name == "exponential_decay":
            return self.lr * self.decay_rate**e
        if name == "polynomial_decay":
            main = self._main_epochs()
            return self.lr * (1 - min(e, main) / main) ** self.decay_rate
        if name == "one_cycle":
            return self._one_cycle(i)
        if name == "cyclic":
            return self._cyclic(i)
        return self.lr

    def _cosine(self, e: float) -> float:
        if self.decay_epochs <= 0:
            return self.min_lr
        cycle = int(e // self.decay_epochs)
        if cycle >= self.num_cycles:
            return self.min_lr
        peak = self.lr * self.cycle_decay**cycle
        t = e - cycle * self.decay_epochs
        cos = math.cos(math.pi * t / self.decay_epochs)
        return self.min_lr + 0.5 * (peak - self.min_lr) * (1 + cos)

    def _one_cycle(self, i: int) -> float:
        steps = self._main_steps()
        start = self.lr / 25.0
        up = 0.3 * steps - 1
        end = steps - 1

        def anneal(a: float, b: float, pct: float) -> float:
            return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)

        if i <= up:
            return anneal(start, self.lr, i / up)
        return anneal(self.lr, self.min_lr, (i - up) / (end - up))

    def _cyclic(self, i: int) -> float:
        total = 2.0 * self._cyclic_half()
        cycle = math.floor(1 + i / total)
        x = 1.0 + i / total - cycle
        scale = x / 0.5 if x <= 0.5 else (x - 1) / (0.5 - 1)
        return self.min_lr + (self.lr - self.min_lr) * scale
