"""Component registries: one flat registry per kind, a decorator to register,
entry-point plugins discovered from package metadata.

A *component* is a plain function or class with a typed signature. Its manifest table
(``[backbone] name = "resnet18" pretrained = false``) names it and gives its keyword
arguments; :mod:`zsbir.manifest` validates those against the signature.

Plugins register through ``importlib.metadata`` entry points in the groups
``zsbir.<kind>`` (``zsbir.losses``, ``zsbir.backbones``, ...). The entry point's name is the
component name and its value the callable (``pkg.module:obj``). Discovery reads metadata
only; a plugin module is imported the first time one of its names is used (or by
``zsbir plugins``, which checks them all). A plugin that fails to import is recorded with
its distribution's name, version and error and never breaks the other names. A plugin can
never shadow a built-in name: the built-in wins and the clash is reported.

Design notes (after timm's ``_registry.py``, confection and flake8's plugin finder):
duplicate names are an error, not a warning; unknown names come with "did you mean"
suggestions; wildcards (``zsbir list losses 'rpkd_*'``) filter names.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.metadata as md
import inspect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "KINDS",
    "Component",
    "Factory",
    "Nested",
    "DuplicateComponentError",
    "PluginEntry",
    "PluginFailure",
    "PluginLoadError",
    "Registry",
    "RegistryError",
    "UnknownComponentError",
    "declared",
    "discover_plugins",
    "get_registry",
    "plugin_failures",
    "unknown_plugin_groups",
    "registries",
]

T = TypeVar("T")

#: Every kind of component, in the order ``zsbir list`` shows them.
KINDS: tuple[str, ...] = (
    "protocols",
    "backbones",
    "heads",
    "networks",
    "losses",
    "teachers",
    "steps",
    "samplers",
    "optimizers",
    "schedulers",
    "hashers",
    "rerankers",
)

#: Parameters the toolkit supplies itself (never written in a manifest), per kind.
#: ``ctx`` is the :class:`zsbir.context.BuildContext` for any kind that asks for it.
INJECTED: dict[str, frozenset[str]] = {
    "protocols": frozenset({"ctx"}),
    "backbones": frozenset({"ctx"}),
    "losses": frozenset({"ctx"}),
    "teachers": frozenset({"ctx", "network", "model"}),
    "samplers": frozenset({"ctx", "labels", "domains", "batch_size", "seed"}),
    "optimizers": frozenset({"ctx", "params"}),
    "schedulers": frozenset({"ctx", "optimizer", "epochs", "steps_per_epoch"}),
    "hashers": frozenset({"ctx"}),
    "heads": frozenset({"ctx", "backbone", "num_classes"}),
    "networks": frozenset({"ctx"}),
    "steps": frozenset({"ctx", "model"}),
    "rerankers": frozenset({"ctx"}),
}

@dataclass(frozen=True)
class Nested:
    """Signature marker: this parameter is a component table of ``kind``, built first and
    passed built (``backbone: Annotated[Backbone, Nested("backbones")]``; a list of tables
    for ``Annotated[list[Loss], Nested("losses")]``). The manifest resolver reads these
    markers instead of a fixed map of keys."""

    kind: str


@dataclass(frozen=True)
class Factory:
    """Signature marker: this parameter is a component table of ``kind`` passed as a
    builder: the parent calls it with the values it provides (a model builds its head
    with ``head(in_features=..., num_classes=...)``)."""

    kind: str


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+\-]*$")
_BUILTIN_PACKAGE = "zsbir"


class RegistryError(Exception):
    """Base class of registry errors."""


class UnknownComponentError(RegistryError, KeyError):
    """A name that no built-in component or installed plugin provides."""

    def __init__(self, kind: str, name: str, suggestions: list[str]):
        self.kind, self.name, self.suggestions = kind, name, suggestions
        super().__init__(self.message)

    @property
    def message(self) -> str:
        msg = f"unknown {_singular(self.kind)} {self.name!r}"
        if self.suggestions:
            msg += "; did you mean " + ", ".join(repr(s) for s in self.suggestions) + "?"
        else:
            msg += f" (see `zsbir list {self.kind}`)"
        return msg

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class DuplicateComponentError(RegistryError):
    """Two different objects registered under one name."""


class PluginLoadError(RegistryError):
    """A plugin's entry point failed to import; names the distribution."""


