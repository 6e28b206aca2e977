"""The loss contract.

A loss is an ``nn.Module`` registered in :data:`zsbir.registry.losses`. It is constructed
from its manifest table (minus ``name`` and ``weight``) and called as
``loss(out, batch, teacher)``:

- ``out``: the model's named outputs: ``"features"`` (B, F) pooled backbone features,
  ``"embedding"`` (B, d) the retrieval embedding (not normalized), ``"logits"`` (B, n_seen)
  seen-class logits, and ``"imagenet_logits"`` (B, 1000) when the model has an ImageNet head;
- ``batch``: ``"image"`` (B, 3, H, W), ``"label"`` (B,) int64 seen-class labels,
  ``"domain"`` (B,) int64 (0 photo, 1 sketch), ``"index"`` (B,) item indices, and, from a
  tuple sampler, ``"tuples"`` / ``"roles"`` (below);
- ``teacher``: the teacher signal, or ``None`` without a teacher: a dict with
  ``"logits"`` (B, 1000) ImageNet logits for each item and, where the strategy has them,
  ``"features"`` (B, F) the teacher's pooled features and ``"class_features"``
  (n_seen, F) per-class mean teacher features. :func:`teacher_logits` also accepts a bare
  logits tensor, which is what the distillation losses need.

Tuple batches (a sampler with ``roles``, e.g. ``triplet``, ``quadruplet``): the batch also
carries ``"tuples"`` (T, k) int64 row indices, one row per tuple, and ``"roles"`` (the k
role names, e.g. ``("anchor", "positive", "negative")``); a loss reads its rows by role
with :func:`tuple_rows`, never by position in the batch, and declares the roles it needs
in ``roles`` (checked against the sampler's).

It returns a scalar tensor; the total loss is the manifest-weighted sum. ``requires``
declares what the loss needs, so that validation rejects a manifest that cannot feed it:
``"teacher"`` (a teacher signal, from ``[teacher]`` or a step that ``provides`` it) and
``"quadruplet"`` (older spelling of the quadruplet's four ``roles``); ``roles`` the tuple
roles it reads (checked against the sampler's); ``output_keys`` the model outputs it reads
(checked against the head's ``provides``); ``teacher_keys`` the keys of the teacher signal
it reads, checked against what the teacher and the step ``provides``. Each may be a frozenset or a
function of the loss's resolved parameters (``sake`` with ``lambda1 = 0`` needs no
teacher).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

Outputs = dict[str, torch.Tensor]
Batch = dict[str, torch.Tensor]

REQUIREMENTS = frozenset({"teacher", "quadruplet"})


class Loss(nn.Module):
    """Base class of registered losses; see the module docstring for the contract."""

    requires: ClassVar[frozenset[str]] = frozenset()
    #: model outputs the loss reads besides "embedding", "logits" and "features"
    output_keys: ClassVar[frozenset[str]] = frozenset()
    #: keys of the teacher signal the loss reads; validation checks the manifest's teacher
    #: strategy ``provides`` them
    teacher_keys: ClassVar[frozenset[str]] = frozenset()
    #: tuple roles the loss reads (validation checks the sampler's ``roles`` has them)
    roles: ClassVar[frozenset[str]] = frozenset()

    def forward(self, out: Outputs, batch: Batch, teacher: Teacher | None) -> torch.Tensor:
        raise NotImplementedError


Teacher = dict[str, torch.Tensor]


def teacher_logits(teacher: Teacher | torch.Tensor | None) -> torch.Tensor | None:
    """The (B, 1000) logits of a teacher signal (a dict, or already a tensor)."""
    if isinstance(teacher, dict):
        return teacher["logits"]
    return teacher


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Per-item ``-sum_m q_m log softmax(logits)_m`` (B,), computed in float32."""
    return -(target_probs.float() * torch.log_softmax(logits.float(), dim=1)).sum(dim=1)


def tuple_rows(batch: Batch | dict, roles: tuple[str, ...], n_rows: int, who: str
               ) -> tuple[torch.Tensor, ...]:
    """The row indices (T,) of each of ``roles`` in a tuple batch: from ``batch["tuples"]``
    and ``batch["roles"]`` when the batch has them (the trainer adds them for every
    sampler with roles). A batch without them (a loss called directly, e.g. in a test)
    is read as whole tuples laid out in the order of ``roles``; ``n_rows`` is its size and
    ``who`` names the loss in errors."""
    if "tuples" in batch:
        have = tuple(batch.get("roles", ()))
        missing = [r for r in roles if r not in have]
        if missing:
            raise ValueError(f"{who}: the batch's tuples have the roles {', '.join(have)}, "
                             f"not {', '.join(missing)}")
        t = batch["tuples"]
        return tuple(t[:, have.index(r)] for r in roles)
    k = len(roles)
    if n_rows == 0 or n_rows % k:
        raise ValueError(f"{who}: expected a batch of tuples ({', '.join(roles)}) * N, a "
                         f"multiple of {k} rows, got {n_rows}")
    rows = torch.arange(n_rows).view(-1, k)
    return tuple(rows[:, j] for j in range(k))
