"""Per-iteration learning-rate schedules (warm-up, one-cycle), after timm's
``step_update``: the trainer calls ``step_update(global_step)`` after every optimizer
step and ``step()`` at every epoch end. Per-epoch schedules are in
:mod:`zsbir.engine.optim`; these update every iteration and ignore ``step()``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch

from zsbir.constraints import Range
from zsbir.registry import schedulers

__all__ = ["IterSchedule", "one_cycle", "warmup_cosine"]


class IterSchedule:
    """Sets every param group's lr to ``base_lr * factor(global_step)``; plain-data state."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Any, total_steps: int):
        self.optimizer = optimizer
        self.factor = factor
        self.total_steps = max(int(total_steps), 1)
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.last_step = 0
        self.step_update(0)

    def step_update(self, global_step: int) -> None:
        self.last_step = int(global_step)
        f = float(self.factor(min(self.last_step, self.total_steps), self.total_steps))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def step(self) -> None:  # per-epoch call: nothing to do
        return None

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "base_lrs": list(self.base_lrs),
                "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_lrs = list(state["base_lrs"])
        self.total_steps = int(state["total_steps"])
        self.step_update(int(state["last_step"]))


@schedulers.register("warmup_cosine")
def warmup_cosine(optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int,
                  warmup_steps: Annotated[int, Range(ge=0)] = 100,
                  min_factor: Annotated[float, Range(ge=0, le=1)] = 0.0) -> IterSchedule:
    """Linear warm-up from 0 over ``warmup_steps`` iterations, then cosine decay to
    ``lr * min_factor`` at the last iteration (Goyal et al., 2017; Loshchilov & Hutter,
    SGDR, ICLR 2017): f(t) = t / W for t < W, else
    m + (1 - m) (1 + cos(pi (t - W) / (T - W))) / 2."""

    def factor(t: int, total: int) -> float:
        if t < warmup_steps:
            return (t + 1) / (warmup_steps + 1)
        span = max(total - warmup_steps, 1)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * (t - warmup_steps)
                                                                   / span))

    return IterSchedule(optimizer, factor, epochs * steps_per_epoch)


@schedulers.register("one_cycle")
def one_cycle(optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int,
              pct_start: Annotated[float, Range(gt=0, lt=1)] = 0.3,
              div_factor: Annotated[float, Range(ge=1)] = 25.0,
              final_div_factor: Annotated[float, Range(ge=1)] = 1e4) -> IterSchedule:
    """One-cycle policy (Smith & Topin, 2019), cosine annealing as torch's OneCycleLR:
    from lr / div_factor up to lr over the first ``pct_start`` of the iterations, then
    down to lr / (div_factor * final_div_factor)."""
    lo, end = 1.0 / div_factor, 1.0 / (div_factor * final_div_factor)

    def cos(a: float, b: float, p: float) -> float:
        return b + (a - b) * 0.5 * (1 + math.cos(math.pi * p))

    def factor(t: int, total: int) -> float:
        up = max(int(pct_start * total), 1)
        if t <= up:
            return cos(lo, 1.0, t / up)
        return cos(1.0, end, (t - up) / max(total - up, 1))

    return IterSchedule(optimizer, factor, epochs * steps_per_epoch)
