"""The ``peft_ema`` teacher, its hooks called directly (as zsbir's trainer calls them)."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from zsbir_peft.backbones import peft_lora
from zsbir_peft.teacher import EmaTeacher, ema_momentum

from zsbir.models.net import RetrievalNet


class _Head(nn.Module):
    """A small head: features -> embedding (and a BatchNorm buffer that changes)."""

    embed_dim = 8

    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, f, domain=None):  # noqa: ANN001
        return {"embedding": self.bn(self.fc(f))}


def _student(factories) -> RetrievalNet:
    bb = peft_lora(factories["vit"](), rank=2, alpha=4.0, targets=["*.qkv", "*.mlp.fc1"])
    return RetrievalNet(bb, _Head(bb.num_features))


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(4, 3, 32, 32, generator=g),
            "domain": torch.tensor([0, 1, 0, 1])}


def _train_steps(student: nn.Module, teacher: EmaTeacher | None, steps: range,
                 opt: torch.optim.Optimizer) -> None:
    student.train()
    for k in steps:
        out = student(**{"image": _batch(k)["image"], "domain": _batch(k)["domain"]})
        loss = out["embedding"].square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if teacher is not None:
            teacher.on_after_optimizer_step(k + 1)


def test_cosine_momentum_schedule_is_dinos():
    # DINO's utils.cosine_scheduler(base, 1, ...): final + 0.5 (base - final)(1 + cos(pi k/K))
    K = 10
    for k in range(K):
        dino = 1 + 0.5 * (0.996 - 1) * (1 + math.cos(math.pi * k / K))
        assert ema_momentum(0.996, k, K) == pytest.approx(dino, abs=1e-15)
    assert ema_momentum(0.996, 0, K) == pytest.approx(0.996)
    assert ema_momentum(0.9, K, K) == 1.0 and ema_momentum(0.9, 3, 0) == 1.0


def test_ema_update_is_the_formula_and_frozen_tensors_are_shared(factories):
    torch.manual_seed(0)
    student = _student(factories)
    teacher = EmaTeacher(student, momentum=0.9)
    teacher.on_train_start(SimpleNamespace(total_steps=4, steps_per_epoch=2, epochs=2,
                                           global_step=0))
    shared = [n for n, p in student.named_parameters() if not p.requires_grad]
    t_params = dict(teacher.ema.named_parameters())
    assert shared and all(t_params[n] is p for n, p in student.named_parameters()
                          if not p.requires_grad)  # not a second copy of the base
    assert all(not p.requires_grad for p in teacher.ema.parameters())
    # a base loaded by replacing the student's Parameters is shared again at train start
    qkv = student.backbone.backbone.model.blocks[0].attn.qkv
    qkv.weight = nn.Parameter(qkv.weight.detach() + 1, requires_grad=False)
    teacher.on_train_start(SimpleNamespace(total_steps=4, steps_per_epoch=2, epochs=2,
                                           global_step=0))
    assert teacher.ema.backbone.backbone.model.blocks[0].attn.qkv.weight is qkv.weight
    t_params = dict(teacher.ema.named_parameters())
    before = {n: p.detach().clone() for n, p in teacher.ema.named_parameters()}
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5)
    _train_steps(student, None, range(1), opt)
    teacher.on_after_optimizer_step(1)
    m = ema_momentum(0.9, 0, 4)
    assert teacher.momentum == m
    s = dict(student.named_parameters())
    changed = 0
    for n in teacher.tracked:
        expected = m * before[n] + (1 - m) * s[n].detach()
        torch.testing.assert_close(t_params[n], expected, rtol=0, atol=1e-7)
        changed += not torch.equal(t_params[n], before[n])
    assert changed > 0
    assert set(teacher.tracked) == {n for n, p in s.items() if p.requires_grad}
    for n, b in student.named_buffers():  # buffers copied, not averaged
        assert torch.equal(dict(teacher.ema.named_buffers())[n], b), n
    # the momentum schedule of the next step
    teacher.on_after_optimizer_step(2)
    assert teacher.momentum == pytest.approx(ema_momentum(0.9, 1, 4))


def test_signal_inference_model_and_no_gradient(factories):
    student = _student(factories)
    teacher = EmaTeacher(student, evaluate_ema=True)
    signal = teacher(_batch())
    assert set(signal) == {"embedding", "features"} == set(EmaTeacher.provides)
    assert signal["embedding"].shape == (4, 8) and not signal["embedding"].requires_grad
    student.eval()
    with torch.no_grad():
        out = student(_batch()["image"], _batch()["domain"])
    assert torch.equal(signal["embedding"], out["embedding"])  # EMA copy == student at init
    assert teacher.inference_model() is teacher.ema
    assert EmaTeacher(student, evaluate_ema=False).inference_model() is None
    # the EMA copy loads into a freshly built student: same keys
    assert set(teacher.ema.state_dict()) == set(student.state_dict())


def test_state_dict_resumes_bit_exactly(factories):
    """Train 6 steps straight; or 3 steps, save the teacher, rebuild everything from the
    saved state, 3 more steps: the EMA weights are bit-identical."""
    info = SimpleNamespace(total_steps=6, steps_per_epoch=3, epochs=2, global_step=0)

    def fresh():
        torch.manual_seed(0)
        student = _student(factories)
        teacher = EmaTeacher(student, momentum=0.5)
        opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5)
        return student, teacher, opt

    s1, t1, o1 = fresh()
    t1.on_train_start(info)
    _train_steps(s1, t1, range(6), o1)

    s2, t2, o2 = fresh()
    t2.on_train_start(info)
    _train_steps(s2, t2, range(3), o2)
    saved = copy.deepcopy({"student": s2.state_dict(), "teacher": t2.state_dict(),
                           "opt": o2.state_dict()})
    assert all(isinstance(v, torch.Tensor) for v in saved["teacher"]["params"].values())
    assert set(saved["teacher"]["params"]) == set(t2.tracked)  # the base is not in it
    s3, t3, o3 = fresh()
    s3.load_state_dict(saved["student"])
    t3.load_state_dict(saved["teacher"])
    o3.load_state_dict(saved["opt"])
    t3.on_train_start(SimpleNamespace(total_steps=6, steps_per_epoch=3, epochs=2,
                                      global_step=3))
    _train_steps(s3, t3, range(3, 6), o3)
    a, b = t1.ema.state_dict(), t3.ema.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert t1.updates == t3.updates == 6 and t1.momentum == t3.momentum
    with pytest.raises(ValueError, match="do not match"):
        t3.load_state_dict({**saved["teacher"], "params": {"x": torch.zeros(1)}})


def test_bad_momentum_and_schedule_are_refused(factories):
    student = _student(factories)
    with pytest.raises(ValueError, match="momentum"):
        EmaTeacher(student, momentum=1.5)
    with pytest.raises(ValueError, match="schedule"):
        EmaTeacher(student, schedule="linear")
    constant = EmaTeacher(student, momentum=0.7, schedule="constant")
    assert constant.momentum_at(1) == constant.momentum_at(100) == 0.7


def test_a_student_without_an_embedding_is_named():
    class FeaturesOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, image, domain=None):  # noqa: ANN001
            return {"features": self.fc(image.mean(dim=(2, 3)))}

    teacher = EmaTeacher(FeaturesOnly())
    with pytest.raises(KeyError, match=r"no \['embedding'\]"):
        teacher(_batch())