@dataclass(frozen=True)
class PluginEntry:
    """An entry point found in installed metadata; not imported yet."""

    kind: str
    name: str
    value: str
    dist: str
    version: str
    entry_point: md.EntryPoint

    @property
    def group(self) -> str:
        return f"zsbir.{self.kind}"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin entry point that could not be used, and why."""

    dist: str
    version: str
    group: str
    name: str
    value: str
    error: str


@dataclass(frozen=True)
class Component:
    """A registered component: the callable and where it comes from."""

    kind: str
    name: str
    obj: Callable[..., Any]
    package: str

    @property
    def summary(self) -> str:
        """The docstring's first full sentence, as plain text (never cut mid-sentence)."""
        from zsbir.docstrings import first_sentence

        return first_sentence(inspect.getdoc(self.obj) or "")

    @property
    def doc(self) -> str:
        """The docstring as plain text (reST roles and literals reduced to their words)."""
        from zsbir.docstrings import plain_doc

        return plain_doc(inspect.getdoc(self.obj) or "")

    @property
    def location(self) -> str:
        """``file:line`` where the component is defined."""
        try:
            target = inspect.unwrap(self.obj)
            file = inspect.getsourcefile(target) or "?"
            line = inspect.getsourcelines(target)[1]
            return f"{file}:{line}"
        except (OSError, TypeError):
            return "?"

    @property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.obj)

    def parameters(self) -> list[inspect.Parameter]:
        """Parameters a manifest may set (injected ones left out)."""
        injected = INJECTED.get(self.kind, frozenset())
        return [
            p
            for p in self.signature.parameters.values()
            if p.name not in injected and p.name != "self"
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]


def declared(obj: Any, attr: str, params: dict[str, Any] | None = None) -> frozenset[str]:
    """A component's declared ``requires``/``provides``/``teacher_keys``/``output_keys``:
    a frozenset, or a callable of the resolved manifest parameters returning one (e.g.
    ``sake`` needs a teacher only when ``lambda1 > 0``)."""
    value = getattr(obj, attr, frozenset())
    if callable(value) and not isinstance(value, (set, frozenset)):
        value = value(dict(params or {}))
    return frozenset(value or ())


def _singular(kind: str) -> str:
    return kind[:-2] if kind.endswith("sses") else kind.removesuffix("s")


def _dist_of_module(module: str) -> str:
    top = module.split(".")[0]
    if top == _BUILTIN_PACKAGE:
        return _BUILTIN_PACKAGE
    dists = md.packages_distributions().get(top)
    return dists[0] if dists else top


# ---------------------------------------------------------------------------- plugins
_discovered: dict[str, dict[str, list[PluginEntry]]] | None = None
_failures: dict[tuple[str, str], PluginFailure] = {}


class PluginExitError(Exception):
    """A plugin module called ``sys.exit`` (or raised ``SystemExit``) while importing."""


class _GuardedEntryPoint:
    """An entry point whose ``load()`` turns a plugin's ``sys.exit`` at import into an
    ordinary error (so it is recorded as that plugin's failure instead of ending zsbir) and
    a malformed value (``"pkg.mod:"``, ``"a b"``) into a clear one (``importlib.metadata``
    fails on it with "'NoneType' object has no attribute 'group'")."""

    def __init__(self, ep: md.EntryPoint):
        self._ep = ep
        self.name, self.value, self.group = ep.name, ep.value, ep.group

    def load(self) -> Any:
        if md.EntryPoint.pattern.match(self.value) is None or \
                not self.value.partition(":")[0].strip():
            raise ValueError(f"malformed entry point value {self.value!r}: expected "
                             "'package.module:object'")
        try:
            return self._ep.load()
        except SystemExit as exc:
            raise PluginExitError(f"the plugin called sys.exit({exc.code!r}) while being "
                                  "imported") from None

    def __repr__(self) -> str:
        return f"EntryPoint(name={self.name!r}, value={self.value!r}, group={self.group!r})"


_unknown_groups: list[PluginEntry] = []


