"""CSE-ResNet-50 / SE-ResNet-50 (SAKE, Liu et al., ICCV 2019, Sec. 3.3) against timm's
legacy_seresnet50: same parameter layout, same function at initialization for both
domain bits, strict weight loading, offline errors. Small inputs, CPU only."""

from __future__ import annotations

import copy
import socket

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from zsbir.models.backbone import WeightsNotFoundError  # noqa: E402
from zsbir.models.cse_resnet import (  # noqa: E402
    DOMAIN_KEY,
    CSEResNet,
    cse_resnet50,
    se_resnet50,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may download: HF offline, and any socket connection fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    """timm's legacy_seresnet50 with random weights, BN statistics and biases randomized
    too so that any wiring difference shows."""
    torch.manual_seed(0)
    ref = timm.create_model("legacy_seresnet50", pretrained=False)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return ref.eval()


@pytest.fixture(scope="module")
def weights_file(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "legacy_seresnet50.pth"
    torch.save(reference.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Two images, each twice: rows 0-1 go in as photos, rows 2-3 as sketches."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return torch.cat([x, x])


DOMAINS = torch.tensor([0, 0, 1, 1])


@pytest.fixture(scope="module")
def ref_out(reference, images) -> tuple[torch.Tensor, torch.Tensor]:
    """legacy_seresnet50's pooled features and logits."""
    with torch.no_grad():
        feats = reference.forward_head(reference.forward_features(images), pre_logits=True)
        return feats, reference.last_linear(feats)


@pytest.fixture(scope="module")
def cse(weights_file) -> CSEResNet:
    """cse_resnet50 loaded from the saved legacy_seresnet50 file, as a user would."""
    return cse_resnet50(pretrained=True, weights=str(weights_file)).eval()


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_parameter_layout_is_legacy_seresnet50_plus_domain_columns(reference):
    ref = reference.state_dict()
    model = CSEResNet(conditional=True)
    model.load_imagenet_state_dict(ref)
    own = model.state_dict()
    extra = sorted(set(own) - set(ref))
    assert set(ref) <= set(own)
    assert len(extra) == 16 and all(k.endswith(DOMAIN_KEY) for k in extra)
    for k, v in ref.items():
        assert own[k].shape == v.shape, k
    for k in extra:  # (C,) column of fc2 = (C, C/16 + 1) in the paper's notation
        block = k.removesuffix(DOMAIN_KEY)
        assert own[k].shape == (own[block + "se_module.fc2.weight"].shape[0],)
        assert torch.count_nonzero(own[k]) == 0


def test_cse_equals_legacy_seresnet50_at_init_for_both_domains(cse, ref_out, images):
    assert cse.conditional and cse.pretrained and cse.num_features == 2048
    ref_feats, ref_logits = ref_out
    assert float(ref_feats.std()) > 1e-3  # not a degenerate comparison
    head = cse.imagenet_classifier()
    assert isinstance(head, nn.Linear) and head.out_features == 1000
    with torch.no_grad():
        feats = cse(images, DOMAINS)
        _close(feats, ref_feats)
        _close(head(feats), ref_logits)


def test_domain_column_makes_the_bits_differ(cse, ref_out, images):
    model = copy.deepcopy(cse)
    with torch.no_grad():
        for p in model.domain_parameters():
            p.normal_(0.0, 1.0)
        feats = model(images, DOMAINS.float())
    _close(feats[:2], ref_out[0][:2])  # d = 0 never sees the column
    assert not torch.allclose(feats[2:], feats[:2], rtol=1e-3, atol=1e-4)


def test_domain_column_gets_gradients_from_sketches(cse, images):
    model = copy.deepcopy(cse)
    model(images[:1], torch.ones(1, dtype=torch.long)).sum().backward()
    grads = [p.grad for p in model.domain_parameters()]
    assert len(grads) == 16 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_se_resnet50_equals_legacy_seresnet50(reference, weights_file, ref_out, images):
    model = se_resnet50(weights=str(weights_file)).eval()
    assert not model.conditional and not list(model.domain_parameters())
    assert set(model.state_dict()) == set(reference.state_dict())
    with torch.no_grad():
        feats = model(images)  # the domain bit is optional (ignored) for plain SE
        _close(feats, ref_out[0])
        _close(model.imagenet_classifier()(feats), ref_out[1])


def test_not_pretrained():
    model = cse_resnet50(pretrained=False)
    assert not model.pretrained and model.imagenet_classifier() is None
    assert all(torch.count_nonzero(p) == 0 for p in model.domain_parameters())


def test_conditional_needs_domain_bits(cse, images):
    with pytest.raises(ValueError, match="domain"):
        cse(images)
    with pytest.raises(ValueError, match="3 entries for a batch of 4"):
        cse(images, torch.tensor([0, 1, 1]))
    with torch.no_grad():
        assert cse(images[:1], 1).shape == (1, 2048)  # a scalar bit is broadcast


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsNotFoundError, match="nope.pth"):
        cse_resnet50(weights=str(missing))


def test_pretrained_with_nothing_cached(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    for factory in (cse_resnet50, se_resnet50):
        with pytest.raises(WeightsNotFoundError) as info:
            factory(pretrained=True)
        msg = str(info.value)
        assert "legacy_seresnet50" in msg and "weights" in msg and "pretrained = false" in msg


def test_wrong_shape_names_the_parameter(reference, tmp_path):
    state = dict(reference.state_dict())
    state["layer3.2.se_module.fc1.weight"] = torch.zeros(32, 1024, 1, 1)
    del state["layer4.0.bn2.running_var"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        cse_resnet50(weights=str(path))
    msg = str(info.value)
    assert "layer3.2.se_module.fc1.weight" in msg and "(32, 1024, 1, 1)" in msg
    assert "layer4.0.bn2.running_var" in msg and "layer5.0.conv1.weight" in msg
    assert str(path) in msg


def test_widened_fc2_gets_a_hint(reference):
    state = dict(reference.state_dict())
    key = "layer1.0.se_module.fc2.weight"
    state[key] = torch.cat([state[key], torch.zeros(256, 1, 1, 1)], dim=1)
    with pytest.raises(ValueError, match="fc2_domain"):
        CSEResNet().load_imagenet_state_dict(state)


def test_checkpoint_with_domain_columns_round_trips(cse, tmp_path):
    model = copy.deepcopy(cse)
    with torch.no_grad():
        for p in model.domain_parameters():
            p.uniform_(-1, 1)
    path = tmp_path / "cse.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    again = cse_resnet50(weights=str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_registered():
    from zsbir.registry import backbones

    # looked up without _ensure_builtins (which imports the full component set)
    assert backbones._components["cse_resnet50"].obj is cse_resnet50
    assert backbones._components["se_resnet50"].obj is se_resnet50
