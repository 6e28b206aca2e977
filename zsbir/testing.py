"""The contract suite: every registered component of every kind, built small and checked
against its kind's contract. Public: plugin authors run it from their own tests.

For each name (zsbir's built-ins and every installed plugin's, :mod:`zsbir.registry`),
:func:`check_component` builds the component from its manifest defaults, or from a declared
tiny example, exactly as a manifest would (``zsbir.manifest.resolve_component`` then
``zsbir.build.build_component``, pretrained weights off, CPU), and checks what its kind
promises:

- ``losses``: a finite scalar with a gradient, on random model outputs, batch and teacher
  signal (the batch in the tuple layout the loss needs);
- ``rerankers``: a (Q, G) float matrix, finite, each query's row independent of the other
  queries, and equal to its naive reference (:mod:`zsbir.rerankers.reference`, or the
  component's own ``reference``) on random embeddings (and, for one that reads model
  ``outputs``, random (N, 5) outputs handed as ``query_outputs``/``gallery_outputs``;
  its reference then gets them as ``params["query_outputs"]``/``["gallery_outputs"]``);
- ``backbones``: declares its input configuration (``pretrained_cfg``: mean, std,
  interpolation) and maps (B, 3, H, W) images to (B, ``num_features``) features;
- ``models``: ``forward(image, domain)`` gives a dict with a (B, ``embed_dim``)
  ``embedding``; ``input_config(domain)`` per domain (mean, std, interpolation);
- ``heads`` / ``networks``: a dict of finite (B, ...) tensors (an ``embedding`` for heads);
- ``hashers``: ``fit`` then ``encode`` keeps one code row per item, and ranking the codes
  gives a (Q, k) result;
- ``samplers``: an epoch of batches of valid item indices, whole tuples of its ``roles``,
  the same batches for the same seed;
- ``optimizers``: built from a parameter-group list, one step changes the parameters;
  ``schedulers``: built on an optimizer, stepping keeps the learning rate finite;
- ``teachers``: declares ``provides``; built around a stand-in network and prepared over a
  stand-in training split (``prepare``), returns a finite signal with those keys;
  ``steps``: callable, ``provides`` a set of names;
- ``protocols``: the ``synthetic`` protocol (and any protocol that declares an example) is
  built and its splits checked; a protocol that needs its dataset on disk is skipped
  ``by design``;
- ``pair_scorers``: declares ``tag`` and its ``outputs``; built around a small model
  (its ``example_model`` table, default a ResNet-18 ``backbone_head``) whose outputs on
  random images feed it (through its ``prepare`` when it has one); ``score_pairs`` gives
  (P,) finite scores, each pair's the same in any block of pairs, and equal to its naive
  reference per pair (the component's own ``reference(query_row, gallery_row, params)``,
  on raw outputs, or zsbir's for ``maxsim``);
- ``importers``: callable on a file path, declares ``expects`` (the format it reads) and
  refuses a file of another format with :class:`zsbir.importers.ImportFormatError`;
- ``index_backends``: an index directory of random embeddings (real-valued, and binary
  sign codes with many Hamming ties) written by the backend is searched, with and without a
  class filter, and equals a plain NumPy ranking (ids in order, ties by photo path; scores
  to 1e-5) (:mod:`zsbir.search.backends.reference`);
- a kind a plugin adds: its :class:`zsbir.registry.KindSpec` ``contract``, if it declares
  one (otherwise the component is only built).

**Declaring a tiny example.** A component may carry ``example``: a dict of manifest
parameters used instead of its defaults (``example: ClassVar[dict] = {"depth": 2}`` on a
class, or ``fn.example = {...}`` on a function). Use it when the defaults are slow on a CPU
(large widths) or need a file. zsbir's own examples are in :data:`BUILTIN_EXAMPLES`.

**From a plugin's tests** (one test id per kind/name)::

    import pytest
    from zsbir.testing import assert_contract, contract_cases

    @pytest.mark.parametrize(("kind", "name"), contract_cases(dist="my-plugin"))
    def test_contract(kind, name):
        assert_contract(kind, name)

Checks run on CPU with tiny inputs (seconds for all of them).
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zsbir.registry import (
    _BUILTIN_PACKAGE,
    Component,
    declared,
    discover_plugins,
    get_registry,
    kind_spec,
    kinds,
)

__all__ = ["BUILTIN_EXAMPLES", "BUILTIN_SKIPS", "CONTRACTS", "PAIR_SCORER_MODEL", "ContractSkip",
           "assert_contract", "assert_core_never_names", "assert_registered_by",
           "build", "build_direct", "check_component", "contract_cases", "example_of"]

def _tiny_folder_tree() -> dict[str, Any]:
    """A ROOT/{sketch,photo}/<class>/ tree of 3 classes x 3 small PNGs, in a temp dir."""
    from PIL import Image

    root = Path(tempfile.mkdtemp(prefix="zsbir-contract-folder-"))
    for domain in ("sketch", "photo"):
        for c, cls in enumerate(("ant", "bee", "cat")):
            (root / domain / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (40 * c, 60 * i, 90)).save(
                    root / domain / cls / f"{i}.png")
    return {"root": str(root), "num_unseen": 1, "val_fraction": 0.0,
            "cache_dir": str(root / "cache")}


#: Tiny examples of zsbir's own components whose defaults are slow or need files
#: (kept here so that the components' modules stay as they are); a callable makes its
#: example when called (files in a temporary directory).
BUILTIN_EXAMPLES: dict[tuple[str, str], dict[str, Any] | Callable[[], dict[str, Any]]] = {
    ("protocols", "folder"): _tiny_folder_tree,
    ("backbones", "timm"): {"model": "resnet18"},
    ("protocols", "synthetic"): {"num_classes": 4, "num_unseen": 1, "photos_per_class": 2,
                                 "sketches_per_class": 2, "image_size": 32},
    ("hashers", "itq"): {"bits": 8},
    ("losses", "sake"): {"lambda2": 0.0},  # lambda2 > 0 reads WordNet (not on every machine)
    ("rerankers", "k_reciprocal"): {"k1": 6, "k2": 3},
    ("rerankers", "csls"): {"k": 3},
    ("rerankers", "alpha_qe"): {"k": 3},
    ("rerankers", "aqe"): {"k": 3},
    ("rerankers", "dba"): {"k": 3, "qe_k": 2},
    ("rerankers", "seen_gate"): {"tau": 0.4, "width": 0.1, "beta": 0.3},
    ("rerankers", "seen_suppress_kr"): {"k1": 6, "k2": 3},
    ("rerankers", "seen_gate_kr"): {"k1": 6, "k2": 3, "tau": 0.4, "width": 0.1, "beta": 0.3},
    ("networks", "imagenet_classifier"): {"backbone": {"name": "resnet18"}},
    ("models", "backbone_head"): {"backbone": {"name": "resnet18"}},
    ("models", "towers"): {"sketch": {"name": "resnet18"}, "photo": {"name": "resnet18"}},
}

B, FEAT, EMB, SIZE = 8, 16, 8, 32

#: zsbir's own components whose contract the suite cannot check, and why
BUILTIN_SKIPS: dict[tuple[str, str], str] = {
    ("networks", "imagenet_classifier"): (
        "by design: a teacher network refuses random weights (it is its backbone's "
        "pretrained ImageNet classifier); the end-to-end tests run it with weights"),
}
SEEN = [f"seen{i}" for i in range(12)]
UNSEEN = ["unseen0", "unseen1"]


class ContractSkip(Exception):  # noqa: N818 - a signal, not an error
    """The kind's contract cannot be checked here; the message starts with ``by design:``."""


