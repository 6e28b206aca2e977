"""Optimizers and learning-rate schedules, registered so manifests name them.

An optimizer component receives ``params`` as a list of parameter groups (``{"params":
[...], "names": [...], "name": str, ["lr", "weight_decay"]}``: every trainable parameter of
the run, grouped by ``[[optimizer.groups]]`` and the modules' hooks,
:mod:`zsbir.engine.param_groups`); a group's ``lr`` / ``weight_decay`` override the
component's own, which apply to the rest.

Schedules are stepped once per epoch (``epoch`` counts from 0) unless documented
otherwise; each is a ``torch.optim.lr_scheduler.LambdaLR`` so its state is plain data.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

import torch

from zsbir.constraints import Length, Range
from zsbir.registry import optimizers, schedulers

Params = Iterable[torch.nn.Parameter] | Iterable[dict]
LR = Annotated[float, Range(gt=0, le=1e3)]
Decay = Annotated[float, Range(ge=0)]
#: Adam's (beta1, beta2), each in [0, 1)
Betas = Annotated[list[Annotated[float, Range(ge=0, lt=1)]], Length(exactly=2)]


def _fused_ok(params: list) -> bool:
    return all(p.is_cuda for g in params for p in (g["params"] if isinstance(g, dict) else [g]))


@optimizers.register("adam")
def adam(params: Params, lr: LR = 1e-4, weight_decay: Decay = 5e-4,
         betas: Betas = [0.9, 0.999], fused: bool = True) -> torch.optim.Optimizer:  # noqa: B006
    """Adam (Kingma & Ba, 2015) with L2 weight decay, as SAKE trains (lr 1e-4, wd 5e-4,
    betas 0.9/0.999). ``fused`` uses the fused CUDA kernel when every parameter is on CUDA."""
    params = list(params)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas),
                            fused=fused and _fused_ok(params) or None)


@optimizers.register("adamw")
def adamw(params: Params, lr: LR = 1e-4, weight_decay: Decay = 0.05,
          betas: Betas = [0.9, 0.999], fused: bool = True) -> torch.optim.Optimizer:  # noqa: B006
    """AdamW (Loshchilov & Hutter, ICLR 2019): decoupled weight decay."""
    params = list(params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas),
                             fused=fused and _fused_ok(params) or None)


@optimizers.register("sgd")
def sgd(params: Params, lr: LR = 1e-4, momentum: Annotated[float, Range(ge=0, le=1)] = 0.9,
        weight_decay: Decay = 5e-4, nesterov: bool = False) -> torch.optim.Optimizer:
    """SGD with momentum, as SBTKNet trains (lr 1e-4, momentum 0.9, weight decay 5e-4)."""
    return torch.optim.SGD(list(params), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov)


def _sgd_check(params: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """Nesterov momentum needs a momentum (torch.optim.SGD refuses it otherwise)."""
    if params.get("nesterov") and not params.get("momentum", 0.9) > 0:
        return ["nesterov = true needs momentum > 0"]
    return []


sgd.check_manifest = _sgd_check  # type: ignore[attr-defined]


def _lambda(optimizer: torch.optim.Optimizer, fn) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


@schedulers.register("constant")
def constant(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning rate stays as the optimizer sets it."""
    return _lambda(optimizer, lambda e: 1.0)


@schedulers.register("exponential")
def exponential(optimizer: torch.optim.Optimizer, epochs: int,
                final_factor: Annotated[float, Range(gt=0)] = 1e-3
                ) -> torch.optim.lr_scheduler.LRScheduler:
    """SAKE's decay: lr_e = lr * final_factor^(e / epochs), i.e. 1e-4 -> 1e-7 over the
    run with the default factor (Liu et al., ICCV 2019, Sec. 4 and reference code)."""
    return _lambda(optimizer, lambda e: final_factor ** (e / max(epochs, 1)))


@schedulers.register("step")
def step(optimizer: torch.optim.Optimizer, every: Annotated[int, Range(ge=1)] = 10,
         factor: Annotated[float, Range(gt=0)] = 0.1) -> torch.optim.lr_scheduler.LRScheduler:
    """lr multiplied by ``factor`` every ``every`` epochs (SBTKNet: / 10 every 10 epochs)."""
    if every < 1:
        raise ValueError(f"schedule.every must be >= 1, got {every}")
    return _lambda(optimizer, lambda e: factor ** (e // every))


@schedulers.register("cosine")
def cosine(optimizer: torch.optim.Optimizer, epochs: int,
           min_factor: Annotated[float, Range(ge=0, le=1)] = 0.0
           ) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay from lr to lr * min_factor over the run."""
    import math

    return _lambda(optimizer, lambda e: min_factor + (1 - min_factor) * 0.5
                   * (1 + math.cos(math.pi * min(e, epochs) / max(epochs, 1))))
