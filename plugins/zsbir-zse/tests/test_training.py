"""The training parts against naive references: the triplet and relation losses (train.py's
``triplet_loss * 2 + rn_loss * 4``), the pair outputs of the step, and the ``zse``
sampler's tuples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("zsbir_zse", reason="install the plugin: pip install -e plugins/zsbir-zse")

from zsbir_zse.training import (  # noqa: E402
    ROLES,
    ZseRelationLoss,
    ZseSampler,
    ZseTripletLoss,
    pair_outputs,
)

from zsbir.data.base import PHOTO, SKETCH  # noqa: E402

G = torch.Generator().manual_seed(0)


def batch_of(t: int, roles=ROLES) -> dict:
    k = len(roles)
    perm = torch.randperm(t * k, generator=G)  # tuples scattered over the batch rows
    return {"tuples": perm.view(t, k), "roles": roles}


def test_triplet_loss_against_a_naive_loop():
    b = batch_of(5)
    e = torch.randn(20, 6, generator=G, requires_grad=True)
    got = ZseTripletLoss()({"pair_embedding": e}, b)
    terms = []
    for a, p, n, _ in b["tuples"].tolist():
        dp = math.sqrt(sum((x - y + 1e-6) ** 2 for x, y in zip(e[a].tolist(), e[p].tolist())))
        dn = math.sqrt(sum((x - y + 1e-6) ** 2 for x, y in zip(e[a].tolist(), e[n].tolist())))
        terms.append(max(0.0, dp - dn + 1.0))
    assert got.item() == pytest.approx(sum(terms) / 5, rel=1e-6)
    got.backward()
    assert e.grad is not None and torch.isfinite(e.grad).all()


def test_relation_loss_against_a_naive_loop():
    b = batch_of(4)
    r = torch.rand(16, generator=G, requires_grad=True)
    got = ZseRelationLoss()({"pair_score": r}, b)
    t = b["tuples"].tolist()
    ref = (sum((r[a].item() - 0.99) ** 2 for a, *_ in t)
           + sum((r[n].item() - 0.01) ** 2 for _, _, n, _ in t)) / 8
    assert got.item() == pytest.approx(ref, rel=1e-6)
    got.backward()


def test_losses_name_the_step_when_its_outputs_are_missing():
    with pytest.raises(ValueError, match="zse_pairs"):
        ZseTripletLoss()({"embedding": torch.zeros(4, 2)}, batch_of(1))


@pytest.mark.parametrize("roles", [ROLES, ("anchor", "positive", "negative")])
def test_pair_outputs_put_each_image_in_its_pair(tiny_model, roles):
    t, k = 3, len(roles)
    b = batch_of(t, roles)
    x = torch.randn(t * k, 3, 32, 32, generator=G)
    dom = torch.zeros(t * k, dtype=torch.long)
    for j, role in enumerate(roles):
        if role in ("anchor", "negative_pair_sketch"):
            dom[b["tuples"][:, j]] = 1
    with torch.no_grad():
        out = tiny_model(x, dom)
        got = pair_outputs(tiny_model, out, {**b, "image": x, "domain": dom})
        tok = out["tokens"]
        for row in b["tuples"].tolist():
            r = dict(zip(roles, row, strict=True))
            s2 = r.get("negative_pair_sketch", r["anchor"])
            ps, pp = tiny_model.cross_pairs(tok[[r["anchor"]]], tok[[r["positive"]]])
            ns, nn_ = tiny_model.cross_pairs(tok[[s2]], tok[[r["negative"]]])
            pos = tiny_model.relation_score(ps, pp)[0]
            neg = tiny_model.relation_score(ns, nn_)[0]
            assert torch.allclose(got["pair_embedding"][r["anchor"]], ps[0, 0], atol=1e-6)
            assert torch.allclose(got["pair_embedding"][r["positive"]], pp[0, 0], atol=1e-6)
            assert torch.allclose(got["pair_embedding"][r["negative"]], nn_[0, 0], atol=1e-6)
            assert got["pair_score"][r["anchor"]].item() == pytest.approx(pos.item(), abs=1e-6)
            assert got["pair_score"][r["negative"]].item() == pytest.approx(neg.item(), abs=1e-6)
            if "negative_pair_sketch" in r:
                assert torch.allclose(got["pair_embedding"][s2], ns[0, 0], atol=1e-6)


def test_pair_outputs_refuse_independent_items(tiny_model):
    out = {"tokens": torch.zeros(4, 65, 16)}
    with pytest.raises(ValueError, match="needs tuple batches"):
        pair_outputs(tiny_model, out, {"image": torch.zeros(4, 3, 32, 32)})


def _split(n_classes=5, sk=3, ph=4, photo_only=()):
    labels, domains = [], []
    for c in range(n_classes):
        for _ in range(0 if c in photo_only else sk):
            labels.append(c * 10)
            domains.append(SKETCH)
        for _ in range(ph):
            labels.append(c * 10)
            domains.append(PHOTO)
    return np.array(labels), np.array(domains)


def test_sampler_tuples():
    labels, domains = _split(photo_only=(4,))
    s = ZseSampler(labels, domains, batch_size=8, seed=3, tuples_per_epoch=50)
    assert len(s) == 25 and s.roles == ROLES
    batches = s.epoch(0)
    assert len(batches) == 25 and all(len(b) == 8 for b in batches)
    tuples = np.concatenate(batches).reshape(-1, 4)
    a, p, n, s2 = tuples.T
    assert (domains[a] == SKETCH).all() and (domains[s2] == SKETCH).all()
    assert (domains[p] == PHOTO).all() and (domains[n] == PHOTO).all()
    assert (labels[a] == labels[p]).all() and (labels[a] == labels[s2]).all()
    assert (labels[n] != labels[a]).all()
    assert 40 in set(labels[n])  # the photo-only class is a negative, never an anchor
    assert 40 not in set(labels[a])
    assert [b.tolist() for b in s.epoch(0)] == [b.tolist() for b in batches]
    assert [b.tolist() for b in s.epoch(1)] != [b.tolist() for b in batches]


def test_sampler_draws_classes_uniformly():
    labels, domains = _split(n_classes=3, sk=1, ph=50)
    s = ZseSampler(labels, domains, batch_size=4, seed=0, tuples_per_epoch=3000)
    tuples = np.concatenate(s.epoch(0)).reshape(-1, 4)
    counts = np.bincount(labels[tuples[:, 0]] // 10, minlength=3)
    assert (abs(counts - 1000) < 120).all()  # classes, not items, are uniform


def test_sampler_refusals():
    labels, domains = _split()
    with pytest.raises(ValueError, match="multiple of 4"):
        ZseSampler(labels, domains, batch_size=6, seed=0)
    with pytest.raises(ValueError, match="at least 2 classes with photos"):
        ZseSampler(labels[:7], domains[:7], batch_size=4, seed=0)