# ---------------------------------------------------------------------------- building
def example_of(kind: str, name: str, comp: Component | None = None) -> dict[str, Any]:
    """The manifest parameters the suite builds ``kind``/``name`` with: the component's
    own ``example``, else zsbir's :data:`BUILTIN_EXAMPLES` entry, else ``{}`` (defaults)."""
    comp = comp or get_registry(kind).component(name)
    own = getattr(comp.obj, "example", None)
    if isinstance(own, dict):
        return dict(own)
    if comp.package != _BUILTIN_PACKAGE:
        return {}
    example = BUILTIN_EXAMPLES.get((kind, name), {})
    return dict(example() if callable(example) else example)


def _ctx() -> Any:
    from zsbir.context import BuildContext

    return BuildContext(device=torch.device("cpu"), seed=0,
                        cache_dir=Path(tempfile.mkdtemp(prefix="zsbir-contract-")),
                        seen_classes=list(SEEN), unseen_classes=list(UNSEEN), image_size=SIZE,
                        purpose="train", load_pretrained=False)


def build(kind: str, name: str, example: dict[str, Any] | None = None, **injected: Any
          ) -> tuple[Any, dict[str, Any]]:
    """``(object, resolved table)``: ``kind``/``name`` resolved and built as a manifest
    table ``{"name": name, **example}`` would be, with pretrained weights off and the
    ``injected`` values offered (each passed only where the kind injects it and the
    signature asks for it: the suite offers a superset)."""
    from zsbir.build import build_component
    from zsbir.manifest import resolve_component
    from zsbir.registry import INJECTED

    reg = get_registry(kind)
    allowed = INJECTED.get(reg.kind, frozenset()) or frozenset()
    injected = {k: v for k, v in injected.items() if k in allowed}  # what this kind gets
    comp = reg.component(name)
    params = example_of(reg.kind, name, comp) if example is None else dict(example)
    table = resolve_component(reg.kind, {"name": name, **params}, f"{reg.kind}.{name}",
                              source=f"zsbir.testing example of {reg.kind}/{name}")
    torch.manual_seed(0)
    return build_component(reg.kind, table, _ctx(), **injected), table


