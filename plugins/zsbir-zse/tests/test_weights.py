"""The authors' weight files: the released checkpoint format (``checkpoint['model']``,
fp16, their parameter names) and the ImageNet ``sam_ViT-B_16.pth`` (their ``ViTPatch``
names), read from local paths, with errors that name the file and the key."""

from __future__ import annotations

import pickle

import pytest
import torch

pytest.importorskip("zsbir_zse", reason="install the plugin: pip install -e plugins/zsbir-zse")

from zsbir_zse.model import ZseModel  # noqa: E402
from zsbir_zse.weights import WeightsError, _map_key, from_authors, to_authors  # noqa: E402

#: the keys of the authors' ``Model.state_dict()`` with one ViT block (their model/
#: model.py, sa.py, ca.py, rn.py; printed from their code), in their order
AUTHORS_KEYS = [
    "sa.model.pos_embedding", "sa.model.cls", "sa.model.embedding.weight",
    "sa.model.embedding.bias", "sa.model.scale.seq.0.weight", "sa.model.scale.seq.2.weight",
    "sa.model.scale.seq.4.weight", "sa.model.scale.seq.6.weight",
    "sa.model.transformer.encoder_norm.weight", "sa.model.transformer.encoder_norm.bias",
    *[f"sa.model.transformer.layers.0.0.{m}.{p}" for m in (
        "layer_norm_input", "layer_norm_out", "attention.to_qkv", "attention.to_out.0",
        "mlp.net.0", "mlp.net.3") for p in ("weight", "bias")],
    *[f"ca.encoder.{layer}.0.{m}" for layer in ("layers", "layer1", "layer2") for m in (
        *[f"self_attn.linears.{i}.{p}" for i in range(4) for p in ("weight", "bias")],
        *[f"feed_forward.w_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")],
        *[f"sublayer.{i}.norm.{p}" for i in (0, 1) for p in ("a", "b")])],
    *[f"rn.rn.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")],
    "conv2d.weight", "conv2d.bias",
]


def authors_state(model: ZseModel, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """``model``'s weights under the authors' names (their unused ``ca.encoder.layers``
    clones filled with noise), as their checkpoints store them."""
    own = model.state_dict()
    out = {}
    for key in AUTHORS_KEYS:
        mine = _map_key(key)
        if mine is None:
            assert key.startswith("ca.encoder.layers."), key
            like = own[_map_key(key.replace("ca.encoder.layers.", "ca.encoder.layer1."))]
            out[key] = torch.randn(like.shape).to(dtype)
        else:
            out[key] = own[mine].to(dtype)
    return out


@pytest.fixture
def one_block(tiny):
    torch.manual_seed(0)
    return ZseModel(**{**tiny, "patch_size": 16, "image_size": 128, "scale_channels":
                       [4, 4, 4], "depth": 1, "anchors": 16})


def test_every_parameter_has_exactly_one_authors_name(one_block):
    mapped = [_map_key(k) for k in AUTHORS_KEYS if not k.startswith("ca.encoder.layers.")]
    assert sorted(mapped) == sorted(one_block.state_dict())
    assert len(set(mapped)) == len(mapped)


def test_released_checkpoint_format_loads_fp16_as_float32(one_block, tiny, tmp_path):
    f = tmp_path / "best_checkpoint.pth"
    torch.save({"model": authors_state(one_block), "epoch": 30, "map_all": 0.7}, f)
    m = ZseModel(**{**tiny, "patch_size": 16, "image_size": 128, "scale_channels": [4, 4, 4],
                    "depth": 1, "anchors": 16}, checkpoint=str(f))
    for k, v in m.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, one_block.state_dict()[k].half().float()), k
    # DataParallel's prefix is accepted too
    sd = {f"module.{k}": v for k, v in authors_state(one_block).items()}
    assert set(from_authors(sd)) == set(one_block.state_dict())


def test_vit_file_loads_the_encoder_only(one_block, tiny, tmp_path):
    vit = {k.removeprefix("sa.model."): v.float() for k, v in authors_state(one_block).items()
           if k.startswith("sa.model.") and ".scale." not in k}
    vit["mlp_head.weight"] = torch.zeros(1000, 16)  # their file's classifier: ignored
    f = tmp_path / "sam_ViT-B_16.pth"
    torch.save(vit, f)
    torch.manual_seed(1)
    m = ZseModel(**{**tiny, "patch_size": 16, "image_size": 128, "scale_channels": [4, 4, 4],
                    "depth": 1, "anchors": 16}, vit_weights=str(f))
    torch.manual_seed(1)
    fresh = ZseModel(**{**tiny, "patch_size": 16, "image_size": 128,
                        "scale_channels": [4, 4, 4], "depth": 1, "anchors": 16})
    for k, v in m.state_dict().items():
        src = one_block if (k.startswith("encoder.") and ".scale_embed." not in k) else fresh
        assert torch.equal(v, src.state_dict()[k].half().float() if src is one_block
                           else src.state_dict()[k]), k


