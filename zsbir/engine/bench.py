"""Training throughput of a manifest's real step: ``zsbir bench train``.

Runs the manifest's own data pipeline (files decoded and augmented by the loader workers),
losses and teacher for ``steps`` steps after ``warmup`` steps, and reports images/s, step
time percentiles, the fraction of wall time spent waiting for data, peak GPU memory, and
which side is the bottleneck. ``synthetic_data`` feeds the same step with tensors already
on the device, which isolates compute. The model's weights are changed by the steps run
(it is a benchmark, nothing is saved).
"""

from __future__ import annotations

import platform
import time
from typing import Any

import numpy as np
import torch

from zsbir.build import build, resolve_device
from zsbir.engine.threads import apply_plan, plan_threads, report, restore, snapshot
from zsbir.engine.trainer import Trainer, aug_seed
from zsbir.manifest import Manifest

__all__ = ["bench_train"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(manifest: Manifest, steps: int = 50, warmup: int = 5,
                synthetic_data: bool = False) -> dict[str, Any]:
    """Time ``steps`` training steps of ``manifest`` (see the module docstring)."""
    saved = snapshot()  # the caller's threads come back, the CPU lease is released
    try:
        apply_plan(plan_threads(resolve_device(manifest.run.device), manifest.run.threads,
                                manifest.data_cfg.workers))
        return _bench_train(manifest, steps, warmup, synthetic_data)
    finally:
        restore(saved)


def _bench_train(manifest: Manifest, steps: int, warmup: int,
                 synthetic_data: bool) -> dict[str, Any]:
    import tempfile
    from pathlib import Path

    exp = build(manifest, "train")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(exp, Path(tmp))
        if exp.teacher is not None:
            trainer._prepare_teacher()
        device = exp.ctx.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        bs = manifest.train.batch_size
        total = warmup + steps
        batches: list[list[Any]] = []
        epoch = 0
        while len(batches) < total:
            batches += [[(int(i), aug_seed(manifest.run.seed, epoch, s, p))
                         for p, i in enumerate(b)]
                        for s, b in enumerate(trainer.epoch_batches(epoch))]
            epoch += 1
        trainer.batches.batches = batches[:total]
        exp.model.train()
        step_times, waits, images = [], [], 0
        if synthetic_data:
            first = next(iter(trainer.loader))
            fixed = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in first.items()}  # uint8 images already on the device
            source = (fixed for _ in range(total))
        else:
            source = iter(trainer.loader)
        t_start = None
        for i in range(total):
            t0 = time.perf_counter()
            batch = next(source)
            t1 = time.perf_counter()
            trainer.train_step(batch)
            _sync(device)
            t2 = time.perf_counter()
            if i == warmup:
                t_start = t0
            if i >= warmup:
                waits.append(t1 - t0)
                step_times.append(t2 - t1)
                images += len(batch["image"])
        wall = time.perf_counter() - (t_start or time.perf_counter())
    st = np.array(step_times) * 1e3
    wait_frac = float(np.sum(waits) / max(wall, 1e-9))
    result = {
        "manifest": manifest.run.name,
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "batch_size": bs, "image_size": manifest.data_cfg.image_size,
        "steps": steps, "warmup": warmup, "synthetic_data": synthetic_data,
        "workers": trainer.workers,
        "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "off",
        "channels_last": trainer.channels_last, "compile": manifest.train.compile,
        "images_per_s": images / max(wall, 1e-9),
        "step_ms": {"p50": float(np.percentile(st, 50)), "p90": float(np.percentile(st, 90)),
                    "p99": float(np.percentile(st, 99)), "mean": float(st.mean())},
        "data_wait_fraction": wait_frac,
        "peak_gpu_memory_gb": (torch.cuda.max_memory_allocated(device) / 2**30
                               if device.type == "cuda" else None),
        "bottleneck": "input pipeline" if wait_frac > 0.2 else "compute",
        "threads": report(),
        "torch": torch.__version__,
    }
    return result
