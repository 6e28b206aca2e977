"""ColBERT's late-interaction MaxSim as a pair scorer (``[pair_scorer] name = "maxsim"``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from zsbir.registry import pair_scorers

__all__ = ["MaxSim"]


@pair_scorers.register("maxsim")
class MaxSim:
    """Late-interaction MaxSim of ColBERT (Khattab & Zaharia, "ColBERT: Efficient and
    Effective Passage Search via Contextualized Late Interaction over BERT", SIGIR 2020,
    Eq. 3): ``s(q, d) = sum_i max_j <q_i, d_j>`` over the L2-normalized token vectors of the
    query (``q_i``) and of the gallery item (``d_j``). It has no weights: it scores the
    model's ``tokens`` output (a ViT's output tokens, a CNN's spatial feature map as one
    token per position) as they are.

    Args:
        output: the per-item model output read, (N, T, D) tokens (a (N, D) output counts
            as one token per item).
        normalize: L2-normalize every token first (ColBERT's cosine MaxSim); ``false``:
            raw dot products.
        reduce: ``"sum"`` over the query tokens (the paper's) or ``"mean"`` (the same
            ranking per query; scores comparable across queries of different lengths).
    """

    def __init__(self, output: str = "tokens", normalize: bool = True,
                 reduce: Literal["sum", "mean"] = "sum"):
        if reduce not in ("sum", "mean"):
            raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
        self.output, self.normalize, self.reduce = output, bool(normalize), reduce
        self.outputs: tuple[str, ...] = (output,)
        self.tag = "maxsim"

    def prepare(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per item, once: the tokens as (N, T, D) float32, L2-normalized (``normalize``)."""
        t = _tokens(outputs[self.output])
        if self.normalize:
            t = torch.nn.functional.normalize(t, dim=-1)
        return {**outputs, self.output: t}

    def score_pairs(self, query: Mapping[str, torch.Tensor],
                    gallery: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(P,) MaxSim scores of the aligned pairs (row i of ``query`` with row i of
        ``gallery``), both sides :meth:`prepare` d."""
        q, g = _tokens(query[self.output]), _tokens(gallery[self.output])
        if q.shape[0] != g.shape[0] or q.shape[2] != g.shape[2]:
            raise ValueError(f"maxsim: query tokens {tuple(q.shape)} and gallery tokens "
                             f"{tuple(g.shape)} do not pair (same count P and width D)")
        sim = torch.bmm(q, g.transpose(1, 2))  # (P, Tq, Tg)
        best = sim.amax(dim=2)
        return best.mean(dim=1) if self.reduce == "mean" else best.sum(dim=1)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(P, T, D) float32 tokens; a (P, D) output is one token per item."""
    x = x.float()
    if x.ndim == 2:
        return x[:, None, :]
    if x.ndim != 3:
        raise ValueError(f"maxsim reads (P, T, D) tokens, got shape {tuple(x.shape)}")
    return x
