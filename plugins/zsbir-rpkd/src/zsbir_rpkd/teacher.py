"""The ``rpkd`` teacher strategy: per-item teacher signals plus seen-class centers.

RPKD (Tian et al., ACM MM 2021; only the abstract is public) needs, for every training
batch, the frozen teacher's per-item ImageNet logits (``rpkd_instance``) and pooled
features (``rpkd_contrastive``, ``rpkd_embedding_supervision``), exactly what zsbir's
built-in ``online`` strategy gives, and the teacher's seen-class embedding centers
(``rpkd_embedding_supervision``). This strategy reuses ``online`` by subclassing it and
adds the centers, computed once before training and cached on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch

from zsbir.context import BuildContext
from zsbir.models.net import TeacherNet
from zsbir.registry import Nested
from zsbir.teachers.strategies import OnlineTeacher, class_means, class_means_key

__all__ = ["RpkdTeacher"]

#: what ``prepare`` receives as ``embed``: ``embed(network, split)`` runs the teacher over a
#: split (eval transform) -> (N, 1000) logits, (N, F) features, (N,) labels
Embedder = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

log = logging.getLogger(__name__)

#: bump when the centers' computation changes here (the core's class_means has its own)
CACHE_FORMAT = 2


class RpkdTeacher(OnlineTeacher):
    """RPKD's teacher: per-item logits and features (as online) plus seen-class centers.

    ``provides`` tells zsbir's validator which signal keys the losses can read.

    Per item, the logits and pooled features of a frozen pretrained network (as
    ``online``); per seen class, a feature center computed once before training.

    Each call returns ``{"logits": (B, 1000), "features": (B, F), "class_features":
    (n_seen, F)}``. The centers are the mean teacher feature of each seen class over the
    training split (the same offline pass as the core's ``class_mean``: eval transform, no
    augmentation), kept for the whole run; the per-item part runs the teacher on each
    augmented batch. (RPKD, Tian et al., ACM MM 2021: only the abstract is public; it names
    the "class embedding centers from the teacher" and this strategy takes them to be these
    per-class means.)

    The centers come from the core's one cached class-mean pass
    (:func:`zsbir.teachers.strategies.class_means`, shared with ``class_mean``), cached in
    ``<cache_dir>/teacher/rpkd_centers-<key>.pt``, the key
    hashing the teacher backbone, the protocol, the training files, the transform and
    ``center_domains``; a later run (or a resumed one) with the same key reads them.

    Args:
        center_domains: which training images are averaged: "photo" (the photos only) or
            "all" (photos and sketches).
        cache: reuse (and write) the cached centers.
    """

    provides: ClassVar[frozenset[str]] = frozenset({"logits", "features", "class_features"})

    def __init__(self, network: Annotated[TeacherNet, Nested("networks")], ctx: BuildContext,
                 center_domains: Literal["photo", "all"] = "photo", cache: bool = True):
        super().__init__(network)
        if center_domains not in ("photo", "all"):
            raise ValueError("teacher.center_domains must be 'photo' or 'all', got "
                             f"{center_domains!r}")
        self.num_classes = ctx.num_seen
        self.cache_dir = Path(ctx.cache_dir) / "teacher"
        self.center_domains = center_domains
        self.cache = cache
        self.centers: torch.Tensor | None = None
        #: after prepare(): whether the centers came from the cache
        self.cache_hit: bool | None = None

    def cache_key(self, fingerprint: dict[str, Any]) -> str:
        return class_means_key(fingerprint, strategy="rpkd", plugin_format=CACHE_FORMAT,
                               center_domains=self.center_domains)

    def prepare(self, *, data: Any, embed: Embedder, fingerprint: dict[str, Any]) -> None:
        path = self.cache_dir / f"rpkd_centers-{self.cache_key(fingerprint)}.pt"
        _, self.centers, self.cache_hit = class_means(
            network=self.network, data=data, embed=embed, domains=self.center_domains,
            num_classes=self.num_classes, cache_path=path if self.cache else None,
            who="rpkd teacher")

    def to(self, device: torch.device) -> RpkdTeacher:
        super().to(device)
        if self.centers is not None:
            self.centers = self.centers.to(device)
        return self

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.centers is None:
            raise RuntimeError("rpkd teacher used before prepare()")
        signal = super().__call__(batch)
        signal["class_features"] = self.centers
        return signal
