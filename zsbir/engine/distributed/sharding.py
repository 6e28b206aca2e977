"""Torch-free sharding arithmetic: which rank gets which slice of a batch, which block of
the evaluation items, and which shard of a sorted file list (``zsbir index --shard i/n``).

Pure arithmetic on lengths and sorted lists (numpy only): the search index imports it
without torch. How the slices make N processes equal one (augmentation seeds, unequal
trailing batches): :mod:`zsbir.engine.distributed`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["ShardError", "parse_shard", "partition_files", "shard_batch", "shard_batches",
           "shard_bounds", "shard_range", "slice_weight"]


class ShardError(ValueError):
    """A batch or a file list cannot be sharded as asked."""


def shard_batch(batch: np.ndarray | Sequence[int], rank: int, world: int,
                unit: int = 1) -> np.ndarray:
    """Rank ``rank``'s contiguous slice of one batch, cut at multiples of ``unit`` items.

    A batch of B items holds B/unit units; they are split as evenly as possible, the
    first ranks taking one more unit when B/unit is not a multiple of ``world`` (only the
    trailing short batch of an epoch may be uneven: :func:`shard_batches` refuses full
    batches that do not divide). Raises :class:`ShardError` if B is not a multiple of
    ``unit``.
    """
    if world < 1 or not 0 <= rank < world:
        raise ShardError(f"rank {rank} is not within 0..{world - 1}")
    if unit < 1:
        raise ShardError(f"unit must be >= 1, got {unit}")
    b = np.asarray(batch)
    if len(b) % unit:
        raise ShardError(f"a batch of {len(b)} items is not a whole number of {unit}-item "
                         "units (quadruplets?)")
    start, stop = shard_bounds(len(b), rank, world, unit)
    return b[start:stop]


def shard_bounds(n: int, rank: int, world: int, unit: int = 1) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s slice of a batch of ``n`` items
    (:func:`shard_batch`); ``start`` is the global position of the slice's first item."""
    base, extra = divmod(n // unit, world)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return start * unit, stop * unit


def shard_batches(batches: Sequence[np.ndarray], rank: int, world: int, unit: int = 1,
                  batch_size: int | None = None) -> list[np.ndarray]:
    """Rank ``rank``'s slice of every global batch (:func:`shard_batch`).

    Every batch of ``batch_size`` items (default: the first batch's length) must split
    into ``world`` equal slices of whole units, or :class:`ShardError` says why; a shorter
    (trailing) batch is split as evenly as units allow, and one with fewer units than
    ranks is refused too (a rank would get nothing to train on).
    """
    if not batches:
        return []
    full = batch_size if batch_size is not None else len(batches[0])
    if full % unit or (full // unit) % world:
        what = f"{full // unit} units of {unit} items" if unit > 1 else f"{full} items"
        raise ShardError(
            f"train.batch_size ({full}) cannot be split evenly over {world} processes: "
            f"the global batch holds {what}, not a multiple of {world}"
            + (" (a quadruplet is never split across processes)" if unit == 4 else ""))
    out = []
    for i, b in enumerate(batches):
        if len(b) < world * unit:
            raise ShardError(f"batch {i} holds {len(b)} items, fewer than {world} processes "
                             f"x {unit}; use drop_last = true in [sampler]")
        out.append(shard_batch(b, rank, world, unit))
    return out


def slice_weight(global_len: int, local_len: int, world: int) -> float:
    """The factor on a rank's gradient that makes DDP's average over ranks equal the
    gradient of the whole batch's mean loss: ``local_len * world / global_len`` (1.0 for
    equal slices)."""
    return local_len * world / global_len


def shard_range(n: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous block of ``range(n)`` (first blocks one longer)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


# ---------------------------------------------------------------------------- file shards
def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with 0 <= i < n (``--shard 0/4`` is the first of four)."""
    i, sep, n = str(text).partition("/")
    try:
        if not sep:
            raise ValueError
        shard, count = int(i), int(n)
    except ValueError:
        raise ShardError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= shard < count:
        raise ShardError(f"--shard {text}: need 0 <= i < n")
    return shard, count


def partition_files(paths: Sequence[str], shard: int, num_shards: int) -> list[str]:
    """Shard ``shard`` of ``num_shards`` of the *sorted* file list: contiguous blocks
    (:func:`shard_range`), so the shards, concatenated in order, are the sorted list and a
    merged index numbers its photos exactly as an unsharded one would. Deterministic:
    every machine computes the same cut from the same file list, in any listing order."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ShardError(f"shard {shard} is not within 0..{num_shards - 1}")
    ordered = sorted(str(p) for p in paths)
    return [ordered[i] for i in shard_range(len(ordered), shard, num_shards)]
