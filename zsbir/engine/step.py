"""The training step, a registered component (``[train.step]``, kind ``steps``).

The trainer owns the loop, mixed precision, checkpoints and logging; what happens to one
batch is the step's. A step is built from its manifest table (+ ``ctx``) and called as
``step(s, batch)`` with a :class:`StepContext` ``s`` and the batch already on the device;
it returns the detached loss terms (``"total"`` included) and must not synchronize with
the host (the trainer checks finiteness where it syncs anyway).

A step may ask for the student (a ``model`` parameter: injected), hold trainable
parameters (``named_parameters()``: optimized, clipped and synchronized as ``step.*``),
define the lifecycle hooks and ``inference_model()`` of :mod:`zsbir.engine.lifecycle`, and
hold state (``state_dict``/``load_state_dict``, saved in every checkpoint and restored on
resume). A step that computes a signal for the losses itself (an EMA teacher inside the
step, a memory bank) declares its keys in ``provides`` (like a teacher's), so that
validation accepts losses that read them without a ``[teacher]`` table. Plugins register
other steps in the entry-point group ``zsbir.steps``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from zsbir.registry import steps

__all__ = ["DefaultStep", "StepContext", "loss_labels", "weighted_losses"]

Losses = Sequence[tuple[str, float, torch.nn.Module]]


@dataclass
class StepContext:
    """What a step may use. ``forward`` is the (possibly compiled) model call;
    ``params`` every trained parameter (the optimizer's: model, losses, step, teacher),
    for clipping."""

    model: torch.nn.Module
    forward: Callable[..., dict[str, torch.Tensor]]
    teacher: Any | None
    losses: Losses
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    device: torch.device
    amp_dtype: torch.dtype | None = None
    grad_clip: float = 0.0
    global_step: int = 0

    def autocast(self) -> torch.autocast:
        """bf16 autocast when mixed precision is on (a no-op context otherwise)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)


def loss_labels(names: Sequence[str]) -> list[str]:
    """Log labels of the manifest's losses: the name, or ``name[i]`` (the index in
    ``[[losses]]``) when two losses share a name, so that neither hides the other."""
    dup = {n for n in names if list(names).count(n) > 1}
    return [f"{n}[{i}]" if n in dup else n for i, n in enumerate(names)]


def weighted_losses(losses: Losses, out: dict[str, torch.Tensor], batch: dict[str, Any],
                    teacher: dict[str, torch.Tensor] | None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``sum_i weight_i * loss_i(out, batch, teacher)`` (losses compute in fp32) and the
    detached per-loss terms, keyed by label."""
    total = torch.zeros((), device=batch["image"].device)
    terms: dict[str, torch.Tensor] = {}
    for label, weight, loss in losses:
        value = loss(out, batch, teacher)
        terms[label] = value.detach()
        total = total + weight * value
    return total, terms


@steps.register("default")
class DefaultStep:
    """One optimization step: student forward and teacher signal (under autocast), the
    manifest-weighted sum of the losses, backward, gradient clipping over every trained
    parameter, optimizer step."""

    #: signal keys the step gives the losses besides the teacher's (none)
    provides: ClassVar[frozenset[str]] = frozenset()

    def model_outputs(self, s: StepContext, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The student's outputs the losses see (under autocast): its forward pass. A step
        that adds outputs (a pair network on the batch's tuples) overrides this only."""
        return s.forward(batch["image"], batch["domain"])

    def __call__(self, s: StepContext, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        with s.autocast():
            out = self.model_outputs(s, batch)
            signal = s.teacher(batch) if s.teacher is not None else None
        total, terms = weighted_losses(s.losses, out, batch, signal)
        s.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(s.params, s.grad_clip)
        s.optimizer.step()
        terms["total"] = total.detach()
        return terms
