"""``python tests/stateful_worker.py OUT_DIR NAME fresh|resume``: the tiny run of test_e2e
with its test-only EMA step, in a process of its own (which the test SIGKILLs)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_e2e import EmaStep, ema_extra, tiny  # noqa: E402

from zsbir.engine.run import load_resumable, run_experiment  # noqa: E402
from zsbir.registry import steps  # noqa: E402

if __name__ == "__main__":
    out, name, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    steps.add("test_ema", EmaStep)
    if mode == "resume":
        run_experiment(load_resumable(out / name), resume=True)
    else:
        run_experiment(tiny(out, name, ema_extra("test_ema")))
