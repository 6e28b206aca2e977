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
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

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


class ShardError(ValueError):
    """A batch or a file list cannot be sharded as asked."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world``, its ``local_rank`` on the node,
    the ``backend`` ("nccl", "gloo", or "" for a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); a no-op for one process.

    Backend: NCCL when the run uses CUDA (``device`` "auto" with a GPU, or "cuda..."),
    gloo otherwise. With NCCL the process's GPU is ``cuda:LOCAL_RANK``.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistEnv()
    r, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
    if not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(key):
                raise ValueError(f"WORLD_SIZE={world} but {key} is not set; launch with "
                                 "torchrun (or zsbir run --nproc N)")
        dist.init_process_group(backend, rank=r, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(rank=r, world=world, local_rank=local, backend=dist.get_backend())


def launch_torchrun(nproc: int, zsbir_args: Sequence[str]) -> int:
    """Run ``zsbir ZSBIR_ARGS`` as ``nproc`` processes on this machine through torchrun
    (``--standalone``: a local rendezvous on a free port); returns torchrun's exit status
    (non-zero when any process failed: torchrun then stops the others)."""
    import subprocess
    import sys

    if _env_int("WORLD_SIZE", 1) > 1:
        raise ValueError("--nproc inside a torchrun process: launch either with torchrun "
                         "or with zsbir run --nproc, not both")
    from zsbir.engine.threads import launcher_env

    cmd = [sys.executable, "-c", _LAUNCHER, "--standalone", f"--nproc-per-node={nproc}",
           "-m", "zsbir", *zsbir_args]
    return subprocess.call(cmd, env=launcher_env(nproc))  # CPUs divided among them


#: torchrun, with its failure report cut to one line: the failing process has printed its
#: own error already (a user error in one line), so torchrun's traceback only adds noise
_LAUNCHER = """\
import sys
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run
try:
    run(get_args_parser().parse_args(sys.argv[1:]))
except ChildFailedError as exc:
    codes = ", ".join(f"rank {r}: exit {f.exitcode}" for r, f in sorted(exc.failures.items()))
    print(f"zsbir: data-parallel run failed ({codes}); the other processes were stopped",
          file=sys.stderr)
    sys.exit(1)
