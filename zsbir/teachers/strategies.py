"""Teacher-signal strategies: ImageNet logits for every item of a training batch.

- ``online`` (SAKE, Liu et al. ICCV 2019, Sec. 3.2): a frozen copy of the pretrained
  network runs on each item of every batch, on the same augmented input and domain bit,
  giving per-item logits t_i.
- ``class_mean`` (SBTKNet, Tursun et al., Sec. 3.3): the frozen network runs once, before
  training, over the training *photos* (no sketches, no augmentation); its logits are
  averaged per class, and every item of class c gets the row mean_logits[c]; the loss
  turns it into q(c) = softmax(mean logits). No teacher forward pass happens during
  training. The table is cached on disk, keyed by the teacher weights, the protocol, the
  split's files and the transform, and reused by later runs.

The network is ``[teacher.network]`` (kind ``networks``; by default an ImageNet classifier
on the student's backbone table), any frozen module returning a signal dict. Either
strategy serves any model with an ImageNet head; the losses (``sake``,
``knowledge_preservation``) decide how logits become targets. A signal is a dict:
``"logits"`` (B, 1000) and ``"features"`` (B, F), the teacher's pooled features (per item
for ``online``, the class mean for ``class_mean``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch

from zsbir.context import BuildContext
from zsbir.registry import Nested, teachers

log = logging.getLogger(__name__)

#: runs the teacher over a split: (network, split) -> (N, 1000) logits, (N, F) features,
#: (N,) labels
Embedder = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class Teacher:
    """Base class: ``prepare`` once before training, then ``teacher(batch)`` per step."""

    #: the keys of the signal it returns (checked against each loss's ``teacher_keys``)
    provides: ClassVar[frozenset[str]] = frozenset({"logits"})
    #: number of teacher forward passes made while training (tests count them)
    forward_calls: int = 0

    def prepare(self, *, data: Any, embed: Embedder, fingerprint: dict[str, Any]) -> None:
        """Work done before training; ``embed`` runs the teacher over a split."""

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def to(self, device: torch.device) -> Teacher:
        return self


@teachers.register("online")
class OnlineTeacher(Teacher):
    """Per-item logits from a frozen pretrained network on the augmented batch
    (SAKE, Liu et al., ICCV 2019: t_i, the teacher signal of Sec. 3.2)."""

    provides: ClassVar[frozenset[str]] = frozenset({"logits", "features"})

    def __init__(self, network: Annotated[torch.nn.Module, Nested("networks")]):
        self.network = network

    def to(self, device: torch.device) -> OnlineTeacher:
        self.network.to(device)
        return self

    @torch.inference_mode()
    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.forward_calls += 1
        signal = self.network(batch["image"], batch["domain"])
        return {k: v.float() for k, v in signal.items()}


@teachers.register("class_mean")
class ClassMeanTeacher(Teacher):
    """Per-class mean teacher logits over the training photos, computed once offline
    (SBTKNet, Tursun et al., "An Efficient Framework for ZS-SBIR", Sec. 3.3 and Fig. 2:
    q(l(I)) = softmax(mean over photos of class l(I) of the teacher's activations)).

    Args:
        domains: which training images are averaged: "photo" (the paper) or "all".
        cache: reuse the table from ``cache_dir/teacher`` when its key matches.
    """

    provides: ClassVar[frozenset[str]] = frozenset({"logits", "features", "class_features"})

    def __init__(self, network: Annotated[torch.nn.Module, Nested("networks")],
                 ctx: BuildContext,
                 domains: Literal["photo", "all"] = "photo",
                 cache: bool = True):
        if domains not in ("photo", "all"):
            raise ValueError(f"teacher.domains must be 'photo' or 'all', got {domains!r}")
        self.network: torch.nn.Module | None = network
        self.num_classes = ctx.num_seen
        self.cache_dir = Path(ctx.cache_dir) / "teacher"
        self.domains = domains
        self.cache = cache
        self.table: torch.Tensor | None = None
        self.features: torch.Tensor | None = None
        self.cache_hit: bool | None = None

    def _key(self, fingerprint: dict[str, Any]) -> str:
        blob = json.dumps({**fingerprint, "domains": self.domains}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def prepare(self, *, data: Any, embed: Embedder, fingerprint: dict[str, Any]) -> None:
        path = self.cache_dir / f"class_mean-{self._key(fingerprint)}.pt"
        if self.cache and path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.table, self.features, self.cache_hit = state["table"], state["features"], True
            log.info("class_mean teacher: cache hit %s", path)
        else:
            from zsbir.data.base import PHOTO

            split = data.train.of_domain(PHOTO) if self.domains == "photo" else data.train
            assert self.network is not None
            logits, features, labels = embed(self.network, split)
            table = torch.zeros(self.num_classes, logits.shape[1])
            feats = torch.zeros(self.num_classes, features.shape[1])
            counts = torch.zeros(self.num_classes)
            table.index_add_(0, labels, logits.float())
            feats.index_add_(0, labels, features.float())
            counts.index_add_(0, labels, torch.ones(len(labels)))
            missing = (counts == 0).nonzero().flatten().tolist()
            if missing:
                raise ValueError(f"class_mean teacher: seen classes {missing} have no "
                                 f"{'photos' if self.domains == 'photo' else 'images'}")
            self.table, self.cache_hit = table / counts[:, None], False
            self.features = feats / counts[:, None]
            if self.cache:
                from zsbir.engine.checkpoint import atomic_save

                atomic_save({"table": self.table, "features": self.features,
                             "key": self._key(fingerprint)}, path)
        self.network = None  # never needed again: no forward pass during training

    def to(self, device: torch.device) -> ClassMeanTeacher:
        if self.table is not None and self.features is not None:
            self.table, self.features = self.table.to(device), self.features.to(device)
        return self

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.table is None or self.features is None:
            raise RuntimeError("class_mean teacher used before prepare()")
        label = batch["label"]
        return {"logits": self.table[label], "features": self.features[label],
                "class_features": self.features}
