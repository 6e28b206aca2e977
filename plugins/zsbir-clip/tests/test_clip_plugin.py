"""The plugin as users meet it: entry points, `zsbir list`, validation of the example
manifests, and real `zsbir run`s of the method with a tiny random CLIP on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("zsbir_clip", reason="install the plugin: pip install -e plugins/zsbir-clip")

import open_clip  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from zsbir_clip.towers import CLIP_MEAN, CLIP_STD  # noqa: E402

from zsbir.cli import main  # noqa: E402
from zsbir.manifest import ManifestError, apply_overrides, load, resolve  # noqa: E402
from zsbir.registry import get_registry  # noqa: E402
from zsbir.testing import assert_core_never_names, assert_registered_by  # noqa: E402

PLUGIN = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((PLUGIN / "examples").glob("*.toml"))
DIST = "zsbir-clip"
COMPONENTS = {
    ("backbones", "clip_vit"): "zsbir_clip.towers:clip_vit",
    ("networks", "clip_text"): "zsbir_clip.towers:clip_text",
    ("heads", "clip_text_classifier"): "zsbir_clip.head:ClipTextClassifier",
    ("losses", "clip_triplet"): "zsbir_clip.losses:ClipTripletLoss",
}


def test_registered_only_through_entry_points():
    for (kind, name), comp in assert_registered_by(DIST, COMPONENTS).items():
        assert "Sain et" in comp.doc and "CVPR 2023" in comp.doc, (kind, name)


def test_the_core_never_mentions_the_plugin():
    assert_core_never_names(DIST)


def test_listed_under_the_plugin_package():
    result = CliRunner().invoke(main, ["list", "heads"])
    assert result.exit_code == 0, result.output
    assert any("clip_text_classifier" in line and DIST in line
               for line in result.output.splitlines()), result.output


def with_weights(raw: dict, path: str, root: str = "") -> dict:
    """The example with its placeholder paths replaced (validation checks they exist)."""
    if root:
        raw["protocol"]["root"] = root
    raw["backbone"]["weights"] = path
    raw["model"]["head"]["network"]["weights"] = path
    return raw


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_manifests_validate(path, tmp_path):
    weights = tmp_path / "ViT-B-32.bin"
    weights.write_bytes(b"")  # validation checks the file exists; nothing reads it
    m = resolve(with_weights(load(path), str(weights), str(tmp_path)), str(path))
    assert m.backbone["name"] == "clip_vit" and m.backbone["arch"] == "ViT-B-32"
    assert m.backbone["prompts"] == 3 and m.backbone["freeze"] == "all_but_layernorm"
    assert m.head["name"] == "clip_text_classifier"
    assert m.head["template"] == "a photo of a {}"
    assert [t["name"] for t in m.losses] == ["clip_triplet", "ce"]
    assert m.losses[0]["margin"] == 0.2
    assert m.optimizer == {**m.optimizer, "name": "adam", "lr": 1e-4, "weight_decay": 0.0,
                           "groups": [{"match": "model.backbone.prompts", "lr": 1e-3}]}
    assert m.train.step["name"] == "default" and m.sampler["name"] == "triplet"
    assert m.train.batch_size == 96  # the paper's 32 triplets
    assert "Paper reports" in path.read_text()


def test_examples_cover_the_three_datasets():
    splits = {}
    for p in EXAMPLES:
        raw = load(p)
        splits[raw["protocol"]["name"]] = raw["protocol"]["split"]
    assert splits == {"sketchy_ext": "sk-ye", "tuberlin_ext": "tub-sh", "quickdraw_ext": "qd-de"}


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ManifestError) as info:
        resolve(raw)
    return [str(p) for p in info.value.problems]


def test_validation_names_the_weights_key(tmp_path):
    raw = load(PLUGIN / "examples" / "clip_sketchy_ye.toml")
    raw = with_weights(raw, str(tmp_path / "missing.safetensors"), str(tmp_path))
    msgs = problems_of(raw)
    assert any(m.startswith("backbone.weights") and "missing.safetensors" in m for m in msgs)
    assert any(m.startswith("model.head.network.weights") for m in msgs), msgs
    raw = with_weights(load(PLUGIN / "examples" / "clip_sketchy_ye.toml"), "", str(tmp_path))
    msgs = problems_of(raw)
    assert any("backbone" in m and "pretrained = true needs backbone.weights" in m
               for m in msgs), msgs


def test_validation_checks_the_method_wiring(tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"")
    raw = with_weights(load(PLUGIN / "examples" / "clip_sketchy_ye.toml"), str(weights),
                       str(tmp_path))
    raw["sampler"] = {"name": "random"}
    raw["data"]["image_size"] = 64
    raw["optimizer"]["groups"] = [{"match": "model.backbone.prompts", "lr": 0, "beta": 1}]
    msgs = problems_of(raw)
    assert any("clip_triplet" in m and "triplet batches" in m for m in msgs), msgs
    assert any("data.image_size = 64" in m for m in msgs), msgs
    assert any(m.startswith("optimizer.groups[0].lr") for m in msgs), msgs
    assert any(m.startswith("optimizer.groups[0].beta") and "unknown" in m for m in msgs), msgs


# ---------------------------------------------------------------------------- real runs
def tiny_manifest(tmp_path: Path, tiny: str, weights: str, name: str, epochs: int = 2
                  ) -> dict:
    raw = load(PLUGIN / "examples" / "clip_sketchy_ye.toml")
    raw["protocol"] = {"name": "synthetic", "num_classes": 8, "num_unseen": 3,
                       "photos_per_class": 6, "sketches_per_class": 6, "image_size": 32,
                       "seed": 0}
    for table in (raw["backbone"], raw["model"]["head"]["network"]):
        table.update(config=tiny, weights=weights, pretrained=bool(weights))
        table.pop("arch")
    return apply_overrides(raw, [
        f"run.output_dir={json.dumps(str(tmp_path))}", f"run.name={name}",
        f"run.cache_dir={json.dumps(str(tmp_path / 'cache'))}", "run.device=cpu",
        "data.image_size=32", "data.workers=0", "data.eval_batch_size=32",
        f"train.epochs={epochs}", "train.batch_size=6", "train.max_steps_per_epoch=3",
        "train.checkpoint_every=0", "train.log_every=1", "evaluation.grid_queries=0",
        'evaluation.metrics=["map@all", "p@100"]',
    ])


def test_zsbir_run_with_a_saved_random_clip(tmp_path, tiny):
    """A real run of the method (synthetic protocol, tiny CLIP from a weights file): it
    trains only the LayerNorms and prompts, at the two learning rates, on triplets."""
    from zsbir.engine.run import run_experiment

    torch.manual_seed(123)
    clip = open_clip.CLIP(**json.loads(Path(tiny).read_text()), quick_gelu=True)
    weights = tmp_path / "tiny_clip.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))

    manifest = resolve(tiny_manifest(tmp_path, tiny, str(weights), "clip"))
    from zsbir.build import build

    tf = build(manifest, purpose="evaluate").eval_transform.describe()
    assert tf["mean"] == list(CLIP_MEAN) and tf["std"] == list(CLIP_STD)
    assert tf["interpolation"] == "bicubic"  # the transform follows the backbone's weights
    events: list[dict] = []
    results = run_experiment(manifest, progress=events.append)

    for entry in results["results"]["synthetic"].values():
        assert 0.0 <= entry["map@all"]["value"] <= 1.0
    steps = [e for e in events if "step" in e and "loss" in e]
    assert len(steps) == 6
    assert all(math.isfinite(e["loss"]["clip_triplet"]) and math.isfinite(e["loss"]["ce"])
               for e in steps)

    final = torch.load(tmp_path / "clip" / "checkpoints" / "final.pt", weights_only=True)
    sd = final["model"]
    # frozen weights are exactly the file's; LayerNorms and prompts moved
    src = clip.state_dict()
    assert torch.equal(sd["backbone.visual.conv1.weight"], src["visual.conv1.weight"])
    assert torch.equal(sd["backbone.visual.transformer.resblocks.0.attn.in_proj_weight"],
                       src["visual.transformer.resblocks.0.attn.in_proj_weight"])
    assert torch.equal(sd["backbone.visual.proj"], src["visual.proj"])
    assert not torch.equal(sd["backbone.visual.ln_pre.weight"], src["visual.ln_pre.weight"])
    assert "backbone.prompts" in sd and "head.text_features" in sd
    assert not any(k.startswith("head.network") for k in sd)  # the text tower is not kept
    last = torch.load(tmp_path / "clip" / "checkpoints" / "last.pt", weights_only=True)
    assert sorted(g["lr"] for g in last["optimizer"]["param_groups"]) == [1e-4, 1e-3]
    prompts = [g for g in last["optimizer"]["param_groups"] if g["lr"] == 1e-3]
    assert prompts[0]["names"] == ["model.backbone.prompts"]


def test_trained_model_embeds_without_reading_the_weights_file(tmp_path, tiny):
    """A trained model is rebuilt from its checkpoint for indexing and search: the CLIP
    weights file it was trained from is not read again (here it no longer holds weights;
    zsbir's validation still asks that the path exists)."""
    from PIL import Image

    from zsbir.engine.index import load_trained
    from zsbir.engine.run import run_experiment

    torch.manual_seed(5)
    weights = tmp_path / "tiny_clip.bin"
    torch.save(open_clip.CLIP(**json.loads(Path(tiny).read_text()), quick_gelu=True)
               .state_dict(), weights)
    run_experiment(resolve(tiny_manifest(tmp_path, tiny, str(weights), "trained", epochs=1)))
    q_run = np.load(tmp_path / "trained" / "features.npz")["query_features"]
    weights.write_bytes(b"not a state dict any more")

    tm = load_trained(tmp_path / "trained")
    img = Image.new("RGB", (32, 32), (200, 30, 30))
    a, b = tm.embed_images([img], 1), tm.embed_images([img], 0)
    assert a.shape == (1, 32) and abs(float((a ** 2).sum()) - 1.0) < 1e-4
    assert not np.allclose(a, b)  # sketch and photo prompts differ

    # the rebuilt model gives the run's own query embeddings
    from zsbir.data.loading import ImageDataset, collate

    p = {k: v for k, v in tm.manifest.protocol.items() if k != "name"}
    data = get_registry("protocols").get("synthetic")(**p)
    ds = ImageDataset(data.query, data.reader, tm.transform, "skip")
    emb = tm.embed_batch(collate([ds[i] for i in range(len(ds))]))
    assert np.allclose(emb, q_run, atol=1e-5)


def test_the_cli_runs_it_and_reports_errors_in_one_line(tmp_path, tiny):
    from zsbir.manifest import dump_toml

    raw = tiny_manifest(tmp_path, tiny, "", "cli", epochs=1)
    path = tmp_path / "clip_tiny.toml"
    path.write_text(dump_toml(raw))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "metrics.json").is_file()

    raw["backbone"]["pretrained"] = True  # and still no weights file
    path.write_text(dump_toml(raw))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "pretrained = true needs backbone.weights" in result.output
    assert "Traceback" not in result.output