"""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown(clean: bool = True) -> None:
    """Leave the process group. After a clean finish every rank first waits at a barrier:
    a rank that tears its connections down while another still has collectives in
    flight makes gloo abort that process ("terminate called without an active
    exception"). After an error no barrier (the other ranks may be gone). DDP wrappers
    must be gone by then (their reducer outliving the group aborts the same way): the
    caller drops its references, and a collection here frees any held in cycles."""
    if not is_distributed():
        return
    import gc

    gc.collect()
    if clean:
        dist.barrier()
    dist.destroy_process_group()


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


# ---------------------------------------------------------------------------- batches
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


# ---------------------------------------------------------------------------- models
class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: the gradient of every rank's input is the sum of
    the ranks' output gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        g = grad.clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g


def _synced_batch_norm(bn: nn.modules.batchnorm._BatchNorm, input: torch.Tensor
                       ) -> torch.Tensor:
    """``bn`` applied with the statistics of the global batch across the ranks (training
    mode, several processes); see :class:`CpuSyncBatchNorm`."""
    dims = [0, *range(2, input.dim())]
    # float64: S2/n - mean^2 cancels catastrophically in float32 when a channel's mean
    # is large against its spread (seen: 4e-5 weight errors after 4 SGD steps)
    x = input.double()
    count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype)
    stats = torch.cat([count, x.sum(dims), (x * x).sum(dims)])
    stats = _AllReduceSum.apply(stats)
    c = x.shape[1]
    n, mean = stats[0], stats[1:1 + c] / stats[0]
    var = (stats[1 + c:] / n - mean * mean).clamp_min(0)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            m = bn.momentum if bn.momentum is not None else \
                1.0 / float(bn.num_batches_tracked)
            bn.running_mean.mul_(1 - m).add_(mean.detach() * m)
            unbiased = var.detach() * (n / (n - 1).clamp_min(1))
            bn.running_var.mul_(1 - m).add_(unbiased * m)
    shape = [1, c] + [1] * (input.dim() - 2)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(input.dtype)


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch across all ranks,
    for CPU tensors (gloo), where ``nn.SyncBatchNorm`` refuses to run.

    Per channel, every rank contributes (count, sum x, sum x^2) through an autograd-aware
    all-reduce; mean = S1/n, biased variance = S2/n - mean^2 normalizes (Ioffe & Szegedy,
    ICML 2015, Alg. 1), the unbiased n/(n-1) variance updates the running estimate. The
    statistics and the normalization are computed in float64 and the output cast back:
    in float32, S2/n - mean^2 loses most of its digits for a channel whose mean is large
    against its spread. The state dict is a plain BatchNorm's, so checkpoints load into
    either.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        return _synced_batch_norm(self, input)


def _norm_act_forward(self: Any, input: torch.Tensor) -> torch.Tensor:
    """timm's ``BatchNormAct2d.forward`` (batch norm, then ``drop``, then ``act``) with
    synchronized statistics."""
    if not (self.training and is_distributed()):
        return self._unsynced_forward(input)
    return self.act(self.drop(_synced_batch_norm(self, input)))


_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_SYNCED_CLASSES: dict[type, type] = {}


def _is_norm_act(module: nn.Module) -> bool:
    """timm's BatchNormAct2d (batch norm + ``drop`` + ``act`` in one module)."""
    try:
        from timm.layers.norm_act import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return type(module) is BatchNormAct2d


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Make every plain BatchNorm layer, and timm's BatchNormAct2d, use the statistics of
    the global batch: ``SyncBatchNorm`` on CUDA (timm's converter, which keeps
    BatchNormAct2d's activation; torch's own would drop it), :class:`CpuSyncBatchNorm` (or a
    synchronized BatchNormAct2d) on the CPU. Parameters and buffers stay the same objects,
    so the optimizer keeps updating them. Other BatchNorm subclasses are left per process,
    with a warning."""
    if device.type == "cuda":
        try:
            from timm.layers import convert_sync_batchnorm as timm_convert

            return timm_convert(model)
        except ImportError:  # pragma: no cover - timm is a dependency
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    skipped: list[str] = []

    def convert(module: nn.Module, prefix: str) -> nn.Module:
        if type(module) in _PLAIN_BN:
            new = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum,
                                   module.affine, module.track_running_stats,
                                   device=None, dtype=None)
            # the very same Parameter and buffer objects: the optimizer keeps updating them
            for name, value in [*module._parameters.items(), *module._buffers.items()]:
                setattr(new, name, value)
            new.train(module.training)
            return new
        if _is_norm_act(module):  # same object, a subclass whose forward synchronizes
            cls = type(module)
            if cls not in _SYNCED_CLASSES:
                _SYNCED_CLASSES[cls] = type(f"Synced{cls.__name__}", (cls,), {
                    "forward": _norm_act_forward, "_unsynced_forward": cls.forward})
            module.__class__ = _SYNCED_CLASSES[cls]
            return module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and \
                not isinstance(module, (CpuSyncBatchNorm, *_SYNCED_CLASSES.values())):
            skipped.append(prefix or type(module).__name__)
        for name, child in module.named_children():
            setattr(module, name, convert(child, f"{prefix}.{name}" if prefix else name))
        return module

    model = convert(model, "")
    if skipped:
        log.warning("batch statistics of %s are per process (not synchronized)",
                    ", ".join(skipped))
    return model


class _WeightState:
    """The current step's gradient factor for :func:`_weighted_allreduce`."""

    def __init__(self) -> None:
        self.weight = 1.0


def _weighted_allreduce(state: _WeightState, bucket: Any) -> torch.futures.Future:
    """DDP communication hook: mean over ranks of ``weight * local gradient``."""
    tensor = bucket.buffer()
    if state.weight != 1.0:
        tensor.mul_(state.weight)
    tensor.div_(world_size())
    fut = dist.all_reduce(tensor, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


# DDP checks the hook's annotations against the real classes (not postponed strings)
_weighted_allreduce.__annotations__ = {"state": _WeightState, "bucket": dist.GradBucket,
                                       "return": torch.futures.Future[torch.Tensor]}


def sync_extra_params(params: Sequence[nn.Parameter], state: _WeightState) -> None:
    """Average, like DDP does for the model, the gradients of trained parameters outside
    the DDP-wrapped model (a loss's learnable parameters): a hook all-reduces each one as
    soon as its gradient is accumulated, weighted by ``state.weight``. Every rank runs the
    same backward graph, so the hooks fire in the same order on every rank."""
    def hook(p: torch.Tensor) -> None:
        if p.grad is None:
            return
        if state.weight != 1.0:
            p.grad.mul_(state.weight)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world_size())

    for p in params:
        p.register_post_accumulate_grad_hook(hook)


def wrap_ddp(model: nn.Module, device: torch.device) -> tuple[nn.Module, _WeightState]:
    """``model`` (BatchNorm synchronized) inside DistributedDataParallel, with a hook whose
    ``state.weight`` scales this rank's gradient (:func:`slice_weight`) before the
    average. The wrapped model shares parameters with ``model``, whose ``state_dict``
    stays the plain one checkpoints hold."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    convert_sync_batchnorm(model, device)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    # BatchNorm buffers are equal on every rank (synchronized statistics): no per-forward
    # buffer broadcast; globally unused parameters keep grad None, as in one process
    import inspect

    sync = ({"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DDP).parameters
            else {"broadcast_buffers": False})
    ddp = DDP(model, device_ids=ids, find_unused_parameters=True, **sync)
    state = _WeightState()
    ddp.register_comm_hook(state, _weighted_allreduce)
    return ddp, state
