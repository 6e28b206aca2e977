"""Manifest -> Experiment: the one function that turns names into objects.

Read :func:`build` top to bottom to see how a run is assembled. Nothing here is
method-specific: SAKE, SBTKNet and RPKD differ only in the registered names their
manifests give.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zsbir.context import BuildContext, default_cache_dir
from zsbir.data.base import ProtocolData
from zsbir.data.loading import Transform
from zsbir.manifest import Manifest
from zsbir.models.net import RetrievalNet, TeacherNet
from zsbir.registry import _singular, get_registry

log = logging.getLogger(__name__)

__all__ = ["BuildError", "Experiment", "build", "call_component", "resolve_device"]


class BuildError(ValueError):
    """A component rejected its manifest parameters while being built (before training);
    the message names the manifest section and the component."""


@dataclass
class Experiment:
    """Everything a run needs, built and wired."""

    manifest: Manifest
    ctx: BuildContext
    data: ProtocolData
    model: RetrievalNet
    teacher: Any | None
    losses: list[tuple[str, float, torch.nn.Module]]
    sampler: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    hashers: list[Any]
    train_transform: Transform
    eval_transform: Transform
    fingerprint: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device = {name!r} but CUDA is not available here "
                           "(use \"auto\" or \"cpu\")")
    return device


def call_component(kind: str, table: dict[str, Any], ctx: BuildContext,
                   skip: tuple[str, ...] = (), **injected: Any) -> Any:
    """Call a registered component with its manifest parameters plus whatever it asks
    for among ``ctx`` and the ``injected`` values."""
    obj = get_registry(kind).get(table["name"])
    params = {k: v for k, v in table.items() if k != "name" and k not in skip}
    accepted = inspect.signature(obj).parameters
    extra = {"ctx": ctx, **injected}
    params.update({k: v for k, v in extra.items() if k in accepted})
    try:
        return obj(**params)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, BuildError) or type(exc).__module__ != "builtins":
            raise  # a specific error (protocol, weights, ...) already says what is wrong
        raise BuildError(f"{_singular(kind)} {table['name']!r}: {exc}") from exc


def build(manifest: Manifest, run_dir: Path | None = None) -> Experiment:
    """Build the protocol, model, teacher, losses, sampler, optimizer, schedule and
    hashers a manifest names (in that order: later parts use what earlier ones found)."""
    run, train = manifest.run, manifest.train
    ctx = BuildContext(
        device=resolve_device(run.device), seed=run.seed, run_dir=run_dir,
        cache_dir=Path(run.cache_dir).expanduser() if run.cache_dir else default_cache_dir(),
        image_size=manifest.data_cfg.image_size,
    )
    torch.manual_seed(run.seed)  # model initialization is part of the seeded run

    # 1. data: the protocol fixes the seen/unseen classes every later part relies on
    data: ProtocolData = call_component("protocols", manifest.protocol, ctx)
    ctx.seen_classes, ctx.unseen_classes = list(data.seen_classes), list(data.unseen_classes)
    d = manifest.data_cfg
    train_tf = Transform(d.image_size, train=True, augment_prob=d.augment_prob, flip=d.flip,
                         scale=d.scale, rotation=d.rotation, translation=d.translation)
    eval_tf = Transform(d.image_size, train=False)

    # 2. the student: backbone + heads
    backbone = call_component("backbones", manifest.backbone, ctx)
    m = manifest.model
    model = RetrievalNet(backbone, num_classes=len(data.seen_classes), embed_dim=m.embed_dim,
                         heads_on=m.heads_on, imagenet_head=m.imagenet_head, dropout=m.dropout)
    model.to(ctx.device)

    # 3. the teacher: a frozen pretrained network behind a signal strategy
    teacher = None
    if manifest.teacher is not None:
        net_table = manifest.teacher.get("backbone") or manifest.backbone
        network = TeacherNet(call_component("backbones", net_table, ctx)).to(ctx.device)
        teacher = call_component("teachers", manifest.teacher, ctx, skip=("backbone",),
                                 network=network)

    # 4. losses, each with its weight
    losses = [(t["name"], float(t["weight"]),
               call_component("losses", t, ctx, skip=("weight",)).to(ctx.device))
              for t in manifest.losses]

    # 5. batches, optimizer, schedule
    sampler = call_component("samplers", manifest.sampler, ctx, labels=data.train.labels,
                             domains=data.train.domains, batch_size=train.batch_size,
                             seed=run.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    params += [p for _, _, loss in losses for p in loss.parameters() if p.requires_grad]
    optimizer = call_component("optimizers", manifest.optimizer, ctx, params=params)
    steps = len(sampler) if not train.max_steps_per_epoch else min(
        len(sampler), train.max_steps_per_epoch)
    scheduler = call_component("schedulers", manifest.schedule, ctx, optimizer=optimizer,
                               epochs=train.epochs, steps_per_epoch=steps)

    # 6. how embeddings are indexed for retrieval
    hashers = [call_component("hashers", t, ctx) for t in manifest.hashers]

    fingerprint = {
        "protocol": manifest.protocol,
        "train_files": _digest(data.train.sources),
        "teacher_backbone": _with_file_stamp(
            (manifest.teacher or {}).get("backbone") or manifest.backbone),
        "transform": eval_tf.describe(),
        "normalize": d.normalize,
    }
    return Experiment(manifest, ctx, data, model, teacher, losses, sampler, optimizer,
                      scheduler, hashers, train_tf, eval_tf, fingerprint)


def _with_file_stamp(table: dict[str, Any]) -> dict[str, Any]:
    """A backbone table plus its weights file's size and mtime, so that a file replaced
    at the same path invalidates caches keyed by the teacher."""
    weights = table.get("weights")
    if not weights or not Path(weights).expanduser().is_file():
        return dict(table)
    st = Path(weights).expanduser().stat()
    return {**table, "weights_stamp": [st.st_size, st.st_mtime_ns]}


def _digest(items: list[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for s in items:
        h.update(s.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]
