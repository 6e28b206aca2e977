"""BatchNorm with the statistics of the global batch across ranks: ``nn.SyncBatchNorm`` on
CUDA (through timm's converter), :class:`CpuSyncBatchNorm` and a synchronized timm
``BatchNormAct2d`` on the CPU (gloo), where PyTorch's SyncBatchNorm refuses CPU tensors.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zsbir.engine.distributed.group import is_distributed

log = logging.getLogger(__name__)

__all__ = ["CpuSyncBatchNorm", "convert_sync_batchnorm"]


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
