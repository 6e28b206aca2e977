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


#: bump when the cached class means or their computation change (old files are not reused)
CLASS_MEANS_FORMAT = 2


def class_means(*, network: Any, data: Any, embed: Embedder, domains: str,
                num_classes: int, cache_path: Path | None, who: str
                ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Per seen class, the mean teacher logits (C, L) and pooled features (C, F) over the
    training photos (``domains = "photo"``) or all training images (``"all"``), eval
    transform, no augmentation; and whether they came from ``cache_path``.

    The one offline class-mean pass of SBTKNet's ``class_mean`` teacher (Tursun et al.,
    Sec. 3.3) and of teachers that need class centers (e.g. RPKD, Tian et al., ACM MM
    2021). ``cache_path`` (None: no cache) is read when it holds a usable table for
    ``num_classes`` classes, and written (atomically) after computing. ``who`` names the
    caller in errors and logs."""
    if cache_path is not None and cache_path.is_file():
        state = torch.load(cache_path, map_location="cpu", weights_only=True)
        logits, features = state.get("logits"), state.get("features")
        if (isinstance(logits, torch.Tensor) and isinstance(features, torch.Tensor)
                and logits.shape[0] == features.shape[0] == num_classes):
            log.info("%s: class means from cache %s", who, cache_path)
            return logits.float(), features.float(), True
        log.warning("%s: ignoring unusable cache file %s", who, cache_path)
    from zsbir.data.base import PHOTO

    split = data.train.of_domain(PHOTO) if domains == "photo" else data.train
    if network is None:
        raise RuntimeError(f"{who}: no teacher network left to compute the class means")
    logits, features, labels = embed(network, split)
    labels = labels.long()
    counts = torch.zeros(num_classes).index_add_(0, labels, torch.ones(len(labels)))
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"{who}: seen classes {missing} have no training "
                         f"{'photos' if domains == 'photo' else 'images'}")
    mean_logits = torch.zeros(num_classes, logits.shape[1]).index_add_(
        0, labels, logits.float()) / counts[:, None]
    mean_features = torch.zeros(num_classes, features.shape[1]).index_add_(
        0, labels, features.float()) / counts[:, None]
    if cache_path is not None:
        from zsbir.engine.checkpoint import atomic_save

        atomic_save({"logits": mean_logits, "features": mean_features, "counts": counts,
                     "format": CLASS_MEANS_FORMAT}, cache_path)
    return mean_logits, mean_features, False


def class_means_key(fingerprint: dict[str, Any], **extra: Any) -> str:
    """The cache key of a class-mean table: the run's fingerprint (teacher weights,
    protocol, training files, transform), the format and the caller's ``extra``."""
    blob = json.dumps({**fingerprint, **extra, "format": CLASS_MEANS_FORMAT},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


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
        return class_means_key(fingerprint, domains=self.domains)

    def prepare(self, *, data: Any, embed: Embedder, fingerprint: dict[str, Any]) -> None:
        path = self.cache_dir / f"class_mean-{self._key(fingerprint)}.pt"
        self.table, self.features, self.cache_hit = class_means(
            network=self.network, data=data, embed=embed, domains=self.domains,
            num_classes=self.num_classes, cache_path=path if self.cache else None,
            who="class_mean teacher")
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