def discover_plugins(refresh: bool = False) -> dict[str, dict[str, list[PluginEntry]]]:
    """Entry points per kind and name, read from metadata only (nothing imported).

    Entry points in a ``zsbir.<other>`` group that names no kind are never loaded; they
    are kept for :func:`unknown_plugin_groups` (``zsbir plugins`` reports them)."""
    global _discovered
    if _discovered is not None and not refresh:
        return _discovered
    found: dict[str, dict[str, list[PluginEntry]]] = {k: {} for k in KINDS}
    unknown: list[PluginEntry] = []
    groups = sorted({g for g in md.entry_points().groups if g.startswith("zsbir.")}
                    | {f"zsbir.{k}" for k in KINDS})
    for ep in (ep for group in groups for ep in md.entry_points(group=group)):
        kind = ep.group.removeprefix("zsbir.")
        dist = getattr(ep, "dist", None)
        try:
            name = (dist.metadata["Name"] or "?") if dist is not None else "?"
            version = (dist.version or "?") if dist is not None else "?"
        except Exception:  # noqa: BLE001 - broken metadata: still list the entry point
            name, version = "?", "?"
        entry = PluginEntry(kind, ep.name, ep.value, name, version,
                            _GuardedEntryPoint(ep))  # type: ignore[arg-type]
        if kind in found:
            found[kind].setdefault(ep.name, []).append(entry)
        else:
            unknown.append(entry)
    _discovered = found
    _unknown_groups[:] = unknown
    return found


def unknown_plugin_groups() -> list[PluginEntry]:
    """Installed entry points in ``zsbir.<other>`` groups that name no kind (ignored)."""
    discover_plugins()
    return list(_unknown_groups)


def plugin_failures() -> list[PluginFailure]:
    """Plugins that failed to load so far in this process (``zsbir plugins`` loads all)."""
    return list(_failures.values())


