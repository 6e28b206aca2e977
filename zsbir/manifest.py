"""TOML manifests: loading, ``--set`` overrides, validation against the registered
components' signatures, and the resolved form (defaults filled) saved with every run.

A manifest is a few core sections (``[run]``, ``[data]``, ``[model]``, ``[train]``,
``[evaluation]``, whose fields are the dataclasses below) and component tables, each
naming a registered component and giving its keyword arguments::

    [protocol]            # registry "protocols"
    name = "synthetic"
    [backbone]            # registry "backbones"
    name = "resnet18"
    pretrained = false
    [[losses]]            # registry "losses"; `weight` is the toolkit's
    name = "ce"
    weight = 1.0

:func:`resolve` checks everything before anything is built and raises
:class:`ManifestError` holding *every* problem with its key path
(``losses[1].weight: expected float, got str "a"``). Types are strict: ``"2"`` is not an
int (LightningCLI's silent coercion is avoided); an int is accepted where a float is
expected. Validation reads each component's signature, so a parameter added to a
component is at once valid in manifests and listed by ``zsbir describe``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from zsbir.constraints import Length, Ordered, Pattern, Range, constraints_of
from zsbir.registry import INJECTED, Component, RegistryError, _singular, get_registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "DataConfig", "EvalConfig", "Manifest", "ManifestError", "ModelConfig", "Problem",
    "RunConfig", "TrainConfig", "apply_overrides", "dump_toml", "load", "resolve",
    "resolve_component",
]


# ---------------------------------------------------------------------------- core sections
_PLAIN_NAME = Pattern(r"[A-Za-z0-9][A-Za-z0-9_.\-]*",
                      "a plain name (letters, digits, '_', '-', '.'; no '/' and not empty)")
_DEVICE = Pattern(r"auto|cpu|mps|cuda(:\d+)?", "\"auto\", \"cpu\", \"mps\" or \"cuda[:N]\"")


@dataclass
class RunConfig:
    """``[run]``: where results go and how the run is seeded."""

    name: Annotated[str, _PLAIN_NAME] = "run"
    #: results land in ``output_dir/name`` (relative paths: to the working directory)
    output_dir: str = "runs"
    seed: Annotated[int, Range(ge=0, lt=2**63)] = 0
    #: "auto" picks CUDA when available, else CPU; or "cpu", "cuda", "cuda:1", "mps"
    device: Annotated[str, _DEVICE] = "auto"
    #: where caches (file indexes, teacher targets, WordNet) go; default ~/.cache/zsbir
    cache_dir: str = ""
    #: refuse to reuse a run directory that already holds results
    overwrite: bool = False
    #: torch intra-op threads; 0: chosen from the CPUs the process may use (OMP_NUM_THREADS,
    #: MKL_NUM_THREADS and ZSBIR_THREADS win over it; see zsbir.engine.threads)
    threads: Annotated[int, Range(ge=0, le=1024)] = 0


@dataclass
class DataConfig:
    """``[data]``: image decoding, augmentation and loading.

    Normalization is not set here: it comes from the student backbone's weights
    (``pretrained_cfg``: mean, std), as timm's and torchvision's weights carry it.
    """

    image_size: Annotated[int, Range(ge=16, le=4096)] = 224
    #: data-loader worker processes; -1 = automatic (CUDA: one per core, at most 8;
    #: CPU: one, so that decoding overlaps compute without starving it)
    workers: Annotated[int, Range(ge=-1, le=256)] = -1
    #: SAKE's recipe: with this probability, a random affine transform + flip
    augment_prob: Annotated[float, Range(ge=0, le=1)] = 0.7
    flip: bool = True
    #: the affine transform's zoom range [low, high]: positive (it divides) and ordered
    scale: Annotated[list[Annotated[float, Range(ge=0.01, le=100)]], Length(exactly=2),
                     Ordered()] = field(default_factory=lambda: [0.7, 1.3])
    rotation: Annotated[float, Range(ge=0, le=180)] = 30.0
    #: the largest shift, in pixels of a 224-pixel input
    translation: Annotated[float, Range(ge=0, le=1000)] = 10.0
    #: "backbone": the mean/std the backbone's weights expect; "none": raw [0, 1] pixels
    normalize: Literal["backbone", "none"] = "backbone"
    #: an unreadable image: "skip" it (reported and counted) or "fail" the run
    on_corrupt: Literal["skip", "fail"] = "skip"
    #: images per batch when embedding for evaluation
    eval_batch_size: Annotated[int, Range(ge=1, le=65536)] = 64


@dataclass
class ModelConfig:
    """``[model]``: what sits on the backbone's pooled features.

    ``[model.head]`` names a registered head (``zsbir list heads``): ``stacked`` (SAKE,
    Liu et al. ICCV 2019: features -> embedding -> classifier and ImageNet head) or
    ``parallel`` (SBTKNet, Tursun et al.: FC_sim, FC_id, FC_soft side by side), or a
    plugin's.
    """

    head: dict[str, Any] = field(default_factory=lambda: {"name": "stacked"})


@dataclass
class TrainConfig:
    """``[train]``: the loop. ``[train.step]`` names the training step (``zsbir list
    steps``): ``default`` is forward, teacher, weighted losses, backward, optimizer step."""

    epochs: Annotated[int, Range(ge=1, le=100_000)] = 20
    batch_size: Annotated[int, Range(ge=1, le=1_000_000)] = 40
    #: stop an epoch after this many steps (0 = the sampler's full epoch)
    max_steps_per_epoch: Annotated[int, Range(ge=0)] = 0
    #: save a resumable checkpoint every N steps (0 = only at epoch ends)
    checkpoint_every: Annotated[int, Range(ge=0)] = 200
    #: evaluate seen-class validation accuracy every N epochs (0 = never)
    val_every: Annotated[int, Range(ge=0)] = 1
    #: stop when validation accuracy has not improved for N epochs (0 = never)
    early_stopping: Annotated[int, Range(ge=0)] = 0
    #: which weights are evaluated at the end: the best validation epoch or the last
    select: Literal["best_val", "last"] = "best_val"
    #: clip the gradient norm of every trained parameter, losses' included (0 = off)
    grad_clip: Annotated[float, Range(ge=0)] = 0.0
    log_every: Annotated[int, Range(ge=1)] = 10
    #: mixed precision: "auto" = bf16 autocast on CUDA, off on CPU (fp32 master weights,
    #: losses computed in fp32)
    amp: Literal["auto", "bf16", "off"] = "auto"
    #: channels-last memory format: "auto" = on for CUDA
    channels_last: Literal["auto", "on", "off"] = "auto"
    #: torch.compile the student and the teacher network ("reduce-overhead" adds CUDA
    #: graphs, for small batches such as SAKE's 40)
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    step: dict[str, Any] = field(default_factory=lambda: {"name": "default"})


@dataclass
class EvalConfig:
    """``[evaluation]``: what is measured on the unseen classes."""

    metrics: Annotated[list[str], Length(min=1)] = field(
        default_factory=lambda: ["map@all", "p@100"])
    #: also score generalized ZS-SBIR: seen-class photos join the gallery (SBTKNet Table 3)
    generalized: bool = False
    #: also score photo-to-photo retrieval among unseen photos (ZS-PBIR, SAKE Table 4)
    pbir: bool = False
    per_class: bool = False
    #: queries shown in the retrieval grid PNG (0 = no grid)
    grid_queries: Annotated[int, Range(ge=0, le=100)] = 6
    grid_top: Annotated[int, Range(ge=1, le=100)] = 10
    #: queries per chunk in the ranking engine (0 = from a memory budget)
    chunk_size: Annotated[int, Range(ge=0)] = 0


CORE_SECTIONS: dict[str, type] = {
    "run": RunConfig, "data": DataConfig, "model": ModelConfig, "train": TrainConfig,
    "evaluation": EvalConfig,
}
#: every manifest key whose tables are components, at any depth, and its registry kind:
#: ``[backbone]``, ``[model.head]``, ``[teacher.network]``, ``[teacher.network.backbone]``,
#: ``[train.step]``, ``[[losses]]``, ...
COMPONENT_KEYS: dict[str, str] = {
    "protocol": "protocols", "backbone": "backbones", "head": "heads",
    "network": "networks", "teacher": "teachers", "losses": "losses", "step": "steps",
    "sampler": "samplers", "optimizer": "optimizers", "schedule": "schedulers",
    "hashers": "hashers", "rerankers": "rerankers",
}
#: keys the toolkit reads from a component table besides the component's own parameters
RESERVED: dict[str, dict[str, Any]] = {"losses": {"weight": 1.0},
                                       "optimizers": {"groups": None}}
#: top-level component sections: key -> (is a list, required, default table)
COMPONENT_SECTIONS: dict[str, tuple[bool, bool, Any]] = {
    "protocol": (False, True, None),
    "backbone": (False, True, None),
    "teacher": (False, False, None),
    "losses": (True, True, None),
    "sampler": (False, False, {"name": "random"}),
    "optimizer": (False, False, {"name": "adam"}),
    "schedule": (False, False, {"name": "constant"}),
    "hashers": (True, False, [{"name": "none"}]),
    "rerankers": (True, False, []),
}
#: the teacher's network when ``[teacher.network]`` is not given: an ImageNet classifier
#: on (a fresh copy of) the student's backbone
DEFAULT_TEACHER_NETWORK = "imagenet_classifier"
SECTION_ORDER = ("run", "protocol", "data", "backbone", "model", "teacher", "losses",
                 "sampler", "optimizer", "schedule", "train", "hashers", "rerankers",
                 "evaluation", "plugins")


# ---------------------------------------------------------------------------- errors
@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest, at a key path."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ManifestError(ValueError):
    """A manifest with problems; ``problems`` lists every one."""

    def __init__(self, problems: Sequence[Problem], source: str = "<manifest>"):
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''}\n{lines}")


# ---------------------------------------------------------------------------- the resolved form
@dataclass
class Manifest:
    """A validated manifest: core sections as dataclasses, component tables as dicts with
    every default filled in (nested component tables too), and the plain-data form
    (``data``) saved with runs. ``plugins`` records the distribution and version of every
    plugin a component of the manifest comes from."""

    run: RunConfig
    data_cfg: DataConfig
    model: ModelConfig
    train: TrainConfig
    evaluation: EvalConfig
    protocol: dict[str, Any]
    backbone: dict[str, Any]
    teacher: dict[str, Any] | None
    losses: list[dict[str, Any]]
    sampler: dict[str, Any]
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    hashers: list[dict[str, Any]]
    rerankers: list[dict[str, Any]] = field(default_factory=list)
    plugins: dict[str, str] = field(default_factory=dict)
    source: str = "<manifest>"

    @property
    def head(self) -> dict[str, Any]:
        return self.model.head

    @property
    def data(self) -> dict[str, Any]:
        """The resolved manifest as plain TOML-able data."""
        out: dict[str, Any] = {}
        for key in SECTION_ORDER:
            if key in CORE_SECTIONS:
                attr = "data_cfg" if key == "data" else key
                out[key] = dataclasses.asdict(getattr(self, attr))
            else:
                value = getattr(self, key)
                if value is not None and value != {} and not (key == "rerankers"
                                                               and not value):
                    out[key] = value
        return out

    def to_toml(self) -> str:
        return dump_toml(self.data)


# ---------------------------------------------------------------------------- loading
def load(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a TOML manifest (and apply ``key.path=value`` overrides) into a plain dict."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError([Problem("", f"cannot read: {exc.strerror}")], str(path)) from exc
    if b"\0" in data:
        raise ManifestError([Problem("", "a binary file, not a TOML manifest (it holds NUL "
                                         "bytes)")], str(path))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ManifestError([Problem("", f"not UTF-8 text: byte 0x{data[exc.start]:02x} on "
                                         f"line {line} cannot be decoded; a manifest is a "
                                         "UTF-8 TOML file")], str(path)) from None
    try:
        raw = tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError([Problem("", f"invalid TOML: {exc}")], str(path)) from exc
    except RecursionError:  # tomllib parses inline tables and arrays recursively
        raise ManifestError([Problem("", "invalid TOML: inline tables or arrays nested too "
                                         "deeply for the TOML parser (a manifest may nest "
                                         f"{MAX_DEPTH} levels at most)")],
                            str(path)) from None
    return apply_overrides(raw, overrides, source=str(path))


#: how deeply tables and arrays may nest in a manifest (the deepest built-in key,
#: ``teacher.network.backbone.weights``, is 4 levels down)
MAX_DEPTH = 32


def nesting_problem(raw: Any, prefix: str = "") -> Problem | None:
    """The first value nested deeper than :data:`MAX_DEPTH` tables and arrays, as a
    :class:`Problem` at its (shortened) key path; ``None`` when there is none. Iterative:
    it never recurses, whatever the depth."""
    stack: list[tuple[Any, list[str]]] = [(raw, [prefix] if prefix else [])]
    while stack:
        node, parts = stack.pop()
        if len(parts) > MAX_DEPTH:
            shown = parts[:6]
            path = "".join(p if p.startswith("[") or i == 0 else f".{p}"
                           for i, p in enumerate(shown))
            return Problem(path + "...", f"nested deeper than {MAX_DEPTH} levels of tables "
                                         "and arrays")
        if isinstance(node, dict):
            stack.extend((v, [*parts, str(k)]) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, [*parts, f"[{i}]"]) for i, v in enumerate(node))
    return None


_PART = re.compile(r"^([A-Za-z0-9_\-]+)((?:\[\d+\])*)$")


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str],
                    source: str = "<manifest>") -> dict[str, Any]:
    """Apply ``--set`` overrides: ``train.epochs=3``, ``losses[1].weight=0.5``,
    ``backbone.name="resnet50"``. Values are TOML literals; a bare word is a string."""
    problems: list[Problem] = []
    for item in overrides:
        if "=" not in item:
            problems.append(Problem(f"--set {item}", "expected KEY=VALUE"))
            continue
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        except RecursionError:
            problems.append(Problem(f"--set {key}", f"the value is nested deeper than "
                                    f"{MAX_DEPTH} levels of tables and arrays"))
            continue
        try:
            _set_path(raw, key, value)
        except (KeyError, IndexError, TypeError) as exc:
            problems.append(Problem(f"--set {key}", str(exc).strip("'\"")))
    deep = nesting_problem(raw)
    if deep is not None:
        problems.append(deep)
    if problems:
        raise ManifestError(problems, source)
    return raw


def _set_path(root: dict[str, Any], key: str, value: Any) -> None:
    node: Any = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        m = _PART.match(part)
        if not m:
            raise KeyError(f"invalid key segment {part!r}")
        name, idx = m.group(1), [int(x) for x in re.findall(r"\[(\d+)\]", m.group(2))]
        last = i == len(parts) - 1
        if not isinstance(node, dict):
            raise TypeError(f"{'.'.join(parts[:i])} is not a table")
        if last and not idx:
            node[name] = value
            return
        node = node.setdefault(name, {} if not idx else [])
        for j, k in enumerate(idx):
            if not isinstance(node, list):
                raise TypeError(f"{name} is not an array of tables")
            if k >= len(node):
                raise IndexError(f"{name}[{k}] does not exist (it has {len(node)} entries)")
            if last and j == len(idx) - 1:
                node[k] = value
                return
            node = node[k]


# ---------------------------------------------------------------------------- type checking
def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "none"
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:  # the base type; constraints: see constraint_text
        return _type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, Sequence, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (dict, Mapping):
        return "table"
    return getattr(tp, "__name__", str(tp))


def constraint_text(tp: Any) -> str:
    """The declared constraints of an annotation, e.g. ``">= 1, <= 4096"`` (or "")."""
    if typing.get_origin(tp) is not typing.Annotated:
        return ""
    return "; ".join(str(c) for c in constraints_of(tuple(typing.get_args(tp)[1:])))


def _value_repr(v: Any) -> str:
    kind = {bool: "bool", int: "int", float: "float", str: "str", list: "array",
            dict: "table"}.get(type(v), type(v).__name__)
    text = repr(v)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{kind} {text}"


def check_type(value: Any, tp: Any, path: str, problems: list[Problem]) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints widened to float)."""
    if tp is inspect.Parameter.empty or tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(tp)
        sub: list[Problem] = []
        out = check_type(value, base, path, sub)
        problems.extend(sub)
        if not sub:
            for c in constraints_of(tuple(meta)):
                msg = c.check(out)
                if msg:
                    problems.append(Problem(path, msg))
        return out
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            sub: list[Problem] = []
            out = check_type(value, arg, path, sub)
            if not sub:
                return out
        problems.append(Problem(path, f"expected {_type_name(tp)}, got {_value_repr(value)}"))
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or type(value) is bool and True not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(Problem(path, f"expected one of {', '.join(map(repr, allowed))}, "
                                          f"got {_value_repr(value)}{hint}"))
        return value
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        if not isinstance(value, list):
            problems.append(Problem(path, f"expected {_type_name(tp)}, "
                                          f"got {_value_repr(value)}"))
            return value
        args = typing.get_args(tp)
        if not args or (origin is tuple and len(args) != 2):
            return value
        return [check_type(v, args[0], f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            problems.append(Problem(path, f"expected table, got {_value_repr(value)}"))
        return value
    if tp is type(None):
        if value is not None:
            problems.append(Problem(path, f"expected nothing, got {_value_repr(value)}"))
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(Problem(path, f"expected bool, got {_value_repr(value)}"))
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(Problem(path, f"expected int, got {_value_repr(value)}"))
        elif not -(2**63) <= value < 2**63:
            problems.append(Problem(path, f"integer out of the 64-bit range: {value}"))
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(Problem(path, f"expected float, got {_value_repr(value)}"))
            return value
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(Problem(path, f"expected a finite float, got {value}"))
        return float(value)
    if tp in (str, Path):
        if not isinstance(value, str):
            problems.append(Problem(path, f"expected {_type_name(tp)}, got {_value_repr(value)}"))
        return value
    return value  # a type manifests cannot spell: not checked here


def _hints(obj: Any) -> dict[str, Any]:
    target = obj.__init__ if inspect.isclass(obj) and not dataclasses.is_dataclass(obj) else obj
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to raw ones
        return {}


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def validate_params(obj: Any, kind: str, table: Mapping[str, Any], path: str,
                    problems: list[Problem], skip: Sequence[str] = ()) -> dict[str, Any]:
    """Check a table's keys against ``obj``'s signature; return them with defaults filled."""
    sig = inspect.signature(obj)
    hints = _hints(obj)
    injected = INJECTED.get(kind, frozenset())
    params = {n: p for n, p in sig.parameters.items()
              if n not in injected and n != "self"
              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in skip:
            continue
        if key not in params:
            allowed = list(params) + list(skip)
            problems.append(Problem(f"{path}.{key}", "unknown parameter"
                                    + (_suggest(key, allowed) or
                                       f" (parameters: {', '.join(allowed) or 'none'})")))
            continue
        out[key] = check_type(value, hints.get(key, params[key].annotation),
                              f"{path}.{key}", problems)
    for name, p in params.items():
        if name in out or name in skip:
            continue
        if p.default is inspect.Parameter.empty:
            problems.append(Problem(f"{path}.{name}", "required parameter is missing"))
        elif p.default is not None:
            out[name] = p.default
    return out


# ---------------------------------------------------------------------------- resolve
@dataclass
class Node:
    """One component found while resolving: where it is, what it is, its resolved table."""

    path: str
    kind: str
    component: Component
    params: dict[str, Any]


def is_component_value(key: str, value: Any) -> bool:
    """Whether ``value`` under ``key`` is a component table (or an array of them): the one
    rule the resolver and :func:`zsbir.build.build_component` both follow."""
    if key not in COMPONENT_KEYS:
        return False
    return isinstance(value, dict) or (isinstance(value, list) and bool(value)
                                       and all(isinstance(v, dict) for v in value))


class _Resolver:
    """Walks a manifest once; every table under a key of :data:`COMPONENT_KEYS`, at any
    depth, is resolved against its registry the same way (confection-style)."""

    def __init__(self, raw: Mapping[str, Any]):
        self.raw = raw
        self.problems: list[Problem] = []
        self.nodes: list[Node] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def component(self, kind: str, table: Any, path: str,
                  extra_skip: Sequence[str] = ()) -> dict[str, Any] | None:
        """A component table resolved (defaults filled, nested components resolved)."""
        if not isinstance(table, dict):
            self.problem(path, f"expected a table, got {_value_repr(table)}")
            return None
        resolved: dict[str, Any] = {}
        # reserved keys are the toolkit's: checked whatever the name says
        for key, default in RESERVED.get(kind, {}).items():
            value = table.get(key, default)
            if key == "weight":
                value = check_type(value, Annotated[float, Range(ge=0)], f"{path}.{key}",
                                   self.problems)
            if value is not None:
                resolved[key] = value
        nested = {k: v for k, v in table.items() if is_component_value(k, v)}
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
        for key, value in nested.items():  # nested errors are reported even if name is bad
            resolved[key] = self.nested(key, value, f"{path}.{key}")
        if comp is None:
            return None
        skip = ("name", *RESERVED.get(kind, {}), *nested, *extra_skip)
        params = validate_params(comp.obj, kind, table, path, self.problems, skip=skip)
        accepted = inspect.signature(comp.obj).parameters
        for key in nested:
            if key not in accepted and not any(p.kind is p.VAR_KEYWORD
                                               for p in accepted.values()):
                self.problem(f"{path}.{key}", f"{_singular(kind)} {name!r} takes no "
                             f"{key!r} component")
        out = {"name": name, **resolved, **params}
        out.update({k: resolved[k] for k in nested})
        self.nodes.append(Node(path, kind, comp, out))
        return out

    def nested(self, key: str, value: Any, path: str) -> Any:
        kind = COMPONENT_KEYS[key]
        if isinstance(value, list):
            return [self.component(kind, t, f"{path}[{i}]") for i, t in enumerate(value)]
        return self.component(kind, value, path)

    def core(self, key: str, cls: type) -> Any:
        table = self.raw.get(key, {})
        if not isinstance(table, dict):
            self.problem(key, f"expected a table, got {_value_repr(table)}")
            return cls()
        nested = {k: v for k, v in table.items() if k in COMPONENT_KEYS}
        values = validate_params(cls, "", table, key, self.problems, skip=tuple(nested))
        for k, v in nested.items():
            if not any(f.name == k for f in dataclasses.fields(cls)):
                self.problem(f"{key}.{k}", "unknown parameter")
                continue
            values[k] = self.component(COMPONENT_KEYS[k], v, f"{key}.{k}")
        for f in dataclasses.fields(cls):  # default component tables are resolved too
            if f.name in COMPONENT_KEYS and f.name not in nested:
                default = f.default_factory() if callable(f.default_factory) else f.default
                values[f.name] = self.component(COMPONENT_KEYS[f.name], default,
                                                f"{key}.{f.name}")
        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except TypeError:
            return cls()


def resolve(raw: Mapping[str, Any], source: str = "<manifest>") -> Manifest:
    """Validate a manifest dict; fill defaults; raise :class:`ManifestError` listing every
    problem. Nothing is built here except registry lookups (which may import a plugin)."""
    deep = nesting_problem(raw)
    if deep is not None:  # before anything walks it (recursively)
        raise ManifestError([deep], source)
    r = _Resolver(raw)
    known = set(CORE_SECTIONS) | set(COMPONENT_SECTIONS) | {"plugins"}
    for key in raw:
        if key not in known:
            r.problem(key, "unknown section" + _suggest(key, sorted(known)))

    core = {k: r.core(k, cls) for k, cls in CORE_SECTIONS.items()}
    comps: dict[str, Any] = {}
    for key, (is_list, required, default) in COMPONENT_SECTIONS.items():
        table = raw.get(key, default)
        if table is None:
            if required:
                r.problem(key, "required section is missing")
            comps[key] = [] if is_list else None
            continue
        if key == "teacher" and isinstance(table, dict) and "network" not in table:
            if "backbone" in table:
                r.problem("teacher.backbone", "the teacher's network is now "
                          "[teacher.network] (name = \"imagenet_classifier\") with its "
                          "backbone in [teacher.network.backbone]")
                table = {k: v for k, v in table.items() if k != "backbone"}
            table = {**table, "network": {"name": DEFAULT_TEACHER_NETWORK,
                                          "backbone": raw.get("backbone")}}
        if is_list:
            if not isinstance(table, list) or (required and not table):
                r.problem(key, f"expected an array of tables ([[{key}]]), "
                               f"got {_value_repr(table)}")
                comps[key] = []
                continue
            comps[key] = r.nested(key, table, key) if table else []
        else:
            comps[key] = r.component(COMPONENT_KEYS[key], table, key)

    _cross_checks(core, comps, r)
    if r.problems:  # in the order of the manifest's sections (stable within one)
        order = {k: i for i, k in enumerate(SECTION_ORDER)}
        r.problems.sort(key=lambda p: order.get(re.split(r"[.\[]", p.path)[0], -1))
        raise ManifestError(r.problems, source)
    return Manifest(
        run=core["run"], data_cfg=core["data"], model=core["model"], train=core["train"],
        evaluation=core["evaluation"], source=source, plugins=plugins_used(r.nodes),
        **comps,
    )


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
    for key, (is_list, _, _) in COMPONENT_SECTIONS.items():
        value = getattr(manifest, key)
        if value:
            r.nested(key, value, key) if is_list else r.component(COMPONENT_KEYS[key],
                                                                   value, key)
    return r.nodes


def _cross_checks(core: dict[str, Any], comps: dict[str, Any], r: _Resolver) -> None:
    """Checks that span sections: can the head, sampler and teacher feed every loss; the
    components' own ``check_manifest`` hooks; metric names."""
    from zsbir.wiring import check_wiring

    by_path = {n.path: n for n in r.nodes}
    plain = {**{k: dataclasses.asdict(v) for k, v in core.items()},
             **{k: v for k, v in comps.items() if v is not None}}
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


# ---------------------------------------------------------------------------- TOML writing
_BARE = re.compile(r"^[A-Za-z0-9_\-]+$")


def _key(k: str) -> str:
    return k if _BARE.match(k) else _str(k)


def _str(s: str) -> str:
    out = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{out}"'


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if v != v else
                                                  ("inf" if v > 0 else "-inf"))
    if isinstance(v, (str, Path)):
        return _str(str(v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_scalar(x)}" for k, x in v.items()
                               if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(data: Mapping[str, Any]) -> str:
    """Write plain data (tables, arrays of tables, scalars) as TOML; ``None`` is omitted."""
    lines: list[str] = []

    def table(prefix: str, d: Mapping[str, Any], header: str | None) -> None:
        scalars = [(k, v) for k, v in d.items() if v is not None and not _is_table(v)]
        subs = [(k, v) for k, v in d.items() if _is_table(v)]
        if header is not None:
            if lines:
                lines.append("")
            lines.append(header)
        lines.extend(f"{_key(k)} = {_scalar(v)}" for k, v in scalars)
        for k, v in subs:
            full = f"{prefix}{_key(k)}"
            if isinstance(v, dict):
                table(full + ".", v, f"[{full}]")
            else:
                for item in v:
                    table(full + ".", item, f"[[{full}]]")

    table("", data, None)
    return "\n".join(lines) + "\n"


def _is_table(v: Any) -> bool:
    return isinstance(v, dict) or (isinstance(v, list) and bool(v)
                                   and all(isinstance(x, dict) for x in v))
