"""The training lifecycle: the hooks the trainer calls on a run's components, their state
in checkpoints, and which weights are validated, evaluated and exported.

Any of the model, the step, the teacher and the losses may define (all optional,
duck-typed, looked up by name):

- ``on_train_start(info: TrainInfo)``: before the first optimizer step of this process,
  with the run's total number of steps (``info.global_step > 0`` on resume);
- ``on_after_optimizer_step(global_step: int)``: after every optimizer step (e.g. a
  momentum / EMA teacher's update, Tarvainen & Valpola, NeurIPS 2017; He et al., MoCo,
  CVPR 2020), ``global_step`` counting the steps done;
- ``on_epoch_end(epoch: int)``: after the last step of an epoch, before validation.

Steps and teachers may hold state (``state_dict()`` / ``load_state_dict(d)``: their
``nn.Module`` parameters and buffers and any plain data): it is saved in every checkpoint
(``components``) and restored on resume, so a run killed at any point resumes exactly.

A teacher or a step may define ``inference_model() -> nn.Module | None``: the weights that
are validated, saved to ``best.pt`` / ``final.pt``, evaluated and exported (e.g. the EMA
copy of the student). It must have the student's ``state_dict`` layout (a trained model is
rebuilt as the student and loads those weights). Default: the student.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["HOOKS", "TrainInfo", "call_hook", "component_state", "hooked", "inference_model",
           "load_component_state"]

#: the hook names the trainer calls
HOOKS = ("on_train_start", "on_after_optimizer_step", "on_epoch_end")
#: the components whose ``state_dict`` is checkpointed (the model and losses have theirs
#: saved on their own)
STATEFUL = ("step", "teacher")


@dataclass(frozen=True)
class TrainInfo:
    """What ``on_train_start`` receives: the run's length and where it starts."""

    #: optimizer steps of the whole run (epochs x steps_per_epoch)
    total_steps: int
    steps_per_epoch: int
    epochs: int
    #: steps already done (> 0 when resuming)
    global_step: int = 0


def hooked(exp: Any) -> list[tuple[str, Any]]:
    """``(name, component)`` of the run's components that may define hooks, in call order:
    model, step, teacher, then each loss (``losses.<label>``)."""
    out: list[tuple[str, Any]] = [("model", exp.model), ("step", exp.step),
                                  ("teacher", exp.teacher)]
    out += [(f"losses.{label}", loss) for label, _, loss in exp.losses]
    return [(n, c) for n, c in out if c is not None]


def call_hook(exp: Any, hook: str, *args: Any) -> None:
    """Call ``hook(*args)`` on every component of ``exp`` that defines it."""
    if hook not in HOOKS:
        raise ValueError(f"unknown lifecycle hook {hook!r} (known: {', '.join(HOOKS)})")
    for _, component in hooked(exp):
        fn = getattr(component, hook, None)
        if callable(fn):
            fn(*args)


def component_state(exp: Any) -> dict[str, Any]:
    """``{"step": ..., "teacher": ...}``: the ``state_dict()`` of the step and the teacher
    where they have one (absent otherwise)."""
    out: dict[str, Any] = {}
    for name in STATEFUL:
        fn = getattr(getattr(exp, name, None), "state_dict", None)
        if callable(fn):
            out[name] = fn()
    return out


def load_component_state(exp: Any, state: dict[str, Any]) -> None:
    """Restore what :func:`component_state` saved; a component that has state now but none
    in the checkpoint (or the reverse) is refused (``KeyError`` naming it)."""
    for name in STATEFUL:
        component = getattr(exp, name, None)
        load = getattr(component, "load_state_dict", None)
        if not callable(load) or not callable(getattr(component, "state_dict", None)):
            continue
        if name not in state:
            raise KeyError(f"the checkpoint holds no state of the {name} "
                           f"({type(component).__name__})")
        load(state[name])


def inference_model(exp: Any) -> nn.Module:
    """The weights validated, evaluated and exported: the teacher's ``inference_model()``,
    else the step's, else the student (``exp.model``)."""
    for name in ("teacher", "step"):
        fn = getattr(getattr(exp, name, None), "inference_model", None)
        if callable(fn):
            model = fn()
            if model is not None:
                return model
    return exp.model