def build_direct(kind: str, name: str, **given: Any) -> tuple[Any, dict[str, Any]]:
    """``(object, parameters)``: the component called directly with its example's (or its
    signature's default) parameters and the ``given`` objects it asks for, for parts the
    suite stands in for (a teacher's network: a tiny module instead of a pretrained one)."""
    reg = get_registry(kind)
    comp = reg.component(name)
    params = example_of(reg.kind, name, comp)
    sig = inspect.signature(comp.obj).parameters
    for p in sig.values():
        if p.name not in params and p.default is not inspect.Parameter.empty:
            params[p.name] = p.default
    params.update({k: v for k, v in {"ctx": _ctx(), **given}.items() if k in sig})
    params = {k: v for k, v in params.items() if k in sig}
    torch.manual_seed(0)
    return comp.obj(**params), params


# ---------------------------------------------------------------------------- contracts
def _finite(t: torch.Tensor, what: str) -> None:
    assert bool(torch.isfinite(t.detach().float()).all()), f"{what} is not finite"


def _images(n: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, SIZE, SIZE, generator=g), torch.arange(n) % 2


def _tiny_backbone() -> Any:
    obj, _ = build("backbones", "resnet18", {})
    return obj


def _role_order(roles: Iterable[str]) -> tuple[str, ...]:
    rank = {"anchor": 0, "positive": 1}
    return tuple(sorted(roles, key=lambda r: (rank.get(r, 2), r)))


