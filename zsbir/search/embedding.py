"""Embedding photos for the index: the run's model loaded from the index's copy, and the
photos to embed read through the training loader (workers, threads, bf16 autocast on CUDA).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zsbir.search import scan

__all__: list[str] = []


def _load_model(model_file: Path, device: str) -> Any:
    from zsbir.engine.index import load_trained

    return load_trained(model_file, device)


def _embed_batches(tm: Any, root: Path, todo: list[str], batch_size: int, workers: int,
                   outputs: Sequence[str] = ()
                   ) -> Iterator[tuple[int, tuple[list[tuple[str, tuple[str, int, int]]],
                                                  np.ndarray, list[tuple[str, str]]]]]:
    """Embed ``todo`` through the training loader: (done count, (kept, emb, skipped)), and
    with ``outputs`` (other model outputs to store, :mod:`zsbir.search.outputs`) a fourth
    item, name -> (N, ...) array, from the same forward pass; ``kept`` pairs each photo
    with (sha256, size, mtime_ns) of the bytes embedded."""
    import torch
    from torch.utils.data import DataLoader

    from zsbir.data.base import PHOTO
    from zsbir.data.loading import worker_count
    from zsbir.engine.threads import use_threads, worker_init

    if not todo:
        return
    ds = scan.PhotoDataset(root, todo, tm.transform, PHOTO)
    batches = [list(range(i, min(i + batch_size, len(todo))))
               for i in range(0, len(todo), batch_size)]
    device = tm.device
    use_threads("train", device, workers=workers)  # zsbir.engine.threads: loaders + model
    n_workers = worker_count(workers, device)
    loader = DataLoader(ds, batch_sampler=batches, num_workers=n_workers,  # type: ignore
                        collate_fn=scan.collate_photos, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if n_workers > 0 else None,
                        generator=torch.Generator().manual_seed(0),
                        worker_init_fn=worker_init if n_workers > 0 else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    done = 0
    for batch, keys in zip(loader, batches):
        done += len(keys)
        skipped = list(batch["skipped"])
        if "image" not in batch:
            yield done, ([], np.zeros((0, 0), np.float32), skipped,
                         *(({},) if outputs else ()))
            continue
        with autocast:
            if outputs:
                got = tm.forward_batch(batch, ("embedding", *outputs))
                emb = np.asarray(got.pop("embedding"), dtype=np.float32)
            else:
                emb = np.asarray(tm.embed_batch(batch), dtype=np.float32)
        kept = [(todo[i], f) for i, f in zip(batch["index"].tolist(), batch["files"])]
        yield done, (kept, emb, skipped, *((got,) if outputs else ()))
