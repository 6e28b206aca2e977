"""The cosine triplet loss against a naive per-triplet loop (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("zsbir_clip", reason="install the plugin: pip install -e plugins/zsbir-clip")

from zsbir_clip.losses import ClipTripletLoss  # noqa: E402


def naive(e: torch.Tensor, margin: float) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    n = e.shape[0] // 3
    for i in range(n):
        a, p, q = e[3 * i].double(), e[3 * i + 1].double(), e[3 * i + 2].double()
        cos_p = (a * p).sum() / (a.norm() * p.norm())
        cos_n = (a * q).sum() / (a.norm() * q.norm())
        total = total + torch.clamp((1 - cos_p) - (1 - cos_n) + margin, min=0)
    return total / n


@pytest.mark.parametrize("seed,margin", [(0, 0.2), (1, 0.0), (2, 1.5)])
def test_matches_naive_loop(seed, margin):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(21, 16, generator=g)
    e1, e2 = e.clone().requires_grad_(), e.clone().requires_grad_()
    loss = ClipTripletLoss(margin=margin)({"embedding": e1}, {}, None)
    ref = naive(e2, margin)
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5, abs_tol=1e-6)
    loss.backward()
    ref.backward()
    assert torch.allclose(e1.grad, e2.grad.float(), atol=1e-5)


def test_margin_and_scale():
    """Cosine distances ignore the embedding's scale; a zero margin and a perfect triplet
    give zero."""
    a = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])  # sketch, photo+, photo-
    loss = ClipTripletLoss(margin=0.0)
    assert float(loss({"embedding": a}, {}, None)) == 0.0
    # d+ = 0, d- = 1: margin 1.5 -> 0.5
    assert math.isclose(float(ClipTripletLoss(margin=1.5)({"embedding": a * 7}, {}, None)), 0.5,
                        rel_tol=1e-6)


def test_reads_the_chosen_output_and_rejects_non_triplets():
    e = torch.randn(6, 4)
    loss = ClipTripletLoss(key="features")
    assert torch.isfinite(loss({"features": e, "embedding": torch.zeros(6, 4)}, {}, None))
    with pytest.raises(ValueError, match="multiple of 3"):
        ClipTripletLoss()({"embedding": torch.randn(8, 4)}, {}, None)
