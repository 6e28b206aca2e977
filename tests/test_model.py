"""The registered heads (SAKE's truncated-SVD initialization, SAKE and SBTKNet layouts),
the retrieval network and the ImageNet-classifier teacher network."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from zsbir.models.backbone import Backbone
from zsbir.models.heads import ParallelHead, StackedHead
from zsbir.models.net import ImageNetClassifier as TeacherNet
from zsbir.models.net import RetrievalNet, svd_init


def net(bb, num_classes, embed_dim, heads_on="embedding", imagenet_head="none"):
    """backbone + head, the head built by the model (in_features, num_classes and the
    pretrained classifier come from it, as a Factory("heads") parameter's do)."""
    cls = StackedHead if heads_on == "embedding" else ParallelHead
    return RetrievalNet(bb, functools.partial(cls, embed_dim=embed_dim,
                                              imagenet_head=imagenet_head),
                        num_classes=num_classes)


class LinearBackbone(Backbone):
    """A tiny 'pretrained' backbone: flatten + linear, with a 1000-way classifier."""

    def __init__(self, feat: int = 48, pretrained: bool = True):
        super().__init__()
        self.num_features = feat
        self.pretrained = pretrained
        self.body = nn.Linear(3 * 4 * 4, feat)
        self.fc = nn.Linear(feat, 1000)

    def forward(self, x, domain=None):
        return torch.relu(self.body(x.flatten(1)))

    def imagenet_classifier(self):
        return self.fc if self.pretrained else None


def test_svd_heads_approximate_pretrained_logits_better_as_d_grows():
    torch.manual_seed(0)
    bb = LinearBackbone()
    x = torch.randn(32, 3, 4, 4)
    target = bb.fc(bb(x))
    errors = []
    for d in (4, 16, 32, 48):
        model = net(bb, num_classes=5, embed_dim=d, imagenet_head="svd")
        out = model(x)
        errors.append((out["imagenet_logits"] - target).norm().item() / target.norm().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-5  # full rank: exact


def test_svd_init_factors():
    fc = nn.Linear(20, 1000)
    ew, hw, hb = svd_init(fc, 20)
    assert ew.shape == (20, 20) and hw.shape == (1000, 20)
    assert torch.allclose(hw @ ew, fc.weight, atol=1e-4)
    assert torch.allclose(hw.T @ hw, torch.eye(20), atol=1e-4)  # U_d has orthonormal columns
    with pytest.raises(ValueError, match="embed_dim"):
        svd_init(fc, 21)


def test_head_layouts_and_outputs():
    bb = LinearBackbone()
    x = torch.randn(3, 3, 4, 4)
    stacked = net(bb, num_classes=7, embed_dim=8, imagenet_head="svd")
    assert stacked.head.classifier.in_features == 8
    assert stacked.head.imagenet_head.in_features == 8
    side = net(bb, num_classes=7, embed_dim=8, heads_on="features", imagenet_head="pretrained")
    assert side.head.classifier.in_features == 48
    assert torch.equal(side.head.imagenet_head.weight, bb.fc.weight)
    out = side(x)
    assert out["embedding"].shape == (3, 8) and out["logits"].shape == (3, 7)
    assert torch.allclose(out["imagenet_logits"], bb.fc(bb(x)))
    plain = net(bb, num_classes=7, embed_dim=8)
    assert "imagenet_logits" not in plain(x)


def test_pretrained_head_needs_pretrained_backbone():
    with pytest.raises(ValueError, match="pretrained ImageNet weights"):
        net(LinearBackbone(pretrained=False), 5, 8, imagenet_head="svd")
    with pytest.raises(ValueError, match="no pretrained ImageNet classifier"):
        TeacherNet(LinearBackbone(pretrained=False))


def test_teacher_net_is_frozen():
    t = TeacherNet(LinearBackbone())
    t.train()
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    x = torch.randn(2, 3, 4, 4)
    signal = t(x)
    assert torch.allclose(signal["logits"], t.head(signal["features"]))


def test_heads_declare_outputs_from_their_parameters():
    assert "imagenet_logits" not in StackedHead.provides({"imagenet_head": "none"})
    assert "imagenet_logits" in StackedHead.provides({"imagenet_head": "svd"})
    assert ParallelHead.provides({}) == {"embedding", "logits"}
