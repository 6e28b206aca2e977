"""Validation of what feeds the losses (zsbir/wiring.py): a step's ``provides`` serves a
loss's teacher signal, a sampler's ``roles`` its tuples, and ``[[optimizer.groups]]``
entries are checked with their key paths."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest

from zsbir.manifest import ManifestError, load, resolve

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


class SignalStep:
    """Test-only step that computes the teacher logits itself (no [teacher] table)."""

    provides: ClassVar[frozenset[str]] = frozenset({"logits"})

    def __call__(self, s, batch):  # pragma: no cover - never run here
        raise NotImplementedError


@pytest.fixture
def signal_step():
    from zsbir.registry import steps

    steps.add("test_signal", SignalStep)
    yield "test_signal"
    steps._components.pop("test_signal", None)


def quick() -> dict:
    raw = load(EXAMPLES / "quickstart.toml")
    raw["data"]["workers"] = 0
    raw["model"]["head"]["imagenet_head"] = "random"
    return raw


def problems(raw: dict) -> list[str]:
    with pytest.raises(ManifestError) as info:
        resolve(raw, "t.toml")
    return [str(p) for p in info.value.problems]


def test_a_step_that_provides_the_signal_replaces_the_teacher(signal_step):
    raw = quick()
    raw["losses"].append({"name": "knowledge_preservation"})
    assert any("needs a teacher signal" in p for p in problems(raw))
    raw["train"] = {**raw.get("train", {}), "step": {"name": signal_step}}
    resolve(raw)


def test_roles_of_the_sampler_must_cover_the_loss():
    raw = quick()
    raw["losses"] = [{"name": "domain_quadruplet"}]
    raw["sampler"] = {"name": "triplet"}
    raw["train"] = {**raw.get("train", {}), "batch_size": 12}
    msgs = problems(raw)
    assert any("needs quadruplet batches" in p and "negative_sketch" in p for p in msgs), msgs
    raw["sampler"] = {"name": "quadruplet"}
    raw["train"]["batch_size"] = 18
    msgs = problems(raw)
    assert any(p.startswith("train.batch_size") and "multiple of 4" in p for p in msgs), msgs
    raw["train"]["batch_size"] = 16
    resolve(raw)


def test_optimizer_groups_are_checked_with_their_paths():
    raw = quick()
    raw["optimizer"]["groups"] = [{"match": "model.head.*", "lr": 1e-2},
                                  {"lr": -1, "weight_decay": "x", "nesterov": True}]
    msgs = problems(raw)
    assert {p.split(":")[0] for p in msgs} == {
        "optimizer.groups[1].match", "optimizer.groups[1].lr",
        "optimizer.groups[1].weight_decay", "optimizer.groups[1].nesterov"}, msgs
    raw["optimizer"]["groups"] = raw["optimizer"]["groups"][:1]
    m = resolve(raw)
    assert m.optimizer["groups"] == [{"match": "model.head.*", "lr": 1e-2}]
    assert "[[optimizer.groups]]" in m.to_toml()
