"""Plugin test fixtures: a tiny random CLIP configuration, one thread, an isolated zsbir
cache; nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: 2-layer, width-64 towers on 32x32 images (patch 8), 32-d embeddings, 16-token texts
TINY = Path(__file__).resolve().parent / "tiny_clip.json"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ZSBIR_CACHE", str(tmp_path_factory.mktemp("zsbir-cache")))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and do not crawl on a shared machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny() -> str:
    return str(TINY)
