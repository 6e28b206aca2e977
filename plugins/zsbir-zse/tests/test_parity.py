"""benchmarks/zse_parity.py: zsbir-zse against the authors' ZSE-SBIR code
(github.com/buptLinfy/ZSE-SBIR), same random weights, eval mode, fp32 CPU.

With ``ZSBIR_ZSE_AUTHORS`` pointing at a checkout of their repository (and their
requirements einops, joblib, tqdm installed): the script itself, tiny config (every width
real, 2 ViT blocks) and, with ``ZSBIR_ZSE_REAL=1``, the ViT-B/16 config. Without it the
test is skipped by design: CI has no checkout; every part is also checked against naive
references in the other test files."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("zsbir_zse", reason="install the plugin: pip install -e plugins/zsbir-zse")

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "zse_parity.py"


@pytest.mark.parametrize("config", ["tiny", "real"])
def test_parity_with_the_authors_code(config, capsys):
    checkout = os.environ.get("ZSBIR_ZSE_AUTHORS", "")
    if not checkout:
        pytest.skip("by design: set ZSBIR_ZSE_AUTHORS to a checkout of "
                    "github.com/buptLinfy/ZSE-SBIR (CI has no network checkout)")
    if config == "real" and os.environ.get("ZSBIR_ZSE_REAL") != "1":
        pytest.skip("by design: the ViT-B/16 config takes minutes; set ZSBIR_ZSE_REAL=1")
    for dep in ("einops", "joblib", "tqdm"):
        if importlib.util.find_spec(dep) is None:
            pytest.fail(f"the authors' code needs {dep}: pip install einops joblib tqdm")
    spec = importlib.util.spec_from_file_location("zse_parity", SCRIPT)
    assert spec is not None and spec.loader is not None, SCRIPT
    module = importlib.util.module_from_spec(spec)
    sys.modules["zse_parity"] = module
    try:
        spec.loader.exec_module(module)
        rc = module.main(["--authors", checkout, "--config", config])
    finally:
        sys.modules.pop("zse_parity", None)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "FAIL" not in out and "RN scores" in out and "p@100-zse" in out
    assert "model" not in sys.modules or not hasattr(sys.modules["model"], "model")
