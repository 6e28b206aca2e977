"""Plugin test fixtures: one thread, an isolated zsbir cache, the tiny configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from zsbir.testing_fixtures import isolated_cache, one_thread  # noqa: F401

PLUGIN = Path(__file__).resolve().parents[1]
TINY_MANIFEST = PLUGIN / "examples" / "tiny_zse.toml"

#: the model part of examples/tiny_zse.toml (2 blocks, 16-d, 32 px, 16 anchors)
TINY = {"image_size": 32, "patch_size": 4, "dim": 16, "depth": 2, "heads": 2, "mlp_dim": 32,
        "scale_channels": [4], "ca_heads": 2, "ca_ff": 16, "conv_dim": 8, "anchors": 16}


@pytest.fixture
def tiny() -> dict:
    return dict(TINY)


@pytest.fixture
def tiny_model():
    import torch
    from zsbir_zse.model import ZseModel

    torch.manual_seed(0)
    return ZseModel(**TINY).eval()
