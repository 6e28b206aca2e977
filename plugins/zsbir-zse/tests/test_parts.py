"""Each part of the ZSE-SBIR model against a naive reference on random inputs (no authors'
checkout needed): the released LayerNorm, the ViT attention and token selection, the
cross-attention (keys from the other image, values from its own), its per-image
projections, the raw-view down-sampling, the cosine matrix and the relation network."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("zsbir_zse", reason="install the plugin: pip install -e plugins/zsbir-zse")

from zsbir_zse.cross import (  # noqa: E402
    CrossAttention,
    CrossLayer,
    RelationNetwork,
    StdLayerNorm,
    cosine_matrix,
)
from zsbir_zse.model import ZseModel  # noqa: E402
from zsbir_zse.vit import Block, ScaleEmbedding, SelfAttentionEncoder  # noqa: E402

G = torch.Generator().manual_seed(0)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G, dtype=torch.float64).float()


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) <= tol


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(randn(*p.shape) * 0.3 + (1.0 if p.ndim == 1 and p.shape[0] > 1 else 0))
    return module.eval()


def test_std_layernorm_is_unbiased_std_with_eps_outside_the_root():
    n = randomize(StdLayerNorm(6))
    x = randn(3, 5, 6)
    ref = torch.empty_like(x)
    for i in range(3):
        for j in range(5):
            v = x[i, j].tolist()
            m = sum(v) / 6
            sd = math.sqrt(sum((u - m) ** 2 for u in v) / 5)
            ref[i, j] = torch.tensor([(u - m) / (sd + 1e-6) for u in v]) * n.a + n.b
    assert close(n(x), ref)
    assert not close(n(x), torch.nn.functional.layer_norm(x, (6,), n.a, n.b, 1e-6), 1e-3)


def naive_mha(q_in, k_in, v_in, wq, wk, wv, wo, heads):
    """Per head, per query row, explicit softmax (q from q_in, k from k_in, v from v_in)."""
    d = q_in.shape[-1] // heads
    q, k, v = wq(q_in), wk(k_in), wv(v_in)
    out = torch.zeros_like(q)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        for i in range(q.shape[0]):
            s = torch.stack([q[i, sl] @ k[j, sl] / math.sqrt(d) for j in range(k.shape[0])])
            w = torch.exp(s - s.max())
            w = w / w.sum()
            out[i, sl] = sum(w[j] * v[j, sl] for j in range(v.shape[0]))
    return wo(out)


def test_cross_layer_against_a_naive_loop():
    layer = randomize(CrossLayer(8, 2, 12, 0.0))
    s, p = randn(1, 5, 8), randn(1, 5, 8)
    with torch.no_grad():
        got = layer(s, p, s)[0]
        a = naive_mha(s[0], p[0], s[0], layer.q, layer.k, layer.v, layer.o, 2)
        x = layer.norm1(s[0] + a)
        ref = layer.norm2(x + layer.w2(torch.relu(layer.w1(x))))
    assert close(got, ref)


def test_cross_attention_sides_read_each_others_layer_input():
    ca = randomize(CrossAttention(8, 2, 12, layers=2, dropout=0.0))
    s, p = randn(3, 5, 8), randn(3, 5, 8)
    with torch.no_grad():
        got_s, got_p = ca(s, p)
        rs, rp = s, p
        for ls, lp in zip(ca.sketch, ca.photo):
            rs, rp = ls(rs, rp, rs), lp(rp, rs, rp)  # both from the previous (rs, rp)
    assert close(got_s, rs) and close(got_p, rp)


def test_per_image_projections_give_the_same_pairs():
    ca = randomize(CrossAttention(8, 2, 12, layers=2, dropout=0.0))
    s, p = randn(4, 5, 8), randn(4, 5, 8)
    with torch.no_grad():
        ref = ca(s, p)
        got = ca.from_projections(s, p, ca.item_projections(s, True),
                                  ca.item_projections(p, False))
    assert close(got[0], ref[0]) and close(got[1], ref[1])


def test_cosine_matrix_and_zero_rows():
    p, q = randn(2, 3, 4), randn(2, 5, 4)
    p[1, 2] = 0
    got = cosine_matrix(p, q)
    for b in range(2):
        for i in range(3):
            for j in range(5):
                n = float(p[b, i].norm() * q[b, j].norm())
                ref = float(p[b, i] @ q[b, j]) / n if n else 0.0
                assert got[b, i, j].item() == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize(("anchors", "widths"), [(49, (2401, 343, 49, 1)),
                                                 (144, (20736, 1728, 144, 1)),
                                                 (196, (38416, 2744, 196, 1)),
                                                 (16, (256, 64, 16, 1))])
def test_relation_network_widths(anchors, widths):
    rn = RelationNetwork(anchors)
    linears = [m for m in rn.mlp if isinstance(m, torch.nn.Linear)]
    assert [linears[0].in_features] + [m.out_features for m in linears] == list(widths)


def test_relation_network_is_sigmoid_of_the_mlp():
    rn = randomize(RelationNetwork(16, 0.0))
    c = randn(3, 16, 16)
    l1, l2, l3 = (m for m in rn.mlp if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        ref = torch.sigmoid(l3(torch.relu(l2(torch.relu(l1(c.reshape(3, -1))))))).view(3)
        assert close(rn(c), ref)
    with pytest.raises(ValueError, match="square number of anchors"):
        RelationNetwork(50)


def test_scale_embedding_is_the_authors_conv_stack_for_patch_16():
    se = ScaleEmbedding(768, 16)
    convs = [m for m in se.seq if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0],
             c.bias is None) for c in convs] == [
        (3, 64, 7, 2, 3, True), (64, 128, 3, 2, 1, True), (128, 256, 3, 2, 1, True),
        (256, 768, 3, 2, 1, True)]
    assert tuple(se(torch.zeros(1, 3, 224, 224)).shape) == (1, 768, 14, 14)
    with pytest.raises(ValueError, match="power of 2"):
        ScaleEmbedding(16, 6, [])


def naive_block(block: Block, x: torch.Tensor, selection: str) -> torch.Tensor:
    """One image's block, written out (attention per head, EViT selection by the class
    token's mean attention)."""
    heads, (n, c) = block.attn.heads, x.shape
    h = block.norm1(x)
    q, k, v = block.attn.qkv(h).split(c, dim=-1)
    d = c // heads
    outs, cls_attn = [], torch.zeros(n - 1)
    for i in range(heads):
        sl = slice(i * d, (i + 1) * d)
        a = (q[:, sl] @ k[:, sl].T * (c / heads) ** -0.5).softmax(-1)
        outs.append(a @ v[:, sl])
        cls_attn += a[0, 1:] / heads
    out = block.attn.proj(torch.cat(outs, dim=-1))
    if block.keep_rate < 1:
        y = x + (h if selection == "released_code" else out)
        keep = math.ceil(block.keep_rate * (n - 1))
        order = sorted(sorted(range(n - 1), key=lambda j: -float(cls_attn[j]))[:keep])
        y = torch.cat([y[:1], y[1:][order]])
    else:
        y = x + out
    return y + block.mlp(block.norm2(y))


