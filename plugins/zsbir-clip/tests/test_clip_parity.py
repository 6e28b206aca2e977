"""benchmarks/clip_parity.py: zsbir-clip's prompted CLIP tower against the authors' code
(Sain et al., CVPR 2023; github.com/aneeshan95/Sketch_LVM).

Without their code (CI): the zsbir side of the comparison is deterministic, reads the
OpenAI-format weights file exactly, and gives the embedding of the authors' token order
(prompts appended after the patches). With ``ZSBIR_SKETCH_LVM`` pointing at a checkout of
their repository: the script itself, on the small and the ViT-B/32 tower."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("zsbir_clip", reason="install the plugin: pip install -e plugins/zsbir-clip")

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "clip_parity.py"


@pytest.fixture(scope="module")
def parity() -> ModuleType:
    spec = importlib.util.spec_from_file_location("clip_parity", SCRIPT)
    assert spec is not None and spec.loader is not None, SCRIPT
    module = importlib.util.module_from_spec(spec)
    sys.modules["clip_parity"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("clip_parity", None)


@pytest.fixture
def small(parity, tmp_path):
    """The script's small random CLIP saved as the weights file, its config, prompts and
    images (seed 0)."""
    cfg = parity.model_config("small")
    sd = parity.random_openai_state_dict(cfg, seed=0)
    weights, config = tmp_path / "openai_format.pt", tmp_path / "config.json"
    torch.save(sd, weights)
    config.write_text(__import__("json").dumps(cfg))
    prompts = parity.random_prompts(cfg["vision_cfg"]["width"], seed=0)
    images = parity.random_images(2, cfg["vision_cfg"]["image_size"], seed=0)
    return sd, weights, config, prompts, images


def embed(parity, weights, config, prompts, images):
    tower = parity.zsbir_tower(weights, config, *prompts).eval()
    with torch.no_grad():
        return tower, parity.zsbir_embed(tower, *images)


def test_random_weights_are_float16_with_non_default_layernorms(parity, small):
    """The weights file holds what OpenAI's checkpoints hold (float16), and its
    LayerNorms and biases are not the identity / zero, so a skipped or swapped LayerNorm
    would change the embeddings."""
    sd = small[0]
    assert {t.dtype for t in sd.values()} == {torch.float16}
    ln = sd["visual.transformer.resblocks.0.ln_1.weight"].float()
    assert (ln - 1).abs().max() > 0.05
    assert sd["visual.transformer.resblocks.0.attn.in_proj_bias"].float().abs().max() > 0.01
    again = parity.random_openai_state_dict(parity.model_config("small"), seed=0)
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    other = parity.random_openai_state_dict(parity.model_config("small"), seed=1)
    assert not torch.equal(sd["visual.proj"], other["visual.proj"])


def test_weights_file_is_read_exactly(parity, small):
    sd, weights, config, prompts, _ = small
    tower = parity.zsbir_tower(weights, config, *prompts)
    for name, p in tower.visual.named_parameters():
        assert torch.equal(p.detach(), sd[f"visual.{name}"].float()), name
    assert torch.equal(tower.prompts.detach()[parity.SKETCH], prompts[0])
    assert torch.equal(tower.prompts.detach()[parity.PHOTO], prompts[1])


def test_zsbir_side_is_deterministic(parity, small):
    """Two towers built from the same file and prompts give bit-identical embeddings."""
    _, weights, config, prompts, images = small
    _, (sk1, ph1) = embed(parity, weights, config, prompts, images)
    _, (sk2, ph2) = embed(parity, weights, config, prompts, images)
    assert torch.equal(sk1, sk2) and torch.equal(ph1, ph2)
    assert sk1.shape == (2, 64) and ph1.shape == (4, 64)


def test_embedding_equals_the_authors_token_order(parity, small):
    """zsbir inserts the prompts after the class token, the authors append them after the
    patches: the class token's output is the same (no positional embedding on prompts,
    no attention mask), to the script's tolerance. The other domain's prompts give a
    clearly different embedding, so the comparison can fail."""
    _, weights, config, prompts, (sketch, photo) = small
    tower, (sk, ph) = embed(parity, weights, config, prompts, (sketch, photo))
    sk_p, ph_p = prompts
    with torch.no_grad():
        ref_sk = parity.appended_prompt_forward(tower.visual, sketch,
                                                sk_p.expand(len(sketch), -1, -1))
        ref_ph = parity.appended_prompt_forward(tower.visual, photo,
                                                ph_p.expand(len(photo), -1, -1))
        wrong = parity.appended_prompt_forward(tower.visual, sketch,
                                               ph_p.expand(len(sketch), -1, -1))
    for ours, ref in ((sk, ref_sk), (ph, ref_ph)):
        d = parity.diff("embedding", ours, ref, parity.TOL_EMBEDDING)
        assert d.ok, d
        assert parity.diff("normalized", F.normalize(ours, dim=-1), F.normalize(ref, dim=-1),
                           parity.TOL_EMBEDDING).ok
    assert parity.diff("swapped prompts", sk, wrong, parity.TOL_EMBEDDING).rel > 1e-2


def test_diff_is_relative_to_the_authors_largest_value(parity):
    d = parity.diff("x", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]), 1e-5)
    assert (d.max_abs, d.rel, d.ok) == (2.0, 0.5, False)
    with pytest.raises(ValueError, match="shapes differ"):
        parity.diff("x", torch.zeros(2), torch.zeros(3), 1e-5)


def test_missing_checkout_is_a_clear_error(parity, tmp_path, capsys):
    assert parity.main(["--authors", str(tmp_path), "--arch", "small"]) == 2
    assert "no src/model_LN_prompt.py" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["small", "ViT-B-32"])
def test_parity_with_the_authors_code(parity, arch, capsys):
    """The script against a local checkout of Sketch_LVM (``ZSBIR_SKETCH_LVM``)."""
    checkout = os.environ.get("ZSBIR_SKETCH_LVM", "")
    if not checkout:
        pytest.skip("by design: set ZSBIR_SKETCH_LVM to a checkout of "
                    "github.com/aneeshan95/Sketch_LVM (CI has no network checkout)")
    rc = parity.main(["--authors", checkout, "--arch", arch, "--batch", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS" in out and "sketch embedding (raw)" in out
    assert "src" not in sys.modules or not hasattr(sys.modules["src"], "model_LN_prompt")
