"""The ``rpkd`` teacher: per-item signals like ``online`` plus cached seen-class centers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("zsbir_rpkd", reason="install the plugin: pip install -e plugins/zsbir-rpkd")

from zsbir_rpkd.teacher import RpkdTeacher  # noqa: E402

from zsbir.context import BuildContext  # noqa: E402
from zsbir.data.base import ProtocolData, Split  # noqa: E402
from zsbir.models.backbone import Backbone  # noqa: E402
from zsbir.models.net import TeacherNet  # noqa: E402
from zsbir.teachers.strategies import OnlineTeacher  # noqa: E402


class TinyBackbone(Backbone):
    """A 'pretrained' flatten + linear backbone with a 1000-way classifier."""

    def __init__(self, feat: int = 12):
        super().__init__()
        self.num_features, self.pretrained = feat, True
        self.body = nn.Linear(3 * 4 * 4, feat)
        self.fc = nn.Linear(feat, 1000)

    def forward(self, x, domain=None):
        return torch.relu(self.body(x.flatten(1)))

    def imagenet_classifier(self):
        return self.fc


def make_data() -> ProtocolData:
    labels = np.array([0, 0, 1, 1, 2, 0, 1, 2])
    domains = np.array([0, 0, 0, 0, 0, 1, 1, 1])  # five photos, then three sketches
    train = Split([f"s{i}" for i in range(8)], labels, domains)
    empty = Split([], np.zeros(0, dtype=int), np.zeros(0, dtype=int))
    return ProtocolData("fake", ["a", "b", "c"], ["d"], train, empty, empty, empty)


def fake_embed(inputs):
    """``embed(network, split)`` on fixed per-source inputs, run in inference mode as the
    toolkit's embedder does; records which sources it saw."""
    calls = []

    @torch.inference_mode()
    def embed(network, split):
        calls.append(list(split.sources))
        feats = network.backbone(torch.stack([inputs[s] for s in split.sources]))
        return network.head(feats), feats, torch.as_tensor(split.labels)

    return embed, calls


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    data = make_data()
    inputs = {s: torch.randn(3, 4, 4) for s in data.train.sources}
    ctx = BuildContext(seen_classes=["a", "b", "c"], cache_dir=tmp_path)
    return data, inputs, ctx


def test_centers_are_photo_means_and_signal_extends_online(setup):
    data, inputs, ctx = setup
    net = TeacherNet(TinyBackbone())
    teacher = RpkdTeacher(net, ctx)
    assert isinstance(teacher, OnlineTeacher)
    embed, calls = fake_embed(inputs)
    teacher.prepare(data=data, embed=embed, fingerprint={"w": 1})
    assert calls == [["s0", "s1", "s2", "s3", "s4"]] and teacher.cache_hit is False
    with torch.no_grad():
        feats = net.backbone(torch.stack([inputs[f"s{i}"] for i in range(5)]))
    expect = torch.stack([feats[:2].mean(0), feats[2:4].mean(0), feats[4]])
    assert torch.allclose(teacher.centers, expect, atol=1e-6)

    x = torch.randn(4, 3, 4, 4)
    batch = {"image": x, "domain": torch.tensor([0, 1, 0, 1]), "label": torch.tensor([0, 1, 2, 0])}
    sig = teacher.to(torch.device("cpu"))(batch)
    online = OnlineTeacher(net)(batch)
    assert set(sig) == {"logits", "features", "class_features"}
    assert torch.equal(sig["logits"], online["logits"])
    assert torch.equal(sig["features"], online["features"])
    assert torch.equal(sig["class_features"], teacher.centers)
    assert teacher.forward_calls == 1


def test_centers_are_cached_by_fingerprint_and_domains(setup):
    data, inputs, ctx = setup
    embed, calls = fake_embed(inputs)
    first = RpkdTeacher(TeacherNet(TinyBackbone()), ctx)
    first.prepare(data=data, embed=embed, fingerprint={"w": 1})
    again = RpkdTeacher(TeacherNet(TinyBackbone()), ctx)  # other weights: the key decides
    again.prepare(data=data, embed=embed, fingerprint={"w": 1})
    assert again.cache_hit is True and len(calls) == 1
    assert torch.equal(again.centers, first.centers)
    assert list((ctx.cache_dir / "teacher").glob("rpkd_centers-*.pt"))
    changed = RpkdTeacher(TeacherNet(TinyBackbone()), ctx)
    changed.prepare(data=data, embed=embed, fingerprint={"w": 2})
    assert changed.cache_hit is False and len(calls) == 2
    every = RpkdTeacher(TeacherNet(TinyBackbone()), ctx, center_domains="all")
    every.prepare(data=data, embed=embed, fingerprint={"w": 1})
    assert every.cache_hit is False and calls[-1] == [f"s{i}" for i in range(8)]
    uncached = RpkdTeacher(TeacherNet(TinyBackbone()), ctx, cache=False)
    uncached.prepare(data=data, embed=embed, fingerprint={"w": 1})
    assert uncached.cache_hit is False and len(calls) == 4


def test_errors(setup):
    data, inputs, ctx = setup
    with pytest.raises(ValueError, match="center_domains"):
        RpkdTeacher(TeacherNet(TinyBackbone()), ctx, center_domains="sketch")
    teacher = RpkdTeacher(TeacherNet(TinyBackbone()), ctx)
    with pytest.raises(RuntimeError, match="before prepare"):
        teacher({"image": torch.randn(1, 3, 4, 4), "domain": torch.zeros(1, dtype=torch.long)})
    more = BuildContext(seen_classes=["a", "b", "c", "e"], cache_dir=ctx.cache_dir)
    embed, _ = fake_embed(inputs)
    with pytest.raises(ValueError, match=r"seen classes \[3\] have no training photos"):
        RpkdTeacher(TeacherNet(TinyBackbone()), more).prepare(data=data, embed=embed,
                                                              fingerprint={})