def test_errors_name_the_file_and_the_key(one_block, tiny, tmp_path):
    kw = {**tiny, "patch_size": 16, "image_size": 128, "scale_channels": [4, 4, 4],
          "depth": 1, "anchors": 16}
    with pytest.raises(WeightsError, match=r"model.checkpoint .*no such file"):
        ZseModel(**kw, checkpoint=str(tmp_path / "missing.pth"))
    f = tmp_path / "plain.pth"
    torch.save(authors_state(one_block), f)
    with pytest.raises(WeightsError, match=r"under 'model'.*found keys: sa.model.pos_emb"):
        ZseModel(**kw, checkpoint=str(f))
    sd = authors_state(one_block)
    sd["rn.rn.0.weight"] = torch.zeros(3, 3)
    torch.save({"model": sd}, f)
    with pytest.raises(WeightsError, match=r"'relation.mlp.0.weight' has shape \(3, 3\)"):
        ZseModel(**kw, checkpoint=str(f))
    sd = authors_state(one_block)
    sd["head.fc.weight"] = torch.zeros(2)
    torch.save({"model": sd}, f)
    with pytest.raises(WeightsError, match=r"not parameters of the authors' ZSE-SBIR model "
                                           r"\(first: head.fc.weight"):
        ZseModel(**kw, checkpoint=str(f))
    sd = authors_state(one_block)
    del sd["conv2d.bias"]
    torch.save({"model": sd}, f)
    with pytest.raises(WeightsError, match=r"1 parameters of the model are missing "
                                           r"\(first: down.bias"):
        ZseModel(**kw, checkpoint=str(f))
    g = tmp_path / "object.pth"
    g.write_bytes(pickle.dumps(object()))
    with pytest.raises(WeightsError, match=r"model.vit_weights .*cannot read .* plain torch"):
        ZseModel(**kw, vit_weights=str(g))
    torch.save({"foo": torch.zeros(2)}, g)
    with pytest.raises(WeightsError, match=r"none of its 1 entries is a ViTPatch parameter"):
        ZseModel(**kw, vit_weights=str(g))


def test_to_authors_is_the_inverse(one_block):
    theirs = to_authors(one_block.state_dict())
    assert sorted(theirs) == sorted(k for k in AUTHORS_KEYS
                                    if not k.startswith("ca.encoder.layers."))
    assert all(torch.equal(v, one_block.state_dict()[_map_key(k)]) for k, v in theirs.items())


def test_import_writes_a_run_of_the_released_checkpoint(tmp_path):
    """``zsbir import zse`` on a checkpoint in their format (real widths, 1 ViT block,
    fp16): the run's model holds its weights as float32 and scores pairs as it does."""
    import json

    from click.testing import CliRunner

    from zsbir.cli import main

    torch.manual_seed(0)
    src = ZseModel(depth=1).eval()
    f = tmp_path / "sketchy_ext_best.pth"
    torch.save({"model": {k: v.half() for k, v in to_authors(src.state_dict()).items()},
                "epoch": 27, "map_all": 0.7, "precision_100": 0.8}, f)
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["import", "zse", str(f), "--protocol", "sk-sh", "--out",
                                  str(out)])
    assert r.exit_code == 0, r.output
    note = json.loads((out / "import.json").read_text())
    assert note["importer"] == "zse" and note["stored_dtype"] == ["float16"]
    assert note["reported_by_checkpoint"] == {"epoch": 27, "map_all": 0.7,
                                              "precision_100": 0.8}
    ckpt = torch.load(out / "checkpoints" / "final.pt", weights_only=True)
    assert ckpt["manifest"]["model"]["depth"] == 1
    assert ckpt["manifest"]["pair_scorer"]["name"] == "zse_rn"
    for k, v in src.state_dict().items():
        assert torch.equal(ckpt["model"][k], v.half().float()), k
    g = tmp_path / "other.pth"
    torch.save({"state_dict": {}}, g)
    r = CliRunner().invoke(main, ["import", "zse", str(g), "--protocol", "sk-sh", "--out",
                                  str(tmp_path / "run2")])
    assert r.exit_code == 1 and "ZSE-SBIR authors' checkpoint" in r.output
    assert "Traceback" not in r.output
