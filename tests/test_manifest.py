"""Manifests: validation against signatures (every problem at once), overrides, the
resolved form."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from zsbir.manifest import ManifestError, apply_overrides, dump_toml, load, resolve

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def quick() -> dict:
    return load(EXAMPLES / "quickstart.toml")


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ManifestError) as info:
        resolve(raw, "test.toml")
    return [str(p) for p in info.value.problems]


def test_quickstart_resolves_with_defaults_filled():
    m = resolve(quick())
    assert m.protocol["name"] == "synthetic"
    assert m.losses == [{"name": "ce", "weight": 1.0, "label_smoothing": 0.0}]
    assert m.backbone == {"name": "resnet18", "pretrained": False, "download": False}
    assert m.train.epochs == 8 and m.data_cfg.image_size == 64
    assert m.hashers[1]["bits"] == 32 and "iterations" in m.hashers[1]


def test_every_problem_reported_at_once_with_paths():
    raw = quick()
    raw["losses"].append({"name": "ce", "weight": "a"})
    raw["losses"].append({"name": "sake"})  # needs a teacher and an ImageNet head
    raw["backbone"]["pretrianed"] = True
    raw["train"]["epochs"] = "2"
    raw["protocol"]["name"] = "synthetik"
    raw["optimizer"]["name"] = "adamm"
    raw["bogus"] = {}
    raw["evaluation"]["metrics"] = ["map@all", "mAP@everything"]
    probs = problems_of(raw)
    text = "\n".join(probs)
    assert "losses[1].weight: expected float, got str 'a'" in text
    assert "losses[2]: loss 'sake' needs a teacher signal" in text
    assert "losses[2]: loss 'sake' reads the model output(s) imagenet_logits" in text
    assert "backbone.pretrianed: unknown parameter; did you mean 'pretrained'?" in text
    assert "train.epochs: expected int, got str '2'" in text
    assert "protocol.name: unknown protocol 'synthetik'; did you mean 'synthetic'?" in text
    assert "optimizer.name: unknown optimizer 'adamm'; did you mean 'adam'" in text
    assert "bogus: unknown section" in text
    assert any(p.startswith("evaluation.metrics[1]") for p in probs)
    assert len(probs) >= 9


def test_required_parameter_and_section_missing():
    raw = quick()
    raw["protocol"] = {"name": "folder"}
    del raw["losses"]
    text = "\n".join(problems_of(raw))
    assert "protocol.root: required parameter is missing" in text
    assert "losses: required section is missing" in text


def test_literal_and_range_checks():
    raw = quick()
    raw["model"]["head"]["imagenet_head"] = "sdv"
    raw["train"]["batch_size"] = 0
    text = "\n".join(problems_of(raw))
    assert "model.head.imagenet_head: expected one of 'svd', 'random', 'none'" in text
    assert "did you mean 'svd'" in text
    assert "train.batch_size: must be >= 1" in text


def test_hasher_bits_cannot_exceed_embedding():
    raw = quick()
    raw["hashers"][1]["bits"] = 128
    assert any("hashers[1].bits: 128 bits exceed the head's embed_dim (64)" in p
               for p in problems_of(raw))


def test_quadruplet_loss_needs_quadruplet_sampler():
    raw = quick()
    raw["losses"] = [{"name": "domain_quadruplet"}]
    text = "\n".join(problems_of(raw))
    assert "needs quadruplet batches" in text


def test_int_widens_to_float_but_bool_is_not_a_number():
    raw = quick()
    raw["optimizer"]["lr"] = 1
    assert resolve(raw).optimizer["lr"] == 1.0 and isinstance(resolve(raw).optimizer["lr"],
                                                              float)
    raw["optimizer"]["lr"] = True
    assert any("optimizer.lr: expected float, got bool" in p for p in problems_of(raw))


def test_overrides():
    raw = apply_overrides(quick(), ["train.epochs=3", "losses[0].weight=0.5",
                                    'backbone.name="resnet50"', "run.name=other",
                                    "evaluation.metrics=['p@100']"])
    assert raw["train"]["epochs"] == 3 and raw["losses"][0]["weight"] == 0.5
    assert raw["backbone"]["name"] == "resnet50" and raw["run"]["name"] == "other"
    assert raw["evaluation"]["metrics"] == ["p@100"]
    with pytest.raises(ManifestError, match=r"losses\[5\] does not exist"):
        apply_overrides(quick(), ["losses[5].weight=1"])
    with pytest.raises(ManifestError, match="expected KEY=VALUE"):
        apply_overrides(quick(), ["train.epochs"])


def test_resolved_form_round_trips_through_toml():
    m = resolve(quick())
    text = dump_toml(m.data)
    again = resolve(tomllib.loads(text))
    assert again.data == m.data


def test_dump_toml_nested_tables_and_escaping():
    data = {"run": {"name": 'a "b"\n'}, "teacher": {"name": "online",
            "backbone": {"name": "resnet50", "weights": "/x y"}},
            "losses": [{"name": "ce", "weight": 1.0}, {"name": "sake", "lambda2": 0.3}]}
    assert tomllib.loads(dump_toml(data)) == data


def test_invalid_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nname=1")
    with pytest.raises(ManifestError, match="invalid TOML"):
        load(bad)
    with pytest.raises(ManifestError, match="cannot read"):
        load(tmp_path / "nope.toml")


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.toml")),
                         ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_example_manifest_validates(path, tmp_path):
    raw = load(path)
    root = raw.get("protocol", {}).get("root")
    if root and not Path(root).is_dir():  # a dataset this machine does not have
        with pytest.raises(ManifestError, match="protocol.root: no such dir"):
            resolve(raw, str(path))
        raw["protocol"]["root"] = str(tmp_path)
    resolve(raw, str(path))
