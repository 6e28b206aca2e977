"""TOML manifests: loading, ``--set`` overrides, validation against the registered
components' signatures, and the resolved form (defaults filled) saved with every run.

A manifest is a few core sections (``[run]``, ``[data]``, ``[train]``, ``[evaluation]``,
whose fields are the dataclasses of :mod:`zsbir.manifest.sections`) and component tables,
each naming a registered component and giving its keyword arguments::

    [protocol]            # registry "protocols"
    name = "synthetic"
    [model]               # registry "models"; default "backbone_head"
    name = "backbone_head"
    [model.backbone]      # a nested table: backbone_head's signature says "backbones"
    name = "resnet18"
    pretrained = false
    [[losses]]            # registry "losses"; `weight` is the toolkit's
    name = "ce"
    weight = 1.0

(``[backbone]`` at the top is shorthand for ``[model.backbone]``.)
:func:`resolve` checks everything before anything is built and raises
:class:`ManifestError` holding *every* problem with its key path
(``losses[1].weight: expected float, got str "a"``). Types are strict: ``"2"`` is not an
int (LightningCLI's silent coercion is avoided); an int is accepted where a float is
expected. Validation reads each component's signature, so a parameter added to a
component is at once valid in manifests and listed by ``zsbir describe``.

One module per job: :mod:`~zsbir.manifest.sections` (section dataclasses, the resolved
:class:`Manifest`), :mod:`~zsbir.manifest.tomlio` (TOML load, ``--set``, dump),
:mod:`~zsbir.manifest.checking` (the type checker), :mod:`~zsbir.manifest.resolver`
(signatures -> resolved tables, cross-section checks); :mod:`~zsbir.manifest.errors`.
"""

from __future__ import annotations

from zsbir.manifest.checking import (
    _hints,
    _suggest,
    _type_name,
    _value_repr,
    check_type,
    constraint_text,
    validate_params,
)
from zsbir.manifest.errors import ManifestError, Problem
from zsbir.manifest.resolver import (
    Marker,
    Node,
    _cross_checks,
    _cuda_available,
    _Resolver,
    components,
    markers,
    plugins_used,
    resolve,
    resolve_component,
    resume_safe,
)
from zsbir.manifest.sections import (
    COMPONENT_KEYS,
    COMPONENT_SECTIONS,
    CORE_SECTIONS,
    DEFAULT_MODEL,
    DEFAULT_TEACHER_NETWORK,
    RESERVED,
    RESERVED_TYPES,
    SECTION_ORDER,
    DataConfig,
    EvalConfig,
    Manifest,
    RunConfig,
    TrainConfig,
    student_backbone,
)
from zsbir.manifest.tomlio import MAX_DEPTH, apply_overrides, dump_toml, load, nesting_problem

__all__ = [
    "COMPONENT_KEYS", "COMPONENT_SECTIONS", "CORE_SECTIONS", "DEFAULT_MODEL",
    "DEFAULT_TEACHER_NETWORK", "MAX_DEPTH", "RESERVED", "RESERVED_TYPES", "SECTION_ORDER",
    "DataConfig",
    "EvalConfig", "Manifest", "ManifestError", "Marker", "Node", "Problem", "RunConfig",
    "TrainConfig", "_Resolver", "_cross_checks", "_cuda_available", "_hints", "_suggest",
    "_type_name", "_value_repr", "apply_overrides", "check_type", "components",
    "constraint_text", "dump_toml", "load", "markers", "nesting_problem", "plugins_used",
    "resolve", "resolve_component", "resume_safe", "student_backbone", "validate_params",
]