@pytest.mark.parametrize("selection", ["released_code", "evit"])
@pytest.mark.parametrize("keep_rate", [1.0, 0.7])
def test_vit_block_against_a_naive_block(keep_rate, selection):
    block = randomize(Block(8, 2, 16, 0.0, keep_rate, selection))
    x = randn(2, 7, 8)
    with torch.no_grad():
        got = block(x)
        for i in range(2):
            assert close(got[i], naive_block(block, x[i], selection))
    assert got.shape[1] == (7 if keep_rate == 1 else 1 + math.ceil(0.7 * 6))


def test_encoder_tokenizer_averages_patch_and_scale_embeddings():
    enc = randomize(SelfAttentionEncoder(32, 4, 16, 0, 2, 32, [4], 0.0))
    x = randn(2, 3, 32, 32)
    with torch.no_grad():
        t = (enc.patch_embed(x) + enc.scale_embed(x)) / 2
        t = torch.cat([enc.cls_token.expand(2, -1, -1), t.flatten(2).transpose(1, 2)], 1)
        assert close(enc(x), enc.norm(t + enc.pos_embed))


def test_anchor_features_view_the_token_matrix_raw(tiny):
    """The released code's ``view(B, 768, 14, 14)`` of the (196, 768) token matrix (not
    a transpose), then the 2x2 stride-2 conv, then (B, 49, 512)."""
    m = randomize(ZseModel(**tiny))
    tokens = randn(2, 65, 16)
    with torch.no_grad():
        got = m.anchor_features(tokens)
        flat = tokens[:, 1:].contiguous().view(-1)  # 64 tokens x 16 per image
        for b in range(2):
            grid = flat[b * 1024:(b + 1) * 1024].view(16, 8, 8)  # raw reshape
            ref = torch.nn.functional.conv2d(grid[None], m.down.weight, m.down.bias, 2)
            assert close(got[b], ref[0].flatten(1).T)
    assert tuple(got.shape) == (2, 16, 8)


def test_pair_scores_do_not_depend_on_the_block(tiny_model):
    x = randn(6, 3, 32, 32)
    with torch.no_grad():
        s = tiny_model(x[:3], torch.ones(3, dtype=torch.long))
        p = tiny_model(x[3:], torch.zeros(3, dtype=torch.long))
        block = tiny_model.score_pairs(s["tokens"], p["tokens"])
        alone = torch.stack([tiny_model.score_pairs(s["tokens"][i:i + 1], p["tokens"][i:i + 1])[0]
                             for i in range(3)])
        pre = tiny_model.score_pairs(s["tokens"], p["tokens"], s["zse_ca"], p["zse_ca"])
    assert close(block, alone) and close(pre, block)
    assert ((block > 0) & (block < 1)).all()


def test_forward_outputs(tiny_model):
    x = randn(4, 3, 32, 32)
    dom = torch.tensor([1, 0, 1, 0])
    with torch.no_grad():
        out = tiny_model(x, dom)
    assert tuple(out["tokens"].shape) == (4, 65, 16)
    assert torch.equal(out["embedding"], out["tokens"][:, 0])
    assert tuple(out["zse_ca"].shape) == (4, 3, 65, 16)
    ca = tiny_model.cross
    with torch.no_grad():
        assert close(out["zse_ca"][0], ca.item_projections(out["tokens"][:1], True)[0])
        assert close(out["zse_ca"][1], ca.item_projections(out["tokens"][1:2], False)[0])
    tiny_model.train()
    assert "zse_ca" not in tiny_model(x, dom)


def test_anchors_must_fit_the_grid(tiny):
    with pytest.raises(ValueError, match="anchors = 20 fits neither"):
        ZseModel(**{**tiny, "anchors": 20})
    m = ZseModel(**{**tiny, "anchors": 64})  # every patch token, no down-sampling
    assert m.down is None
    m = ZseModel(depth=12, dim=16, heads=2, mlp_dim=16, ca_heads=2, ca_ff=8, anchors=144)
    assert m.encoder.num_tokens == 144 and m.down is None  # 196 -> 177 -> 160 -> 144
