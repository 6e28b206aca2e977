"""Generalized ZS-SBIR: rankings that use the model's own seen-class classifier.

In the generalized task the gallery also holds photos of the *seen* classes (a user's photo
folder), and those photos crowd the top of an unseen sketch's ranking: the embedding was
trained to put every photo near *some* seen class, so seen-class photos sit in the dense
part of the space. The model's seen-class classifier (``outputs = ("logits",)``, contract
in :mod:`.base`) tells how sure it is that an item is one of its seen classes. With ``z(x)``
an item's logits over the ``C`` seen classes and temperature ``T``:

    p(x) = softmax(z(x) / T),        sigma(x) = max_c p_c(x)    (seen-class confidence)

- ``seen_suppress`` -- calibrated stacking (Chao, Changpinyo, Gong & Sha, "An Empirical Study
  and Analysis of Generalized Zero-Shot Learning for Object Recognition in the Wild", ECCV
  2016, Eq. 3: ``y = argmax_c f_c(x) - gamma 1[c in S]``, a calibration constant
  subtracted from the seen classes' scores). In retrieval every gallery item is a candidate
  and whether it belongs to a seen class is unknown, so the indicator becomes the
  classifier's confidence (a max-softmax seen/unseen detector, Hendrycks & Gimpel, ICLR
  2017)::

      s'(q, g) = cos(q, g) - gamma * sigma(g)

- ``seen_gate`` -- the query's own seen/unseen posterior gates the suppression, as the
  novelty-detection gate of Socher, Ganjoo, Manning & Ng ("Zero-Shot Learning Through
  Cross-Modal Transfer", NeurIPS 2013, Eq. 5: a seen-class expert for items detected as
  seen, the zero-shot expert otherwise) made soft as in Atzmon & Chechik ("Adaptive
  Confidence Smoothing for Generalized Zero-Shot Learning", CVPR 2019, Eq. 1:
  ``p(y|x) = p(S|x) p(y|S, x) + p(U|x) p(y|U, x)``). A sketch of a seen class must not
  have its own class's photos pushed down::

      u(q) = sigmoid((tau - sigma(q)) / width)          (probability q is of an unseen class)
      s'(q, g) = cos(q, g) - gamma * u(q) * sigma(g) + beta * (1 - u(q)) * <p(q), p(g)>

  ``width -> 0`` is Socher et al.'s hard threshold; the ``beta`` term is the seen-class
  expert: for a query judged seen, photos the classifier puts in the same seen class as the
  sketch rise (``<p(q), p(g)>`` is the probability both are of one seen class).
- ``seen_suppress_kr`` / ``seen_gate_kr`` -- the same corrections on the k-reciprocal
  score (Zhong et al., CVPR 2017; :mod:`.kreciprocal`) instead of the cosine:
  ``s'(q, g) = -d*(q, g) - gamma u(q) sigma(g) + beta (1 - u(q)) <p(q), p(g)>``
  (``u = 1``, ``beta = 0`` for ``seen_suppress_kr``); k-reciprocal's neighbourhoods stay
  those of the embedding, the correction is added to its final score.

Nothing here sees a label; the gallery statistics are per item (inductive), so a query's
scores depend only on it. Parameters are chosen on seen-class validation data only by
``zsbir tune RUN_DIR`` (:mod:`zsbir.engine.tune`); the defaults below are starting values,
not measured optima. Cost: a (G, C) softmax at fit, then per query chunk one (n, C) x
(C, G) product when ``beta > 0``; the rest is the base ranking's.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch

from zsbir.constraints import Range
from zsbir.registry import rerankers

from .base import Reranker
from .kreciprocal import KReciprocal

__all__ = ["SeenPosterior"]


def _fmt(x: float) -> str:
    return f"{x:g}"


class SeenPosterior(Reranker):
    """Seen-class suppression and gating on the cosine or k-reciprocal score (module
    docstring); ``gated = False`` is calibrated stacking (``u = 1``, no ``beta`` term)."""

    outputs = ("logits",)

    def __init__(self, gamma: float = 0.3, temperature: float = 1.0, gated: bool = False,
                 tau: float = 0.5, width: float = 0.05, beta: float = 0.0,
                 kr: KReciprocal | None = None, chunk_size: int = 1024, ctx: Any = None):
        super().__init__(chunk_size, ctx)
        self.gamma, self.temperature = float(gamma), float(temperature)
        self.gated, self.tau, self.width, self.beta = gated, float(tau), float(width), \
            float(beta)
        self.kr = kr
        if kr is not None:
            kr.device = self.device

    @property
    def tag(self) -> str:
        base = "seen_gate" if self.gated else "seen_suppress"
        if self.kr is not None:
            base += f"_kr{self.kr.k1}"
        tag = f"{base}_g{_fmt(self.gamma)}"
        if self.temperature != 1.0:
            tag += f"_T{_fmt(self.temperature)}"
        if self.gated:
            tag += f"_tau{_fmt(self.tau)}_w{_fmt(self.width)}"
            if self.beta:
                tag += f"_b{_fmt(self.beta)}"
        return tag

    # -- posteriors
    def posterior(self, logits: torch.Tensor) -> torch.Tensor:
        """``p(x) = softmax(z / T)`` over the seen classes, (n, C)."""
        return torch.softmax(logits / self.temperature, dim=1)

    def unseen_prob(self, p_q: torch.Tensor) -> torch.Tensor:
        """``u(q)``: 1 for calibrated stacking, the gate of the query's confidence else."""
        if not self.gated:
            return p_q.new_ones(p_q.shape[0])
        return torch.sigmoid((self.tau - p_q.max(1).values) / self.width)

    def _fit(self, gallery: torch.Tensor, queries: torch.Tensor | None) -> None:
        self.p_g = self.posterior(self.gallery_outputs["logits"])
        self.sigma_g = self.p_g.max(1).values
        if self.kr is not None:  # fitted on the same unit gallery
            self.kr.gallery = gallery
            self.kr._fit(gallery, None)

    # -- scoring
    def base_scores(self, q: torch.Tensor) -> torch.Tensor:
        """The ranking that is corrected: cosine, or the k-reciprocal score."""
        return self.kr._scores(q) if self.kr is not None else q @ self.gallery.T

    def correct(self, s: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
        """``s - gamma u(q) sigma(g) + beta (1 - u(q)) <p(q), p(g)>`` for base scores ``s``
        (n, G) of queries with logits ``logits_q`` (n, C)."""
        p_q = self.posterior(logits_q)
        u = self.unseen_prob(p_q)
        out = s - self.gamma * u[:, None] * self.sigma_g[None, :]
        if self.gated and self.beta:
            out = out + self.beta * (1 - u)[:, None] * (p_q @ self.p_g.T)
        return out

    def _scores_out(self, q: torch.Tensor, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = outputs["logits"]
        if logits.shape[1] != self.p_g.shape[1]:
            raise ValueError(f"reranker {self.tag!r}: query logits have "
                             f"{logits.shape[1]} classes, the gallery's {self.p_g.shape[1]}")
        return self.correct(self.base_scores(q), logits)


Gamma = Annotated[float, Range(ge=0)]
Temperature = Annotated[float, Range(gt=0)]
Width = Annotated[float, Range(gt=0)]
Chunk = Annotated[int, Range(ge=1)]


@rerankers.register("seen_suppress")
def seen_suppress(gamma: Gamma = 0.3, temperature: Temperature = 1.0,
                  chunk_size: Chunk = 1024, ctx: Any = None) -> SeenPosterior:
    """Calibrated seen-class suppression for generalized retrieval (calibrated stacking,
    Chao et al., ECCV 2016).

    ``cos(q, g) - gamma * max softmax(z(g) / T)``, z the seen-class classifier's logits;
    ``zsbir tune`` chooses gamma and T on seen-class data."""
    return SeenPosterior(gamma, temperature, False, chunk_size=chunk_size, ctx=ctx)


@rerankers.register("seen_gate")
def seen_gate(gamma: Gamma = 0.3, temperature: Temperature = 1.0,
              tau: Annotated[float, Range(ge=0, le=1)] = 0.5, width: Width = 0.05,
              beta: Gamma = 0.0, chunk_size: Chunk = 1024, ctx: Any = None) -> SeenPosterior:
    """Seen-class suppression gated by the query's own seen/unseen posterior
    (Socher et al., NeurIPS 2013; Atzmon & Chechik, CVPR 2019).

    ``cos - gamma u(q) sigma(g) + beta (1 - u(q)) <p(q), p(g)>``,
    ``u(q) = sigmoid((tau - max p(q)) / width)``."""
    return SeenPosterior(gamma, temperature, True, tau, width, beta,
                         chunk_size=chunk_size, ctx=ctx)


@rerankers.register("seen_suppress_kr")
def seen_suppress_kr(gamma: Gamma = 0.3, temperature: Temperature = 1.0,
                     k1: Annotated[int, Range(ge=1)] = 20, k2: Annotated[int, Range(ge=1)] = 6,
                     lambda_value: Annotated[float, Range(ge=0, le=1)] = 0.3,
                     chunk_size: Chunk = 256, ctx: Any = None) -> SeenPosterior:
    """Calibrated seen-class suppression on k-reciprocal re-ranking (Chao et al., ECCV
    2016; Zhong et al., CVPR 2017).

    ``-d*(q, g) - gamma * max softmax(z(g) / T)``."""
    kr = KReciprocal(k1, k2, lambda_value, False, chunk_size, ctx)
    return SeenPosterior(gamma, temperature, False, kr=kr, chunk_size=chunk_size, ctx=ctx)


@rerankers.register("seen_gate_kr")
def seen_gate_kr(gamma: Gamma = 0.3, temperature: Temperature = 1.0,
                 tau: Annotated[float, Range(ge=0, le=1)] = 0.5, width: Width = 0.05,
                 beta: Gamma = 0.0, k1: Annotated[int, Range(ge=1)] = 20,
                 k2: Annotated[int, Range(ge=1)] = 6,
                 lambda_value: Annotated[float, Range(ge=0, le=1)] = 0.3,
                 chunk_size: Chunk = 256, ctx: Any = None) -> SeenPosterior:
    """Query-gated seen-class suppression on k-reciprocal re-ranking (Socher et al., 2013;
    Atzmon & Chechik, 2019; Zhong et al., 2017).

    ``-d*(q, g) - gamma u(q) sigma(g) + beta (1 - u(q)) <p(q), p(g)>``."""
    kr = KReciprocal(k1, k2, lambda_value, False, chunk_size, ctx)
    return SeenPosterior(gamma, temperature, True, tau, width, beta, kr=kr,
                         chunk_size=chunk_size, ctx=ctx)
