"""Teacher strategies: online per-item signals; class_mean computed once over training
photos, cached, and never run during training."""

from __future__ import annotations

import numpy as np
import torch

from tests.test_model import LinearBackbone  # noqa: E402
from zsbir.context import BuildContext
from zsbir.data.base import ProtocolData, Split
from zsbir.models.net import TeacherNet
from zsbir.teachers.strategies import ClassMeanTeacher, OnlineTeacher


def make_data() -> ProtocolData:
    labels = np.array([0, 0, 1, 1, 0, 1])
    domains = np.array([0, 0, 0, 0, 1, 1])
    train = Split([f"s{i}" for i in range(6)], labels, domains)
    empty = Split([], np.zeros(0), np.zeros(0))
    return ProtocolData("fake", ["a", "b"], ["c"], train, empty, empty, empty)


class CountingNet(TeacherNet):
    calls = 0

    def forward(self, image, domain=None):
        CountingNet.calls += 1
        return super().forward(image, domain)


def fake_embed(inputs: dict[str, torch.Tensor]):
    """An ``embed`` callback: the teacher run over a split on fixed per-source inputs."""
    calls = []

    def embed(network, split):
        calls.append(list(split.sources))
        x = torch.stack([inputs[s] for s in split.sources])
        feats = network.backbone(x)
        return network.head(feats), feats, torch.as_tensor(split.labels)

    return embed, calls


def test_online_teacher_returns_per_item_logits_and_features():
    torch.manual_seed(0)
    net = TeacherNet(LinearBackbone())
    x = torch.randn(5, 3, 4, 4)
    sig = OnlineTeacher(net)({"image": x, "domain": torch.zeros(5, dtype=torch.long)})
    assert torch.allclose(sig["logits"], net(x)["logits"]) and sig["features"].shape == (5, 48)


def test_class_mean_averages_photos_only_and_caches(tmp_path):
    torch.manual_seed(0)
    data = make_data()
    inputs = {s: torch.randn(3, 4, 4) for s in data.train.sources}
    ctx = BuildContext(seen_classes=["a", "b"], cache_dir=tmp_path)
    net = TeacherNet(LinearBackbone())
    embed, calls = fake_embed(inputs)
    t = ClassMeanTeacher(net, ctx)
    fp = {"weights": "w1", "transform": {"size": 4}}
    t.prepare(data=data, embed=embed, fingerprint=fp)
    assert t.cache_hit is False and calls == [["s0", "s1", "s2", "s3"]]  # photos only
    with torch.no_grad():
        logits = net(torch.stack([inputs[s] for s in ["s0", "s1", "s2", "s3"]]))["logits"]
    expect = torch.stack([logits[:2].mean(0), logits[2:].mean(0)])
    assert torch.allclose(t.table, expect, atol=1e-6)
    sig = t({"label": torch.tensor([1, 0, 1])})
    assert torch.equal(sig["logits"], expect[[1, 0, 1]])
    # a second run with the same key reads the cache: no teacher pass at all
    t2 = ClassMeanTeacher(TeacherNet(LinearBackbone()), ctx)
    t2.prepare(data=data, embed=embed, fingerprint=fp)
    assert t2.cache_hit is True and len(calls) == 1 and torch.equal(t2.table, t.table)
    # any change of the key (weights, transform, files) recomputes
    t3 = ClassMeanTeacher(TeacherNet(LinearBackbone()), ctx)
    t3.prepare(data=data, embed=embed, fingerprint={**fp, "transform": {"size": 8}})
    assert t3.cache_hit is False and len(calls) == 2


def test_class_mean_makes_no_forward_pass_during_training(tmp_path):
    data = make_data()
    inputs = {s: torch.randn(3, 4, 4) for s in data.train.sources}
    net = CountingNet(LinearBackbone())
    t = ClassMeanTeacher(net, BuildContext(seen_classes=["a", "b"], cache_dir=tmp_path))
    embed, _ = fake_embed(inputs)
    t.prepare(data=data, embed=embed, fingerprint={"k": 1})
    CountingNet.calls = 0
    for _ in range(10):
        t({"label": torch.tensor([0, 1]), "image": torch.randn(2, 3, 4, 4)})
    assert CountingNet.calls == 0 and t.network is None