def test_last_pt_holds_what_trains_and_checks_its_base(tmp_path, tiny):
    """last.pt / best.pt keep the prompts and LayerNorms, not the frozen tower, plus a
    reference to the weights file (path, size, sha256) checked before resuming: a changed
    file is refused in one line naming it. final.pt stays self-contained."""
    from safetensors.torch import save_file

    from zsbir.engine.checkpoint import CheckpointError, load_checkpoint
    from zsbir.engine.run import load_resumable, run_experiment

    def save_clip(seed: int, path: Path) -> None:
        torch.manual_seed(seed)
        clip = open_clip.CLIP(**json.loads(Path(tiny).read_text()), quick_gelu=True)
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))

    weights = tmp_path / "tiny_clip.safetensors"
    save_clip(1, weights)
    raw = apply_overrides(tiny_manifest(tmp_path, tiny, str(weights), "part"),
                          ["train.checkpoint_every=2"])
    assert run_experiment(resolve(raw), stop_after_steps=2)["interrupted"]
    last = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert "backbone.prompts" in last["model"] and "backbone.visual.ln_pre.weight" in last["model"]
    assert "backbone.visual.conv1.weight" not in last["model"]
    assert "backbone.visual.conv1.weight" in last["base"]["frozen"]
    files = {f["key"]: f for f in last["base"]["files"]}
    assert files["model.backbone.weights"]["path"] == str(weights)
    assert files["model.backbone.weights"]["size"] == weights.stat().st_size
    assert len(files["model.backbone.weights"]["sha256"]) == 64
    # the base changed: refused before anything is trained, naming the file
    save_clip(2, weights)
    with pytest.raises(CheckpointError, match="tiny_clip.safetensors.*changed"):
        run_experiment(load_resumable(tmp_path / "part"), resume=True)
    save_clip(1, weights)  # restored: the run resumes and finishes
    run_experiment(load_resumable(tmp_path / "part"), resume=True)
    final = load_checkpoint(tmp_path / "part" / "checkpoints" / "final.pt")
    assert "backbone.visual.conv1.weight" in final["model"]  # self-contained
