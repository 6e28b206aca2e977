"""Component registries: one flat registry per kind, a decorator to register, and one
discovery path for every name: ``importlib.metadata`` entry points.

A *component* is a plain function or class with a typed signature. Its manifest table
(``[backbone] name = "resnet18" pretrained = false``) names it and gives its keyword
arguments; :mod:`zsbir.manifest` validates those against the signature.

Every name, zsbir's own and each plugin's, is an entry point in the group
``zsbir.<kind>`` (``zsbir.losses``, ``zsbir.backbones``, ...) of its distribution: the entry
point's name is the component name and its value the callable (``pkg.module:obj``). zsbir's
built-ins are entry points of the ``zsbir`` distribution itself (``pyproject.toml``,
``[project.entry-points."zsbir.<kind>"]``; the module also registers the object with
``@<kind>.register("name")``, and ``tests/test_registry.py`` checks the two agree). Discovery
reads metadata only; a module is imported the first time one of its names is used (or by
``zsbir plugins``, which loads them all). An entry point that fails to import is recorded
with its distribution's name, version and error and never breaks the other names (a broken
built-in module breaks only its own names). A plugin can never shadow a built-in name: the
built-in wins and the clash is reported.

A plugin may add a kind: an entry point in the group ``zsbir.kinds`` whose name is the new
kind (plural, ``[a-z][a-z0-9_]*``) and whose value is a :class:`KindSpec`; the group
``zsbir.<newkind>`` is then read like a built-in kind's (:func:`kinds`, :func:`get_registry`,
``zsbir list``). A ``zsbir.<other>`` group that names no kind is reported by
``zsbir plugins``, never silently used.

Design notes (after timm's ``_registry.py``, confection and flake8's plugin finder, which
also lists its own checks as entry points of the flake8 distribution): duplicate names are
an error, not a warning; unknown names come with "did you mean" suggestions; wildcards
(``zsbir list losses 'rpkd_*'``) filter names.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib.metadata as md
import inspect
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from zsbir.injection import SUPPLIED

__all__ = [
    "KINDS",
    "Component",
    "Factory",
    "KindSpec",
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
    "kinds",
    "load_all",
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
    "models",
    "networks",
    "losses",
    "teachers",
    "steps",
    "samplers",
    "optimizers",
    "schedulers",
    "hashers",
    "rerankers",
    "pair_scorers",
    "importers",
)

class _Injected(Mapping[str, frozenset[str]]):
    """Read-only: the built-in kinds' injected parameters (``zsbir.injection.SUPPLIED``);
    a plugin kind's come from its :class:`KindSpec` (imported on first use)."""

    def __init__(self, built_in: Mapping[str, frozenset[str]]):
        self._built_in = built_in

    def __getitem__(self, kind: str) -> frozenset[str]:
        if kind in self._built_in:
            return self._built_in[kind]
        spec = _plugin_kind_spec(kind)
        if spec is None:
            raise KeyError(kind)
        return spec.injected

    def __iter__(self) -> Iterator[str]:
        return iter(self._built_in)

    def __len__(self) -> int:
        return len(self._built_in)


#: Parameters the toolkit supplies itself (never written in a manifest), per kind: a
#: read-only view of the built-in kinds' call sites (:data:`zsbir.injection.SUPPLIED`,
#: which those call sites check themselves against) and a plugin kind's
#: ``KindSpec.injected``. ``ctx`` is the :class:`zsbir.context.BuildContext` for any kind
#: that asks for it.
INJECTED: Mapping[str, frozenset[str]] = _Injected(SUPPLIED)


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
    """An entry point found in metadata (a plugin's, or zsbir's own built-in: ``dist``
    ``"zsbir"``); not imported yet."""

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


# --------------------------------------------------------------------------- discovery
#: the entry-point group in which a plugin declares a new kind
KINDS_GROUP = "zsbir.kinds"
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class KindSpec:
    """What a plugin declares about a kind it adds (the value of its ``zsbir.kinds`` entry
    point): a one-sentence summary, the parameters the code that builds components of the
    kind injects (never written in a manifest), and optionally the kind's contract for
    :mod:`zsbir.testing`: a callable ``contract(built_object, component)`` that raises
    ``AssertionError`` when a built component breaks the kind's rules."""

    summary: str = ""
    injected: frozenset[str] = frozenset({"ctx"})
    contract: Callable[[Any, Component], None] | None = None


