"""conftest.py's CI policy: under CI=true a skip (a missing tool) fails, a module-level
importorskip too, and a skip whose reason starts with "by design:" stays a skip; outside
CI every skip stays a skip. Run on a throwaway test file in a pytest subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = '''
import pytest

def test_tool_missing():
    pytest.skip("headless Chromium is not installed")

def test_by_design():
    pytest.skip("by design: CUDA is available here")

def test_passes():
    assert True

def test_fails():
    assert False
'''
MODULE_SKIP = '''
import pytest
pytest.importorskip("zsbir_no_such_plugin_xyz")

def test_never_collected():
    pass
'''


def _run(tmp_path: Path, ci: str | None) -> dict:
    shutil.copy(ROOT / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_cases.py").write_text(CASES)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    summary = tmp_path / "summary.json"
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["ZSBIR_CI_SUMMARY"] = str(summary)
    if ci is not None:
        env["CI"] = ci
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           str(tmp_path)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)
    return {"rc": proc.returncode, "out": proc.stdout, **json.loads(summary.read_text())}


def test_under_ci_a_missing_tool_fails(tmp_path):
    r = _run(tmp_path, "true")
    assert "FAILED" in r["out"] and "test_tool_missing" in r["out"], r["out"]
    assert "this test would have been skipped (headless Chromium is not installed)" in r["out"]
    assert (r["passed"], r["failed"], r["skipped"]) == (1, 2, 1), r
    assert r["collection_errors"] == 1, r  # the module-level importorskip
    assert "SKIPPED" in r["out"] and "by design: CUDA" in r["out"]
    assert r["rc"] == 1


def test_outside_ci_skips_stay_skips(tmp_path):
    r = _run(tmp_path, None)
    assert (r["passed"], r["failed"], r["skipped"]) == (1, 1, 2), r
    assert r["collection_errors"] == 0, r
    assert r["rc"] == 1  # test_fails


@pytest.mark.parametrize("value", ["false", ""])
def test_ci_false_is_not_ci(tmp_path, value):
    r = _run(tmp_path, value)
    assert r["failed"] == 1 and r["skipped"] == 2, r
