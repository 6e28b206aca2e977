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
from typing import Any, Literal

from zsbir.constraints import constraints_of
from zsbir.registry import INJECTED, Component, RegistryError, get_registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "DataConfig", "EvalConfig", "Manifest", "ManifestError", "ModelConfig", "Problem",
    "RunConfig", "TrainConfig", "apply_overrides", "dump_toml", "load", "resolve",
]


# ---------------------------------------------------------------------------- core sections
@dataclass
class RunConfig:
    """``[run]``: where results go and how the run is seeded."""

    name: str = "run"
    #: results land in ``output_dir/name`` (relative paths: to the working directory)
    output_dir: str = "runs"
    seed: int = 0
    #: "auto" picks CUDA when available, else CPU; or "cpu", "cuda", "cuda:1", "mps"
    device: str = "auto"
    #: where caches (file indexes, teacher targets, WordNet) go; default ~/.cache/zsbir
    cache_dir: str = ""
    #: refuse to reuse a run directory that already holds results
    overwrite: bool = False


@dataclass
class DataConfig:
    """``[data]``: image decoding, augmentation and loading."""

    image_size: int = 224
    #: data-loader worker processes; -1 = automatic (CUDA: one per core, at most 8;
    #: CPU: one, so that decoding overlaps compute without starving it)
    workers: int = -1
    #: SAKE's recipe: with this probability, a random affine transform + flip
    augment_prob: float = 0.7
    flip: bool = True
    scale: list[float] = field(default_factory=lambda: [0.7, 1.3])
    rotation: float = 30.0
    translation: float = 10.0
    normalize: Literal["imagenet", "none"] = "imagenet"
    #: an unreadable image: "skip" it (reported and counted) or "fail" the run
    on_corrupt: Literal["skip", "fail"] = "skip"
    #: images per batch when embedding for evaluation
    eval_batch_size: int = 64


@dataclass
class ModelConfig:
    """``[model]``: the heads on top of the backbone's pooled features.

    SAKE (Liu et al., ICCV 2019) stacks them: features -> embedding (d) -> classifier and
    ImageNet head, both on the embedding. SBTKNet (Tursun et al.) puts FC_sim, FC_id and
    FC_soft side by side on the pooled features: ``heads_on = "features"``.
    """

    embed_dim: int = 512
    #: what the seen-class classifier and ImageNet head read: the embedding or the features
    heads_on: Literal["embedding", "features"] = "embedding"
    #: "svd": SAKE's truncated-SVD init from the pretrained classifier (needs heads_on =
    #: embedding); "pretrained": copy the pretrained classifier (heads_on = features);
    #: "random"; "none": no ImageNet head
    imagenet_head: Literal["svd", "pretrained", "random", "none"] = "none"
    #: also initialize the embedding layer by SVD when imagenet_head = "svd"
    dropout: float = 0.0


@dataclass
class TrainConfig:
    """``[train]``: the loop."""

    epochs: int = 20
    batch_size: int = 40
    #: stop an epoch after this many steps (0 = the sampler's full epoch)
    max_steps_per_epoch: int = 0
    #: save a resumable checkpoint every N steps (0 = only at epoch ends)
    checkpoint_every: int = 200
    #: evaluate seen-class validation accuracy every N epochs (0 = never)
    val_every: int = 1
    #: stop when validation accuracy has not improved for N epochs (0 = never)
    early_stopping: int = 0
    #: which weights are evaluated at the end: the best validation epoch or the last
    select: Literal["best_val", "last"] = "best_val"
    #: clip the gradient norm (0 = off)
    grad_clip: float = 0.0
    log_every: int = 10
    #: mixed precision: "auto" = bf16 autocast on CUDA, off on CPU (fp32 master weights,
    #: losses computed in fp32)
    amp: Literal["auto", "bf16", "off"] = "auto"
    #: channels-last memory format: "auto" = on for CUDA
    channels_last: Literal["auto", "on", "off"] = "auto"
    #: torch.compile the student and the online teacher ("reduce-overhead" adds CUDA graphs,
    #: for small batches such as SAKE's 40)
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"


@dataclass
class EvalConfig:
    """``[evaluation]``: what is measured on the unseen classes."""

    metrics: list[str] = field(default_factory=lambda: ["map@all", "p@100"])
    #: also score generalized ZS-SBIR: seen-class photos join the gallery (SBTKNet Table 3)
    generalized: bool = False
    #: also score photo-to-photo retrieval among unseen photos (ZS-PBIR, SAKE Table 4)
    pbir: bool = False
    per_class: bool = False
    #: queries shown in the retrieval grid PNG (0 = no grid)
    grid_queries: int = 6
    grid_top: int = 10
    #: queries per chunk in the ranking engine (0 = from a memory budget)
    chunk_size: int = 0


