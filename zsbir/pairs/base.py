"""The pair-scorer contract (kind ``pair_scorers``, manifest ``[pair_scorer]``).

A pair scorer is a registered class or function whose object has:

- ``tag: str``: its label in ``metrics.json`` (``"<hasher>+<tag>@<K>"`` for top-K
  re-scoring, ``"<tag>-exhaustive"`` for every pair);
- ``outputs: tuple[str, ...]``: the per-item model outputs it reads (keys of the model's
  ``forward(image, domain)`` dict, e.g. ``("tokens",)``); the core computes them once per
  item (:func:`zsbir.engine.embed.embed_outputs`) and the photo index stores them
  (:mod:`zsbir.search.outputs`);
- ``score_pairs(query, gallery) -> (P,)``: ``query`` and ``gallery`` map each name of
  ``outputs`` to a tensor whose axis 0 has the same length P in both (row ``i`` of the
  query side pairs with row ``i`` of the gallery side: aligned pairs, already on the
  device); returns P float scores, higher = more similar. A pair's score must not depend
  on the other pairs of the block (eval mode, no batch statistics): the core cuts the
  pairs into blocks of ``batch_pairs`` as it likes.

A scorer whose weights belong to the trained model (a cross-attention + relation network)
names ``model`` in its constructor signature and is given the model being evaluated (the
student, or its ``inference_model()``: EMA weights, a checkpoint's), whose submodules it
reads; a scorer without weights ignores it. ``ctx`` is offered as to every component.

``[pair_scorer]`` keys besides the scorer's own parameters (checked by ``zsbir validate``):
``top_k`` (re-score the top K of every hasher's ranking; 0: off), ``exhaustive`` (score
every (query, gallery item) pair), ``batch_pairs`` (pairs per block on the device).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["PairScorer", "needed_outputs", "outputs_of"]


@runtime_checkable
class PairScorer(Protocol):
    """What the core needs of a pair scorer (see the module docstring)."""

    tag: str
    outputs: tuple[str, ...]

    def score_pairs(self, query: Mapping[str, torch.Tensor],
                    gallery: Mapping[str, torch.Tensor]) -> torch.Tensor: ...


def outputs_of(component: Any) -> tuple[str, ...]:
    """A component's declared per-item ``outputs`` (contract 1), as a tuple of names."""
    value = getattr(component, "outputs", ()) or ()
    if isinstance(value, str):
        value = (value,)
    return tuple(str(v) for v in value)


def needed_outputs(components: Sequence[Any], extra: Sequence[str] = ()) -> tuple[str, ...]:
    """Every per-item output the ``components`` (a pair scorer, rerankers) declare, plus
    ``extra``, without ``"embedding"`` (always computed) and without repeats, in order."""
    out: list[str] = []
    for name in [n for c in components if c is not None for n in outputs_of(c)] + list(extra):
        if name != "embedding" and name not in out:
            out.append(name)
    return tuple(out)
