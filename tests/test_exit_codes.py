"""Exit codes and error output follow docs/troubleshooting.md ("Exit codes"): one
representative of each documented class of error, through the real command line.

- 2: what ``zsbir validate`` refuses (the manifest, its values, ``--set``) and usage
  errors; printed as ``FILE: N problem(s)`` and one ``  - key: message`` line each, or one
  ``error:`` line;
- 1: every other error a user can fix (data, weights and checkpoint files, run
  directories, plugins, indexes): one ``error:`` line (a data tree that does not fit its
  protocol adds the indented listing of what it found);
- a traceback is a bug (``tests/test_reliability.py::test_bugs_keep_their_traceback``).

A few cases run ``python -m zsbir`` in a subprocess (the real entry point, its real
stderr); the rest click's runner with ``catch_exceptions=False`` (an escaping exception
fails the test) and stderr kept apart from stdout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

from zsbir.cli import main
from zsbir.engine.run import RESOLVED
from zsbir.manifest import dump_toml, load

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.toml"


def zsbir(*args: object) -> tuple[int, str]:
    """``python -m zsbir ARGS`` in a subprocess (this checkout's zsbir): (status, stderr)."""
    out = subprocess.run([sys.executable, "-m", "zsbir", *map(str, args)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    return out.returncode, out.stderr


def invoke(*args: object) -> tuple[int, str]:
    """``zsbir ARGS`` in-process: (status, stderr); a traceback fails the test."""
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return res.exit_code, res.stderr


def one_error_line(stderr: str, *parts: str) -> str:
    """Exactly one non-empty line on stderr, ``error: ...`` holding ``parts``."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert all(p in lines[0] for p in parts), stderr
    return lines[0]


def manifest_problems(stderr: str, source: str, *problems: str) -> None:
    """``SOURCE: N problem(s)`` then one ``  - ...`` line per problem, each given one
    (``key: message`` start) found among them."""
    assert "Traceback" not in stderr, stderr
    head, *rest = [ln for ln in stderr.splitlines() if ln.strip()]
    n = len(rest)
    assert head == f"{source}: {n} problem{'s' if n != 1 else ''}", stderr
    assert all(ln.startswith("  - ") for ln in rest), stderr
    for p in problems:
        assert any(ln.removeprefix("  - ").startswith(p) for ln in rest), (p, stderr)


def write(path: Path, raw: dict) -> Path:
    path.write_text(dump_toml(raw))
    return path


# ------------------------------------------------------------------------ exit status 2
def test_invalid_toml_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nname = 'x'\n")
    code, err = zsbir("validate", bad)
    assert code == 2
    manifest_problems(err, str(bad), "invalid TOML")


def test_unknown_component_name_exits_2(tmp_path):
    raw = load(QUICKSTART)
    raw["losses"][0]["name"] = "cee"
    path = write(tmp_path / "m.toml", raw)
    for cmd in ("validate", "run"):
        code, err = invoke(cmd, path)
        assert code == 2
        manifest_problems(err, str(path), "losses[0].name: unknown loss 'cee'")


def test_bad_set_exits_2():
    code, err = invoke("validate", QUICKSTART, "--set", "train.epochs")
    assert code == 2
    manifest_problems(err, str(QUICKSTART), "--set train.epochs: expected KEY=VALUE")
    code, err = invoke("validate", QUICKSTART, "--set", "train.epochs=\"many\"")
    assert code == 2
    manifest_problems(err, str(QUICKSTART), "train.epochs: expected int, got str 'many'")


def test_missing_data_root_is_a_manifest_value_exits_2(tmp_path):
    raw = load(QUICKSTART)
    raw["protocol"] = {"name": "folder", "root": str(tmp_path / "absent"), "num_unseen": 1}
    path = write(tmp_path / "m.toml", raw)
    code, err = invoke("run", path)
    assert code == 2
    manifest_problems(err, str(path), "protocol.root: no such dir")


def test_weights_file_that_is_a_directory_exits_2(tmp_path):
    """A manifest value that ``zsbir validate`` refuses: 2, at validate and at run."""
    for cmd in ("validate", "run"):
        code, err = invoke(cmd, QUICKSTART, "--set",
                           f"backbone.weights={json.dumps(str(tmp_path))}")
        assert code == 2
        manifest_problems(err, str(QUICKSTART),
                          f"backbone.weights: '{tmp_path}' is a directory, not a weights file")


def test_nested_too_deep_exits_2():
    code, err = invoke("validate", QUICKSTART, "--set",
                       "model.head.x=" + "[" * 600 + "1" + "]" * 600)
    assert code == 2
    manifest_problems(err, str(QUICKSTART), "--set model.head.x: the value is nested deeper")


def test_usage_error_exits_2():
    code, err = zsbir("run")
    assert code == 2
    one_error_line(err, "missing MANIFEST", "zsbir run --help")


# ------------------------------------------------------------------------ exit status 1
def test_data_that_does_not_fit_the_protocol_exits_1(tmp_path, monkeypatch):
    """An existing root without the protocol's layout: found while reading the data."""
    (tmp_path / "empty").mkdir()
    raw = load(QUICKSTART)
    raw["protocol"] = {"name": "folder", "root": str(tmp_path / "empty"), "num_unseen": 1}
    raw["run"]["output_dir"] = str(tmp_path / "runs")
    path = write(tmp_path / "m.toml", raw)
    code, err = invoke("run", path)
    assert code == 1
    assert "Traceback" not in err
    first = err.splitlines()[0]
    assert first.startswith("error: ") and "no known layout found under root" in first \
        and str(tmp_path / "empty") in first, err


def test_data_check_of_data_that_cannot_serve_the_protocol_exits_1(tmp_path):
    """``zsbir data check``: the report on stdout, one error line on stderr."""
    (tmp_path / "empty").mkdir()
    code, err = invoke("data", "check", tmp_path / "empty", "--protocol", "tuberlin_ext")
    assert code == 1
    one_error_line(err, "cannot serve tuberlin_ext", str(tmp_path / "empty"))


def test_damaged_checkpoint_exits_1(tiny_run, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_runs", Path(__file__).with_name("test_reliability_runs.py"))
    runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runs)
    d = tmp_path / "run"
    (d / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_run / RESOLVED, d / RESOLVED)
    last = d / "checkpoints" / "last.pt"
    shutil.copy(tiny_run / "checkpoints" / "last.pt", last)
    runs.flip_tensor_byte(last)
    code, err = zsbir("run", "--resume", d)
    assert code == 1
    one_error_line(err, str(last), "is damaged (CRC mismatch in member")


def _fake_run_dir(tmp_path: Path, last: bool) -> tuple[Path, Path]:
    """A run directory holding a (fake) run: its resolved manifest and a checkpoints
    folder; returns (manifest naming that directory, run directory)."""
    raw = load(QUICKSTART)
    raw["run"].update(output_dir=str(tmp_path / "runs"), name="held")
    manifest = write(tmp_path / "m.toml", raw)
    d = tmp_path / "runs" / "held"
    (d / "checkpoints").mkdir(parents=True)
    (d / RESOLVED).write_text(dump_toml(raw))
    if last:
        torch.save({"model": {}}, d / "checkpoints" / "last.pt")
    return manifest, d


def test_run_directory_that_holds_a_run_exits_1(tmp_path):
    manifest, d = _fake_run_dir(tmp_path, last=True)
    code, err = invoke("run", manifest)
    assert code == 1
    one_error_line(err, f"run directory '{d}' already holds a run")
    assert (d / "checkpoints" / "last.pt").is_file()  # nothing removed


def test_resume_without_last_pt_exits_1(tmp_path):
    _, d = _fake_run_dir(tmp_path, last=False)
    code, err = invoke("run", "--resume", d)
    assert code == 1
    one_error_line(err, f"'{d}' has no checkpoints/last.pt to resume from")


def test_plugin_failure_exits_1(fake_plugins):
    fake_plugins("fake-broken-ec", {"zsbir.losses": {"broken_ec": "fakeplug_ec:X"}},
                 {"fakeplug_ec": "import not_a_module_ec\n"})
    res = CliRunner().invoke(main, ["plugins"], catch_exceptions=False)
    assert res.exit_code == 1
    assert "Traceback" not in res.output and "not_a_module_ec" in res.output
    code, err = invoke("describe", "losses", "broken_ec")
    assert code == 1
    one_error_line(err, "broken_ec", "not_a_module_ec")


def test_search_on_a_directory_that_is_not_an_index_exits_1(tmp_path):
    sketch = tmp_path / "s.png"
    sketch.write_bytes(b"")
    code, err = zsbir("search", tmp_path, sketch)
    assert code == 1
    one_error_line(err, f"'{tmp_path}' is not a zsbir index")


def test_unreadable_features_file_for_evaluate_exits_1(tmp_path):
    code, err = invoke("evaluate", "--features", tmp_path / "absent.npz")
    assert code == 1
    one_error_line(err, "no features file", "absent.npz")


def test_the_documented_table_lists_every_class_tested_here():
    """docs/troubleshooting.md's exit-code table names each class these tests exercise."""
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    table = text[text.index("## Exit codes"):]
    table = table[:table.index("\n## ", 3)]
    for phrase in ("invalid TOML", "unknown component", "--set", "protocol.root",
                   "weights", "nested", "usage", "no known layout", "is damaged",
                   "already holds a run", "has no checkpoints/last.pt", "plugin",
                   "is not a zsbir index", "zsbir data check", "Traceback"):
        assert phrase in table, phrase
