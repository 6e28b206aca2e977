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

Optional: ``prepare(outputs) -> outputs`` (a mapping of name -> (N, ...) tensors, returned
with the same names and lengths): per-item work the core then does once per item instead
of once per pair (MaxSim's normalization; a projection of the tokens). When a scorer
defines it, the core hands ``score_pairs`` prepared outputs only, so a caller of
``score_pairs`` prepares both sides first: ``score_pairs(prepare(q), prepare(g))``.

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

__all__ = ["PairScorer", "make_pair_scorer", "needed_outputs", "outputs_of"]


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


def make_pair_scorer(name: str, model: torch.nn.Module | None = None,
                     device: str | torch.device = "cpu", what: str = "--pair-scorer") -> Any:
    """The registered pair scorer ``name`` with its default parameters, resolved and built
    as a ``[pair_scorer]`` table is, around ``model`` (for a scorer that reads one).
    ``ValueError`` (one line, naming ``what``) for an unknown name or a scorer that cannot
    be built so."""
    from zsbir.build import build_component
    from zsbir.context import BuildContext
    from zsbir.manifest import ManifestError, resolve_component
    from zsbir.registry import RegistryError

    try:
        table = resolve_component("pair_scorers", {"name": name}, what)
        return build_component("pair_scorers", table, BuildContext(device=torch.device(device)),
                               model=model)
    except ManifestError as exc:
        raise ValueError("; ".join(str(p) for p in exc.problems)) from exc
    except (RegistryError, ValueError, TypeError) as exc:
        raise ValueError(f"{what} {name}: {exc}") from exc
