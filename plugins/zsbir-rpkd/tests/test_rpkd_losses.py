"""Each RPKD loss against a naive per-item Python loop (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("zsbir_rpkd", reason="install the plugin: pip install -e plugins/zsbir-rpkd")

from zsbir_rpkd.losses import (  # noqa: E402
    RpkdContrastiveLoss,
    RpkdEmbeddingSupervisionLoss,
    RpkdInstanceLoss,
)

from zsbir.context import BuildContext  # noqa: E402


# ----------------------------------------------------------------------------- naive loops
def softmax(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    m = max(xs)
    ex = [torch.exp(x - m) for x in xs]
    z = sum(ex)
    return [e / z for e in ex]


def kl(p: list[torch.Tensor], q: list[torch.Tensor]) -> torch.Tensor:
    return sum(pj * (torch.log(pj) - torch.log(qj)) for pj, qj in zip(p, q))


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / (a.norm() * b.norm())


def naive_instance(s, t, tau):
    terms = []
    for i in range(len(s)):
        p_t = softmax([t[i, m] / tau for m in range(s.shape[1])])
        p_s = softmax([s[i, m] / tau for m in range(s.shape[1])])
        terms.append(tau * tau * kl(p_t, p_s))
    return sum(terms) / len(terms)


def naive_contrastive(e, f, tau):
    b = len(e)
    terms = []
    for i in range(b):
        others = [j for j in range(b) if j != i]
        p_s = softmax([cos(e[i], e[j]) / tau for j in others])
        p_t = softmax([cos(f[i], f[j]) / tau for j in others])
        terms.append(kl(p_t, p_s))
    return sum(terms) / b


def naive_embedding_supervision(z, f, centers, k, tau, st):
    terms = []
    for i in range(len(z)):
        sims = [(cos(f[i], centers[c]).item(), c) for c in range(len(centers))]
        nearest = [c for _, c in sorted(sims, reverse=True)[:k]]
        q = softmax([cos(f[i], centers[c]) / tau for c in nearest])
        p = softmax([z[i, c] / st for c in nearest])
        terms.append(kl(q, p))
    return sum(terms) / len(terms)


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.allclose(got.double(), want.double(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- rpkd_instance
@pytest.mark.parametrize("seed,tau", [(0, 1.0), (1, 4.0), (2, 0.5)])
def test_instance_matches_naive_loop(seed, tau):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(6, 12, generator=g) * 3).requires_grad_()
    t = torch.randn(6, 12, generator=g) * 3
    got = RpkdInstanceLoss(tau=tau)({"imagenet_logits": s}, {}, {"logits": t})
    s64 = s.detach().double().requires_grad_()
    want = naive_instance(s64, t.double(), tau)
    assert close(got, want)
    got.backward()
    want.backward()
    assert close(s.grad, s64.grad)


def test_instance_is_zero_when_student_matches_teacher_and_accepts_bare_logits():
    t = torch.randn(4, 10)
    loss = RpkdInstanceLoss(tau=2.0)
    assert loss({"imagenet_logits": t.clone()}, {}, t).abs().item() < 1e-6
    assert loss({"imagenet_logits": torch.randn(4, 10)}, {}, {"logits": t}).item() > 0


def test_instance_errors_are_clear():
    loss = RpkdInstanceLoss()
    with pytest.raises(KeyError, match="imagenet_head"):
        loss({"logits": torch.randn(2, 3)}, {}, {"logits": torch.randn(2, 1000)})
    with pytest.raises(ValueError, match="teacher signal"):
        loss({"imagenet_logits": torch.randn(2, 10)}, {}, None)
    with pytest.raises(ValueError, match="do not match"):
        loss({"imagenet_logits": torch.randn(2, 10)}, {}, {"logits": torch.randn(2, 9)})
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="tau"):
            RpkdInstanceLoss(tau=bad)


# ----------------------------------------------------------------------------- rpkd_contrastive
@pytest.mark.parametrize("seed,tau", [(0, 0.1), (1, 0.5), (2, 1.0)])
def test_contrastive_matches_naive_loop(seed, tau):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(7, 5, generator=g).requires_grad_()
    f = torch.randn(7, 9, generator=g)  # the teacher's width differs from the student's
    got = RpkdContrastiveLoss(tau=tau)({"embedding": e}, {}, {"features": f,
                                                               "logits": torch.randn(7, 3)})
    e64 = e.detach().double().requires_grad_()
    want = naive_contrastive(e64, f.double(), tau)
    assert close(got, want)
    got.backward()
    want.backward()
    assert close(e.grad, e64.grad)


def test_contrastive_single_item_gives_zero_with_gradient():
    e = torch.randn(1, 4, requires_grad=True)
    out = RpkdContrastiveLoss()({"embedding": e}, {}, {"features": torch.randn(1, 6)})
    out.backward()
    assert out.item() == 0.0 and torch.equal(e.grad, torch.zeros_like(e))


def test_contrastive_is_zero_for_identical_relations():
    f = torch.randn(5, 8)
    loss = RpkdContrastiveLoss(tau=0.2)({"embedding": 3 * f}, {}, {"features": f})
    assert loss.abs().item() < 1e-6


def test_contrastive_needs_teacher_features():
    with pytest.raises(ValueError, match="teacher\\['features'\\].*bare tensor"):
        RpkdContrastiveLoss()({"embedding": torch.randn(3, 4)}, {}, torch.randn(3, 1000))


# ----------------------------------------------------------------------------- embedding sup.
@pytest.mark.parametrize("seed,k,tau,st", [(0, 3, 0.1, 1.0), (1, 1, 0.5, 2.0),
                                           (2, 6, 1.0, 0.5), (3, 4, 0.2, 1.0)])
def test_embedding_supervision_matches_naive_loop(seed, k, tau, st):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(8, 6, generator=g) * 2).requires_grad_()
    f = torch.randn(8, 10, generator=g)
    centers = torch.randn(6, 10, generator=g)
    loss = RpkdEmbeddingSupervisionLoss(k=k, tau=tau, student_temperature=st)
    got = loss({"logits": z}, {}, {"features": f, "class_features": centers,
                                   "logits": torch.randn(8, 1000)})
    z64 = z.detach().double().requires_grad_()
    want = naive_embedding_supervision(z64, f.double(), centers.double(), k, tau, st)
    assert close(got, want)
    got.backward()
    want.backward()
    assert close(z.grad, z64.grad)
    # only the k selected classes of each item receive a gradient
    assert ((z.grad != 0).sum(1) <= k).all()


def test_embedding_supervision_names_the_teacher_to_use():
    loss = RpkdEmbeddingSupervisionLoss(k=2)
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match="class_features.*name = \"rpkd\""):
        loss({"logits": z}, {}, {"logits": torch.randn(3, 1000), "features": torch.randn(3, 5)})
    with pytest.raises(ValueError, match="class_features.*None"):
        loss({"logits": z}, {}, None)
    with pytest.raises(ValueError, match="features"):
        loss({"logits": z}, {}, {"class_features": torch.randn(4, 5)})
    with pytest.raises(ValueError, match="do not match"):
        loss({"logits": z}, {}, {"class_features": torch.randn(5, 5),
                                 "features": torch.randn(3, 5)})
    with pytest.raises(ValueError, match="k = 5 exceeds"):
        RpkdEmbeddingSupervisionLoss(k=5)({"logits": z}, {}, {
            "class_features": torch.randn(4, 5), "features": torch.randn(3, 5)})


def test_embedding_supervision_checks_k_against_the_seen_classes():
    ctx = BuildContext(seen_classes=["a", "b", "c"])
    RpkdEmbeddingSupervisionLoss(k=3, ctx=ctx)
    with pytest.raises(ValueError, match="exceeds the 3 seen classes"):
        RpkdEmbeddingSupervisionLoss(k=4, ctx=ctx)
    with pytest.raises(ValueError, match="k must be"):
        RpkdEmbeddingSupervisionLoss(k=0)


def test_teacher_signal_gets_no_gradient():
    f = torch.randn(5, 6, requires_grad=True)
    c = torch.randn(3, 6, requires_grad=True)
    t = torch.randn(5, 10, requires_grad=True)
    out = {"embedding": torch.randn(5, 4, requires_grad=True),
           "logits": torch.randn(5, 3, requires_grad=True),
           "imagenet_logits": torch.randn(5, 10, requires_grad=True)}
    sig = {"logits": t, "features": f, "class_features": c}
    total = (RpkdInstanceLoss()(out, {}, sig) + RpkdContrastiveLoss()(out, {}, sig)
             + RpkdEmbeddingSupervisionLoss(k=2)(out, {}, sig))
    total.backward()
    assert f.grad is None and c.grad is None and t.grad is None
    assert all(v.grad is not None for v in out.values())
