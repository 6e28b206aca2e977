"""benchmarks/gpu_check.py's dry run: every row of the GPU table (step only and end to end
in fp32, bf16 + channels_last and with torch.compile at both batch sizes, the evaluation's
code path, the CLIP plugin's step) runs at tiny size on the CPU, in the order and with the
goal / anchor column of the real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_runs_every_row(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run",
                        "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rows = [ln.split(" | ") for ln in r.stdout.splitlines()
            if ln.startswith("| ") and not ln.startswith("| part")]
    names = [f"{c[0][2:]} {c[1]} b{c[2]}" for c in rows]
    training = [f"{p} {v} b{b}" for p in ("step", "e2e") for b in (2, 4)
                for v in ("fp32", "bf16+cl")]
    compiled = [f"{p} bf16+cl+compile b{b}" for p in ("step", "e2e") for b in (2, 4)]
    assert names == ["eval 300 x 400 x 512 b-", "clip tiny CLIP b9", *training, *compiled], \
        r.stdout
    got = json.loads(out.read_text())
    assert len(got) == 14 and not any(row["value"] in ("error", "skipped") for row in got)
    assert all(row["images_per_s"] > 0 for row in got if row["part"] != "eval")
    e2e = [row for row in got if row["part"] == "e2e"]
    assert all(not row["raw"]["synthetic_data"] and row["raw"]["workers"] >= 1 for row in e2e)
    assert {row["raw"]["compile"] for row in e2e} == {"off", "default"}
    assert next(row for row in got if row["part"] == "eval")["seconds"] > 0
    # the column that compares a real run with the anchors and goals (not in a dry run)
    refs = {(row["part"], row["config"], row["full"]): row["reference"] for row in got
            if "full" in row}
    assert refs[("e2e", "bf16+cl", 40)].startswith("goal >= 1,500 img/s")
    assert refs[("step", "bf16+cl+compile", 256)].startswith("anchor 3,803 img/s")
    assert all(ref.endswith("dry run, not compared") for ref in refs.values() if ref != "-")
    assert "# goals: end to end b40" in r.stdout


def test_gpu_check_reference_column_compares_real_figures():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    row = {"part": "e2e", "config": "bf16+cl", "full": 40, "images_per_s": 1600.0}
    assert gpu_check.reference(row, dry=False).endswith(": met")
    assert gpu_check.reference({**row, "images_per_s": 900.0}, dry=False).endswith("NOT met")
    step = {"part": "step", "config": "fp32", "full": 40, "images_per_s": 1232.0}
    assert gpu_check.reference(step, dry=False).endswith(": 2.00x")
    assert gpu_check.reference({"part": "eval", "seconds": 1.5}, dry=False).endswith("NOT met")
    line = gpu_check.goals_line([row, {**row, "full": 256, "images_per_s": 2600.0},
                                 {"part": "eval", "seconds": 0.4}])
    assert line.count(": met") == 3
