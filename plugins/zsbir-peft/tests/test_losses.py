"""``peft_ema_distill`` against per-item loops."""

from __future__ import annotations

import pytest
import torch
from zsbir_peft.losses import EmaDistillLoss

from zsbir.registry import declared


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(5, 6, generator=g, requires_grad=True)
    t = torch.randn(5, 6, generator=g)
    return {"embedding": s, "features": s * 2}, {"embedding": t, "features": t * 3}


def test_cosine_equals_a_per_item_loop_and_teacher_gets_no_gradient():
    out, teacher = _data()
    t = teacher["embedding"].requires_grad_(True)
    value = EmaDistillLoss("cosine")(out, {}, teacher)
    s = out["embedding"]
    naive = sum(1 - (s[i] @ t[i]) / (s[i].norm() * t[i].norm()) for i in range(5)) / 5
    torch.testing.assert_close(value, naive)
    value.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


@pytest.mark.parametrize("normalize", [False, True])
def test_mse_equals_a_per_item_loop(normalize):
    out, teacher = _data(1)
    s, t = out["features"], teacher["features"]
    value = EmaDistillLoss("mse", key="features", normalize=normalize)(out, {}, teacher)
    if normalize:
        s, t = s / s.norm(dim=1, keepdim=True), t / t.norm(dim=1, keepdim=True)
    naive = sum(((s[i] - t[i]) ** 2).sum() / 6 for i in range(5)) / 5
    torch.testing.assert_close(value, naive)


def test_declares_the_teacher_key_it_reads_and_refuses_a_missing_signal():
    assert declared(EmaDistillLoss, "requires") == {"teacher"}
    assert declared(EmaDistillLoss, "teacher_keys", {"key": "features"}) == {"features"}
    assert declared(EmaDistillLoss, "teacher_keys", {}) == {"embedding"}
    out, _ = _data()
    with pytest.raises(ValueError, match="peft_ema"):
        EmaDistillLoss()(out, {}, None)
    assert EmaDistillLoss()(out, {}, {"embedding": out["embedding"].detach()}) < 1e-6
