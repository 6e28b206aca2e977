"""Manifest -> objects: the one function every command uses (``build``).

Read :func:`build` top to bottom to see how a run is assembled. Nothing here is
method-specific: SAKE, SBTKNet, RPKD and plugin methods differ only in the registered
names their manifests give. Every component table, at any depth, is built the same way
by :func:`build_component`: the nested component tables its signature marks
(``Nested(kind)``: ``[model.backbone]``, ``[teacher.network]``,
``[teacher.network.backbone]``, ...) first, bottom-up, passed built; those marked
``Factory(kind)`` (``[model.head]``) passed as builders the parent calls with what it
provides; plus whatever it asks for among the injected values (``ctx``, ...). Each call
below passes them through :func:`zsbir.injection.supply`, which checks that they are
exactly what :data:`zsbir.injection.SUPPLIED` declares for the kind: the table validation
reads (:data:`zsbir.registry.INJECTED`) follows from these call sites.

Purposes:

- ``"train"``: everything (``zsbir run``, ``zsbir bench``);
- ``"evaluate"``: protocol data, model, hashers, rerankers and the pair scorer; no teacher,
  losses or optimizer (scoring a model, trained or not: ``zsbir evaluate RUN_DIR``); with a
  self-contained checkpoint (``final.pt``) pretrained weights are not read, and the model
  is built for the checkpoint's classes (its classifier), whatever protocol scores it;
- ``"embed"``: model, transform and hashers from a checkpoint, no data
  (``zsbir index``, ``zsbir search``, ``zsbir serve``): pretrained weights are not read,
  the checkpoint's replace them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from zsbir.context import BuildContext, default_cache_dir
from zsbir.data.base import ProtocolData
from zsbir.data.check import build_protocol
from zsbir.data.loading import DomainTransforms, Transform
from zsbir.engine.checkpoint import load_model_checkpoint
from zsbir.engine.param_groups import param_groups, trainable_owners
from zsbir.engine.step import loss_labels
from zsbir.injection import supply
from zsbir.manifest import RESERVED, Manifest, Marker, markers
from zsbir.models.inputs import InputConfig, from_pretrained_cfg
from zsbir.progress import phase
from zsbir.registry import INJECTED, _singular, get_registry

log = logging.getLogger(__name__)

__all__ = ["BuildError", "Experiment", "Purpose", "build", "build_component",
           "build_pair_scorer", "check_outputs", "resolve_device", "transforms_for"]

Purpose = Literal["train", "evaluate", "embed"]


class BuildError(ValueError):
    """A component rejected its manifest parameters while being built (before training);
    the message names the manifest section and the component."""


@dataclass
class Experiment:
    """Everything a run needs, built and wired (fields a purpose does not need are
    ``None`` or empty)."""

    manifest: Manifest
    ctx: BuildContext
    data: ProtocolData | None
    model: torch.nn.Module
    teacher: Any | None
    losses: list[tuple[str, float, torch.nn.Module]]
    sampler: Any
    optimizer: torch.optim.Optimizer | None
    scheduler: Any
    hashers: list[Any]
    train_transform: DomainTransforms
    eval_transform: DomainTransforms
    fingerprint: dict[str, Any] = field(default_factory=dict)
    step: Any = None
    rerankers: list[Any] = field(default_factory=list)
    purpose: str = "train"
    #: ``[pair_scorer]`` built (``None`` without one): :mod:`zsbir.pairs`
    pair_scorer: Any = None

    @property
    def transforms(self) -> dict[str, dict[str, Transform]]:
        """Per domain (``"sketch"``, ``"photo"``): ``{"train": ..., "eval": ...}``."""
        return {d: {"train": self.train_transform.for_domain(d),
                    "eval": self.eval_transform.for_domain(d)} for d in ("sketch", "photo")}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BuildError(f"run.device = {name!r} but CUDA is not available here "
                         "(use \"auto\" or \"cpu\")")
    return device


def build_component(kind: str, table: dict[str, Any], ctx: BuildContext,
                    skip: tuple[str, ...] = (), **injected: Any) -> Any:
    """Build a resolved component table: the nested tables its signature marks first
    (``Nested``: built, bottom-up; ``Factory``: passed as ``factory(**provided)``), then
    the component with its parameters plus whatever it asks for among ``ctx`` and the
    ``injected`` values (each listed in :data:`zsbir.registry.INJECTED` for ``kind``).
    The kind's reserved keys (a loss's ``weight``) and ``skip`` are not passed."""
    unlisted = set(injected) - INJECTED.get(kind, frozenset())
    if unlisted:  # the one table validation reads must name what building supplies
        raise TypeError(f"build_component({kind!r}) was given {', '.join(sorted(unlisted))}, "
                        f"which zsbir.registry.INJECTED[{kind!r}] does not list")
    obj = get_registry(kind).get(table["name"])
    accepted = inspect.signature(obj).parameters
    marks = markers(obj)
    reserved = {"name", *RESERVED.get(kind, {}), *skip}
    params: dict[str, Any] = {}
    for key, value in table.items():
        if key in reserved:
            continue
        if key in marks and value is not None:
            value = _build_marked(marks[key], value, ctx)
        params[key] = value
    if not ctx.load_pretrained:  # a checkpoint's weights replace the pretrained ones
        if "pretrained" in accepted:
            params["pretrained"] = False
        if "weights" in accepted:
            params["weights"] = accepted["weights"].default if accepted[
                "weights"].default is not inspect.Parameter.empty else None
    params.update({k: v for k, v in {"ctx": ctx, **injected}.items() if k in accepted})
    try:
        return obj(**params)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, BuildError) or type(exc).__module__ != "builtins":
            raise  # a specific error (protocol, weights, ...) already says what is wrong
        raise BuildError(f"{_singular(kind)} {table['name']!r}: {exc}") from exc


def _build_marked(mark: Marker, value: Any, ctx: BuildContext) -> Any:
    """A marked parameter's table (or array of tables): built (with ``ctx`` alone: a
    nested component gets nothing else), or a builder its parent calls with what it
    provides (a model: ``head(**supply("heads", ...))``)."""
    def one(t: dict[str, Any]) -> Any:
        if mark.factory:
            return functools.partial(build_component, mark.kind, t, ctx)
        return build_component(mark.kind, t, ctx)

    return [one(t) for t in value] if mark.many else one(value)


def _input_config(model: Any, domain: str) -> InputConfig:
    if hasattr(model, "input_config"):
        return model.input_config(domain)
    return from_pretrained_cfg(getattr(model, "pretrained_cfg", None))  # a bare backbone


def transforms_for(manifest: Manifest, model: Any, recorded: dict[str, Any] | None = None
                   ) -> tuple[DomainTransforms, DomainTransforms]:
    """(train, eval) transforms, one per domain: the manifest's augmentation, and the
    normalization and resize filter of the model's input configuration for that domain
    (``model.input_config(domain)``; a bare backbone: its ``pretrained_cfg``), or the one
    a checkpoint ``recorded`` when the model was trained
    (:func:`zsbir.models.inputs.input_record`)."""
    from zsbir.models.inputs import from_record

    d = manifest.data_cfg
    train: dict[str, Transform] = {}
    evaluation: dict[str, Transform] = {}
    for domain in ("photo", "sketch"):
        cfg = (from_record(recorded[domain]) if recorded and domain in recorded
               else _input_config(model, domain))
        norm: dict[str, Any] = ({"mean": tuple(cfg.mean), "std": tuple(cfg.std)}
                                if d.normalize == "backbone" else {"mean": None, "std": None})
        common = dict(size=cfg.size or d.image_size, interpolation=cfg.interpolation, **norm)
        train[domain] = Transform(train=True, augment_prob=d.augment_prob, flip=d.flip,
                                  scale=d.scale, rotation=d.rotation,
                                  translation=d.translation, **common)
        evaluation[domain] = Transform(train=False, **common)
    if train["photo"].size != train["sketch"].size:
        raise BuildError(f"the model takes {train['sketch'].size}-pixel sketches and "
                         f"{train['photo'].size}-pixel photos; batches mix both domains, so "
                         "the input sizes must agree")
    return DomainTransforms(**train), DomainTransforms(**evaluation)


def build(manifest: Manifest, purpose: Purpose = "train", run_dir: Path | None = None,
          checkpoint: dict[str, Any] | None = None) -> Experiment:
    """Build what a manifest names, for ``purpose`` (see the module docstring), in this
    order (later parts use what earlier ones found): protocol, model (``[model]``: e.g.
    backbone + head), teacher, losses, step, sampler, optimizer, schedule, hashers, rerankers,
    pair scorer.

    ``checkpoint``: a checkpoint dict (``final.pt``, ``best.pt``): the model's weights (and
    the hashers' fitted state, and the class lists for ``embed``) come from it.
    """
    if purpose not in ("train", "evaluate", "embed"):
        raise ValueError(f"unknown build purpose {purpose!r}")
    if purpose == "embed" and checkpoint is None:
        raise ValueError("build(purpose='embed') needs the checkpoint holding the weights")
    run, train = manifest.run, manifest.train
    ctx = BuildContext(
        device=resolve_device(run.device), seed=run.seed, run_dir=run_dir,
        cache_dir=Path(run.cache_dir).expanduser() if run.cache_dir else default_cache_dir(),
        image_size=manifest.data_cfg.image_size, purpose=purpose,
        # a self-contained checkpoint (final.pt) replaces the pretrained weights: not read
        load_pretrained=checkpoint is None or bool(checkpoint.get("base")),
    )
    torch.manual_seed(run.seed)  # model initialization is part of the seeded run
    training = purpose == "train"

    # 1. data: the protocol fixes the seen/unseen classes every later part relies on
    data: ProtocolData | None = None
    if purpose == "embed":
        assert checkpoint is not None
        ctx.seen_classes = list(checkpoint["classes"]["seen"])
        ctx.unseen_classes = list(checkpoint["classes"]["unseen"])
    else:
        with phase("indexing the protocol's files"):  # checked first (zsbir data check)
            data = build_protocol(manifest.protocol, ctx, **supply("protocols"))
        ctx.seen_classes, ctx.unseen_classes = list(data.seen_classes), list(data.unseen_classes)

    # 2. the student ([model]: backbone + head by default); the transforms follow its
    # input configuration per domain
    # the model as it was trained: with a checkpoint, its classifier (and any part built
    # from class names) follows the checkpoint's classes, whatever protocol scores it
    trained = (checkpoint or {}).get("classes")
    model_ctx = ctx if not trained else dataclasses.replace(
        ctx, seen_classes=list(trained["seen"]), unseen_classes=list(trained["unseen"]))
    with phase("building the model"):
        model = build_component("models", manifest.model, model_ctx,
                                **supply("models", num_classes=len(model_ctx.seen_classes)))
    if checkpoint is not None:  # over the verified base weights when it holds only those
        load_model_checkpoint(model, checkpoint, manifest.data)
    model.to(ctx.device)
    train_tf, eval_tf = transforms_for(manifest, model, (checkpoint or {}).get("inputs"))

    # 3. the teacher: a frozen network ([teacher.network]) behind a signal strategy
    teacher = None
    if training and manifest.teacher is not None:
        with phase("building the teacher"):
            teacher = build_component("teachers", manifest.teacher, ctx,
                                      **supply("teachers", model=model))
            if callable(getattr(teacher, "to", None)):
                teacher.to(ctx.device)

    # 4. losses (each with its weight and a unique log label) and the training step
    losses: list[tuple[str, float, torch.nn.Module]] = []
    step = sampler = optimizer = scheduler = None
    if training:
        labels = loss_labels([t["name"] for t in manifest.losses])
        with phase("building the losses"):  # SAKE's WordNet matrix is computed here
            losses = [(label, float(t["weight"]),
                       build_component("losses", t, ctx, **supply("losses")).to(ctx.device))
                      for label, t in zip(labels, manifest.losses)]
        step = build_component("steps", train.step, ctx, **supply("steps", model=model))
        if isinstance(step, torch.nn.Module):
            step.to(ctx.device)

        # 5. batches, optimizer, schedule
        sampler = build_component("samplers", manifest.sampler, ctx, **supply(
            "samplers", labels=data.train.labels, domains=data.train.domains,
            batch_size=train.batch_size, seed=run.seed))
        # every trainable parameter, wherever it lives, named by its owner and grouped by
        # [[optimizer.groups]] and the modules' hooks (zsbir.engine.param_groups)
        groups = param_groups(trainable_owners(model, losses, step, teacher),
                              manifest.optimizer.get("groups") or ())
        optimizer = build_component("optimizers", manifest.optimizer, ctx, skip=("groups",),
                                    **supply("optimizers", params=groups))
        steps = len(sampler) if not train.max_steps_per_epoch else min(
            len(sampler), train.max_steps_per_epoch)
        scheduler = build_component("schedulers", manifest.schedule, ctx, **supply(
            "schedulers", optimizer=optimizer, epochs=train.epochs, steps_per_epoch=steps))

    # 6. how embeddings are indexed and re-ranked for retrieval
    hashers = [build_component("hashers", t, ctx, **supply("hashers")) for t in manifest.hashers]
    if checkpoint is not None and checkpoint.get("hashers"):
        for h, saved in zip(hashers, checkpoint["hashers"]):
            h.load_state_dict(saved["state"])
    rerankers = [build_component("rerankers", t, ctx, **supply("rerankers"))
                 for t in manifest.rerankers]
    # 7. the pair scorer (zsbir.pairs): given the model, whose submodules it may read; the
    # per-item outputs it and the rerankers read are checked now, not after training
    pair_scorer = build_pair_scorer(manifest, ctx, model)
    check_outputs(model, [("[pair_scorer]", pair_scorer),
                          *((f"rerankers[{i}]", r) for i, r in enumerate(rerankers))],
                  str(manifest.model.get("name", "?")), eval_tf.for_domain("photo").size,
                  ctx.device)

    fingerprint: dict[str, Any] = {}
    if data is not None:
        fingerprint = {
            "protocol": manifest.protocol,
            "train_files": _digest(data.train.sources),
            "teacher_network": _with_file_stamps((manifest.teacher or {}).get("network")),
            "transform": eval_tf.describe(),
        }
    return Experiment(manifest, ctx, data, model, teacher, losses, sampler, optimizer,
                      scheduler, hashers, train_tf, eval_tf, fingerprint, step, rerankers,
                      purpose, pair_scorer)


def build_pair_scorer(manifest: Manifest, ctx: BuildContext, model: torch.nn.Module
                      ) -> Any:
    """``[pair_scorer]`` built with ``model`` injected (``None`` without the section).
    Evaluation rebuilds it around the weights it scores (:mod:`zsbir.engine.pair_eval`)."""
    if manifest.pair_scorer is None:
        return None
    scorer = build_component("pair_scorers", manifest.pair_scorer, ctx,
                             **supply("pair_scorers", model=model))
    if isinstance(scorer, torch.nn.Module):
        scorer.to(ctx.device)
    return scorer


def check_outputs(model: torch.nn.Module, components: list[tuple[str, Any]],
                  model_name: str, size: int, device: torch.device) -> None:
    """:class:`BuildError` when the model does not give an output that a component
    (``(manifest section, object)``: the pair scorer, a reranker) declares in ``outputs``:
    one forward pass of a random sketch and photo in eval mode (no state changes; the
    global RNG is not touched)."""
    from zsbir.pairs.base import outputs_of

    wanted = [(where, n) for where, c in components if c is not None
              for n in outputs_of(c) if n != "embedding"]
    if not wanted:
        return
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=g).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            got = model(x, torch.tensor([1, 0], device=device))
    finally:
        model.train(was_training)
    for where, name in wanted:
        if name not in got:
            raise BuildError(f"{where} reads the model output {name!r}, which model "
                             f"{model_name!r} does not give (it gives "
                             f"{', '.join(map(repr, got))})")


def _with_file_stamps(table: Any) -> Any:
    """A component table plus, for every ``weights`` file in it (nested tables too), its
    size and mtime, so that a file replaced at the same path invalidates caches."""
    if isinstance(table, list):
        return [_with_file_stamps(t) for t in table]
    if not isinstance(table, dict):
        return table
    out = {k: _with_file_stamps(v) for k, v in table.items()}
    weights = table.get("weights")
    if isinstance(weights, str) and weights and Path(weights).expanduser().is_file():
        st = Path(weights).expanduser().stat()
        out["weights_stamp"] = [st.st_size, st.st_mtime_ns]
    return out


def _digest(items: list[str]) -> str:
    h = hashlib.sha256()
    for s in items:
        h.update(s.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]