def _loss_inputs(obj: Any, params: dict[str, Any]) -> tuple[dict, dict, dict | None]:
    """Random outputs, a batch of tuples and a teacher signal (when the loss needs one)."""
    g = torch.Generator().manual_seed(1)
    roles = _role_order(declared(obj, "roles", params)) or (
        "anchor", "positive", "negative", "negative_sketch")
    unit = len(roles)
    n = unit * 3
    # per tuple: the anchor and positive share a class, the others another class; the
    # anchor and roles naming a sketch are sketches (the quadruplet layout for 4 roles)
    labels, domains = [], []
    for t in range(n // unit):
        for i, role in enumerate(roles):
            labels.append((2 * t + (0 if i < 2 else 1)) % len(SEEN))
            domains.append(1 if i == 0 or "sketch" in role else 0)
    batch: dict[str, Any] = {
        "image": torch.randn(n, 3, SIZE, SIZE, generator=g),
        "label": torch.tensor(labels), "domain": torch.tensor(domains),
        "index": torch.arange(n), "tuples": torch.arange(n).view(-1, unit),
        "roles": roles,
    }
    out = {"features": torch.randn(n, FEAT, generator=g),
           "embedding": torch.randn(n, EMB, generator=g),
           "logits": torch.randn(n, len(SEEN), generator=g),
           "imagenet_logits": torch.randn(n, 1000, generator=g)}
    for key in declared(obj, "output_keys", params) - set(out):
        out[key] = torch.randn(n, EMB, generator=g)
    for v in out.values():
        v.requires_grad_(True)
    teacher = None
    if "teacher" in declared(obj, "requires", params) or declared(obj, "teacher_keys", params):
        teacher = {"logits": torch.randn(n, 1000, generator=g),
                   "features": torch.randn(n, FEAT, generator=g),
                   "class_features": torch.randn(len(SEEN), FEAT, generator=g)}
        for key in declared(obj, "teacher_keys", params) - set(teacher):
            teacher[key] = torch.randn(n, FEAT, generator=g)
    return out, batch, teacher


def check_loss(comp: Component) -> None:
    """A finite scalar with a gradient to the model outputs (or the loss's parameters)."""
    obj, params = build("losses", comp.name)
    out, batch, teacher = _loss_inputs(obj, params)
    value = obj(out, batch, teacher)
    assert isinstance(value, torch.Tensor), f"returned {type(value).__name__}, not a tensor"
    assert value.numel() == 1 and value.ndim == 0, f"not a scalar: shape {tuple(value.shape)}"
    _finite(value, "the loss")
    assert value.requires_grad, "the loss has no gradient (detached from the outputs)"
    value.backward()
    leaves = [*out.values(), *(obj.parameters() if isinstance(obj, torch.nn.Module) else [])]
    grads = [t.grad for t in leaves if t.grad is not None]
    assert grads, "no gradient reached the model outputs or the loss's parameters"
    for grad in grads:
        _finite(grad, "a gradient")


def _reference(comp: Component) -> Callable[..., np.ndarray] | None:
    own = getattr(comp.obj, "reference", None)
    if callable(own):
        return own
    if comp.package != _BUILTIN_PACKAGE:
        return None
    from zsbir.rerankers import reference as ref

    table: dict[str, Callable[..., np.ndarray]] = {
        "alpha_qe": lambda q, g, p: ref.alpha_qe_ref(q, g, p["k"], p["alpha"]),
        "aqe": lambda q, g, p: ref.alpha_qe_ref(q, g, p["k"], 0.0),
        "dba": lambda q, g, p: ref.dba_ref(q, g, p["k"], p["alpha"], p["qe_k"]),
        "csls": lambda q, g, p: ref.csls_ref(q, g, p["k"]),
        "domain_center": lambda q, g, p: ref.domain_center_ref(q, g),
        "k_reciprocal": lambda q, g, p: (None if p.get("approximate") else
                                         ref.k_reciprocal_ref(q, g, p["k1"], p["k2"],
                                                              p["lambda_value"])),
        "tta": lambda q, g, p: ref.tta_ref(q, g),
        **{name: (lambda q, g, p, name=name: ref.seen_posterior_ref(
            q, g, p["query_outputs"]["logits"], p["gallery_outputs"]["logits"], p["gamma"],
            p["temperature"], "gate" in name, p.get("tau", 0.5), p.get("width", 0.05),
            p.get("beta", 0.0), (p["k1"], p["k2"], p["lambda_value"]) if "kr" in name
            else None))
           for name in ("seen_suppress", "seen_gate", "seen_suppress_kr", "seen_gate_kr")},
    }
    return table.get(comp.name)


def check_reranker(comp: Component) -> None:
    """(Q, G) finite scores, rows independent of the other queries, equal to the naive
    reference where there is one (a reranker's own ``reference(q, g, params)``)."""
    obj, params = build("rerankers", comp.name)
    rng = np.random.default_rng(0)
    nq, ng, d = 6, 12, 8
    views = 1 + len(getattr(obj, "views", ()) or ()) if getattr(obj, "needs_model", False) else 0
    shape = (lambda n: (n, views, d)) if views else (lambda n: (n, d))
    q = rng.normal(size=shape(nq)).astype(np.float32)
    g = rng.normal(size=shape(ng)).astype(np.float32)
    # per-item model outputs it reads (contract: zsbir.rerankers.base), random (N, 5)
    names = tuple(getattr(obj, "outputs", ()) or ())
    qo = {n: 2 * rng.normal(size=(nq, 5)).astype(np.float32) for n in names}
    go = {n: 2 * rng.normal(size=(ng, 5)).astype(np.float32) for n in names}
    kw = {"query_outputs": qo} if names else {}
    fitted = obj.fit(g, q if getattr(obj, "uses_queries", False) else None,
                     **({"gallery_outputs": go, "query_outputs": qo} if names else {}))
    assert fitted is obj or fitted is None, "fit() returns the reranker itself"
    s = np.asarray(obj.scores(q, g, **kw))
    assert s.shape == (nq, ng), f"scores shape {s.shape}, expected {(nq, ng)}"
    assert np.isfinite(s).all(), "scores are not finite"
    part = np.asarray(obj.scores(q[:3], g, **({"query_outputs": {n: v[:3] for n, v in
                                                                  qo.items()}}
                                               if names else {})))
    np.testing.assert_allclose(part, s[:3], atol=1e-5,
                               err_msg="a query's scores depend on the other queries")
    reference = _reference(comp)
    ref_params = {k: v for k, v in params.items() if k != "name"}
    if names:
        ref_params.update(query_outputs=qo, gallery_outputs=go)
    want = reference(q, g, ref_params) if reference is not None else None
    if want is not None:
        np.testing.assert_allclose(s, want, atol=2e-5,
                                   err_msg="the reranker differs from its naive reference")


def _check_input_config(cfg: Any, what: str) -> None:
    for attr in ("mean", "std", "interpolation"):
        assert getattr(cfg, attr, None) is not None, f"{what} has no {attr}"
    assert len(cfg.mean) == 3 and len(cfg.std) == 3, f"{what}: mean/std are not per channel"
    assert all(s > 0 for s in cfg.std), f"{what}: std must be positive"
    assert isinstance(cfg.interpolation, str), f"{what}: interpolation is not a filter name"


def check_backbone(comp: Component) -> None:
    """Declares its input configuration; (B, 3, H, W) -> (B, num_features)."""
    obj, _ = build("backbones", comp.name)
    _check_input_config(getattr(obj, "pretrained_cfg", None), "pretrained_cfg")
    width = getattr(obj, "num_features", None)
    assert isinstance(width, int) and width > 0, f"num_features = {width!r}"
    obj.eval()
    x, dom = _images(2)
    with torch.no_grad():
        try:
            feats = obj(x, dom)
        except RuntimeError:  # a fixed-size model (a ViT): at its declared input size
            size = tuple(getattr(obj.pretrained_cfg, "input_size", ())[-2:])
            if len(size) != 2 or size == (SIZE, SIZE):
                raise
            x = torch.nn.functional.interpolate(x, size=size)
            feats = obj(x, dom)
    assert tuple(feats.shape) == (2, width), f"features {tuple(feats.shape)}, not (2, {width})"
    _finite(feats, "the features")


def _check_outputs(out: Any, n: int, what: str) -> None:
    assert isinstance(out, dict) and out, f"{what} returns {type(out).__name__}, not a dict"
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            assert value.shape[0] == n, f"{what}[{key!r}] has {value.shape[0]} rows, not {n}"
            _finite(value, f"{what}[{key!r}]")


def check_model(comp: Component) -> None:
    """``forward(image, domain)`` -> dict with a (B, embed_dim) embedding; an input
    configuration per domain."""
    obj, _ = build("models", comp.name, num_classes=len(SEEN))
    for domain in ("sketch", "photo"):
        _check_input_config(obj.input_config(domain), f"input_config({domain!r})")
    obj.eval()
    x, dom = _images(4)
    with torch.no_grad():
        out = obj(x, dom)
    _check_outputs(out, 4, "the model's output")
    assert "embedding" in out, "the model's output has no 'embedding'"
    assert tuple(out["embedding"].shape) == (4, obj.embed_dim), (
        f"embedding {tuple(out['embedding'].shape)}, embed_dim {obj.embed_dim}")


def check_head(comp: Component) -> None:
    """Pooled features -> a dict of (B, ...) tensors with an embedding."""
    backbone = _tiny_backbone()
    width = backbone.num_features
    classifier = getattr(backbone, "imagenet_classifier", None)
    obj, _ = build("heads", comp.name, backbone=backbone, num_classes=len(SEEN),
                   in_features=width,
                   classifier=classifier() if callable(classifier) else None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = obj(torch.randn(4, width, generator=g), torch.arange(4) % 2)
    _check_outputs(out, 4, "the head's output")
    assert "embedding" in out, "the head's output has no 'embedding'"


def check_network(comp: Component) -> None:
    """A module; one that takes ``(image, domain)`` maps images to a dict of finite (B, ...)
    tensors (a network of another input, e.g. a text tower, is only built)."""
    obj, _ = build("networks", comp.name)
    assert isinstance(obj, torch.nn.Module), f"{type(obj).__name__} is not an nn.Module"
    names = list(inspect.signature(obj.forward).parameters)
    if names[:2] != ["image", "domain"]:
        return
    obj.eval()
    x, dom = _images(2)
    with torch.no_grad():
        _check_outputs(obj(x, dom), 2, "the network's output")


class _TinyNetwork(torch.nn.Module):
    """A teacher network (or student, for teachers given the model) stand-in: ImageNet
    logits, pooled features and an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, FEAT)
        self.fc = torch.nn.Linear(FEAT, 1000)

    def forward(self, image: torch.Tensor, domain: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        f = self.proj(image.mean(dim=(2, 3)))
        return {"logits": self.fc(f), "features": f, "embedding": f}


class _TrainSplit:
    """A training split stand-in for ``Teacher.prepare``: two items per seen class and
    domain (``of_domain`` keeps it whole: the labels are what a teacher averages over)."""

    def __init__(self) -> None:
        self.labels = np.repeat(np.arange(len(SEEN)), 4)
        self.domains = np.tile(np.array([0, 1]), len(self.labels) // 2)

    def of_domain(self, domain: int) -> _TrainSplit:
        return self

    def __len__(self) -> int:
        return len(self.labels)


def _embed(network: Any, split: _TrainSplit) -> tuple[torch.Tensor, ...]:
    """What the trainer's embedder gives ``prepare``: (N, 1000) logits, (N, F) features and
    (N,) labels of ``split``, here on random images."""
    x, _ = _images(len(split))
    with torch.no_grad():
        out = network(x, torch.as_tensor(split.domains))
    return out["logits"], out["features"], torch.as_tensor(split.labels)


def check_teacher(comp: Component) -> None:
    """Declares ``provides``; prepared over a (stand-in) training split, it returns a signal
    holding those keys, one row per item."""
    from types import SimpleNamespace

    network = _TinyNetwork()  # a teacher network is pretrained: a stand-in here
    obj, params = build_direct("teachers", comp.name, network=network, model=network)
    provides = declared(obj, "provides", params)
    assert provides and all(isinstance(k, str) for k in provides), "provides is empty"
    prepare = getattr(obj, "prepare", None)
    if callable(prepare):
        data = SimpleNamespace(train=_TrainSplit(), seen_classes=list(SEEN),
                               unseen_classes=list(UNSEEN))
        prepare(data=data, embed=_embed, fingerprint={"contract": comp.name})
    x, dom = _images(4)
    signal = obj({"image": x, "domain": dom, "label": torch.arange(4) % len(SEEN),
                  "index": torch.arange(4)})
    assert isinstance(signal, dict) and signal, "the teacher signal is not a dict"
    for key, value in signal.items():  # per item, or per class (class_features)
        if isinstance(value, torch.Tensor):
            _finite(value, f"signal[{key!r}]")
    missing = provides - set(signal)
    assert not missing, f"the signal lacks the keys it provides: {sorted(missing)}"


def check_step(comp: Component) -> None:
    """Callable; ``provides`` (when declared) a set of signal names."""
    obj, params = build("steps", comp.name, model=_TinyNetwork())
    assert callable(obj), "a step is called once per batch"
    provides = declared(obj, "provides", params)
    assert all(isinstance(k, str) for k in provides), "provides holds non-strings"


def check_sampler(comp: Component) -> None:
    """Batches of valid indices, whole tuples, the same for the same seed."""
    labels = np.repeat(np.arange(4), 24)
    domains = np.tile(np.array([0, 1]), len(labels) // 2)
    # 24 items a batch: whole pairs, triplets, quadruplets and sextuplets
    inject = dict(labels=labels, domains=domains, batch_size=24, seed=0)
    obj, _ = build("samplers", comp.name, **inject)
    again, _ = build("samplers", comp.name, **inject)

    def batches(s: Any) -> list[np.ndarray]:
        return [np.asarray(b) for b in (s.epoch(0) if hasattr(s, "epoch") else iter(s))]

    first = batches(obj)
    assert first, "an epoch has no batch"
    unit = len(getattr(obj, "roles", ()) or ()) or 1
    for b in first:
        assert b.ndim == 1 and len(b) > 0, f"a batch of shape {b.shape}"
        assert np.issubdtype(b.dtype, np.integer), f"indices of dtype {b.dtype}"
        assert ((b >= 0) & (b < len(labels))).all(), "an index outside the items"
        assert len(b) % unit == 0, f"a batch of {len(b)} items is not whole {unit}-tuples"
    if hasattr(obj, "__len__"):
        assert len(obj) == len(first), f"len() = {len(obj)} but the epoch has {len(first)}"
    assert all(np.array_equal(a, b) for a, b in zip(first, batches(again))) and \
        len(first) == len(batches(again)), "the same seed gives other batches"


def _param_groups() -> tuple[list[dict[str, Any]], torch.nn.Parameter]:
    p = torch.nn.Parameter(torch.ones(4, 3))
    return [{"params": [p], "name": "default"}], p


def check_optimizer(comp: Component) -> None:
    """Built from a parameter-group list; a step changes the parameters."""
    groups, p = _param_groups()
    obj, _ = build("optimizers", comp.name, params=groups)
    assert isinstance(obj, torch.optim.Optimizer), f"{type(obj).__name__} is no optimizer"
    before = p.detach().clone()
    (p ** 2).sum().backward()
    obj.step()
    _finite(p, "the parameters after a step")
    assert not torch.equal(before, p.detach()), "a step left the parameters unchanged"


def check_scheduler(comp: Component) -> None:
    """Built on an optimizer; stepping over the run keeps the learning rate finite."""
    groups, p = _param_groups()
    opt = torch.optim.SGD(groups, lr=0.1)
    obj, _ = build("schedulers", comp.name, optimizer=opt, epochs=2, steps_per_epoch=3)
    for _ in range(6):
        opt.step()
        obj.step()
        for group in opt.param_groups:
            lr = float(group["lr"])
            assert np.isfinite(lr) and lr >= 0, f"learning rate {lr}"


def check_hasher(comp: Component) -> None:
    """fit/encode keep one code per item; ranking the codes gives (Q, k)."""
    from zsbir.hashing import search

    obj, _ = build("hashers", comp.name)
    feats = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32)
    fitted = obj.fit(feats, seed=0)
    assert fitted is obj or fitted is None, "fit() returns the hasher itself"
    codes = np.asarray(obj.encode(feats))
    assert codes.shape[0] == 40, f"{codes.shape[0]} codes for 40 items"
    binary = codes.dtype == np.uint8
    _, idx = search(codes[:5], codes, 7, binary=binary)
    assert np.asarray(idx).shape == (5, 7), f"ranking of shape {np.asarray(idx).shape}"


def check_protocol(comp: Component) -> None:
    """Built (synthetic, or a declared example): seen/unseen classes and non-empty splits."""
    has_example = getattr(comp.obj, "example", None) is not None or (
        comp.package == _BUILTIN_PACKAGE and ("protocols", comp.name) in BUILTIN_EXAMPLES)
    if not has_example:
        raise ContractSkip("by design: the protocol reads its dataset from disk (declare "
                           "`example` pointing at a tiny copy to check it)")
    obj, _ = build("protocols", comp.name)
    assert obj.seen_classes and obj.unseen_classes, "no seen or no unseen classes"
    assert not set(obj.seen_classes) & set(obj.unseen_classes), "a class is seen and unseen"
    for split in ("train", "query", "gallery"):
        assert len(getattr(obj, split)) > 0, f"split {split} is empty"


#: the [model] table a pair scorer is checked with (a scorer may declare ``example_model``)
PAIR_SCORER_MODEL: dict[str, Any] = {"name": "backbone_head", "backbone": {"name": "resnet18"}}


def check_pair_scorer(comp: Component) -> None:
    """``tag`` and ``outputs`` declared; (P,) finite scores from a model's outputs on random
    images; a pair's score independent of the other pairs of its block; equal to the naive
    per-pair reference where there is one."""
    table = dict(getattr(comp.obj, "example_model", None) or PAIR_SCORER_MODEL)
    model, _ = build("models", table.pop("name"), table, num_classes=len(SEEN))
    obj, params = build("pair_scorers", comp.name, model=model)
    tag, names = getattr(obj, "tag", None), getattr(obj, "outputs", None)
    assert isinstance(tag, str) and tag, f"a pair scorer declares `tag` (got {tag!r})"
    assert isinstance(names, tuple) and names and all(isinstance(n, str) for n in names), \
        f"a pair scorer declares `outputs`, a non-empty tuple of names (got {names!r})"
    model.eval()
    if isinstance(obj, torch.nn.Module):
        obj.eval()
    g = torch.Generator().manual_seed(0)
    size = max(SIZE, 64)  # a few spatial positions: several tokens per image
    x = torch.randn(6, 3, size, size, generator=g)
    with torch.no_grad():
        sk = model(x[:3], torch.ones(3, dtype=torch.long))
        ph = model(x[3:], torch.zeros(3, dtype=torch.long))
    missing = [n for n in names if n not in sk or n not in ph]
    assert not missing, (f"the model ({table or PAIR_SCORER_MODEL}) gives no output "
                         f"{missing}: declare `example_model`, a [model] table that does")
    prepare = getattr(obj, "prepare", None)
    if callable(prepare):  # per-item work: the core hands score_pairs prepared outputs
        with torch.no_grad():
            sk_p, ph_p = dict(prepare({n: sk[n] for n in names})), dict(
                prepare({n: ph[n] for n in names}))
        assert all(len(sk_p[n]) == 3 and len(ph_p[n]) == 3 for n in names), \
            "prepare() keeps every output's items (same names, same lengths)"
    else:
        sk_p, ph_p = sk, ph
    qi = torch.arange(3).repeat_interleave(3)
    gi = torch.arange(3).repeat(3)

    def score(rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return obj.score_pairs({n: sk_p[n][qi[rows]] for n in names},
                                   {n: ph_p[n][gi[rows]] for n in names})

    s = score(torch.arange(9))
    assert isinstance(s, torch.Tensor) and tuple(s.shape) == (9,), \
        f"score_pairs gave {getattr(s, 'shape', type(s).__name__)} for 9 pairs, not (9,)"
    _finite(s, "the pair scores")
    for rows in (torch.arange(4), torch.tensor([8, 2, 5]), torch.arange(9).flip(0)):
        torch.testing.assert_close(score(rows), s[rows], atol=1e-5, rtol=1e-5,
                                   msg="a pair's score depends on the other pairs of its block")
    reference = getattr(comp.obj, "reference", None)
    if not callable(reference) and comp.package == _BUILTIN_PACKAGE and comp.name == "maxsim":
        from zsbir.pairs.reference import maxsim_ref

        def reference(q: dict, d: dict, p: dict) -> float:
            return maxsim_ref(q[p["output"]], d[p["output"]], p["normalize"], p["reduce"])
    if callable(reference):
        p = {k: v for k, v in params.items() if k != "name"}
        want = [reference({n: sk[n][int(qi[i])].numpy() for n in names},
                          {n: ph[n][int(gi[i])].numpy() for n in names}, p) for i in range(9)]
        np.testing.assert_allclose(s.numpy(), np.asarray(want, np.float64), rtol=1e-4,
                                   atol=1e-4, err_msg="the pair scorer differs from its "
                                   "naive reference")


def check_importer(comp: Component) -> None:
    from zsbir.importers import ImportFormatError

    obj, _ = build("importers", comp.name)
    expects = getattr(obj, "expects", "")
    assert isinstance(expects, str) and expects, "an importer declares `expects` (its format)"
    assert callable(obj), "an importer is called with the checkpoint's path"
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "other.pt"
        torch.save({"not": torch.zeros(2)}, other)
        try:
            obj(other)
        except ImportFormatError as exc:
            assert "\n" not in str(exc), "the refusal is one line"
        else:
            raise AssertionError("a file of another format was not refused with "
                                 "ImportFormatError")


def check_index_backend(comp: Component) -> None:
    from zsbir.search.backends import search_loaded
    from zsbir.search.backends.reference import (
        StandInModel,
        index_from_embeddings,
        naive_ranking,
    )
    from zsbir.search.faiss_index import encode

    rng = np.random.default_rng(0)
    paths = sorted(f"c{i % 3}/{i:03d}.png" for i in range(40))
    for binary in (False, True):
        obj, _ = build("index_backends", comp.name)
        emb = rng.standard_normal((len(paths), 12)).astype(np.float32)
        queries = rng.standard_normal((3, 12)).astype(np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            fx, con = index_from_embeddings(obj, Path(tmp) / "idx", emb, paths, binary=binary)
            try:
                h = StandInModel(binary).hasher(None)
                codes = encode(h, queries)
                gallery = encode(h, emb)
                for label, top in ((None, 7), ("c1", 5), (None, len(paths))):
                    values, positions = search_loaded(fx, codes, top, label,
                                                      lambda pos, g=gallery: g[pos])
                    for q, v, p in zip(queries, values, positions):
                        want = naive_ranking(q, emb, paths, top, binary=binary, label=label)
                        got = [fx.paths[int(i)] for i in p]
                        assert got == [w for w, _ in want], (
                            f"binary={binary} label={label}: ranking {got[:5]}... differs "
                            f"from the reference {[w for w, _ in want][:5]}...")
                        np.testing.assert_allclose(np.asarray(v, np.float64),
                                                   [s for _, s in want], atol=1e-5)
            finally:
                con.close()
                close = getattr(obj, "close", None)
                if close is not None:
                    close()


#: kind -> its contract check (a component of a kind a plugin adds uses its KindSpec)
CONTRACTS: dict[str, Callable[[Component], None]] = {
    "losses": check_loss, "rerankers": check_reranker, "backbones": check_backbone,
    "models": check_model, "heads": check_head, "networks": check_network,
    "teachers": check_teacher, "steps": check_step, "samplers": check_sampler,
    "optimizers": check_optimizer, "schedulers": check_scheduler, "hashers": check_hasher,
    "protocols": check_protocol, "importers": check_importer,
    "pair_scorers": check_pair_scorer,
    "index_backends": check_index_backend,
}


def check_component(kind: str, name: str) -> None:
    """Build ``kind``/``name`` small and check its kind's contract: ``AssertionError`` on a
    violation, :class:`ContractSkip` (``by design: ...``) when it cannot be checked here."""
    reg = get_registry(kind)
    comp = reg.component(name)
    if comp.package == _BUILTIN_PACKAGE and (reg.kind, name) in BUILTIN_SKIPS:
        raise ContractSkip(BUILTIN_SKIPS[reg.kind, name])
    check = CONTRACTS.get(reg.kind)
    if check is not None:
        check(comp)
        return
    spec = kind_spec(reg.kind)
    obj, _ = build(reg.kind, name)
    if spec is not None and spec.contract is not None:
        spec.contract(obj, comp)


def contract_cases(kinds_: Iterable[str] | None = None, dist: str | None = None,
                   ) -> list[Any]:
    """``pytest.param(kind, name, id="kind/name")`` for every registered name (of
    ``kinds_``; of the distribution ``dist`` only, e.g. ``"zsbir"`` or a plugin's name).
    Reads metadata only: nothing is imported until a case runs. A name that fails to load
    is a case too (it fails, with the plugin's error)."""
    import pytest

    found = discover_plugins()
    out = []
    for kind in (list(kinds_) if kinds_ is not None else list(kinds())):
        reg = get_registry(kind)
        for name in reg.names():
            entries = found.get(reg.kind, {}).get(name, [])
            owner = entries[0].dist if entries else reg._components[name].package
            if dist is None or owner == dist:
                out.append(pytest.param(reg.kind, name, id=f"{reg.kind}/{name}"))
    return out


def assert_contract(kind: str, name: str) -> None:
    """:func:`check_component` for pytest: a ``by design`` case is skipped with its reason."""
    import pytest

    try:
        check_component(kind, name)
    except ContractSkip as skip:
        pytest.skip(str(skip))


def assert_registered_by(dist: str, components: dict[tuple[str, str], str]
                         ) -> dict[tuple[str, str], Any]:
    """A plugin's packaging, for its tests: each ``(kind, name) -> "module:object"`` is an
    entry point of group ``zsbir.<kind>`` of distribution ``dist`` with that value, and the
    registry's component of that name is that object, reported under ``dist``. Returns the
    registry's components (to check their docs, parameters ...)."""
    import importlib.metadata as md

    from zsbir.registry import get_registry

    found = {}
    for (kind, name), value in components.items():
        eps = {ep.name: ep for ep in md.entry_points(group=f"zsbir.{kind}")}
        assert eps[name].value == value and eps[name].dist.metadata["Name"] == dist
        comp = get_registry(kind).component(name)
        assert comp.package == dist and comp.obj is eps[name].load()
        found[(kind, name)] = comp
    return found


def assert_core_never_names(dist: str) -> None:
    """No file of the zsbir package (.py, .json, .toml) names the plugin ``dist`` or its
    module (``dist`` with ``_``): the core knows no plugin by name."""
    import zsbir

    names = (dist, dist.replace("-", "_"))
    root = Path(zsbir.__file__).parent
    hits = [p for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".json", ".toml")
            and any(n in p.read_text(errors="ignore") for n in names)]
    assert not hits, hits


if __name__ == "__main__":  # pragma: no cover - `python -m zsbir.testing`: a quick report
    import sys

    bad = 0
    for param in contract_cases():
        kind, name = param.values
        try:
            check_component(kind, name)
            print(f"ok    {kind}/{name}")
        except ContractSkip as exc:
            print(f"skip  {kind}/{name}: {exc}")
        except Exception as exc:  # noqa: BLE001
            bad += 1
            print(f"FAIL  {kind}/{name}: {type(exc).__name__}: {exc}")
    sys.exit(1 if bad else 0)

