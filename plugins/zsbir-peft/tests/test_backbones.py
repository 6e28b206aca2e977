"""``peft_lora`` / ``peft_adapter`` on a tiny random timm ViT and on ResNet-18, built
directly in Python (the manifest route: test_plugin.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from zsbir_peft.backbones import PeftBackbone, peft_adapter, peft_lora
from zsbir_peft.layers import AdapterLinear, LoRAConv2d, LoRALinear

from zsbir.models.backbone import Backbone

VIT_TARGETS = ["*.qkv", "*.attn.proj", "*.mlp.fc1", "*.mlp.fc2"]


def _images(n: int = 3, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=g), torch.tensor([0, 1, 0][:n])


def _perturb(model: torch.nn.Module) -> None:
    """Move every LoRA B / adapter up away from zero (as training would)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_B", "adapter_up.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("make, targets", [("vit", VIT_TARGETS),
                                           ("resnet18", ["*.conv1", "*.conv2", "model.fc"])],
                         ids=["vit", "resnet18"])
def test_lora_keeps_the_backbone_contract_and_equals_the_base_at_init(factories, make, targets):
    make = factories[make]
    base = make().eval()
    reference = copy.deepcopy(base)
    wrapped = peft_lora(base, rank=4, alpha=8.0, targets=targets).eval()
    assert isinstance(wrapped, Backbone) and isinstance(wrapped, PeftBackbone)
    assert wrapped.num_features == reference.num_features
    assert wrapped.pretrained_cfg == reference.pretrained_cfg
    assert wrapped.conditional == reference.conditional
    assert wrapped.imagenet_classifier() is None  # random init: no ImageNet classifier
    x, d = _images()
    assert torch.equal(wrapped(x, d), reference(x, d))  # B = 0
    # every base key is still there, under its own name, plus lora_A / lora_B
    keys = set(wrapped.state_dict())
    assert {f"backbone.{k}" for k in reference.state_dict()} <= keys
    extra = keys - {f"backbone.{k}" for k in reference.state_dict()}
    assert extra and all(k.endswith((".lora_A", ".lora_B")) for k in extra)
    assert len(wrapped.adapted) == len(extra) // 2
    kinds = {type(wrapped.backbone.get_submodule(n)) for n in wrapped.adapted}
    assert kinds <= {LoRALinear, LoRAConv2d}


@pytest.mark.parametrize("make, targets", [("vit", VIT_TARGETS),
                                           ("resnet18", ["*.conv2"])], ids=["vit", "resnet18"])
def test_only_lora_parameters_train_and_get_gradients(factories, make, targets):
    make = factories[make]
    wrapped = peft_lora(make(), rank=2, alpha=2.0, targets=targets)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[1] in ("lora_A", "lora_B") for n in trainable)
    _perturb(wrapped)
    wrapped.train()
    x, d = _images()
    wrapped(x, d).square().sum().backward()
    for n, p in wrapped.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_frozen_batchnorm_statistics_stay_fixed_in_train_mode(factories):
    resnet18 = factories["resnet18"]
    wrapped = peft_lora(resnet18(), rank=2, targets=["*.conv1"])
    before = {k: v.clone() for k, v in wrapped.state_dict().items() if "running" in k}
    wrapped.train()
    wrapped(*_images())
    after = wrapped.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    moving = peft_lora(resnet18(), rank=2, targets=["*.conv1"], freeze_norm_stats=False)
    moving.train()
    moving(*_images())
    assert any(not torch.equal(v, moving.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("make, targets", [("vit", VIT_TARGETS),
                                           ("resnet18", ["*.conv1", "*.conv2"])],
                         ids=["vit", "resnet18"])
def test_merge_folds_lora_with_equal_outputs(factories, make, targets):
    make = factories[make]
    wrapped = peft_lora(make(), rank=4, alpha=8.0, targets=targets).eval()
    _perturb(wrapped)
    x, d = _images()
    adapted = wrapped(x, d).detach()
    assert not torch.allclose(adapted, peft_lora(make(), targets=targets).eval()(x, d))
    plain = wrapped.merge()
    assert not wrapped.peft_parameter_names() and wrapped.adapted == []
    assert not any(isinstance(m, (LoRALinear, LoRAConv2d)) for m in plain.modules())
    torch.testing.assert_close(plain(x, d), adapted, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wrapped(x, d), adapted, rtol=1e-4, atol=1e-5)
    # the merged backbone's keys are the base's: loadable into a fresh, unwrapped one
    fresh = make()
    fresh.load_state_dict(plain.state_dict())
    torch.testing.assert_close(fresh.eval()(x, d), adapted, rtol=1e-4, atol=1e-5)


def test_adapter_on_a_vit_identity_at_init_and_only_adapters_train(factories):
    tiny_vit = factories["vit"]
    base = tiny_vit().eval()
    reference = copy.deepcopy(base)
    wrapped = peft_adapter(base, rank=8).eval()
    assert all(isinstance(wrapped.backbone.get_submodule(n), AdapterLinear)
               for n in wrapped.adapted) and len(wrapped.adapted) == 4  # 2 blocks x 2
    x, d = _images()
    assert torch.equal(wrapped(x, d), reference(x, d))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(".adapter_down." in n or ".adapter_up." in n for n in trainable)
    assert wrapped.merge() is wrapped.backbone and len(wrapped.adapted) == 4  # not foldable


def test_trainable_patterns_and_errors_name_what_is_wrong(factories):
    tiny_vit = factories["vit"]
    wrapped = peft_lora(tiny_vit(), targets=["*.qkv"], trainable=["*norm*"])
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert any(n.endswith("norm1.weight") for n in trainable)
    assert not any(n.endswith("qkv.weight") for n in trainable)
    with pytest.raises(ValueError, match=r"\['\*.qvk'\] match no Linear or Conv2d layer"):
        peft_lora(tiny_vit(), targets=["*.qvk"])
    with pytest.raises(ValueError, match=r"trainable \['\*nrom\*'\] match no parameter"):
        peft_lora(tiny_vit(), trainable=["*nrom*"])


def test_attributes_of_the_inner_backbone_are_forwarded(factories):
    tiny_vit = factories["vit"]
    inner = tiny_vit()
    inner.input_kind = "rgb"  # e.g. a method a newer Backbone contract adds
    wrapped = peft_lora(inner)
    assert wrapped.input_kind == "rgb"
    with pytest.raises(AttributeError):
        wrapped.param_groups  # noqa: B018 - names relative to the inner module: not forwarded
