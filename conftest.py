"""Test policy for CI, for every test under this repository (tests/ and plugins/*/tests/).

On a user's machine a test whose tool is missing (Chromium, node + katex, WordNet, a plugin,
an optional package, ../shared) skips with the reason. Under ``CI=true`` such a skip is a
**failure**: CI installs everything its tests need, so a skip there means an install step
broke and the test would silently not run. Skips that do not stand for a missing tool say
so by starting their reason with :data:`BY_DESIGN` (e.g. a CPU-only test on a CUDA machine).
A module skipped as a whole (``pytest.importorskip`` at its top) is a collection error
under CI, and the other modules still run.

Under CI the counts are also written as JSON to ``$ZSBIR_CI_SUMMARY`` (when set), which
``.ci/run`` prints as its last lines: how many tests ran, and how many of the browser and
documentation-site tests (``tests/test_browser.py``, ``tests/test_docs.py``) ran and skipped.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

BY_DESIGN = "by design:"
BROWSER_AND_DOCS = ("tests/test_browser.py", "tests/test_docs.py")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Turn a skip that stands for a missing tool into a failure (CI only)."""
    if not (in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if reason.startswith(BY_DESIGN):
        return
    report.outcome = "failed"
    report.longrepr = (f"CI=true: this test would have been skipped ({reason}); CI must "
                       "install what its tests need (.ci/run), so a skip here is a failure")


def pytest_configure(config: pytest.Config) -> None:
    if in_ci():  # a module whose plugin is missing fails; the other modules still run
        config.option.continue_on_collection_errors = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    _fail_skip(outcome.get_result())  # a module-level importorskip


_status: dict[str, str] = {}  # node id -> passed / failed / skipped (its worst phase)
_collect_errors: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    prev = _status.get(report.nodeid)
    if report.failed:
        _status[report.nodeid] = "failed"
    elif report.skipped and prev != "failed":
        _status[report.nodeid] = "skipped"
    elif report.when == "call" and prev is None:
        _status[report.nodeid] = "passed"


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _collect_errors.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("ZSBIR_CI_SUMMARY")
    if not path:
        return
    ours = [s for n, s in _status.items() if n.replace("\\", "/").startswith(BROWSER_AND_DOCS)]
    every, bd = Counter(_status.values()), Counter(ours)
    Path(path).write_text(json.dumps({
        "exitstatus": int(exitstatus), "collection_errors": len(_collect_errors),
        **{k: every[k] for k in ("passed", "failed", "skipped")},
        **{f"browser_docs_{k}": bd[k] for k in ("passed", "failed", "skipped")},
    }) + "\n")