# ---------------------------------------------------------------------------- registry
class Registry:
    """A flat name -> component mapping for one kind, plus that kind's plugins."""

    def __init__(self, kind: str):
        if kind not in KINDS:
            raise ValueError(f"unknown registry kind {kind!r}; kinds are {', '.join(KINDS)}")
        self.kind = kind
        self._components: dict[str, Component] = {}

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._components)} built-in)"

    # -- registering
    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@losses.register("ce")`` registers the decorated callable."""

        def deco(obj: T) -> T:
            self.add(name or obj.__name__, obj)  # type: ignore[attr-defined]
            return obj

        return deco

    def add(self, name: str, obj: Callable[..., Any], package: str | None = None) -> Component:
        """Register ``obj`` under ``name``; a different object under a taken name is an error."""
        if not _NAME_RE.match(name):
            raise RegistryError(f"invalid {_singular(self.kind)} name {name!r}")
        if not callable(obj):
            raise RegistryError(f"{self.kind} {name!r}: {obj!r} is not callable")
        existing = self._components.get(name)
        if existing is not None:
            if existing.obj is obj:
                return existing
            raise DuplicateComponentError(
                f"{_singular(self.kind)} {name!r} is already registered by "
                f"{existing.package} ({existing.location}); refusing to replace it with "
                f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"
            )
        comp = Component(self.kind, name, obj, package or _dist_of_module(obj.__module__))
        self._components[name] = comp
        return comp

    # -- looking up
    def _plugins(self) -> dict[str, list[PluginEntry]]:
        return discover_plugins()[self.kind]

    def names(self, pattern: str = "*") -> list[str]:
        """Built-in and plugin names matching a wildcard pattern, without importing plugins."""
        _ensure_builtins()
        all_names = set(self._components) | set(self._plugins())
        return sorted(n for n in all_names if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        _ensure_builtins()
        return name in self._components or name in self._plugins()

    def suggest(self, name: str, n: int = 3) -> list[str]:
        names = self.names()
        close = difflib.get_close_matches(name, names, n=n, cutoff=0.6)
        if not close:
            low = name.lower()
            close = [c for c in names if low in c.lower() or c.lower() in low][:n]
        return close

    def component(self, name: str) -> Component:
        """The registered component, importing its plugin if needed."""
        _ensure_builtins()
        if name in self._components:
            return self._components[name]
        entries = self._plugins().get(name)
        if not entries:
            raise UnknownComponentError(self.kind, name, self.suggest(name))
        if len(entries) > 1:
            dists = ", ".join(f"{e.dist} {e.version}" for e in entries)
            raise PluginLoadError(
                f"{_singular(self.kind)} {name!r} is provided by several plugins ({dists}); "
                "uninstall all but one"
            )
        return self._load(entries[0])

    def get(self, name: str) -> Callable[..., Any]:
        """The registered callable for ``name``."""
        return self.component(name).obj

    def entry(self, name: str) -> Component | PluginEntry:
        """What is known about ``name`` without importing a plugin."""
        _ensure_builtins()
        if name in self._components:
            return self._components[name]
        entries = self._plugins().get(name)
        if entries:
            return entries[0]
        raise UnknownComponentError(self.kind, name, self.suggest(name))

    def _load(self, entry: PluginEntry) -> Component:
        key = (entry.group, entry.name)
        if key in _failures:
            raise PluginLoadError(_failure_text(_failures[key]))
        try:
            obj = entry.entry_point.load()
            comp = self._components.get(entry.name)
            if comp is None or comp.obj is not obj:
                comp = self.add(entry.name, obj, package=entry.dist)
        except Exception as exc:  # noqa: BLE001 - any import error belongs to the plugin
            failure = PluginFailure(
                entry.dist, entry.version, entry.group, entry.name, entry.value,
                f"{type(exc).__name__}: {exc}",
            )
            _failures[key] = failure
            raise PluginLoadError(_failure_text(failure)) from exc
        return comp

    def builtin_shadowed(self) -> list[PluginEntry]:
        """Plugin entries whose name a built-in already takes (the built-in wins)."""
        _ensure_builtins()
        builtin = {n for n, c in self._components.items() if c.package == _BUILTIN_PACKAGE}
        return [e for n, es in self._plugins().items() if n in builtin for e in es
                if e.dist != _BUILTIN_PACKAGE]


def _failure_text(f: PluginFailure) -> str:
    return (f"plugin {f.dist} {f.version} failed to load {f.group} entry point "
            f"{f.name!r} ({f.value}): {f.error}")


_REGISTRIES: dict[str, Registry] = {k: Registry(k) for k in KINDS}
protocols = _REGISTRIES["protocols"]
backbones = _REGISTRIES["backbones"]
losses = _REGISTRIES["losses"]
teachers = _REGISTRIES["teachers"]
samplers = _REGISTRIES["samplers"]
optimizers = _REGISTRIES["optimizers"]
schedulers = _REGISTRIES["schedulers"]
hashers = _REGISTRIES["hashers"]
heads = _REGISTRIES["heads"]
networks = _REGISTRIES["networks"]
steps = _REGISTRIES["steps"]
rerankers = _REGISTRIES["rerankers"]


def get_registry(kind: str) -> Registry:
    """The registry of one kind; accepts the singular too (``loss``)."""
    if kind in _REGISTRIES:
        return _REGISTRIES[kind]
    for plural in (kind + "s", kind + "es"):
        if plural in _REGISTRIES:
            return _REGISTRIES[plural]
    close = difflib.get_close_matches(kind, KINDS, n=2)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; kinds are {', '.join(KINDS)}"
    raise RegistryError(f"unknown component kind {kind!r}{hint}")


def registries() -> Iterable[Registry]:
    return _REGISTRIES.values()


def load_all_plugins() -> list[PluginFailure]:
    """Import every discovered plugin entry point; return the failures (none raised)."""
    for reg in _REGISTRIES.values():
        for name in reg.names():
            if name in reg._components:
                continue
            try:
                reg.component(name)
            except RegistryError:
                pass
    return plugin_failures()


_builtins_loaded = False
_builtin_error: str | None = None


def _ensure_builtins() -> None:
    """Import the modules that register the built-in components (once). A built-in module
    that fails to import is a bug in zsbir or its environment: every later lookup says so
    (instead of "unknown component")."""
    global _builtins_loaded, _builtin_error
    if _builtin_error is not None:
        raise RegistryError(_builtin_error)
    if not _builtins_loaded:
        _builtins_loaded = True
        try:
            importlib.import_module("zsbir.components")
        except Exception as exc:
            _builtin_error = (f"zsbir's built-in components failed to import "
                              f"({type(exc).__name__}: {exc}); reinstall zsbir or fix the "
                              "environment")
            raise
