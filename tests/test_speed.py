"""Speed switches keep what is computed: bf16 autocast + channels_last losses track the fp32
run from the same seed; `zsbir bench train` reports its figures (no timing asserted)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tests.test_e2e import EXAMPLES, TINY, tiny
from zsbir.cli import main
from zsbir.engine.run import run_experiment


def losses_of(tmp_path, name: str, extra: list[str]) -> list[float]:
    events = []
    m = tiny(tmp_path, name, ["train.epochs=1", "train.max_steps_per_epoch=6", *extra])
    run_experiment(m, progress=events.append, stop_after_steps=6)
    return [e["loss"]["total"] for e in events if "loss" in e and "step" in e]


@pytest.mark.slow
def test_bf16_channels_last_losses_track_fp32(tmp_path):
    ref = losses_of(tmp_path, "fp32", ["train.amp=off", "train.channels_last=off"])
    fast = losses_of(tmp_path, "bf16", ["train.amp=bf16", "train.channels_last=on"])
    assert len(ref) == len(fast) == 6
    for a, b in zip(ref, fast):  # running means of the first steps, bf16 tolerance
        assert abs(a - b) <= 0.05 * abs(a) + 1e-2, (ref, fast)
    assert ref != fast  # the switch really changed the arithmetic


def test_bench_train_reports_figures(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "train", str(EXAMPLES / "quickstart.toml"), "--steps", "2", "--warmup",
            "1", "--json", str(out), "--synthetic-data"]
    for o in TINY:
        args += ["--set", o]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["images_per_s"] > 0 and data["steps"] == 2 and data["batch_size"] == 8
    assert set(data["step_ms"]) == {"p50", "p90", "p99", "mean"}
    assert data["bottleneck"] in ("compute", "input pipeline")
    assert "images/s" in res.output
