"""Shared fixtures: isolated caches, and fake plugin distributions on sys.path."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own zsbir cache unless it sets one."""
    monkeypatch.setenv("ZSBIR_CACHE", str(tmp_path_factory.mktemp("zsbir-cache")))


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    """Install fake plugin distributions: ``make(dist, {group: {name: "mod:obj"}},
    {module: source})``. Registry state is restored afterwards."""
    from zsbir import registry

    saved = {k: dict(r._components) for k, r in registry._REGISTRIES.items()}
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(dist: str, entry_points: dict[str, dict[str, str]],
             modules: dict[str, str] | None = None, version: str = "1.0") -> None:
        info = tmp_path / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = []
        for group, eps in entry_points.items():
            lines.append(f"[{group}]")
            lines += [f"{n} = {v}" for n, v in eps.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        for mod, src in (modules or {}).items():
            (tmp_path / f"{mod}.py").write_text(textwrap.dedent(src))
        registry.discover_plugins(refresh=True)

    yield make
    for k, r in registry._REGISTRIES.items():
        r._components = saved[k]
    registry._failures.clear()
    for mod in [m for m in sys.modules if m.startswith("fakeplug")]:
        del sys.modules[mod]
    monkeypatch.undo()
    registry.discover_plugins(refresh=True)


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared is absent ({SHARED}); real-data tests need it")
    return SHARED
