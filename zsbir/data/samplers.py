"""Batch samplers: which training items form each batch.

A sampler is registered in :data:`zsbir.registry.samplers`. The toolkit constructs it with
the training split's ``labels`` and ``domains``, the ``batch_size`` and the run's ``seed``
(injected), plus the manifest's parameters. ``epoch(e)`` returns that epoch's batches as
index arrays, computed from ``(seed, e)`` alone: resuming mid-epoch regenerates the same
list and skips the batches already done, so a resumed run sees exactly the same data.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import numpy as np

from zsbir.constraints import Range
from zsbir.data.base import PHOTO, SKETCH
from zsbir.registry import samplers

__all__ = ["MixedSampler", "RandomSampler", "Sampler", "batch_tuples", "epoch_rng",
           "sampler_roles", "sampler_unit"]


def epoch_rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    """A generator that depends only on (seed, epoch, stream)."""
    return np.random.default_rng([seed, epoch, stream, 0x5B1])


class Sampler:
    """Base class. ``roles`` names the positions of the tuples a batch is made of (e.g.
    ``("anchor", "positive", "negative")``), ``()`` for independent items: a batch is its
    tuples flattened in role order, the trainer gives the losses ``batch["tuples"]`` (T,
    len(roles)) row indices and ``batch["roles"]``, and data-parallel training never
    splits a tuple across processes (:func:`zsbir.engine.distributed.shard_batches`)."""

    roles: ClassVar[tuple[str, ...]] = ()

    def __init__(self, labels: np.ndarray, domains: np.ndarray, batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.labels = np.asarray(labels)
        self.domains = np.asarray(domains)
        self.batch_size = batch_size
        self.seed = seed
        if len(self.labels) == 0:
            raise ValueError("the training split is empty")

    def __len__(self) -> int:
        raise NotImplementedError

    def epoch(self, epoch: int) -> list[np.ndarray]:
        raise NotImplementedError

    def epoch_shard(self, epoch: int, rank: int, world: int) -> list[np.ndarray]:
        """Process ``rank`` of ``world``'s contiguous slice of each of ``epoch``'s batches:
        the same global batches on every process, cut at ``unit`` boundaries."""
        from zsbir.engine.distributed import shard_batches

        return shard_batches(self.epoch(epoch), rank, world, sampler_unit(self),
                             self.batch_size)


def sampler_roles(sampler: object) -> tuple[str, ...]:
    """The roles of a sampler's tuples (``()``: independent items). Plugin samplers need
    not derive from :class:`Sampler`: a missing or malformed ``roles`` is ``()``."""
    roles = getattr(sampler, "roles", ())
    return tuple(roles) if isinstance(roles, (tuple, list)) and all(
        isinstance(r, str) for r in roles) else ()


def sampler_unit(sampler: object) -> int:
    """Items per indivisible group of a sampler's batches: ``len(roles)``, else its
    ``unit`` attribute (a plugin sampler's older spelling), else 1."""
    roles = sampler_roles(sampler)
    if roles:
        return len(roles)
    unit = getattr(sampler, "unit", 1)
    return unit if isinstance(unit, int) and not isinstance(unit, bool) and unit >= 1 else 1


def batch_tuples(n_rows: int, roles: tuple[str, ...]) -> dict[str, object]:
    """``{"tuples": (n_rows / k, k) LongTensor of row indices, "roles": roles}`` for a batch
    of whole tuples in role order (``{}`` for independent items)."""
    import torch

    if not roles:
        return {}
    k = len(roles)
    if n_rows % k:
        raise ValueError(f"a batch of {n_rows} rows is not whole tuples of "
                         f"{k} ({', '.join(roles)})")
    return {"tuples": torch.arange(n_rows).view(-1, k), "roles": tuple(roles)}


@samplers.register("random")
class RandomSampler(Sampler):
    """Uniform shuffle of all training items each epoch, cut into batches."""

    def __init__(self, labels: np.ndarray, domains: np.ndarray, batch_size: int, seed: int,
                 drop_last: bool = True):
        super().__init__(labels, domains, batch_size, seed)
        self.drop_last = drop_last and len(self.labels) >= batch_size

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int) -> list[np.ndarray]:
        perm = epoch_rng(self.seed, epoch).permutation(len(self.labels))
        return [perm[i * self.batch_size:(i + 1) * self.batch_size] for i in range(len(self))]


@samplers.register("mixed")
class MixedSampler(Sampler):
    """Each batch holds a fixed number of sketches and photos, then is shuffled.

    As the SAKE reference code (Liu et al., ICCV 2019) composes its batches of 40: e.g.
    TU-Berlin 4 sketches : 36 photos, Sketchy 13 : 26. Each domain is drawn without
    replacement from its own seeded permutation, restarted when exhausted; an epoch has
    ``ceil(#items / batch_size)`` batches.
    """

    def __init__(self, labels: np.ndarray, domains: np.ndarray, batch_size: int, seed: int,
                 sketches_per_batch: Annotated[int, Range(ge=0)] = 13):
        super().__init__(labels, domains, batch_size, seed)
        if not 0 <= sketches_per_batch <= batch_size:
            raise ValueError(
                f"sketches_per_batch ({sketches_per_batch}) must be within 0..batch_size "
                f"({batch_size})"
            )
        self.k_sketch = sketches_per_batch
        self.sketch_idx = np.flatnonzero(self.domains == SKETCH)
        self.photo_idx = np.flatnonzero(self.domains == PHOTO)
        for k, pool, what in ((self.k_sketch, self.sketch_idx, "sketches"),
                              (batch_size - self.k_sketch, self.photo_idx, "photos")):
            if k > 0 and len(pool) == 0:
                raise ValueError(f"mixed sampler: the training split has no {what}")

    @staticmethod
    def check_manifest(params: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
        """sketches_per_batch must fit in a batch."""
        k, batch = params.get("sketches_per_batch"), manifest.get("train", {}).get("batch_size")
        if isinstance(k, int) and isinstance(batch, int) and k > batch:
            return [f"sketches_per_batch ({k}) exceeds train.batch_size ({batch})"]
        return []

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    @staticmethod
    def _draw(pool: np.ndarray, k: int, n_batches: int, rng: np.random.Generator) -> np.ndarray:
        need = k * n_batches
        if need == 0:
            return np.zeros((n_batches, 0), dtype=np.int64)
        reps = -(-need // len(pool))
        seq = np.concatenate([rng.permutation(pool) for _ in range(reps)])[:need]
        return seq.reshape(n_batches, k)

    def epoch(self, epoch: int) -> list[np.ndarray]:
        rng = epoch_rng(self.seed, epoch)
        n = len(self)
        sk = self._draw(self.sketch_idx, self.k_sketch, n, rng)
        ph = self._draw(self.photo_idx, self.batch_size - self.k_sketch, n, rng)
        both = np.concatenate([sk, ph], axis=1)
        return [rng.permutation(row) for row in both]