CORE_SECTIONS: dict[str, type] = {
    "run": RunConfig, "data": DataConfig, "model": ModelConfig, "train": TrainConfig,
    "evaluation": EvalConfig,
}
#: component sections: key -> (registry kind, is a list, required, default table, reserved keys)
COMPONENT_SECTIONS: dict[str, tuple[str, bool, bool, Any, dict[str, Any]]] = {
    "protocol": ("protocols", False, True, None, {}),
    "backbone": ("backbones", False, True, None, {}),
    "teacher": ("teachers", False, False, None, {"backbone": None}),
    "losses": ("losses", True, True, None, {"weight": 1.0}),
    "sampler": ("samplers", False, False, {"name": "random"}, {}),
    "optimizer": ("optimizers", False, False, {"name": "adam"}, {}),
    "schedule": ("schedulers", False, False, {"name": "constant"}, {}),
    "hashers": ("hashers", True, False, [{"name": "none"}], {}),
}
SECTION_ORDER = ("run", "protocol", "data", "backbone", "model", "teacher", "losses",
                 "sampler", "optimizer", "schedule", "train", "hashers", "evaluation")


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
    every default filled in, and the plain-data form (``data``) saved with runs."""

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
    source: str = "<manifest>"

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
                if value is not None:
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
    return apply_overrides(raw, overrides, source=str(path))


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
        try:
            _set_path(raw, key, value)
        except (KeyError, IndexError, TypeError) as exc:
            problems.append(Problem(f"--set {key}", str(exc).strip("'\"")))
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
def _core(cls: type, table: Any, path: str, problems: list[Problem]) -> Any:
    if not isinstance(table, dict):
        problems.append(Problem(path, f"expected a table, got {_value_repr(table)}"))
        return cls()
    values = validate_params(cls, "", table, path, problems)
    try:
        return cls(**values)
    except TypeError:
        return cls()


def _component(kind: str, table: Any, path: str, problems: list[Problem],
               reserved: dict[str, Any]) -> tuple[dict[str, Any] | None, Component | None]:
    if not isinstance(table, dict):
        problems.append(Problem(path, f"expected a table, got {_value_repr(table)}"))
        return None, None
    name = table.get("name")
    if not isinstance(name, str):
        problems.append(Problem(f"{path}.name", "required: the registered component's name"
                                + (f", got {_value_repr(name)}" if name is not None else "")))
        return None, None
    registry = get_registry(kind)
    try:
        comp = registry.component(name)
    except RegistryError as exc:
        problems.append(Problem(f"{path}.name", str(exc)))
        return None, None
    params = validate_params(comp.obj, kind, table, path, problems,
                             skip=("name", *reserved))
    resolved: dict[str, Any] = {"name": name}
    for key, default in reserved.items():
        value = table.get(key, default)
        if key == "weight":
            value = check_type(value, float, f"{path}.weight", problems)
        if value is not None:
            resolved[key] = value
    resolved.update(params)
    return resolved, comp


def resolve(raw: Mapping[str, Any], source: str = "<manifest>") -> Manifest:
    """Validate a manifest dict; fill defaults; raise :class:`ManifestError` listing every
    problem. Nothing is built here except registry lookups (which may import a plugin)."""
    problems: list[Problem] = []
    known = set(CORE_SECTIONS) | set(COMPONENT_SECTIONS)
    for key in raw:
        if key not in known:
            problems.append(Problem(key, "unknown section" + _suggest(key, sorted(known))))

    core = {k: _core(cls, raw.get(k, {}), k, problems) for k, cls in CORE_SECTIONS.items()}
    comps: dict[str, Any] = {}
    classes: dict[str, Any] = {}
    for key, (kind, is_list, required, default, reserved) in COMPONENT_SECTIONS.items():
        table = raw.get(key, default)
        if table is None:
            if required:
                problems.append(Problem(key, "required section is missing"))
            comps[key] = [] if is_list else None
            continue
        if is_list:
            if not isinstance(table, list) or not table:
                problems.append(Problem(key, f"expected an array of tables ([[{key}]]), "
                                             f"got {_value_repr(table)}"))
                comps[key] = []
                continue
            comps[key], classes[key] = [], []
            for i, t in enumerate(table):
                r, c = _component(kind, t, f"{key}[{i}]", problems, reserved)
                comps[key].append(r)
                classes[key].append(c)
        else:
            comps[key], classes[key] = _component(kind, table, key, problems, reserved)

    _cross_checks(core, comps, classes, raw, problems)
    if problems:
        raise ManifestError(problems, source)
    return Manifest(
        run=core["run"], data_cfg=core["data"], model=core["model"], train=core["train"],
        evaluation=core["evaluation"], source=source,
        **{k: v for k, v in comps.items()},
    )


def _cross_checks(core: dict[str, Any], comps: dict[str, Any], classes: dict[str, Any],
                  raw: Mapping[str, Any], problems: list[Problem]) -> None:
    """Checks that span sections: can the sampler and teacher feed every loss, etc."""
    model: ModelConfig = core["model"]
    train: TrainConfig = core["train"]
    # teacher network: [teacher.backbone] or the student's backbone table
    teacher = comps.get("teacher")
    if teacher is not None and isinstance(raw.get("teacher"), dict):
        tb = raw["teacher"].get("backbone")
        if tb is not None:
            resolved, _ = _component("backbones", tb, "teacher.backbone", problems, {})
            teacher["backbone"] = resolved
            tb_pretrained = (resolved or {}).get("pretrained", True)
        else:
            tb_pretrained = (comps.get("backbone") or {}).get("pretrained", True)
        if tb_pretrained is False and not (teacher.get("backbone") or {}).get("weights") \
                and not (comps.get("backbone") or {}).get("weights"):
            problems.append(Problem(
                "teacher", "the teacher network needs ImageNet weights, but its backbone has "
                "pretrained = false (set backbone.pretrained = true or give [teacher.backbone])"))
    sampler_cls = classes.get("sampler")
    structure = getattr(sampler_cls.obj, "structure", "items") if sampler_cls else "items"
    for i, (loss, comp) in enumerate(zip(comps.get("losses") or [], classes.get("losses") or [])):
        if loss is None or comp is None:
            continue
        needs = getattr(comp.obj, "requires", frozenset())
        path = f"losses[{i}]"
        keys = getattr(comp.obj, "teacher_keys", frozenset())
        t_comp = classes.get("teacher")
        provides = getattr(t_comp.obj, "provides", None) if t_comp is not None else None
        if teacher is not None and provides is not None and not keys <= provides:
            problems.append(Problem(path, f"loss {loss['name']!r} reads the teacher signal's "
                                          f"{', '.join(sorted(keys - provides))}, which teacher "
                                          f"{teacher['name']!r} does not provide "
                                          f"(it provides {', '.join(sorted(provides))})"))
        if "teacher" in needs and teacher is None:
            problems.append(Problem(path, f"loss {loss['name']!r} needs a teacher signal: "
                                          "add a [teacher] table (e.g. name = \"online\")"))
        if "imagenet_head" in needs and model.imagenet_head == "none":
            problems.append(Problem(path, f"loss {loss['name']!r} needs an ImageNet head: set "
                                          "model.imagenet_head (\"svd\", \"pretrained\" or "
                                          "\"random\")"))
        if "quadruplet" in needs and structure != "quadruplet":
            problems.append(Problem(path, f"loss {loss['name']!r} needs quadruplet batches: "
                                          "set [sampler] name = \"quadruplet\""))
    if model.imagenet_head == "svd" and model.heads_on != "embedding":
        problems.append(Problem("model.imagenet_head", "\"svd\" initialization needs "
                                "model.heads_on = \"embedding\""))
    if model.imagenet_head == "pretrained" and model.heads_on != "features":
        problems.append(Problem("model.imagenet_head", "\"pretrained\" copies the backbone's "
                                "classifier, so it needs model.heads_on = \"features\""))
    for key, value, low in (("train.epochs", train.epochs, 1),
                            ("train.batch_size", train.batch_size, 1),
                            ("model.embed_dim", model.embed_dim, 1),
                            ("data.image_size", core["data"].image_size, 16)):
        if isinstance(value, int) and value < low:
            problems.append(Problem(key, f"must be >= {low}, got {value}"))
    for i, h in enumerate(comps.get("hashers") or []):
        bits = (h or {}).get("bits")
        if isinstance(bits, int) and bits > model.embed_dim:
            problems.append(Problem(f"hashers[{i}].bits", f"{bits} bits exceed model.embed_dim "
                                    f"({model.embed_dim}): a hasher cannot make more bits "
                                    "than the embedding has dimensions"))
    if structure == "quadruplet" and train.batch_size % 4:
        problems.append(Problem("train.batch_size", "the quadruplet sampler needs a multiple "
                                f"of 4 images, got {train.batch_size}"))
    try:
        from zsbir.evaluation import parse_metric
    except ImportError:  # pragma: no cover - evaluation package always ships
        return
    for i, m in enumerate(core["evaluation"].metrics):
        try:
            parse_metric(m)
        except ValueError as exc:
            problems.append(Problem(f"evaluation.metrics[{i}]", str(exc)))


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
