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