_discovered: dict[str, dict[str, list[PluginEntry]]] | None = None
_failures: dict[tuple[str, str], PluginFailure] = {}
_unknown_groups: list[PluginEntry] = []
_plugin_kinds: dict[str, list[PluginEntry]] = {}
_kind_problems: list[PluginFailure] = []


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


_Found = tuple[md.EntryPoint, str, str]  # an entry point, its distribution and version


def _entry(kind: str, found: _Found) -> PluginEntry:
    ep, dist, version = found
    return PluginEntry(kind, ep.name, ep.value, dist, version,
                       _GuardedEntryPoint(ep))  # type: ignore[arg-type]


def _norm_dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _own_entry_points() -> list[_Found] | None:
    """zsbir's own entry points from the ``pyproject.toml`` of the source checkout zsbir
    is imported from (an editable install, or a tree on ``PYTHONPATH`` with nothing
    installed): the file is the truth there, the installed metadata may be older. None for
    an installed zsbir (no such file): its metadata holds them."""
    path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not path.is_file():
        return None
    try:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        project = tomllib.loads(path.read_text(encoding="utf-8")).get("project", {})
    except Exception:  # noqa: BLE001 - unreadable: fall back to the installed metadata
        return None
    if project.get("name") != _BUILTIN_PACKAGE:
        return None
    version = str(project.get("version", "?"))
    return [(md.EntryPoint(name=name, value=value, group=group), _BUILTIN_PACKAGE, version)
            for group, entries in project.get("entry-points", {}).items()
            if group.startswith("zsbir.") for name, value in entries.items()]


def _installed_entry_points() -> list[_Found]:
    """Every ``zsbir.*`` entry point, each (distribution, group, name) once.

    zsbir's own come from its source checkout's ``pyproject.toml`` when there is one
    (:func:`_own_entry_points`), else from its metadata like every plugin's. An editable
    install can leave a ``*.egg-info`` next to the sources (``src/``) on ``sys.path`` besides
    the installed ``*.dist-info``: the same distribution found twice.
    ``importlib.metadata.entry_points`` keeps the first distribution of each normalized name
    on Python >= 3.10; the key below makes that explicit."""
    own = _own_entry_points()
    seen: set[tuple[str, str, str]] = set()
    out: list[_Found] = []
    everything = md.entry_points()  # read once; select() below filters it in memory
    groups = sorted(g for g in everything.groups if g.startswith("zsbir."))
    for ep in (ep for g in groups for ep in everything.select(group=g)):
        dist = getattr(ep, "dist", None)
        try:
            name = (dist.metadata["Name"] or "?") if dist is not None else "?"
            version = (dist.version or "?") if dist is not None else "?"
        except Exception:  # noqa: BLE001 - broken metadata: still list the entry point
            name, version = "?", "?"
        if own is not None and _norm_dist(name) == _BUILTIN_PACKAGE:
            continue
        key = (_norm_dist(name), ep.group, ep.name)
        if key not in seen:
            seen.add(key)
            out.append((ep, name, version))
    return (own or []) + out


def discover_plugins(refresh: bool = False) -> dict[str, dict[str, list[PluginEntry]]]:
    """Entry points per kind and name, zsbir's own and every plugin's, read from metadata
    only (nothing imported). Also reads the kinds plugins add (group ``zsbir.kinds``).

    Entry points in a ``zsbir.<other>`` group that names no kind are never loaded; they
    are kept for :func:`unknown_plugin_groups` (``zsbir plugins`` reports them)."""
    global _discovered
    if _discovered is not None and not refresh:
        return _discovered
    eps = _installed_entry_points()
    # kinds added by plugins first: their groups are then read like the built-in ones
    _plugin_kinds.clear()
    _kind_problems.clear()
    for found_ep in (f for f in eps if f[0].group == KINDS_GROUP):
        ep = found_ep[0]
        entry = _entry(ep.name, found_ep)
        problem = None
        if ep.name in KINDS:
            problem = f"kind {ep.name!r} is a built-in kind; the declaration is ignored"
        elif not _KIND_RE.match(ep.name):
            problem = f"invalid kind name {ep.name!r} (expected [a-z][a-z0-9_]*)"
        if problem is not None:
            _kind_problems.append(PluginFailure(entry.dist, entry.version, KINDS_GROUP,
                                                ep.name, ep.value, problem))
            continue
        _plugin_kinds.setdefault(ep.name, []).append(entry)
    for kind in [k for k in _REGISTRIES if k not in KINDS and k not in _plugin_kinds]:
        del _REGISTRIES[kind]  # its distribution is gone
    for kind in _plugin_kinds:
        _REGISTRIES.setdefault(kind, Registry(kind))
    found: dict[str, dict[str, list[PluginEntry]]] = {k: {} for k in (*KINDS, *_plugin_kinds)}
    unknown: list[PluginEntry] = []
    for found_ep in eps:
        ep = found_ep[0]
        if ep.group == KINDS_GROUP:
            continue
        kind = ep.group.removeprefix("zsbir.")
        entry = _entry(kind, found_ep)
        if kind in found:
            found[kind].setdefault(ep.name, []).append(entry)
        else:
            unknown.append(entry)
    for names in found.values():  # zsbir's own entry first: the built-in wins
        for entries in names.values():
            entries.sort(key=lambda e: e.dist != _BUILTIN_PACKAGE)
    _discovered = found
    _unknown_groups[:] = unknown
    return found


