"""The command line: list, describe, validate (exit 2 with every problem), plugins,
evaluate --features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from zsbir.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_list_all_and_kind():
    res = invoke("list")
    assert res.exit_code == 0
    assert "losses\tce\tzsbir\tCross-entropy" in res.output
    assert "protocols\tsynthetic\tzsbir" in res.output
    res = invoke("list", "losses")
    assert res.exit_code == 0 and "backbones" not in res.output
    res = invoke("list", "backbones", "resnet*")
    assert "resnet18" in res.output and "cse_resnet50" not in res.output


def test_describe_prints_parameters_and_location():
    res = invoke("describe", "losses", "ce")
    assert res.exit_code == 0
    assert "label_smoothing" in res.output and "classification.py:" in res.output
    res = CliRunner().invoke(main, ["describe", "losses", "cee"])
    assert res.exit_code == 1 and "did you mean 'ce'" in res.output


def test_validate_good_and_bad(tmp_path):
    res = invoke("validate", str(EXAMPLES / "quickstart.toml"))
    assert res.exit_code == 0 and "ok" in res.output
    res = invoke("validate", str(EXAMPLES / "quickstart.toml"), "--show")
    assert "[model.backbone]" in res.output and "download = false" in res.output
    bad = tmp_path / "bad.toml"
    bad.write_text((EXAMPLES / "quickstart.toml").read_text()
                   + '\n[[losses]]\nname = "ce"\nweight = "a"\n')
    res = CliRunner().invoke(main, ["validate", str(bad), "--set", "train.epochs=x"])
    assert res.exit_code == 2
    assert "losses[1].weight: expected float, got str 'a'" in res.output
    assert "train.epochs: expected int, got str 'x'" in res.output
    assert "Traceback" not in res.output


def test_plugins_command_reports_broken_plugin(fake_plugins):
    fake_plugins("fake-broken", {"zsbir.losses": {"broken_loss": "fakeplug_b2:X"}},
                 {"fakeplug_b2": "import not_a_module_xyz\n"})
    res = CliRunner().invoke(main, ["plugins"])
    assert res.exit_code == 1
    assert "fake-broken" in res.output and "not_a_module_xyz" in res.output
    res = invoke("list", "losses")  # listing still works
    assert res.exit_code == 0 and "broken_loss" in res.output and "ce" in res.output


def test_evaluate_features_json(tmp_path):
    rng = np.random.default_rng(0)
    ql, gl = rng.integers(0, 4, 30), rng.integers(0, 4, 80)
    centers = rng.normal(size=(4, 16))
    np.savez(tmp_path / "f.npz",
             query_features=centers[ql] + rng.normal(size=(30, 16)), query_labels=ql,
             gallery_features=centers[gl] + rng.normal(size=(80, 16)), gallery_labels=gl)
    res = invoke("evaluate", "--features", str(tmp_path / "f.npz"), "--metric", "map@all",
                 "--metric", "p@10", "--hasher", "none", "--hasher", "itq:8", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert set(out) == {"real", "itq8"}
    assert 0.25 < out["real"]["metrics"]["map@all"] <= 1.0
    res = CliRunner().invoke(main, ["evaluate", "--features", str(tmp_path / "f.npz"),
                                    "--metric", "map@everything"])
    assert res.exit_code == 2


def test_component_rejecting_its_parameters_is_a_clean_error(tmp_path):
    """Caught by validation (the sampler's check_manifest hook), before anything is built:
    exit 2 naming the component, no traceback; the run directory can be used at once."""
    args = ["run", str(EXAMPLES / "quickstart.toml"), "--set", "train.batch_size=16",
            "--set", f"run.output_dir={json.dumps(str(tmp_path))}"]
    for _ in range(2):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2, res.output
        assert "sampler: sketches_per_batch (32) exceeds train.batch_size (16)" \
            in " ".join(res.output.split())
        assert "Traceback" not in res.output and "already holds" not in res.output
