"""Plugin test fixtures: a tiny random CLIP configuration, one thread, an isolated zsbir
cache; nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from zsbir.testing_fixtures import isolated_cache, one_thread  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: 2-layer, width-64 towers on 32x32 images (patch 8), 32-d embeddings, 16-token texts
TINY = Path(__file__).resolve().parent / "tiny_clip.json"


@pytest.fixture
def tiny() -> str:
    return str(TINY)