def kinds() -> tuple[str, ...]:
    """Every kind: the built-in ones (:data:`KINDS`, in ``zsbir list``'s order), then those
    installed plugins add (group ``zsbir.kinds``), sorted."""
    discover_plugins()
    return (*KINDS, *sorted(_plugin_kinds))


def kind_declarations() -> dict[str, list[PluginEntry]]:
    """The ``zsbir.kinds`` entry points of installed plugins, per kind they add."""
    discover_plugins()
    return {k: list(v) for k, v in _plugin_kinds.items()}


def _plugin_kind_spec(kind: str) -> KindSpec | None:
    """The :class:`KindSpec` a plugin declares for ``kind`` (imported), or None for a
    name no plugin declares. Raises :class:`PluginLoadError` when it cannot be used."""
    discover_plugins()
    entries = _plugin_kinds.get(kind)
    if not entries:
        return None
    if len(entries) > 1:
        dists = ", ".join(f"{e.dist} {e.version}" for e in entries)
        raise PluginLoadError(f"kind {kind!r} is declared by several plugins ({dists}); "
                              "uninstall all but one")
    entry = entries[0]
    key = (KINDS_GROUP, kind)
    if key in _failures:
        raise PluginLoadError(_failure_text(_failures[key]))
    try:
        spec = entry.entry_point.load()
        if not isinstance(spec, KindSpec):
            raise TypeError(f"{entry.value} is a {type(spec).__name__}, not a "
                            "zsbir.registry.KindSpec")
    except Exception as exc:  # noqa: BLE001 - any import error belongs to the plugin
        _failures[key] = PluginFailure(entry.dist, entry.version, KINDS_GROUP, kind,
                                       entry.value, f"{type(exc).__name__}: {exc}")
        raise PluginLoadError(_failure_text(_failures[key])) from exc
    return spec


def kind_spec(kind: str) -> KindSpec | None:
    """The :class:`KindSpec` of a kind a plugin adds (None for a built-in kind)."""
    return _plugin_kind_spec(get_registry(kind).kind) if kind not in KINDS else None


def unknown_plugin_groups() -> list[PluginEntry]:
    """Installed entry points in ``zsbir.<other>`` groups that name no kind (ignored)."""
    discover_plugins()
    return list(_unknown_groups)


def kind_problems() -> list[PluginFailure]:
    """``zsbir.kinds`` entries that cannot add a kind (a built-in kind's name, an invalid
    name)."""
    discover_plugins()
    return list(_kind_problems)


def plugin_failures() -> list[PluginFailure]:
    """Entry points (built-in or plugin) that failed to load so far in this process
    (``zsbir plugins`` loads all)."""
    return list(_failures.values())


