"""Collectives over the process group: broadcast, gather (objects, arrays, rows) and
reductions (all-of flags, means of scalars); the identity in a single process.

Gathered arrays come back in rank order, so with contiguous shards
(:func:`zsbir.engine.distributed.sharding.shard_range`) every rank holds the same arrays, in
the same order, as one process would.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from zsbir.engine.distributed.group import is_distributed, rank, world_size

__all__ = ["all_gather_arrays", "all_ranks", "broadcast_object", "gather_concat",
           "gather_objects", "gather_rows", "mean_across_ranks"]


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as computed on rank ``src``, on every rank (pickled; small objects)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (pickled; small objects), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_arrays(x: np.ndarray | torch.Tensor) -> list[np.ndarray | torch.Tensor]:
    """Every rank's ``x`` (same dtype and trailing shape, any length along dim 0), in rank
    order, on every rank; numpy in -> numpy out, tensors come back on ``x``'s device."""
    as_numpy = isinstance(x, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(x)) if as_numpy else x
    if not is_distributed():
        return [x]
    dev = _comm_device()
    local = t.to(dev).contiguous()
    n = torch.tensor([local.shape[0]], device=dev, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    if local.shape[0] < longest:  # all_gather needs equal shapes: pad, then trim
        pad = torch.zeros((longest - local.shape[0], *local.shape[1:]), dtype=local.dtype,
                          device=dev)
        local = torch.cat([local, pad])
    parts = [torch.empty_like(local) for _ in counts]
    dist.all_gather(parts, local)
    out = [p[:c] for p, c in zip(parts, counts)]
    if as_numpy:
        return [p.cpu().numpy() for p in out]
    return [p.to(t.device) for p in out]


def gather_concat(x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """The ranks' ``x`` concatenated along dim 0 in rank order (identity for one process)."""
    if not is_distributed():
        return x
    parts = all_gather_arrays(x)
    return np.concatenate(parts) if isinstance(x, np.ndarray) else torch.cat(parts)


def all_ranks(flag: bool) -> bool:
    """True when ``flag`` is true on every rank (one tiny all-reduce; every rank calls)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather_rows(x: torch.Tensor | None) -> torch.Tensor | None:
    """:func:`gather_concat` for a (n, ...) tensor that may be ``None`` on ranks that had
    no rows (their shape is taken from the others); ``None`` when no rank had any."""
    if not is_distributed():
        return x
    shapes = [None] * world_size()
    meta = None if x is None else (tuple(x.shape[1:]), str(x.dtype).removeprefix("torch."))
    dist.all_gather_object(shapes, meta)
    known = [m for m in shapes if m is not None]
    if not known:
        return None
    tail, dtype = known[0]
    local = x if x is not None else torch.zeros((0, *tail), dtype=getattr(torch, dtype))
    return torch.cat(all_gather_arrays(local))


def mean_across_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mean over ranks of each scalar (one all-reduce for all of them)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).reshape(())
                           .to(_comm_device()) for k in keys])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    stacked /= world_size()
    dev = next(iter(values.values()))
    dev = dev.device if isinstance(dev, torch.Tensor) else torch.device("cpu")
    return {k: stacked[i].to(dev, torch.float32) for i, k in enumerate(keys)}
