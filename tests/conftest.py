"""Shared fixtures: isolated caches, and fake plugin distributions on sys.path."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

from zsbir.testing_fixtures import isolated_cache  # noqa: F401 - autouse: a cache per test

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the tests' runs keep their thread counts whatever else runs (bit-identical reruns and
# resumes); the division among concurrent processes is tested with its own directories
os.environ.setdefault("ZSBIR_CPU_LEASES", "off")
#: ../shared beside the repository root; ZSBIR_SHARED names it from a worktree elsewhere
SHARED = Path(os.environ.get("ZSBIR_SHARED")
              or Path(__file__).resolve().parents[1].parent / "shared")


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
        r._components = saved.get(k, {})  # a kind a fake plugin added has nothing saved
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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished tiny synthetic run (test_e2e's TINY settings: ResNet-18 from scratch,
    32 px, 2 epochs; real-valued and 8-bit ITQ hashers), trained once per session."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("_zsbir_test_e2e",
                                                  Path(__file__).with_name("test_e2e.py"))
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    from zsbir.engine.run import run_experiment
    from zsbir.manifest import apply_overrides, load, resolve

    out = tmp_path_factory.mktemp("tiny-run")
    raw = apply_overrides(load(e2e.EXAMPLES / "quickstart.toml"),
                          [*e2e.TINY, f"run.output_dir={json.dumps(str(out))}", "run.name=run"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZSBIR_CACHE", str(tmp_path_factory.mktemp("tiny-run-cache")))
        run_experiment(resolve(raw))
    return out / "run"


@pytest.fixture
def counted(monkeypatch) -> list[int]:
    """Counts the photos that go through the model (TrainedModel.forward_batch, the one
    place an index embeds: embed_batch calls it)."""
    from zsbir.engine.index import TrainedModel

    seen: list[int] = []
    original = TrainedModel.forward_batch

    def wrapper(self, batch, *args, **kwargs):
        seen.append(int(batch["image"].shape[0]))
        return original(self, batch, *args, **kwargs)

    monkeypatch.setattr(TrainedModel, "forward_batch", wrapper)
    return seen


# ---------------------------------------------------- a photo folder and sketches to search
def _synthetic_image(path: Path, cls: int, i: int, domain: int) -> None:
    from PIL import Image

    from zsbir.data.synthetic import render

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render(cls, domain, i, 7, 32)).save(path)


@pytest.fixture
def photos(tmp_path) -> Path:
    """The search tests' folder: 3 classes x 4 synthetic photos in class folders
    (c0..c2/0..3.png), one loose photo, one unreadable file (c0/bad.png), one file without
    a photo suffix (ignored)."""
    root = tmp_path / "photos"
    for c in range(3):
        for i in range(4):
            _synthetic_image(root / f"c{c}" / f"{i}.png", c, i, 0)
    _synthetic_image(root / "loose.png", 0, 9, 0)
    (root / "c0" / "bad.png").write_bytes(b"not an image")
    (root / "notes.txt").write_text("not a photo suffix: ignored")
    return root


@pytest.fixture
def sketches(tmp_path) -> list[Path]:
    """One synthetic sketch of each of the 3 classes of :func:`photos`."""
    out = []
    for c in range(3):
        _synthetic_image(tmp_path / f"sketch{c}.png", c, 0, 1)
        out.append(tmp_path / f"sketch{c}.png")
    return out
