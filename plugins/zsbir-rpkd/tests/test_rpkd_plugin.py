"""The plugin as users meet it: entry points, `zsbir list`, the example manifests, and a
short CPU run of an RPKD manifest on the synthetic protocol."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("zsbir_rpkd", reason="install the plugin: pip install -e plugins/zsbir-rpkd")

from click.testing import CliRunner  # noqa: E402

from zsbir.cli import main  # noqa: E402
from zsbir.manifest import apply_overrides, load, resolve  # noqa: E402
from zsbir.testing import assert_registered_by  # noqa: E402

PLUGIN = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((PLUGIN / "examples").glob("*.toml"))
DIST = "zsbir-rpkd"
COMPONENTS = {
    ("losses", "rpkd_instance"): "zsbir_rpkd.losses:RpkdInstanceLoss",
    ("losses", "rpkd_contrastive"): "zsbir_rpkd.losses:RpkdContrastiveLoss",
    ("losses", "rpkd_embedding_supervision"): "zsbir_rpkd.losses:RpkdEmbeddingSupervisionLoss",
    ("teachers", "rpkd"): "zsbir_rpkd.teacher:RpkdTeacher",
}


def test_registered_only_through_entry_points():
    for comp in assert_registered_by(DIST, COMPONENTS).values():
        assert comp.summary and "only the abstract" in comp.doc.lower()


def test_listed_under_the_plugin_package():
    for kind in ("losses", "teachers"):
        result = CliRunner().invoke(main, ["list", kind])
        assert result.exit_code == 0, result.output
        rows = [line.split("\t") for line in result.output.splitlines()]
        ours = {r[1]: r for r in rows if len(r) == 4 and r[0] == kind}
        for k, name in COMPONENTS:
            if k == kind:
                # before first use: "zsbir-rpkd 0.1.0"; once imported: "zsbir-rpkd"
                assert ours[name][2].split()[0] == DIST, ours.get(name)


def test_describe_shows_the_typed_parameters():
    result = CliRunner().invoke(main, ["describe", "losses", "rpkd_embedding_supervision"])
    assert result.exit_code == 0, result.output
    for word in ("k", "tau", "student_temperature", "zsbir-rpkd"):
        assert word in result.output


def _load(path: Path) -> dict:
    """An example manifest with its dataset root pointed at a folder that exists here
    (validation checks that the root exists; the datasets are not on this machine)."""
    raw = load(path)
    raw["protocol"]["root"] = str(path.parent)
    return raw


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_manifests_validate(path):
    m = resolve(_load(path), str(path))
    assert m.teacher["name"] == "rpkd"
    assert [t["name"] for t in m.losses] == ["ce", "rpkd_instance", "rpkd_contrastive",
                                            "rpkd_embedding_supervision"]
    assert {h["name"] for h in m.hashers} == {"none", "itq"}
    assert {"map@all", "p@100"} <= set(m.evaluation.metrics)
    assert m.backbone["name"] in ("cse_resnet50", "resnet50") and m.backbone["pretrained"]


def test_examples_cover_both_datasets():
    protocols = {resolve(_load(p)).protocol["name"]: resolve(_load(p)) for p in EXAMPLES}
    assert protocols["sketchy_ext"].protocol["split"] == "sk-sh"
    assert {"map@200", "p@200"} <= set(protocols["sketchy_ext"].evaluation.metrics)
    assert protocols["tuberlin_ext"].protocol["split"] == "tub-sh"


def test_validation_requires_a_teacher_for_rpkd_losses():
    raw = load(PLUGIN / "examples" / "rpkd_sketchy.toml")
    del raw["teacher"]
    with pytest.raises(ValueError, match="needs a teacher signal"):
        resolve(raw)


@pytest.fixture
def one_thread():
    """Tiny CPU models run fastest on one thread, and do not slow to a crawl when other
    processes share the cores (OpenMP threads spin on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_smoke_run_on_synthetic(tmp_path, one_thread):
    """The Sketchy example's model, teacher and losses, on a tiny synthetic benchmark with a
    ResNet-18 whose 'pretrained' weights come from a local file (no download)."""
    import timm

    from zsbir.engine.run import run_experiment

    weights = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet18").state_dict(), weights)

    raw = load(PLUGIN / "examples" / "rpkd_sketchy.toml")
    raw["protocol"] = {"name": "synthetic", "num_classes": 8, "num_unseen": 3,
                       "photos_per_class": 6, "sketches_per_class": 6, "image_size": 32,
                       "seed": 0}
    raw["backbone"] = {"name": "resnet18", "weights": str(weights)}
    raw = apply_overrides(raw, [
        f"run.output_dir={json.dumps(str(tmp_path))}", "run.name=rpkd",
        f"run.cache_dir={json.dumps(str(tmp_path / 'cache'))}", "run.device=cpu",
        "data.image_size=32", "data.workers=0", "data.eval_batch_size=32",
        "model.head.embed_dim=16", "train.epochs=2", "train.batch_size=8",
        "train.max_steps_per_epoch=4",
        "sampler.sketches_per_batch=4", "train.checkpoint_every=0", "train.log_every=1",
        "losses[3].k=3", "hashers[1].bits=8", "evaluation.grid_queries=0",
        'evaluation.metrics=["map@all", "p@100"]',
    ])
    manifest = resolve(raw)
    assert manifest.head["imagenet_head"] == "svd" and manifest.teacher["name"] == "rpkd"
    events = []
    run_experiment(manifest, progress=events.append)

    metrics = json.loads((tmp_path / "rpkd" / "metrics.json").read_text())
    for entry in metrics["results"]["synthetic"].values():
        assert math.isfinite(entry["map@all"]["value"])
        assert 0.0 <= entry["map@all"]["value"] <= 1.0
    assert set(metrics["results"]["synthetic"]) == {"real", "itq8"}
    ends = [e for e in events if "epoch_end" in e]
    assert len(ends) == 2
    for name in ("ce", "rpkd_instance", "rpkd_contrastive", "rpkd_embedding_supervision"):
        assert all(math.isfinite(e["loss"][name]) for e in ends), name
    # the class centers were computed once and cached under run.cache_dir
    assert len(list((tmp_path / "cache" / "teacher").glob("rpkd_centers-*.pt"))) == 1


def test_validation_checks_the_teacher_provides_class_centers():
    """rpkd_embedding_supervision reads class_features: the online teacher lacks them."""
    from zsbir.manifest import ManifestError, load, resolve

    raw = load(PLUGIN / "examples" / "rpkd_tuberlin.toml")
    raw["teacher"] = {"name": "online"}
    with pytest.raises(ManifestError) as info:
        resolve(raw)
    assert any("class_features" in str(p) and "'online'" in str(p)
               for p in info.value.problems)
