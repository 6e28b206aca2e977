"""``peft_ema``: a momentum (EMA) teacher for self-distillation.

The teacher is an exponential moving average of the student (Tarvainen & Valpola, "Mean
teachers are better role models", NeurIPS 2017; DINO, Caron et al., "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021, Sec. 3.1): after every optimizer step

    theta_t <- m theta_t + (1 - m) theta_s

with the momentum ``m`` following DINO's cosine schedule from ``momentum`` to 1 over the
run's total number of optimizer steps K (Sec. 3.1, "Teacher network": "λ following a
cosine schedule from 0.996 to 1 during training"; their code's ``cosine_scheduler``):

    m_k = 1 - (1 - momentum) (cos(pi k / K) + 1) / 2,   k = 0 .. K-1 the step's index.

Buffers (BatchNorm statistics) are copied from the student, not averaged. The teacher runs
the EMA copy (in eval mode, without gradients) on each batch and gives the distillation
losses its ``embedding`` and ``features``; with ``evaluate_ema`` the EMA copy is the model
validated, evaluated and exported (``inference_model()``).

With a frozen base (``peft_lora``, ``peft_adapter``) only the trainable parameters change:
the EMA copy shares the frozen tensors with the student (no second copy of a foundation
model in memory) and averages the trainable ones only; its state (``state_dict()``) holds
those and the buffers, so that a checkpoint stays small and a resumed run is bit-identical.

Lifecycle (zsbir's trainer calls these; see ``zsbir.engine.lifecycle``):
``on_train_start(info)`` (``info.total_steps``), ``on_after_optimizer_step(global_step)``
(``global_step``: optimizer steps done, this one included), ``state_dict()`` /
``load_state_dict(d)``, ``inference_model()``.
"""

from __future__ import annotations

import copy
import math
from typing import Annotated, Any, ClassVar, Literal

import torch
from torch import nn

from zsbir.constraints import Range
from zsbir.teachers.strategies import Teacher

__all__ = ["EmaTeacher", "ema_momentum"]

#: bump when the layout of :meth:`EmaTeacher.state_dict` changes
STATE_FORMAT = 1


def ema_momentum(base: float, k: int, total: int) -> float:
    """DINO's cosine momentum schedule (Caron et al., ICCV 2021, Sec. 3.1):
    ``1 - (1 - base) (cos(pi k / total) + 1) / 2`` for step index ``k`` (0-based) of
    ``total``; ``base`` at k = 0, rising to 1 at k = total (and 1 beyond it)."""
    if total <= 0 or k >= total:
        return 1.0
    k = max(k, 0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * k / total) + 1.0) / 2.0


