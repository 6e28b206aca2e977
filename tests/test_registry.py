"""Registries: registration, lookup with suggestions, wildcards, entry-point plugins."""

from __future__ import annotations

import pytest

from zsbir import registry
from zsbir.registry import (
    DuplicateComponentError,
    PluginLoadError,
    UnknownComponentError,
    get_registry,
    losses,
)

PLUGIN_SRC = """
from zsbir.losses.base import Loss

class FakeLoss(Loss):
    '''A fake loss from a plugin.'''
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale
    def forward(self, out, batch, teacher):
        return out["logits"].sum() * 0 + self.scale
"""


def test_builtin_kinds_are_populated():
    assert "ce" in losses
    assert {"resnet18", "resnet50", "cse_resnet50"} <= set(get_registry("backbones").names())
    assert "synthetic" in get_registry("protocols").names()
    assert {"none", "itq", "sign"} <= set(get_registry("hashers").names())
    assert {"online", "class_mean"} <= set(get_registry("teachers").names())


def test_singular_kind_and_unknown_kind():
    assert get_registry("loss") is losses
    with pytest.raises(registry.RegistryError, match="did you mean"):
        get_registry("lossess")


def test_unknown_name_suggests_closest():
    with pytest.raises(UnknownComponentError) as info:
        losses.get("domain_quadruplt")
    assert "domain_quadruplet" in info.value.suggestions
    assert "did you mean 'domain_quadruplet'" in str(info.value)


def test_wildcard_names():
    names = get_registry("backbones").names("resnet*")
    assert names == sorted(names) and "resnet18" in names and "cse_resnet50" not in names


def test_duplicate_registration_is_an_error():
    reg = registry.Registry("losses")

    @reg.register("x")
    def a() -> None: ...

    reg.add("x", a)  # the same object again is fine
    with pytest.raises(DuplicateComponentError, match="already registered"):
        @reg.register("x")
        def b() -> None: ...


def test_component_metadata():
    comp = losses.component("ce")
    assert comp.package == "zsbir"
    assert comp.location.endswith(".py:" + comp.location.rsplit(":", 1)[1])
    assert "classification" in comp.location
    assert [p.name for p in comp.parameters()] == ["label_smoothing"]
    assert comp.summary.startswith("Cross-entropy")


def test_plugin_listed_without_import_then_loaded(fake_plugins):
    import sys

    fake_plugins("fake-ok", {"zsbir.losses": {"fake_loss": "fakeplug_ok:FakeLoss"}},
                 {"fakeplug_ok": PLUGIN_SRC})
    assert "fake_loss" in losses.names()
    assert "fakeplug_ok" not in sys.modules  # listing does not import
    entry = losses.entry("fake_loss")
    assert isinstance(entry, registry.PluginEntry) and entry.dist == "fake-ok"
    comp = losses.component("fake_loss")
    assert comp.package == "fake-ok" and "fakeplug_ok" in sys.modules


def test_broken_plugin_is_isolated(fake_plugins):
    fake_plugins("fake-broken", {"zsbir.losses": {"broken_loss": "fakeplug_broken:Nope"}},
                 {"fakeplug_broken": "raise ImportError('missing dependency xyz')\n"})
    assert "broken_loss" in losses.names()  # still listed
    assert "ce" in losses.names()
    with pytest.raises(PluginLoadError) as info:
        losses.get("broken_loss")
    msg = str(info.value)
    assert "fake-broken 1.0" in msg and "missing dependency xyz" in msg
    failures = registry.load_all_plugins()
    assert [(f.dist, f.group, f.name) for f in failures] == [
        ("fake-broken", "zsbir.losses", "broken_loss")]
    assert losses.get("ce")  # others still work


def test_plugin_cannot_shadow_builtin(fake_plugins):
    fake_plugins("fake-shadow", {"zsbir.losses": {"ce": "fakeplug_shadow:FakeLoss"}},
                 {"fakeplug_shadow": PLUGIN_SRC})
    assert losses.component("ce").package == "zsbir"  # the built-in wins
    shadowed = losses.builtin_shadowed()
    assert [(e.dist, e.name) for e in shadowed] == [("fake-shadow", "ce")]


