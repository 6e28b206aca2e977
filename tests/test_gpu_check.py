"""benchmarks/gpu_check.py's dry run: every kind of row (step only, end to end from JPEG
files with torch.compile, GPU-sized evaluation's code path, the CLIP plugin's step) runs
at tiny size on the CPU and prints its table row."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run",
                        "--only", "step fp32 b2", "e2e bf16+cl+compile b2", "eval", "clip",
                        "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| ") and "img/s" in ln
            or ln.startswith("| eval |")]
    assert [ln.split(" | ")[0] for ln in rows] == ["| step", "| e2e", "| eval", "| clip"], r.stdout
    import json

    got = json.loads(out.read_text())
    assert all(row["images_per_s"] > 0 for row in got if "images_per_s" in row)
    e2e = next(row for row in got if row["part"] == "e2e")
    assert e2e["raw"]["compile"] == "default" and not e2e["raw"]["synthetic_data"]
    assert next(row for row in got if row["part"] == "eval")["seconds"] > 0
