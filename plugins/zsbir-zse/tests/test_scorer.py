"""Pair scorer ``zse_rn`` through the core's pair batching (the exhaustive path and top-K
re-scoring use it), with and without the per-image projections, against the naive
per-pair relation score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("zsbir_zse", reason="install the plugin: pip install -e plugins/zsbir-zse")

from zsbir_zse.scorer import ZseRelationScorer  # noqa: E402

from zsbir.pairs import PairBatcher  # noqa: E402


def naive(model, s_tok: torch.Tensor, p_tok: torch.Tensor) -> np.ndarray:
    """Every pair alone through the cross-attention's plain forward and the RN."""
    out = np.empty((len(s_tok), len(p_tok)))
    with torch.no_grad():
        for i in range(len(s_tok)):
            for j in range(len(p_tok)):
                s, p = model.cross(s_tok[i:i + 1], p_tok[j:j + 1])
                out[i, j] = float(model.relation_score(s, p)[0])
    return out


@pytest.mark.parametrize("precompute", [False, True])
def test_exhaustive_scores_through_the_core_batching(tiny_model, precompute):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 3, 32, 32, generator=g)
    with torch.no_grad():
        q = tiny_model(x[:4], torch.ones(4, dtype=torch.long))
        p = tiny_model(x[4:], torch.zeros(5, dtype=torch.long))
    scorer = ZseRelationScorer(tiny_model, precompute=precompute)
    assert scorer.outputs == (("tokens", "zse_ca") if precompute else ("tokens",))
    batcher = PairBatcher(scorer, {k: q[k].numpy() for k in scorer.outputs},
                          {k: p[k].numpy() for k in scorer.outputs}, batch_pairs=7)
    got = batcher.rows(np.arange(4)).numpy()
    np.testing.assert_allclose(got, naive(tiny_model, q["tokens"], p["tokens"]), atol=1e-6)


def test_scorer_needs_a_zse_model():
    with pytest.raises(ValueError, match=r'set \[model\] name = "zse"'):
        ZseRelationScorer(torch.nn.Linear(2, 2))


def test_scorer_leaves_a_training_model_in_training(tiny_model):
    tiny_model.train()
    t = torch.randn(2, 65, 16)
    scorer = ZseRelationScorer(tiny_model)
    a = scorer.score_pairs({"tokens": t[:1]}, {"tokens": t[1:]})
    b = scorer.score_pairs({"tokens": t[:1]}, {"tokens": t[1:]})
    assert torch.equal(a, b) and tiny_model.training  # scored in eval mode (no dropout)
