"""benchmarks/bench_threads.py runs: its evaluate part (old and new policy, one process
each) at tiny size, with the columns the README table records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_threads_evaluate_part_at_tiny_size(tmp_path):
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "ZSBIR_CPU_LEASES"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_threads.py"),
                        "--parts", "evaluate", "--eval-size", "200", "300", "--out",
                        str(tmp_path / "work"), "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(x["part"], x["policy"]) for x in rows] == [("evaluate", "old"), ("evaluate", "new")]
    old, new = rows
    assert old["source"] == "off" and old["wait"] == "default"
    assert new["source"] == "policy" and new["wait"] == "PASSIVE"
    assert all(x["evaluate_s"] > 0 and x["search_s"] > 0 and 0 < x["map"] <= 1 for x in rows)
    assert old["map"] == new["map"]  # the same features, the same metric
    assert "new/old" in r.stdout
    # the children's leases lived in the work directory and were released
    assert list((tmp_path / "work" / "cpu-leases").glob("*.lease")) == []
