"""DistributedDataParallel wrapping: the model (BatchNorm synchronized) inside DDP with a
communication hook that weights each rank's gradient by its slice of the batch
(:func:`zsbir.engine.distributed.sharding.slice_weight`), and the same averaging for
trained parameters outside the wrapped model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zsbir.engine.distributed.group import world_size
from zsbir.engine.distributed.syncbn import convert_sync_batchnorm

__all__ = ["sync_extra_params", "wrap_ddp"]


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
    """Keep trained parameters outside the DDP-wrapped model (a loss's, the step's, the
    teacher's) equal on every rank, as DDP does for the model: their values are broadcast
    from rank 0 now, and a hook all-reduces each one's gradient as soon as it is
    accumulated, weighted by ``state.weight``. Every rank runs the same backward graph, so
    the hooks fire in the same order on every rank."""
    def hook(p: torch.Tensor) -> None:
        if p.grad is None:
            return
        if state.weight != 1.0:
            p.grad.mul_(state.weight)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world_size())

    for p in params:
        with torch.no_grad():
            dist.broadcast(p.data, src=0)  # a component may initialize per process
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