class EmaTeacher(Teacher):
    """A momentum (EMA) copy of the student as the teacher (DINO, Caron et al., ICCV 2021,
    Sec. 3.1: ``theta_t <- lambda theta_t + (1 - lambda) theta_s`` after each step, lambda
    on a cosine schedule from ``momentum`` to 1; Tarvainen & Valpola, NeurIPS 2017).

    Gives ``{"embedding": (B, d), "features": (B, F)}`` of the EMA copy on each training
    batch (for ``peft_ema_distill``).

    Args:
        model: the student (injected by zsbir).
        momentum: the momentum at the first step (DINO: 0.996).
        schedule: ``"cosine"`` (DINO: to 1 over the run) or ``"constant"``.
        evaluate_ema: validate, evaluate and export the EMA copy instead of the student.
    """

    provides: ClassVar[frozenset[str]] = frozenset({"embedding", "features"})

    def __init__(self, model: nn.Module,
                 momentum: Annotated[float, Range(ge=0, le=1)] = 0.996,
                 schedule: Literal["cosine", "constant"] = "cosine", evaluate_ema: bool = True):
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"teacher.schedule must be 'cosine' or 'constant', got "
                             f"{schedule!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"teacher.momentum must be in [0, 1], got {momentum!r}")
        self.student = model
        self.base_momentum = float(momentum)
        self.schedule = schedule
        self.evaluate_ema = bool(evaluate_ema)
        frozen = [p for p in model.parameters() if not p.requires_grad]
        # the frozen tensors are shared, not copied: deepcopy's memo maps them to themselves
        memo: dict[int, Any] = {id(p): p for p in frozen}
        self.ema: nn.Module = copy.deepcopy(model, memo)
        self.ema.eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        #: names of the averaged parameters (the student's trainable ones, at build time)
        self.tracked = [n for n, p in model.named_parameters() if p.requires_grad]
        self.total_steps = 0
        self.updates = 0
        self.momentum = self.base_momentum
        self.forward_calls = 0

    # -- pairs of (teacher tensor, student tensor) --------------------------------------
    def _pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor],
                              list[torch.Tensor], list[torch.Tensor]]:
        s_params = dict(self.student.named_parameters())
        t_params = dict(self.ema.named_parameters())
        s_bufs = dict(self.student.named_buffers())
        t_bufs = dict(self.ema.named_buffers())
        if s_params.keys() != t_params.keys() or s_bufs.keys() != t_bufs.keys():
            raise RuntimeError("peft_ema: the student's parameters or buffers changed names "
                               "after the teacher was built (was the model modified?)")
        names = list(t_bufs)
        return ([t_params[n] for n in self.tracked], [s_params[n] for n in self.tracked],
                [t_bufs[n] for n in names], [s_bufs[n] for n in names])

    # -- lifecycle ----------------------------------------------------------------------
    def on_train_start(self, info: Any) -> None:
        """Learn the run's total number of optimizer steps (for the cosine schedule), and
        share the student's frozen tensors again (loading a checkpoint's base weights may
        have replaced them)."""
        self.total_steps = int(info.total_steps)
        self._share_frozen()

    def _share_frozen(self) -> None:
        """Make every frozen parameter of the EMA copy the student's own Parameter."""
        tracked = set(self.tracked)
        for name, p in self.student.named_parameters():
            if name in tracked:
                continue
            owner, _, leaf = name.rpartition(".")
            module = self.ema.get_submodule(owner) if owner else self.ema
            if module._parameters.get(leaf) is not p:
                setattr(module, leaf, p)

    def momentum_at(self, global_step: int) -> float:
        """The momentum of the update after optimizer step ``global_step`` (1-based)."""
        if self.schedule == "constant":
            return self.base_momentum
        return ema_momentum(self.base_momentum, global_step - 1, self.total_steps)

    @torch.no_grad()
    def on_after_optimizer_step(self, global_step: int) -> None:
        """``theta_t <- m theta_t + (1 - m) theta_s`` for the trainable parameters; buffers
        copied. (Frozen parameters are shared, hence equal.)"""
        m = self.momentum_at(global_step)
        t_p, s_p, t_b, s_b = self._pairs()
        if t_p:
            s_p = [s.detach().to(t.dtype) for t, s in zip(t_p, s_p)]
            torch._foreach_mul_(t_p, m)
            torch._foreach_add_(t_p, s_p, alpha=1.0 - m)
        for t, s in zip(t_b, s_b):
            t.copy_(s)
        self.momentum = m
        self.updates += 1

    # -- the teacher signal -------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.forward_calls += 1
        out = self.ema(batch["image"], batch["domain"])
        missing = sorted(self.provides - set(out))
        if missing:
            raise KeyError(f"peft_ema: the student's outputs have no {missing} (it gives "
                           f"{sorted(out)}); a zsbir model returns at least 'embedding' and "
                           "'features'")
        return {k: out[k].detach().float() for k in sorted(self.provides)}

    def to(self, device: torch.device) -> EmaTeacher:
        self.ema.to(device)
        return self

    def inference_model(self) -> nn.Module | None:
        """The EMA copy when ``evaluate_ema`` (validated, evaluated, exported), else
        ``None`` (the student)."""
        return self.ema if self.evaluate_ema else None

    # -- checkpoint state ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data: the averaged parameters, the buffers and the schedule's position."""
        t_params = dict(self.ema.named_parameters())
        return {
            "format": STATE_FORMAT,
            "params": {n: t_params[n].detach().clone() for n in self.tracked},
            "buffers": {n: b.detach().clone() for n, b in self.ema.named_buffers()},
            "updates": self.updates, "momentum": self.momentum,
            "total_steps": self.total_steps,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output exactly; a mismatch names what differs."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"peft_ema: teacher state format {state.get('format')!r}, "
                             f"expected {STATE_FORMAT}")
        t_params = dict(self.ema.named_parameters())
        t_bufs = dict(self.ema.named_buffers())
        for what, saved, own in (("parameters", state["params"], set(self.tracked)),
                                 ("buffers", state["buffers"], set(t_bufs))):
            if set(saved) != own:
                diff = sorted(set(saved) ^ own)[:5]
                raise ValueError(f"peft_ema: the saved teacher {what} do not match this "
                                 f"model (e.g. {diff})")
        for n, v in state["params"].items():
            t_params[n].copy_(v)
        for n, v in state["buffers"].items():
            t_bufs[n].copy_(v)
        self.updates = int(state["updates"])
        self.momentum = float(state["momentum"])
        self.total_steps = int(state["total_steps"])
