"""LoRA and adapter layers against hand-written references (Hu et al., ICLR 2022, Eq. 3;
Houlsby et al., ICML 2019, Sec. 2.1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zsbir_peft.layers import (
    AdapterConv2d,
    AdapterLinear,
    LoRAConv2d,
    LoRALinear,
    inject,
    merge_lora,
    peft_parameter_names,
)


def _randomize_b(layer: nn.Module) -> None:
    """B is zero at init; give it values so that the update is not trivially zero."""
    with torch.no_grad():
        layer.lora_B.normal_()


def test_lora_linear_equals_w_x_plus_scaled_b_a_x():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = LoRALinear(base, rank=3, alpha=6.0)
    _randomize_b(layer)
    x = torch.randn(5, 12)
    w, b, a, bb = base.weight, base.bias, layer.lora_A, layer.lora_B
    expected = torch.stack([w @ xi + b + (6.0 / 3) * (bb @ (a @ xi)) for xi in x])
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.weight is base.weight and layer.bias is base.bias  # taken over, not copied
    assert isinstance(layer, nn.Linear)


def test_lora_init_a_kaiming_b_zero_and_layer_equals_base():
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    layer = LoRALinear(base, rank=8, alpha=16.0)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1.0 / 64 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    x = torch.randn(4, 64)
    assert torch.equal(layer(x), base(x))


def test_lora_conv_equals_naive_low_rank_pair_and_merges():
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True)
    layer = LoRAConv2d(base, rank=2, alpha=4.0)
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(layer(x), base(x))  # zero-init B
    _randomize_b(layer)
    naive = base(x) + 2.0 * F.conv2d(F.conv2d(x, layer.lora_A, stride=2, padding=1),
                                     layer.lora_B)
    torch.testing.assert_close(layer(x), naive, rtol=1e-5, atol=1e-5)
    merged = layer.merged()
    assert type(merged) is nn.Conv2d
    torch.testing.assert_close(merged(x), naive, rtol=1e-4, atol=1e-4)


def test_lora_dropout_only_on_the_low_rank_path():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = LoRALinear(base, rank=2, alpha=2.0, dropout=0.5)
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), base(x))  # B = 0: dropout cannot change anything
    _randomize_b(layer)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + x @ layer.lora_A.T @ layer.lora_B.T)


def test_lora_refuses_bad_rank_and_grouped_convs():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), rank=0, alpha=1.0)
    with pytest.raises(ValueError, match="grouped"):
        LoRAConv2d(nn.Conv2d(4, 4, 3, groups=4), rank=2, alpha=1.0)


def test_adapter_is_y_plus_up_act_down_y_and_identity_at_init():
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    layer = AdapterLinear(base, rank=3)
    x = torch.randn(4, 10)
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.adapter_up.weight.normal_()
    y = base(x)
    d, u = layer.adapter_down, layer.adapter_up
    expected = torch.stack([yi + u.weight @ F.gelu(d.weight @ yi + d.bias) + u.bias for yi in y])
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)

    conv = nn.Conv2d(3, 5, 3, padding=1)
    cl = AdapterConv2d(conv, rank=2, activation="relu")
    xi = torch.randn(1, 3, 6, 6)
    assert torch.equal(cl(xi), conv(xi))


def test_inject_matches_names_refuses_typos_and_merge_folds():
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("blk", nn.Sequential())
    net.blk.add_module("qkv", nn.Linear(8, 24))
    net.blk.add_module("act", nn.ReLU())
    net.blk.add_module("proj", nn.Linear(24, 8))
    ref = nn.Sequential(*[m for m in net.blk])  # the same layers, before wrapping
    x = torch.randn(3, 8)
    before = ref(x).detach()
    names = inject(net, ["*.qkv"], lambda m: LoRALinear(m, rank=2, alpha=4.0))
    assert names == ["blk.qkv"] and isinstance(net.blk.qkv, LoRALinear)
    assert type(net.blk.proj) is nn.Linear
    assert torch.equal(net(x), before)
    assert peft_parameter_names(net) == ["blk.qkv.lora_A", "blk.qkv.lora_B"]
    with pytest.raises(ValueError, match=r"\['\*.fc9'\] match no Linear or Conv2d"):
        inject(net, ["*.proj", "*.fc9"], lambda m: LoRALinear(m, rank=2, alpha=4.0))
    _randomize_b(net.blk.qkv)
    adapted = net(x).detach()
    assert not torch.allclose(adapted, before)
    assert merge_lora(net) == ["blk.qkv"]
    assert type(net.blk.qkv) is nn.Linear and not peft_parameter_names(net)
    torch.testing.assert_close(net(x), adapted, rtol=1e-5, atol=1e-5)