def test_two_plugins_same_name_conflict(fake_plugins):
    fake_plugins("fake-a", {"zsbir.losses": {"twin": "fakeplug_a:FakeLoss"}},
                 {"fakeplug_a": PLUGIN_SRC})
    fake_plugins("fake-b", {"zsbir.losses": {"twin": "fakeplug_b:FakeLoss"}},
                 {"fakeplug_b": PLUGIN_SRC})
    with pytest.raises(PluginLoadError, match="several plugins"):
        losses.get("twin")


# ------------------------------------------------------------ one discovery path (#24.7)
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _pyproject_entry_points() -> dict[str, dict[str, str]]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    groups = data["project"].get("entry-points", {})
    return {g.removeprefix("zsbir."): dict(eps) for g, eps in groups.items()
            if g.startswith("zsbir.")}


def test_every_registration_has_its_entry_point_and_vice_versa():
    """Each ``@<kind>.register("name")`` under zsbir/ is an entry point of the zsbir
    distribution in pyproject.toml, pointing at the registered object, and every such entry
    point is registered. On failure, prints the pyproject lines to add / remove."""
    import json
    import subprocess
    import sys

    from zsbir import catalog

    # a fresh process: here other tests' fixtures reset the registries' tables
    code = ("import json\nfrom zsbir import catalog\n"
            "print(json.dumps(catalog.builtin_entry_points()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    live = json.loads(out.stdout)
    assert len(live["losses"]) >= 4 and "resnet18" in live["backbones"]
    declared = _pyproject_entry_points()
    missing = {k: {n: v for n, v in names.items() if declared.get(k, {}).get(n) != v}
               for k, names in live.items()}
    missing = {k: v for k, v in missing.items() if v}
    extra = sorted(f"zsbir.{k} {n} = {v!r}" for k, names in declared.items()
                   for n, v in names.items() if live.get(k, {}).get(n) != v)
    unreachable = sorted(f"{k}/{n}" for k, names in live.items() for n, v in names.items()
                         if v == "?")
    assert not unreachable, ("registered objects that are not module attributes (an entry "
                             f"point cannot name them): {unreachable}")
    assert not missing, ("pyproject.toml lacks (or has another value for) these entry "
                         "points of zsbir's built-ins; add them, then "
                         "`pip install --no-deps -e .`:\n\n"
                         + catalog.entry_point_toml(missing))
    assert not extra, ("pyproject.toml declares entry points no module registers "
                       f"(remove them or register the name): {extra}")


def test_installed_metadata_matches_pyproject():
    """The installed zsbir's entry points are pyproject.toml's (a wheel carries its
    metadata; an editable install reads them at install time: reinstall after changing
    them)."""
    import importlib.metadata as md

    declared = _pyproject_entry_points()
    installed: dict[str, dict[str, str]] = {}
    for ep in md.distribution("zsbir").entry_points:
        if ep.group.startswith("zsbir."):
            installed.setdefault(ep.group.removeprefix("zsbir."), {})[ep.name] = ep.value
    assert installed == declared, ("the installed zsbir metadata differs from pyproject.toml: "
                                   "run `pip install --no-deps -e .`")


def _builtins_found() -> dict[str, dict[str, str]]:
    found = registry.discover_plugins(refresh=True)
    out = {k: {n: es[0].value for n, es in names.items()
               if es[0].dist == registry._BUILTIN_PACKAGE} for k, names in found.items()}
    return {k: v for k, v in out.items() if v}


def test_builtins_come_from_the_checkout_or_from_metadata(monkeypatch):
    """In a source checkout (editable, or a tree on PYTHONPATH with nothing installed, as on
    the GPU machine) zsbir's entry points are read from its pyproject.toml; an installed
    zsbir (no pyproject.toml beside the package) uses its metadata. Either way: the same
    names, and a plugin's are untouched."""
    import importlib.metadata as md

    declared = _pyproject_entry_points()
    try:
        assert _builtins_found() == declared
        everything = md.entry_points()
        without_zsbir = md.EntryPoints(
            ep for g in everything.groups for ep in everything.select(group=g)
            if getattr(ep, "dist", None) is None or ep.dist.metadata["Name"] != "zsbir")
        monkeypatch.setattr(md, "entry_points", lambda: without_zsbir)  # nothing installed
        assert _builtins_found() == declared
        assert "ce" in losses and losses.component("ce").package == "zsbir"
        monkeypatch.undo()
        monkeypatch.setattr(registry, "_own_entry_points", lambda: None)  # installed zsbir
        assert _builtins_found() == declared, "stale metadata: `pip install --no-deps -e .`"
    finally:
        monkeypatch.undo()
        registry.discover_plugins(refresh=True)


def test_lookup_imports_only_the_modules_it_needs():
    import subprocess
    import sys

    code = ("import sys\nfrom zsbir.registry import get_registry, kinds\n"
            "names = {k: get_registry(k).names() for k in kinds()}\n"
            "assert 'ce' in names['losses'] and 'itq' in names['hashers']\n"
            "before = sorted(m for m in sys.modules if m.startswith(('zsbir.losses', "
            "'zsbir.models', 'zsbir.hashing', 'torch', 'faiss')))\n"
            "get_registry('hashers').get('sign')\n"
            "print(before, 'zsbir.losses.classification' in sys.modules, "
            "'zsbir.hashing.hashers' in sys.modules, 'faiss' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] False True False", out.stdout


def test_import_zsbir_hashing_does_not_import_faiss():
    import subprocess
    import sys

    code = ("import sys\nimport zsbir.hashing as h\nfrom zsbir.hashing import ITQHasher\n"
            "print('faiss' in sys.modules)\nimport zsbir.hashing.ann\n"
            "print('faiss' in sys.modules, callable(h.search), h.search.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "True", "search"], out.stdout


def _builtin_entry(kind: str, name: str, value: str) -> registry.PluginEntry:
    import importlib.metadata as md

    ep = md.EntryPoint(name, value, f"zsbir.{kind}")
    return registry.PluginEntry(kind, name, value, "zsbir", "0.1.0",
                                registry._GuardedEntryPoint(ep))  # type: ignore[arg-type]


def test_a_broken_builtin_module_breaks_only_its_own_names(fake_plugins):
    """A zsbir entry point whose module fails to import is reported (distribution zsbir,
    the error) on each use of its name; every other name still works, on every lookup."""
    fake_plugins("fake-none", {}, {"fakeplug_brokenbuiltin": "raise ImportError('no xyz')\n"})
    found = registry.discover_plugins()
    found["losses"]["zz_broken"] = [_builtin_entry("losses", "zz_broken",
                                                   "fakeplug_brokenbuiltin:Loss")]
    for _ in range(2):  # the failure is remembered, not retried into a different error
        with pytest.raises(PluginLoadError, match=r"zsbir's built-in zsbir 0\.1\.0 .*no xyz"):
            losses.get("zz_broken")
        assert losses.get("ce") and get_registry("hashers").get("itq")
    assert [(f.dist, f.name) for f in registry.plugin_failures()] == [("zsbir", "zz_broken")]
    from click.testing import CliRunner

    from zsbir.cli import main

    res = CliRunner().invoke(main, ["plugins"])  # reported like a plugin's failure
    assert res.exit_code == 1
    assert any(line.split("\t")[:4] == ["zsbir", "0.1.0", "zsbir.losses", "zz_broken"]
               and "no xyz" in line for line in res.output.splitlines()), res.output
    # a plugin of the same name never stands in for the broken built-in
    found["losses"]["zz_broken"].append(registry.PluginEntry(
        "losses", "zz_broken", "x:y", "fake-other", "1.0", None))  # type: ignore[arg-type]
    with pytest.raises(PluginLoadError, match="zsbir's built-in"):
        losses.get("zz_broken")


def test_editable_egg_info_beside_dist_info_is_one_distribution(fake_plugins, tmp_path,
                                                                monkeypatch):
    """An editable install leaves src/<pkg>.egg-info on sys.path besides the installed
    .dist-info: one distribution, not a conflict of two."""
    fake_plugins("fake-twice", {"zsbir.losses": {"twice_loss": "fakeplug_twice:FakeLoss"}},
                 {"fakeplug_twice": PLUGIN_SRC})
    src = tmp_path / "src"
    egg = src / "fake_twice.egg-info"
    egg.mkdir(parents=True)
    (egg / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: fake-twice\nVersion: 1.0\n")
    (egg / "entry_points.txt").write_text("[zsbir.losses]\ntwice_loss = fakeplug_twice:FakeLoss\n")
    monkeypatch.syspath_prepend(str(src))
    registry.discover_plugins(refresh=True)
    assert len(registry.discover_plugins()["losses"]["twice_loss"]) == 1
    assert losses.component("twice_loss").package == "fake-twice"


# ------------------------------------------------------------ plugins add kinds (#24.6)
KIND_SRC = """
from zsbir.registry import KindSpec

def _contract(obj, comp):
    assert callable(obj), f"{comp.name}: an augmenter is callable"

SPEC = KindSpec(summary="Image augmenters.", injected=frozenset({"ctx", "size"}),
                contract=_contract)

class Flip:
    '''Flips images left-right.'''
    def __init__(self, p: float = 0.5, size: int = 0):
        self.p = p
    def __call__(self, x):
        return x
"""


def test_a_plugin_adds_a_kind(fake_plugins):
    import sys

    from click.testing import CliRunner

    from zsbir.cli import main

    fake_plugins("fake-kinds", {"zsbir.kinds": {"augmenters": "fakeplug_kind:SPEC"},
                                "zsbir.augmenters": {"flip": "fakeplug_kind:Flip"}},
                 {"fakeplug_kind": KIND_SRC})
    assert "augmenters" in registry.kinds() and registry.kinds()[-1] == "augmenters"
    reg = get_registry("augmenters")
    assert get_registry("augmenter") is reg and reg.names() == ["flip"]
    assert "fakeplug_kind" not in sys.modules  # discovery reads metadata only
    res = CliRunner().invoke(main, ["list", "augmenters"])
    assert res.exit_code == 0, res.output
    assert "flip" in res.output and "Flips images left-right." in res.output
    assert "fakeplug_kind" not in sys.modules  # list reads the summary from the source
    comp = reg.component("flip")
    assert comp.package == "fake-kinds" and comp.kind == "augmenters"
    assert registry.INJECTED.get("augmenters") == frozenset({"ctx", "size"})
    assert [p.name for p in comp.parameters()] == ["p"]  # `size` is injected
    assert registry.kind_spec("augmenters").summary == "Image augmenters."
    res = CliRunner().invoke(main, ["plugins"])
    assert res.exit_code == 0, res.output
    assert "adds kind augmenters" in res.output


def test_plugin_kind_problems_are_reported(fake_plugins):
    from click.testing import CliRunner

    from zsbir.cli import main

    fake_plugins("fake-badkinds", {"zsbir.kinds": {"losses": "fakeplug_bk:SPEC",
                                                   "Bad-Kind": "fakeplug_bk:SPEC",
                                                   "widgets": "fakeplug_bk:NOT_A_SPEC"},
                                   "zsbir.gadgets": {"g": "fakeplug_bk:G"},
                                   "zsbir.widgets": {"w": "fakeplug_bk:G"}},
                 {"fakeplug_bk": "from zsbir.registry import KindSpec\nSPEC = KindSpec()\n"
                                 "NOT_A_SPEC = 3\ndef G():\n    '''A gadget.'''\n"})
    assert "losses" not in registry.kind_declarations()
    assert "gadgets" not in registry.kinds() and "widgets" in registry.kinds()
    problems = {f.name: f.error for f in registry.kind_problems()}
    assert "built-in kind" in problems["losses"] and "invalid kind" in problems["Bad-Kind"]
    res = CliRunner().invoke(main, ["list"])
    assert res.exit_code == 0
    assert "zsbir.gadgets" in res.stderr and "names no kind" in res.stderr
    res = CliRunner().invoke(main, ["plugins"])
    assert res.exit_code == 1
    out = " ".join(res.output.split())
    assert "unknown group zsbir.gadgets" in out
    assert "not a zsbir.registry.KindSpec" in out
    assert "a built-in kind" in out