# ---------------------------------------------------------------------------- registry
class Registry:
    """A flat name -> component mapping for one kind, filled from entry points on demand."""

    def __init__(self, kind: str):
        if kind not in KINDS and kind not in _plugin_kinds:
            raise ValueError(f"unknown registry kind {kind!r}; kinds are {', '.join(kinds())}")
        self.kind = kind
        self._components: dict[str, Component] = {}

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._components)} loaded)"

    # -- registering
    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@losses.register("ce")`` registers the decorated callable (the
        name must also be an entry point of its distribution to be found before its
        module is imported)."""

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
        """Entry points of this kind per name (zsbir's own and plugins'), built-in first."""
        return discover_plugins().get(self.kind, {})

    def names(self, pattern: str = "*") -> list[str]:
        """Every name (entry points and registered objects) matching a wildcard pattern,
        without importing anything."""
        all_names = set(self._components) | set(self._plugins())
        return sorted(n for n in all_names if fnmatch.fnmatchcase(n, pattern))

    def builtin_names(self) -> list[str]:
        """Names zsbir's own distribution declares for this kind (nothing imported)."""
        return sorted(n for n, es in self._plugins().items()
                      if any(e.dist == _BUILTIN_PACKAGE for e in es))

    def __contains__(self, name: object) -> bool:
        return name in self._components or name in self._plugins()

    def suggest(self, name: str, n: int = 3) -> list[str]:
        names = self.names()
        close = difflib.get_close_matches(name, names, n=n, cutoff=0.6)
        if not close:
            low = name.lower()
            close = [c for c in names if low in c.lower() or c.lower() in low][:n]
        return close

    def component(self, name: str) -> Component:
        """The registered component, importing its module (built-in or plugin) if needed."""
        entries = self._plugins().get(name, [])
        comp = self._components.get(name)
        if comp is not None and (comp.package == _BUILTIN_PACKAGE or not entries
                                 or entries[0].dist != _BUILTIN_PACKAGE):
            return comp
        if not entries:
            raise UnknownComponentError(self.kind, name, self.suggest(name))
        if entries[0].dist == _BUILTIN_PACKAGE:  # a built-in wins over any plugin
            return self._load(entries[0])
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
        """What is known about ``name`` without importing anything: the loaded component,
        else its entry point (zsbir's own first)."""
        entries = self._plugins().get(name)
        comp = self._components.get(name)
        if comp is not None and (not entries or comp.package == entries[0].dist):
            return comp
        if entries:
            return entries[0]
        if comp is not None:
            return comp
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
        builtin = set(self.builtin_names())
        return [e for n, es in self._plugins().items() if n in builtin for e in es
                if e.dist != _BUILTIN_PACKAGE]


def _failure_text(f: PluginFailure) -> str:
    who = "zsbir's built-in" if f.dist == _BUILTIN_PACKAGE else "plugin"
    return (f"{who} {f.dist} {f.version} failed to load {f.group} entry point "
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
models = _REGISTRIES["models"]
networks = _REGISTRIES["networks"]
steps = _REGISTRIES["steps"]
rerankers = _REGISTRIES["rerankers"]
pair_scorers = _REGISTRIES["pair_scorers"]
importers = _REGISTRIES["importers"]


def get_registry(kind: str) -> Registry:
    """The registry of one kind (built-in or added by a plugin); accepts the singular too
    (``loss``)."""
    discover_plugins()
    if kind in _REGISTRIES:
        return _REGISTRIES[kind]
    for plural in (kind + "s", kind + "es"):
        if plural in _REGISTRIES:
            return _REGISTRIES[plural]
    all_kinds = kinds()
    close = difflib.get_close_matches(kind, all_kinds, n=2)
    hint = (f"; did you mean {', '.join(close)}?" if close
            else f"; kinds are {', '.join(all_kinds)}")
    raise RegistryError(f"unknown component kind {kind!r}{hint}")


def registries() -> Iterable[Registry]:
    """Every registry: the built-in kinds', then the plugin kinds'."""
    return [_REGISTRIES[k] for k in kinds()]


def load_all(kinds_: Iterable[str] | None = None) -> list[PluginFailure]:
    """Import every discovered entry point (built-in and plugin; of ``kinds_``, default
    all) and every plugin kind's :class:`KindSpec`; return the failures (none raised)."""
    selected = list(kinds_) if kinds_ is not None else list(kinds())
    for kind in selected:
        if kind not in KINDS:
            try:
                _plugin_kind_spec(kind)
            except RegistryError:
                pass
        reg = get_registry(kind)
        for name in reg.names():
            try:
                reg.component(name)
            except RegistryError:
                pass
    return plugin_failures()


def load_all_plugins() -> list[PluginFailure]:
    """:func:`load_all` over every kind (the name ``zsbir plugins`` has always used)."""
    return load_all()
