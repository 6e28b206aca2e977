"""The resolver: a manifest dict -> :class:`~zsbir.manifest.sections.Manifest`, every
component table checked against its registered component's signature and its defaults
filled in, or :class:`~zsbir.manifest.errors.ManifestError` with every problem at its key
path.

Which keys of a table are themselves component tables is read from the component's
signature, not from a list of keys: a parameter annotated
``Annotated[Backbone, Nested("backbones")]`` takes a ``backbones`` table (resolved here,
built first and passed built), ``Annotated[HeadFactory, Factory("heads")]`` a ``heads``
table passed as a builder, ``Annotated[list[Loss], Nested("losses")]`` an array of tables
(confection's registry-driven configs and Hydra's ``_target_`` trees work the same way;
here the nesting is declared by the parent). Only the top-level sections are a table
(:data:`~zsbir.manifest.sections.COMPONENT_SECTIONS`).

Two rules keep a manifest unambiguous: a key that zsbir supplies itself (``ctx``, a
head's ``in_features``: :data:`zsbir.registry.INJECTED`) cannot be written in a table, and
``weight`` is reserved for losses only. The shorthand ``[backbone]`` is
``[model.backbone]`` of the default model (given both: an error); problems inside it are
reported at the path the manifest wrote (``backbone.weights``), and the resolved form is
always the ``[model]`` one.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from zsbir.constraints import ResumeSafe, resume_safe_of
from zsbir.manifest.checking import _hints, _suggest, _value_repr, check_type, validate_params
from zsbir.manifest.errors import ManifestError, Problem
from zsbir.manifest.sections import (
    COMPONENT_SECTIONS,
    CORE_SECTIONS,
    DEFAULT_MODEL,
    DEFAULT_TEACHER_NETWORK,
    RESERVED,
    RESERVED_TYPES,
    SECTION_ORDER,
    Manifest,
    student_backbone,
)
from zsbir.registry import INJECTED, Component, Factory, Nested, RegistryError, get_registry

__all__ = ["Marker", "Node", "components", "markers", "plugins_used", "resolve",
           "resolve_component", "resume_safe"]


@dataclass
class Node:
    """One component found while resolving: where it is, what it is, its resolved table."""

    path: str
    kind: str
    component: Component
    params: dict[str, Any]


@dataclass(frozen=True)
class Marker:
    """A parameter that takes a component table: its ``kind``, whether it is passed as a
    builder (``Factory``) rather than built (``Nested``), and whether it takes an array of
    tables."""

    kind: str
    factory: bool = False
    many: bool = False


def _marker_of(tp: Any) -> Marker | None:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[Annotated[..., Nested(k)]]
        for arg in typing.get_args(tp):
            found = _marker_of(arg)
            if found is not None:
                return found
        return None
    if origin is not Annotated:
        return None
    base, *meta = typing.get_args(tp)
    for m in meta:
        if isinstance(m, (Nested, Factory)):
            many = typing.get_origin(base) in (list, collections.abc.Sequence) or base is list
            return Marker(m.kind, isinstance(m, Factory), many)
    return None


@functools.cache
def _markers_cached(obj: Any) -> dict[str, Marker]:
    out: dict[str, Marker] = {}
    for name, tp in _hints(obj).items():
        found = _marker_of(tp)
        if found is not None:
            out[name] = found
    return out


def markers(obj: Any) -> dict[str, Marker]:
    """``{parameter: Marker}`` for every parameter of a component (or a core section's
    dataclass) whose annotation carries ``Nested(kind)`` or ``Factory(kind)``."""
    try:
        return dict(_markers_cached(obj))
    except TypeError:  # an unhashable callable
        return dict(_markers_cached.__wrapped__(obj))


def _resume_safe_of(tp: Any) -> ResumeSafe | None:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[Annotated[..., ResumeSafe()]]
        return next((m for m in map(_resume_safe_of, typing.get_args(tp)) if m), None)
    if origin is not Annotated:
        return None
    return resume_safe_of(tuple(typing.get_args(tp)[1:]))


@functools.cache
def _resume_safe_cached(obj: Any) -> dict[str, ResumeSafe]:
    return {name: m for name, tp in _hints(obj).items()
            if (m := _resume_safe_of(tp)) is not None}


def resume_safe(obj: Any) -> dict[str, ResumeSafe]:
    """``{parameter: ResumeSafe}`` for every parameter of a component (or field of a
    section dataclass, or of :class:`~zsbir.manifest.sections.Manifest`) whose annotation
    carries :class:`~zsbir.constraints.ResumeSafe`: changing it does not touch the trained
    state."""
    try:
        return dict(_resume_safe_cached(obj))
    except TypeError:  # an unhashable callable
        return dict(_resume_safe_cached.__wrapped__(obj))


def _default_of(obj: Any, name: str) -> Any:
    """The default of parameter (or dataclass field) ``name``; ``inspect.Parameter.empty``
    when it has none."""
    import inspect

    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            if f.name == name:
                if f.default_factory is not dataclasses.MISSING:
                    return f.default_factory()
                return inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
    p = inspect.signature(obj).parameters.get(name)
    return inspect.Parameter.empty if p is None else p.default


class _Resolver:
    """Walks a manifest once; every component table, at any depth, is resolved against its
    registry the same way, its nested tables found from its signature."""

    def __init__(self, raw: Mapping[str, Any]):
        self.raw = raw
        self.problems: list[Problem] = []
        self.nodes: list[Node] = []
        #: resolved path prefix -> the path the manifest wrote (the shorthand [backbone])
        self.aliases: dict[str, str] = {}

    def problem(self, path: str, message: str) -> None:
        for src, dst in self.aliases.items():
            if path == src or path.startswith((src + ".", src + "[")):
                path = dst + path[len(src):]
        self.problems.append(Problem(path, message))

    def component(self, kind: str, table: Any, path: str) -> dict[str, Any] | None:
        """A component table resolved (defaults filled, nested components resolved)."""
        import inspect

        if isinstance(table, Mapping) and not isinstance(table, dict):
            table = dict(table)  # a default given as a read-only mapping
        if not isinstance(table, dict):
            self.problem(path, f"expected a table, got {_value_repr(table)}")
            return None
        resolved: dict[str, Any] = {}
        reserved = RESERVED.get(kind, {})
        # reserved keys are the toolkit's: checked whatever the name says
        types_ = RESERVED_TYPES.get(kind, {})
        for key, default in reserved.items():
            value = table.get(key, default)
            if key in types_:
                sub: list[Problem] = []
                value = check_type(value, types_[key], f"{path}.{key}", sub)
                for p in sub:
                    self.problem(p.path, p.message)
            if value is not None:
                resolved[key] = value
        name = table.get("name")
        comp: Component | None = None
        if not isinstance(name, str):
            self.problem(f"{path}.name", "required: the registered component's name"
                         + (f", got {_value_repr(name)}" if name is not None else ""))
        else:
            try:
                comp = get_registry(kind).component(name)
            except RegistryError as exc:
                self.problem(f"{path}.name", str(exc))
        if comp is None:
            return None
        marks = markers(comp.obj)
        injected = INJECTED.get(kind, frozenset())
        sub = []
        params = validate_params(comp.obj, kind, table, path, sub,
                                 skip=("name", *reserved, *marks))
        for p in sub:
            self.problem(p.path, p.message)
        nested: dict[str, Any] = {}
        for key, mark in marks.items():
            if key in injected:
                if key in table:
                    self.problem(f"{path}.{key}", f"a table under {key!r}, which zsbir "
                                 "supplies itself (injected): it is never written in a "
                                 "manifest")
                continue
            value = table.get(key, inspect.Parameter.empty)
            if value is inspect.Parameter.empty:
                value = _default_of(comp.obj, key)
            if value is inspect.Parameter.empty:
                self.problem(f"{path}.{key}", f"required: a [{path}.{key}] table "
                             f"({mark.kind.removesuffix('s')} component)")
                continue
            if value is None:
                continue
            nested[key] = self.nested(mark, value, f"{path}.{key}")
        out = {"name": name, **resolved, **params, **nested}
        self.nodes.append(Node(path, kind, comp, out))
        return out

    def nested(self, mark: Marker, value: Any, path: str) -> Any:
        """The table (or array of tables) a marked parameter takes, resolved."""
        if mark.many:
            if not isinstance(value, list):
                self.problem(path, f"expected an array of {mark.kind} tables, got "
                             f"{_value_repr(value)}")
                return []
            return [self.component(mark.kind, t, f"{path}[{i}]") for i, t in enumerate(value)]
        return self.component(mark.kind, value, path)

    def core(self, key: str, cls: type) -> Any:
        table = self.raw.get(key, {})
        if not isinstance(table, dict):
            self.problem(key, f"expected a table, got {_value_repr(table)}")
            return cls()
        marks = markers(cls)
        sub: list[Problem] = []
        values = validate_params(cls, "", table, key, sub, skip=tuple(marks))
        for p in sub:
            self.problem(p.path, p.message)
        for name, mark in marks.items():  # default component tables are resolved too
            value = table[name] if name in table else _default_of(cls, name)
            values[name] = self.nested(mark, value, f"{key}.{name}")
        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except TypeError:
            return cls()

    def model_table(self) -> Any:
        """``[model]`` with the shorthand ``[backbone]`` moved into it (and its name
        defaulted): the table the ``models`` registry resolves."""
        table = self.raw.get("model", {})
        if not isinstance(table, dict):
            return table  # reported by component()
        table = {"name": DEFAULT_MODEL, **table}
        if "backbone" not in self.raw:
            return table
        if "backbone" in table:
            self.problem("backbone", "given twice: [backbone] is shorthand for "
                         "[model.backbone], and the manifest has [model.backbone] too; "
                         "keep one")
            return table
        name = table["name"]
        try:
            comp = get_registry("models").component(name) if isinstance(name, str) else None
        except RegistryError:
            comp = None  # component() reports the name
        if comp is not None and "backbone" not in markers(comp.obj):
            takes = ", ".join(f"[model.{k}]" for k in markers(comp.obj)) or "none"
            self.problem("backbone", f"[backbone] is shorthand for [model.backbone], but "
                         f"model {name!r} takes no backbone table (its tables: {takes}); "
                         "write the backbones under [model]")
            return table
        table["backbone"] = self.raw["backbone"]
        self.aliases["model.backbone"] = "backbone"
        return table


def resolve(raw: Mapping[str, Any], source: str = "<manifest>") -> Manifest:
    """Validate a manifest dict; fill defaults; raise :class:`ManifestError` listing every
    problem. Nothing is built here except registry lookups (which may import a plugin)."""
    from zsbir.manifest.tomlio import nesting_problem

    deep = nesting_problem(raw)
    if deep is not None:  # before anything walks it (recursively)
        raise ManifestError([deep], source)
    r = _Resolver(raw)
    known = set(CORE_SECTIONS) | set(COMPONENT_SECTIONS) | {"plugins", "backbone"}
    for key in raw:
        if key not in known:
            r.problem(key, "unknown section" + _suggest(key, sorted(known)))

    core = {k: r.core(k, cls) for k, cls in CORE_SECTIONS.items()}
    model = r.model_table()
    comps: dict[str, Any] = {}
    for key, (kind, is_list, required, default, _) in COMPONENT_SECTIONS.items():
        table = model if key == "model" else raw.get(key, default)
        if table is None:
            if required:
                r.problem(key, "required section is missing")
            comps[key] = [] if is_list else None
            continue
        if key == "teacher" and isinstance(table, dict) and "network" not in table \
                and _takes_network(table.get("name")):
            if "backbone" in table:
                r.problem("teacher.backbone", "the teacher's network is now "
                          "[teacher.network] (name = \"imagenet_classifier\") with its "
                          "backbone in [teacher.network.backbone]")
                table = {k: v for k, v in table.items() if k != "backbone"}
            table = {**table, "network": {"name": DEFAULT_TEACHER_NETWORK,
                                          "backbone": student_backbone(model)}}
        if is_list:
            if not isinstance(table, list) or (required and not table):
                r.problem(key, f"expected an array of tables ([[{key}]]), "
                               f"got {_value_repr(table)}")
                comps[key] = []
                continue
            comps[key] = r.nested(Marker(kind, many=True), table, key) if table else []
        else:
            comps[key] = r.component(kind, table, key)

    _cross_checks(core, comps, r)
    if r.problems:  # in the order of the manifest's sections (stable within one)
        order = {k: i for i, k in enumerate(SECTION_ORDER)}
        r.problems.sort(key=lambda p: order.get(re.split(r"[.\[]", p.path)[0], -1))
        raise ManifestError(r.problems, source)
    return Manifest(
        run=core["run"], data_cfg=core["data"], train=core["train"],
        evaluation=core["evaluation"], source=source, plugins=plugins_used(r.nodes),
        **comps,
    )


def _takes_network(name: Any) -> bool:
    """Whether teacher ``name`` takes a ``[teacher.network]`` table (an unknown name:
    assumed, so that its problems are reported once, at the name)."""
    if not isinstance(name, str):
        return True
    try:
        comp = get_registry("teachers").component(name)
    except RegistryError:
        return True
    return "network" in markers(comp.obj)


def resolve_component(kind: str, table: Mapping[str, Any], path: str,
                      source: str = "<command line>") -> dict[str, Any]:
    """One component table (e.g. from a command-line option) resolved like a manifest's:
    defaults filled, types and constraints checked; :class:`ManifestError` otherwise."""
    r = _Resolver({})
    out = r.component(kind, dict(table), path)
    if r.problems or out is None:
        raise ManifestError(r.problems, source)
    return out


def plugins_used(nodes: Sequence[Node]) -> dict[str, str]:
    """``{distribution: version}`` of every plugin whose component the manifest uses."""
    import importlib.metadata as md

    out: dict[str, str] = {}
    for node in nodes:
        dist = node.component.package
        if dist == "zsbir" or dist in out:
            continue
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "unknown"
    return dict(sorted(out.items()))


def components(manifest: Manifest) -> list[Node]:
    """Every component of a resolved manifest, with its path (re-resolved, cheap)."""
    r = _Resolver(manifest.data)
    for k, cls in CORE_SECTIONS.items():
        r.core(k, cls)
    for key, (kind, is_list, _, _, _) in COMPONENT_SECTIONS.items():
        value = getattr(manifest, key)
        if value:
            r.nested(Marker(kind, many=is_list), value, key)
    return r.nodes


def _cross_checks(core: dict[str, Any], comps: dict[str, Any], r: _Resolver) -> None:
    """Checks that span sections: can the head, sampler and teacher feed every loss; the
    components' own ``check_manifest`` hooks; metric names."""
    from zsbir.wiring import check_wiring

    by_path = {n.path: n for n in r.nodes}
    plain = {**{k: dataclasses.asdict(v) for k, v in core.items()},
             **{k: v for k, v in comps.items() if v is not None}}
    # hooks written against the shorthand read the student's backbone as "backbone"
    plain["backbone"] = student_backbone(comps.get("model"))
    head = by_path.get("model.head")
    check_wiring(core, r.nodes, r.problem)  # losses' needs, roles, optimizer groups
    for node in r.nodes:  # the components' own cross-key checks
        hook = getattr(node.component.obj, "check_manifest", None)
        if callable(hook):
            for msg in hook(node.params, plain) or ():
                r.problem(node.path, msg)
    embed_dim = (head.params.get("embed_dim") if head else None)
    for node in r.nodes:
        bits = node.params.get("bits") if node.kind == "hashers" else None
        if isinstance(bits, int) and isinstance(embed_dim, int) and bits > embed_dim:
            r.problem(f"{node.path}.bits", f"{bits} bits exceed the head's embed_dim "
                      f"({embed_dim}): a hasher cannot make more bits than the embedding "
                      "has dimensions")
    dev = core["run"].device
    if isinstance(dev, str) and dev.startswith("cuda") and not _cuda_available():
        r.problem("run.device", f"{dev!r} but CUDA is not available on this machine "
                  "(use \"auto\" or \"cpu\")")
    from zsbir.evaluation.metrics import parse_metric

    for i, m in enumerate(core["evaluation"].metrics):
        try:
            parse_metric(m)
        except ValueError as exc:
            r.problem(f"evaluation.metrics[{i}]", str(exc))


def _cuda_available() -> bool:
    if "torch" not in sys.modules:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return False
    import torch

    return bool(torch.cuda.is_available())


