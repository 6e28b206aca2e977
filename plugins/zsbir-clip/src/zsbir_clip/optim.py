"""``clip_adam``: Adam with the paper's two learning rates (LayerNorms, prompts)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

import torch

from zsbir.constraints import Length, Range

__all__ = ["clip_adam", "split_prompt_params"]

LR = Annotated[float, Range(gt=0)]


def split_prompt_params(params: Iterable[torch.nn.Parameter]
                        ) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(other parameters, prompt parameters): ``clip_vit`` marks its prompt tokens with
    ``zsbir_clip_group = "prompts"``."""
    other, prompts = [], []
    for p in params:
        if isinstance(p, dict):
            raise ValueError("clip_adam: expected parameters, got parameter groups")
        (prompts if getattr(p, "zsbir_clip_group", None) == "prompts" else other).append(p)
    return other, prompts


def clip_adam(params: Iterable[torch.nn.Parameter], lr: LR = 1e-4, prompt_lr: LR = 1e-3,
              weight_decay: Annotated[float, Range(ge=0)] = 0.0,
              betas: Annotated[list[float], Length(exactly=2)] = [0.9, 0.999],  # noqa: B006
              ) -> torch.optim.Optimizer:
    """Adam with two learning rates, as Sain et al. (CVPR 2023) train: ``prompt_lr`` (1e-3)
    for the ``clip_vit`` visual prompts, ``lr`` (1e-4) for every other trainable parameter
    (the LayerNorms); no weight decay (Sketch_LVM's ``configure_optimizers``:
    ``torch.optim.Adam`` with its defaults besides the two rates)."""
    other, prompts = split_prompt_params(params)
    groups = [g for g in ({"params": other, "lr": lr}, {"params": prompts, "lr": prompt_lr})
              if g["params"]]
    if not groups:
        raise ValueError("clip_adam: no trainable parameters")
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
