"""Data-parallel training and sharded embedding over ``torch.distributed``.

One process per device (``torchrun --nproc-per-node N -m zsbir run MANIFEST``, or
``zsbir run --nproc N``). What every process does, and why the result matches one process:

- **Batches.** ``train.batch_size`` is the *global* batch B. Every rank computes the same
  epoch batch list from ``(seed, epoch)`` (samplers are deterministic) and keeps its own
  contiguous slice of each batch (:func:`shard_batches`): rank r gets positions
  ``[r*B/N, (r+1)*B/N)``. Augmentation seeds use the *global* position, so N processes
  see exactly the images, in the same augmentations, that one process with batch B sees.
  A sampler whose batches have structure (quadruplets: ``unit = 4`` consecutive items that
  a loss reads together) is never split inside a unit.
- **Gradients.** DistributedDataParallel averages the ranks' gradients. For a loss that is
  a mean over the batch's items (or units) and slices of equal size, the average of the
  ranks' gradients is the gradient of the global batch. A short trailing batch split into
  unequal slices is weighted by slice size in a DDP communication hook
  (:func:`slice_weight`), so that holds there too. Losses that couple items across the
  whole batch (in-batch triplet mining) see only their rank's slice, as in any DDP setup.
- **BatchNorm.** Batch statistics are synchronized across ranks: ``nn.SyncBatchNorm`` on
  CUDA; on the CPU (gloo), where PyTorch's SyncBatchNorm refuses CPU tensors,
  :class:`CpuSyncBatchNorm` all-reduces per-channel sums with autograd.
- **Writes.** Only rank 0 (:func:`is_main`) writes checkpoints, logs, metrics and figures.
- **Evaluation.** Each rank embeds a contiguous shard of the items (:func:`shard_range`)
  and the shards are gathered in rank order (:func:`gather_concat`), so every rank holds
  the same arrays, in the same order, as one process would.

Not bit-exact: float addition is not associative, and the distributed run sums in a
different order (per-rank means then an all-reduce, BatchNorm statistics from sums rather
than PyTorch's fused kernel). The equivalence test (tests/test_distributed.py) documents
the tolerance it allows.

Large collections: :func:`partition_files` / :func:`parse_shard` cut a sorted file list
into shard ``i`` of ``n`` for ``zsbir index --shard i/n`` (see ``zsbir.hashing.ann`` for
merging the shards' embeddings into one index without re-embedding).

One module per job; every name is importable from this package as before
(``from zsbir.engine import distributed as D``; ``D.is_main()``):

- :mod:`.sharding`: torch-free arithmetic (batch slices, evaluation blocks, file shards);
  importing this package imports only it, so search code gets the arithmetic without torch;
- :mod:`.group`: joining, launching and leaving the process group; rank and world size;
- :mod:`.collectives`: broadcast, gathers and reductions;
- :mod:`.syncbn`: BatchNorm statistics across ranks;
- :mod:`.ddp`: DistributedDataParallel wrapping and gradient averaging.

The torch modules are imported on first use of one of their names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from zsbir.engine.distributed.sharding import (
    ShardError,
    parse_shard,
    partition_files,
    shard_batch,
    shard_batches,
    shard_bounds,
    shard_range,
    slice_weight,
)

if TYPE_CHECKING:
    from zsbir.engine.distributed.collectives import (
        all_gather_arrays,
        all_ranks,
        broadcast_object,
        gather_concat,
        gather_objects,
        gather_rows,
        mean_across_ranks,
    )
    from zsbir.engine.distributed.ddp import sync_extra_params, wrap_ddp
    from zsbir.engine.distributed.group import (
        DistEnv,
        barrier,
        init_distributed,
        is_distributed,
        is_main,
        launch_torchrun,
        rank,
        shutdown,
        world_size,
    )
    from zsbir.engine.distributed.syncbn import CpuSyncBatchNorm, convert_sync_batchnorm

#: name -> the submodule (which imports torch) that defines it
_LAZY = {
    **dict.fromkeys(("DistEnv", "barrier", "init_distributed", "is_distributed", "is_main",
                     "launch_torchrun", "rank", "shutdown", "world_size"), "group"),
    **dict.fromkeys(("all_gather_arrays", "all_ranks", "broadcast_object", "gather_concat",
                     "gather_objects", "gather_rows", "mean_across_ranks"), "collectives"),
    **dict.fromkeys(("CpuSyncBatchNorm", "convert_sync_batchnorm"), "syncbn"),
    **dict.fromkeys(("sync_extra_params", "wrap_ddp"), "ddp"),
}

__all__ = [
    "CpuSyncBatchNorm",
    "DistEnv",
    "ShardError",
    "all_gather_arrays",
    "barrier",
    "shutdown",
    "broadcast_object",
    "convert_sync_batchnorm",
    "all_ranks",
    "gather_concat",
    "gather_objects",
    "gather_rows",
    "init_distributed",
    "is_distributed",
    "is_main",
    "launch_torchrun",
    "mean_across_ranks",
    "parse_shard",
    "partition_files",
    "rank",
    "shard_batch",
    "shard_batches",
    "shard_bounds",
    "shard_range",
    "slice_weight",
    "sync_extra_params",
    "world_size",
    "wrap_ddp",
]


def __getattr__(name: str) -> Any:
    """The torch-backed names, imported from their submodule on first use."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
