"""Tuple samplers: ``quadruplet`` (SBTKNet's domain-aware quadruplet loss) and ``triplet``
(sketch anchor, photo positive, photo negative: Sain et al., CVPR 2023, and any triplet
method). Each declares the ``roles`` of its tuples; a batch is its tuples flattened in role
order, and the trainer hands the losses ``batch["tuples"]`` (T, len(roles)) row indices."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from zsbir.data.base import PHOTO, SKETCH
from zsbir.data.samplers import Sampler, epoch_rng
from zsbir.registry import samplers

__all__ = ["QuadrupletSampler", "TripletSampler"]

#: domain at each position of a quadruplet
QUADRUPLET_DOMAINS = (SKETCH, PHOTO, PHOTO, SKETCH)


class _Pool:
    """Item indices of one domain grouped by (compact) class, for vectorized draws."""

    def __init__(self, items: np.ndarray, cls: np.ndarray, n_classes: int):
        order = np.argsort(cls, kind="stable")
        self.items = items[order]
        self.counts = np.bincount(cls, minlength=n_classes)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])

    def __len__(self) -> int:
        return len(self.items)

    def draw_in(self, c: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item of class ``c[k]`` for each k, uniformly (every class must be present)."""
        return self.items[self.starts[c] + rng.integers(0, self.counts[c])]

    def draw_not_in(self, c: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item of a class other than ``c[k]`` for each k, uniformly over those items."""
        r = rng.integers(0, len(self.items) - self.counts[c])
        r = r + np.where(r >= self.starts[c], self.counts[c], 0)  # skip class c's block
        return self.items[r]


@samplers.register("quadruplet")
class QuadrupletSampler(Sampler):
    """Batches of quadruplets for SBTKNet's domain-aware quadruplet loss (Eq. 2).

    Each quadruplet is ``[anchor sketch (class c), positive photo (c), negative photo (c'),
    negative sketch (c'')]`` with ``c', c'' != c``; a batch is ``batch_size / 4`` quadruplets
    flattened in that interleaved order (``batch_size`` counts images and must be a multiple
    of 4; SBTKNet: 16 quadruplets = 64 images), so every batch holds as many sketches as
    photos. An epoch makes every sketch the anchor of exactly one quadruplet, in a seeded
    permutation; positives are uniform among the class's photos, negatives uniform among the
    other classes' photos (sketches). Sketches of classes without photos are never anchors
    (see :attr:`num_skipped`). Everything depends on ``(seed, epoch)`` alone.

    ``same_negative_class``: draw the negative sketch from the negative photo's class. The
    paper only asks both negatives to be "different class" from the anchor (Sec. 3.2, Fig. 2)
    and never ties them together, so the default False draws them independently.
    ``drop_last``: drop the last, smaller batch (default False: every sketch is an anchor).
    """

    #: the positions of each tuple (a quadruplet is never split across processes)
    roles: ClassVar[tuple[str, ...]] = ("anchor", "positive", "negative", "negative_sketch")

    def __init__(self, labels: np.ndarray, domains: np.ndarray, batch_size: int, seed: int,
                 same_negative_class: bool = False, drop_last: bool = False):
        super().__init__(labels, domains, batch_size, seed)
        k, what = len(self.roles), type(self).__name__.removesuffix("Sampler").lower()
        if batch_size % k:
            raise ValueError(f"{what} sampler: batch_size counts images and must be a "
                             f"multiple of {k} ({', '.join(self.roles)}), got {batch_size}")
        self.quads_per_batch = batch_size // k
        negative_sketch = "negative_sketch" in self.roles
        self.same_negative_class = same_negative_class
        self.drop_last = drop_last

        _, cls = np.unique(self.labels, return_inverse=True)
        cls = cls.reshape(-1)
        n_classes = int(cls.max()) + 1
        is_sketch, is_photo = self.domains == SKETCH, self.domains == PHOTO
        has_photo = np.bincount(cls[is_photo], minlength=n_classes) > 0
        has_sketch = np.bincount(cls[is_sketch], minlength=n_classes) > 0
        usable = has_photo & has_sketch  # classes that can give anchors (and negative pairs)
        if same_negative_class:
            photo_ok, sketch_ok = is_photo & usable[cls], is_sketch & usable[cls]
            n_photo_cls = n_sketch_cls = int(usable.sum())
        else:
            photo_ok, sketch_ok = is_photo, is_sketch
            n_photo_cls, n_sketch_cls = int(has_photo.sum()), int(has_sketch.sum())
        if not usable.any() or n_photo_cls < 2 or (negative_sketch and n_sketch_cls < 2):
            raise ValueError(
                f"{what} sampler needs at least 2 classes with photos"
                + (" and 2 with sketches" if negative_sketch else "")
                + (", all with both" if same_negative_class else "")
                + f" (got {int(has_photo.sum())} classes with photos, "
                f"{int(has_sketch.sum())} with sketches, {int(usable.sum())} with both)"
            )

        anchors = np.flatnonzero(is_sketch & usable[cls])
        #: sketches never used as anchors because their class has no photo
        self.num_skipped = int(is_sketch.sum()) - len(anchors)
        self._anchors, self._anchor_cls = anchors, cls[anchors]
        self._cls = cls
        self._photos = _Pool(np.flatnonzero(photo_ok), cls[photo_ok], n_classes)
        self._sketches = _Pool(np.flatnonzero(sketch_ok), cls[sketch_ok], n_classes)
        # positives come from all photos of the anchor's class
        self._pos = _Pool(np.flatnonzero(is_photo), cls[is_photo], n_classes)

    def __len__(self) -> int:
        n, q = len(self._anchors), self.quads_per_batch
        return n // q if self.drop_last else -(-n // q)

    def epoch(self, epoch: int) -> list[np.ndarray]:
        rng = epoch_rng(self.seed, epoch)
        perm = rng.permutation(len(self._anchors))
        anchor, c = self._anchors[perm], self._anchor_cls[perm]
        pos = self._pos.draw_in(c, rng)
        neg_photo = self._photos.draw_not_in(c, rng)
        columns = [anchor, pos, neg_photo]
        if "negative_sketch" in self.roles:
            if self.same_negative_class:
                columns.append(self._sketches.draw_in(self._cls[neg_photo], rng))
            else:
                columns.append(self._sketches.draw_not_in(c, rng))
        quads = np.stack(columns, axis=1).astype(np.int64)
        q = self.quads_per_batch
        return [quads[i * q:(i + 1) * q].reshape(-1) for i in range(len(self))]


@samplers.register("triplet")
class TripletSampler(QuadrupletSampler):
    """Batches of triplets: an anchor sketch of class c, a positive photo of c and a
    negative photo of another class c'. They are the first three positions of the
    ``quadruplet`` sampler's tuples, drawn the same way (every sketch of a class with photos
    is the anchor of one triplet per epoch; positive uniform among the class's photos,
    negative uniform among the other classes' photos), without the negative sketch, which is
    therefore never decoded. As the data loader of Sain et al. (CVPR 2023, "CLIP for All
    Things Zero-Shot SBIR") builds its triplets. ``batch_size`` counts images (a multiple
    of 3).

    ``same_negative_class`` has no effect here (there is no negative sketch).
    """

    roles: ClassVar[tuple[str, ...]] = ("anchor", "positive", "negative")
