"""Pair scoring (kind ``pair_scorers``, manifest ``[pair_scorer]``): a score for each given
(query, gallery item) pair, computed from both items' stored per-item model outputs
(tokens, not only one vector): cross-encoders, relation networks, late interaction.

>>> from zsbir.registry import pair_scorers
>>> s = pair_scorers.get("maxsim")()                                   # doctest: +SKIP
>>> s.score_pairs({"tokens": q_tok}, {"tokens": g_tok})  # (P,) scores # doctest: +SKIP

- :mod:`.base`: the contract (:class:`PairScorer`) and how a scorer is built;
- :mod:`.batching`: the core's batching (:class:`PairBatcher`: aligned blocks of
  ``batch_pairs`` pairs on the device, every per-item output computed once) and top-K
  re-scoring of an embedding ranking (:func:`stable_topk`, :func:`rescore_order`,
  :func:`merged_scores`);
- :mod:`.maxsim`: ColBERT's late-interaction MaxSim (``maxsim``), the built-in scorer;
- :mod:`.reference`: naive per-pair and per-query references the tests compare with.

Evaluation (:mod:`zsbir.engine.pair_eval`), the photo index's stored outputs
(:mod:`zsbir.search.outputs`) and ``zsbir search --pair-scorer`` use them.
"""

from .base import PairScorer, make_pair_scorer, needed_outputs
from .batching import PairBatcher, merged_scores, rescore_order, stable_topk

__all__ = ["PairBatcher", "PairScorer", "make_pair_scorer", "merged_scores", "needed_outputs",
           "rescore_order", "stable_topk"]
