"""The CLIP towers: prompts, freezing, weights from a local file and its errors, the text
classifier head, the two learning rates as a parameter group and the triplet loss's tuples."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("zsbir_clip", reason="install the plugin: pip install -e plugins/zsbir-clip")

import open_clip  # noqa: E402
from zsbir_clip.head import ClipTextClassifier, class_prompt  # noqa: E402
from zsbir_clip.towers import CLIP_MEAN, CLIP_STD, clip_text, clip_vit  # noqa: E402

from zsbir.models.backbone import WeightsNotFoundError  # noqa: E402


def tiny_clip(tiny: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.CLIP(**json.loads(open(tiny).read()), quick_gelu=True).eval()


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def weights_file(tmp_path, tiny):
    """A random tiny CLIP saved as open_clip saves weights: model.state_dict()."""
    model = tiny_clip(tiny, seed=123)
    path = tmp_path / "open_clip_model.bin"
    torch.save(model.state_dict(), path)
    return model, path


def test_without_prompts_it_is_open_clips_image_tower(weights_file, tiny):
    model, path = weights_file
    bb = clip_vit(config=tiny, weights=str(path), prompts=0).eval()
    x = images()
    with torch.no_grad():
        assert torch.allclose(bb(x, torch.tensor([0, 1, 0, 1])), model.encode_image(x),
                              atol=1e-5)


def test_weights_file_is_loaded_bin_and_safetensors(weights_file, tiny, tmp_path):
    """Outputs equal those of the saved model, for both file formats, and differ from a
    tower with other (random) weights: the file was really read."""
    from safetensors.torch import save_file

    model, path = weights_file
    st = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    x = images()
    d = torch.tensor([1, 0, 1, 0])
    outs = []
    for f in (path, st):
        torch.manual_seed(7)  # same prompts for both
        bb = clip_vit(config=tiny, weights=str(f), prompts=3).eval()
        assert bb.pretrained and bb.pretrained_cfg.source == str(f)
        with torch.no_grad():
            outs.append(bb(x, d))
        text = clip_text(config=tiny, weights=str(f))
        ref = model.encode_text(open_clip.SimpleTokenizer(context_length=16)(["a photo of a cat"]))
        assert torch.allclose(text.encode_text(["a photo of a cat"]), ref, atol=1e-5)
        assert abs(text.logit_scale - float(model.logit_scale.detach().exp())) < 1e-4
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    torch.manual_seed(7)
    other = clip_vit(config=tiny, pretrained=False, prompts=3).eval()
    assert not other.pretrained and other.pretrained_cfg.source == "random init"
    with torch.no_grad():
        assert not torch.allclose(other(x, d), outs[0], atol=1e-3)


def test_pretrained_cfg_is_clips():
    from zsbir_clip.towers import clip_config

    for arch, patch in (("ViT-B-32", 32), ("ViT-B-16", 16)):
        c = clip_config(arch)
        assert c["vision_cfg"]["patch_size"] == patch and c["vision_cfg"]["image_size"] == 224
    assert CLIP_MEAN == open_clip.OPENAI_DATASET_MEAN and CLIP_STD == open_clip.OPENAI_DATASET_STD


def test_missing_file_and_pretrained_without_file_name_the_key(tiny, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsNotFoundError, match=r"backbone\.weights.*does not exist"):
        clip_vit(config=tiny, weights=str(missing))
    with pytest.raises(WeightsNotFoundError) as info:
        clip_vit(config=tiny)  # pretrained = true by default, no file
    msg = str(info.value)
    assert "backbone.weights" in msg and "nothing is downloaded" in msg
    assert "\n" not in msg
    with pytest.raises(WeightsNotFoundError, match=r"network\.weights"):
        clip_text(config=tiny)


def test_a_file_of_another_architecture_is_refused(weights_file, tiny, tmp_path):
    model, path = weights_file
    other = json.loads(open(tiny).read())
    other["vision_cfg"]["width"] = 32  # a different (still tiny) architecture
    cfg = tmp_path / "other.json"
    cfg.write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"backbone\.weights: .*not an open_clip state dict "
                                         r"for .*other\.json"):
        clip_vit(config=str(cfg), weights=str(path))


def test_a_checkpoint_being_rebuilt_skips_the_file(tiny, tmp_path):
    """ctx.load_pretrained = False (zsbir rebuilding a trained model whose checkpoint holds
    every weight): the file is neither needed nor read."""
    from zsbir.context import BuildContext

    ctx = BuildContext(load_pretrained=False)
    bb = clip_vit(config=tiny, weights="", pretrained=True, ctx=ctx)
    assert bb.pretrained_cfg.source == "random init"


def test_prompts_per_domain(tiny):
    torch.manual_seed(0)
    bb = clip_vit(config=tiny, pretrained=False, prompts=3).eval()
    assert bb.prompts.shape == (2, 3, 64)
    x = images(2)
    photo, sketch = torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long)
    with torch.no_grad():
        p0, s0 = bb(x, photo), bb(x, sketch)
        assert not torch.allclose(p0, s0, atol=1e-4)  # the domain's prompts matter
        bb.prompts[1].normal_()  # change only the sketch prompts
        assert torch.allclose(bb(x, photo), p0, atol=1e-6)
        assert not torch.allclose(bb(x, sketch), s0, atol=1e-4)
    with pytest.raises(ValueError, match="domain"):
        bb(x, None)


def test_prompt_position_does_not_matter(tiny):
    """After the class token (here, the paper's figure) or after the patches (the released
    code): the same output, since prompts carry no positional embedding and the image
    transformer has no mask."""
    torch.manual_seed(0)
    bb = clip_vit(config=tiny, pretrained=False, prompts=3).eval()
    v = bb.visual
    x, d = images(3), torch.tensor([0, 1, 1])
    with torch.no_grad():
        t = v.conv1(x).flatten(2).transpose(1, 2)
        t = torch.cat([v.class_embedding.expand(3, 1, -1), t], 1) + v.positional_embedding
        t = torch.cat([t, bb.prompts[d]], 1)  # appended, as Sketch_LVM does
        ref = v.ln_post(v.transformer(v.ln_pre(t))[:, 0]) @ v.proj
        assert torch.allclose(bb(x, d), ref, atol=1e-5)


def test_only_layernorms_and_prompts_train(tiny):
    bb = clip_vit(config=tiny, pretrained=False)
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    layernorms = {f"{m}.{k}" for m, mod in bb.named_modules()
                  if isinstance(mod, torch.nn.LayerNorm) for k in ("weight", "bias")}
    assert trainable == layernorms | {"prompts"}
    assert len(layernorms) == 2 * (2 + 2 * 2)  # ln_pre, ln_post, 2 per block x 2 blocks
    x = images(2)
    bb(x, torch.tensor([0, 1])).sum().backward()
    assert all(p.grad is not None for n, p in bb.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in bb.named_parameters() if n not in trainable)

    released = clip_vit(config=tiny, pretrained=False, freeze="released_code")
    extra = {n for n, p in released.named_parameters() if p.requires_grad} - trainable
    assert {"visual.class_embedding", "visual.positional_embedding", "visual.proj",
            "visual.transformer.resblocks.0.attn.in_proj_weight"} <= extra
    assert not any(n.endswith("conv1.weight") or "mlp" in n for n in extra)
    full = clip_vit(config=tiny, pretrained=False, freeze="none")
    assert all(p.requires_grad for p in full.parameters())


def test_text_tower_is_frozen(tiny):
    text = clip_text(config=tiny, pretrained=False)
    assert not any(p.requires_grad for p in text.parameters())
    text.train()
    assert not text.training
    assert text(["a photo of a dog"])["features"].shape == (1, 32)


def test_text_classifier_head_against_a_naive_reference(tiny):
    from zsbir.context import BuildContext

    torch.manual_seed(0)
    text = clip_text(config=tiny, pretrained=False)
    bb = clip_vit(config=tiny, pretrained=False)
    classes = ["hot-air_balloon", "triangle-ring", "cat"]
    head = ClipTextClassifier(in_features=bb.num_features, num_classes=3, network=text,
                              ctx=BuildContext(seen_classes=classes))
    assert class_prompt("a photo of a {}", "hot-air_balloon") == "a photo of a hot air balloon"
    f = torch.randn(5, 32)
    out = head(f, torch.zeros(5, dtype=torch.long))
    t = text.encode_text([f"a photo of a {c}" for c in ("hot air balloon", "triangle ring",
                                                          "cat")])
    for i in range(5):
        assert torch.allclose(out["embedding"][i], f[i] / f[i].norm(), atol=1e-6)
        for c in range(3):
            cos = float(f[i] @ t[c] / (f[i].norm() * t[c].norm()))
            assert abs(float(out["logits"][i, c]) - text.logit_scale * cos) < 1e-3
    assert set(head.state_dict()) == {"text_features", "logit_scale"}  # no text tower kept
    fixed = ClipTextClassifier(in_features=bb.num_features, num_classes=3, network=text,
                               logit_scale=10.0, ctx=BuildContext(seen_classes=classes))
    assert torch.allclose(fixed(f)["logits"] * text.logit_scale / 10.0, out["logits"],
                          atol=1e-4)
    with pytest.raises(ValueError, match="class names"):
        ClipTextClassifier(in_features=bb.num_features, num_classes=4, network=text,
                           ctx=BuildContext(seen_classes=classes))


def test_two_learning_rates(tiny):
    """The paper's two rates are a parameter group, not a plugin optimizer."""
    from zsbir.engine.optim import adam
    from zsbir.engine.param_groups import param_groups

    bb = clip_vit(config=tiny, pretrained=False)
    groups = param_groups({"model.backbone": bb},
                          [{"match": "model.backbone.prompts", "lr": 1e-3}])
    opt = adam(groups, lr=1e-4, weight_decay=0.0)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(bb.prompts)] == 1e-3
    assert lrs[id(bb.visual.ln_pre.weight)] == 1e-4
    assert len(lrs) == sum(p.requires_grad for p in bb.parameters())
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)


def test_triplet_loss_reads_the_tuples():
    """clip_triplet reads (anchor, positive, negative) by role from batch["tuples"], in any
    row order and column order, and equals the naive per-triplet formula."""
    from zsbir_clip.losses import ClipTripletLoss

    g = torch.Generator().manual_seed(0)
    e = torch.randn(9, 4, generator=g)
    tuples = torch.randperm(9, generator=g).view(3, 3)  # rows scattered over the batch
    batch = {"tuples": tuples, "roles": ("negative", "anchor", "positive")}
    got = ClipTripletLoss(margin=0.2)({"embedding": e}, batch, None)

    def d(x, y):
        return 1 - float(x @ y) / float(x.norm() * y.norm())

    want = sum(max(0.0, d(e[a], e[p]) - d(e[a], e[n]) + 0.2)
               for n, a, p in tuples.tolist()) / 3
    assert abs(float(got) - want) < 1e-5
    with pytest.raises(ValueError, match="anchor"):
        ClipTripletLoss()({"embedding": e}, {"tuples": tuples, "roles": ("a", "b", "c")}, None)
