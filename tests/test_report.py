"""zsbir report (summary + curves.png) and zsbir compare (runs side by side, seeds
grouped into mean ± std), on run directories written by hand."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from zsbir.cli import main
from zsbir.engine.tracking import RunTracker
from zsbir.report.compare import (
    CompareError,
    build_table,
    compare,
    group_key,
    group_runs,
    load_run,
    render,
)


def _manifest_toml(name: str, seed: int, lr: float = 1e-3, loss: str = "ce") -> str:
    return (f'[run]\nname = "{name}"\nseed = {seed}\noutput_dir = "runs"\n\n'
            f'[protocol]\nname = "synthetic"\nnum_classes = 24\n\n'
            f'[[losses]]\nname = "{loss}"\nweight = 1.0\n\n'
            f'[optimizer]\nname = "adam"\nlr = {lr}\n')


def make_run(root: Path, name: str, seed: int, values: dict[str, float], *, lr: float = 1e-3,
             loss: str = "ce", epochs: int = 3, write_scalars: bool = False) -> Path:
    """A finished run directory: manifest.resolved.toml + metrics.json (+ scalars.csv)."""
    run = root / name
    run.mkdir(parents=True)
    (run / "manifest.resolved.toml").write_text(_manifest_toml(name, seed, lr, loss))
    results = {"synthetic": {
        "real": {"map@all": {"value": values["real"], "formula": "VOC"},
                 "p@100": {"value": values["real"] / 2, "formula": "P@K"},
                 "per_class": {"map@all": {"a": 1.0}}},
        "itq8": {"map@all": {"value": values["itq"], "formula": "VOC"},
                 "p@100": {"value": values["itq"] / 2, "formula": "P@K"}}}}
    history = [{"epoch": e, "loss": {"ce": 2.0 - e * 0.5, "total": 2.0 - e * 0.5},
                "images_per_s": 100.0 + 10 * e, "lr": 1e-3 / (e + 1),
                "val_accuracy": 0.2 + 0.1 * e} for e in range(epochs)]
    metrics = {"protocol": {"name": "synthetic"}, "results": results,
               "chance": {"synthetic": 0.125}, "sizes": {"synthetic": {"queries": 40,
                                                                      "gallery": 40}},
               "classes": {"counts": {"seen": 16, "unseen": 8, "validation": 16,
                                      "validation_images": 32}},
               "train": {"epochs_run": epochs, "global_steps": 30, "best_epoch": epochs - 1,
                         "best_val_accuracy": 0.2 + 0.1 * (epochs - 1), "selected": "last",
                         "stopped_early": False, "history": history, "seconds": 12.0},
               "seconds": {"evaluate_total": 3.0}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    if write_scalars:
        with RunTracker(run, epochs=epochs, tensorboard=False) as tracker:
            for e in range(epochs):
                for s in (1, 2):
                    tracker({"epoch": e, "step": s, "steps": 2,
                             "loss": {"ce": 2.0 - e * 0.5 - s * 0.1,
                                      "total": 2.0 - e * 0.5 - s * 0.1},
                             "images_per_s": 90.0, "lr": 1e-3 / (e + 1)})
                tracker({"epoch_end": e, **history[e]})
    return run


@pytest.fixture
def runs(tmp_path) -> dict[str, list[Path]]:
    rng = np.random.default_rng(0)
    out: dict[str, list[Path]] = {"ce": [], "sake": [], "lr": []}
    for seed in range(3):
        out["ce"].append(make_run(tmp_path, f"ce_seed{seed}", seed,
                                  {"real": float(rng.uniform(0.3, 0.5)),
                                   "itq": float(rng.uniform(0.2, 0.4))}))
    for seed in range(2):
        out["sake"].append(make_run(tmp_path, f"sake_seed{seed}", seed,
                                    {"real": float(rng.uniform(0.4, 0.6)),
                                     "itq": float(rng.uniform(0.3, 0.5))}, loss="sake"))
    out["lr"].append(make_run(tmp_path, "ce_lr", 0, {"real": 0.33, "itq": 0.22}, lr=1e-2))
    return out


def _values(paths: list[Path], hasher: str, metric: str) -> list[float]:
    return [json.loads((p / "metrics.json").read_text())["results"]["synthetic"][hasher]
            [metric]["value"] for p in paths]


def test_group_key_ignores_only_seed_name_and_output_dir(runs):
    a, b = load_run(runs["ce"][0]), load_run(runs["ce"][1])
    assert group_key(a.manifest) == group_key(b.manifest)
    assert group_key(a.manifest) != group_key(load_run(runs["lr"][0]).manifest)
    assert group_key(a.manifest) != group_key(load_run(runs["sake"][0]).manifest)


def test_seeds_of_one_manifest_become_one_row_with_mean_and_std(runs):
    all_runs = [load_run(p) for p in runs["ce"] + runs["sake"] + runs["lr"]]
    groups = group_runs(all_runs)
    assert list(groups) == ["ce", "sake", "ce_lr"]
    assert [len(g) for g in groups.values()] == [3, 2, 1]
    table = build_table(groups, metrics=["map@all"])
    assert table.columns == [("synthetic", "real", "map@all"), ("synthetic", "itq8", "map@all")]
    for label, paths in (("ce", runs["ce"]), ("sake", runs["sake"])):
        row = next(r for r in table.rows if r[0] == label)
        want = _values(paths, "real", "map@all")
        assert row[1] == len(paths)
        assert row[2][0].mean == pytest.approx(statistics.mean(want))
        assert row[2][0].std == pytest.approx(statistics.stdev(want))  # sample std (n - 1)
        assert row[2][0].text() == f"{statistics.mean(want):.4f} ± {statistics.stdev(want):.4f}"
    single = next(r for r in table.rows if r[0] == "ce_lr")
    assert single[2][0].std is None and single[2][0].text() == "0.3300"


def test_formats_round_trip(runs):
    paths = runs["ce"] + runs["sake"]
    md = compare(paths, ["map@all", "p@100"], "markdown", hashers=["real"])
    lines = md.splitlines()
    assert lines[0] == "| run | seeds | synthetic real map@all | synthetic real p@100 |"
    assert lines[2].startswith("| ce | 3 | ") and "±" in lines[2]
    latex = compare(paths, ["map@all"], "latex")
    assert latex.startswith("\\begin{tabular}{lrrr}") and "$\\pm$" in latex
    assert "\\bottomrule" in latex and "ce & 3 &" in latex
    rows = list(csv.DictReader(io.StringIO(compare(paths, ["map@all"], "csv"))))
    assert [r["run"] for r in rows] == ["ce", "sake"]
    assert float(rows[0]["synthetic real map@all mean"]) == pytest.approx(
        statistics.mean(_values(runs["ce"], "real", "map@all")))
    assert float(rows[1]["synthetic itq8 map@all std"]) == pytest.approx(
        statistics.stdev(_values(runs["sake"], "itq8", "map@all")))
    plain = compare(paths, ["map@all"], "table")
    assert plain.splitlines()[0].split()[:2] == ["run", "seeds"]


def test_extra_columns(runs):
    table = build_table(group_runs([load_run(p) for p in runs["ce"]]), ["map@all"],
                        ["real"], extras=["chance", "seconds", "images_per_s", "best_val"])
    cells = table.rows[0][2]
    rate = statistics.harmonic_mean([100, 110, 120])
    # identical across the three seeds: std 0, shown as such
    assert [c.text() for c in cells[1:]] == ["0.125 ± 0.000", "15 ± 0", f"{rate:.1f} ± 0.0",
                                             "0.400 ± 0.000"]


def test_compare_errors_are_one_line(tmp_path, runs):
    with pytest.raises(CompareError, match="no metrics.json"):
        load_run(tmp_path)
    with pytest.raises(CompareError, match="no run has map@nothing"):
        build_table(group_runs([load_run(runs["ce"][0])]), ["map@nothing"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{not json")
    for args in (["compare", str(tmp_path / "bad")], ["compare", str(tmp_path / "nope")],
                 ["compare", str(runs["ce"][0]), "--metric", "map@nothing"],
                 ["report", str(tmp_path / "bad")]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 1, (args, res.output)
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_compare_command(runs):
    res = CliRunner().invoke(main, ["compare", *map(str, runs["ce"] + runs["lr"]),
                                    "--metric", "map@all", "--hasher", "itq8",
                                    "--format", "markdown", "--extra", "chance"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == "| run | seeds | synthetic itq8 map@all | chance |"
    assert "| ce | 3 |" in res.output and "| ce_lr | 1 | 0.2200 | 0.125 |" in res.output


def test_report_draws_curves_from_scalars(tmp_path):
    from PIL import Image

    from zsbir.report.curves import curves_data

    run = make_run(tmp_path, "r", 0, {"real": 0.4, "itq": 0.3}, write_scalars=True)
    data = curves_data(run)
    assert data["loss"]["total"] == [(1, 2.0), (2, 1.5), (3, 1.0)]
    assert [x for x, _ in data["step_loss"]["total"]] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert data["val"] == [(1, pytest.approx(0.2)), (2, pytest.approx(0.3)),
                           (3, pytest.approx(0.4))]
    res = CliRunner().invoke(main, ["report", str(run)])
    assert res.exit_code == 0, res.output
    assert "synthetic (40 queries x 40) real" in res.output and "map@all=0.4000" in res.output
    assert "16 seen, 8 unseen" in res.output and "best validation accuracy 0.400" in res.output
    with Image.open(run / "curves.png") as im:
        assert im.size == (1400, 400)
        # not a blank canvas: the lines were drawn
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 10


def test_report_falls_back_to_the_history_in_metrics_json(tmp_path):
    from zsbir.report.curves import curves_data

    run = make_run(tmp_path, "old", 0, {"real": 0.4, "itq": 0.3}, epochs=2)
    data = curves_data(run)
    assert data["loss"]["ce"] == [(1, 2.0), (2, 1.5)] and data["step_loss"] == {}
    assert data["lr"] == [(1, 1e-3), (2, 5e-4)]
    res = CliRunner().invoke(main, ["report", str(run), "--no-plot"])
    assert res.exit_code == 0 and not (run / "curves.png").exists()


def test_render_rejects_unknown_format(runs):
    table = build_table(group_runs([load_run(runs["ce"][0])]))
    with pytest.raises(CompareError, match="unknown format"):
        render(table, "html")
