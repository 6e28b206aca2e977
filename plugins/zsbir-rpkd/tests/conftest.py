"""Plugin test fixtures: every test gets its own zsbir cache; nothing is downloaded."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ZSBIR_CACHE", str(tmp_path_factory.mktemp("zsbir-cache")))
