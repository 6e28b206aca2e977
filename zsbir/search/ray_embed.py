"""Embedding an index's photos on Ray: ``zsbir index build|update ... --ray [ADDRESS]``
(the ``zsbir[ray]`` extra; the core never imports Ray).

The photos still to embed (the sorted list :mod:`zsbir.search.store` computes: a resumed
build or an update lists only the photos not committed yet) become a Ray Dataset
(``ray.data.from_items``, one row per photo name, in path order). ``map_batches`` runs
:class:`_EmbedActor` in an actor pool: each actor loads the index's model once (its bytes
are put in the object store, so a remote node needs no copy of the index directory),
reads, hashes and decodes each photo exactly as the one-process loader does
(:class:`zsbir.search.scan.PhotoDataset`, the same transform and ``embed_batch``) and
returns the batch's embeddings with the SHA-256, size and mtime of the bytes it embedded,
or the reason a file was skipped. With GPUs in the cluster each actor takes one GPU (one
actor per GPU by default), else one CPU (one actor per CPU by default; ``--ray-actors``
sets the count). The driver iterates the results in order (``preserve_order``) and commits
each batch to ``index.sqlite`` and the backend as it comes
(:func:`zsbir.search.store._sync`): the photo ids are those of a one-process build, a
killed build resumes without embedding a committed photo again, and the embeddings equal a
one-process build's (same code on the same bytes; float32, to 1e-6 on a CPU).

Every node must see the photo folder at the same path (a shared file system). Without an
``ADDRESS`` a local Ray instance is started (and stopped at the end); ``auto`` or
``ray://HOST:10001`` join a running cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zsbir.search.errors import SearchError

__all__ = ["RayOptions", "ray_embed_batches", "require_ray"]

EXTRA = "--ray needs the ray extra: pip install 'zsbir[ray]'"

#: the last :func:`ray_embed_batches` run: photos, actors, the actors' busy seconds (reading,
#: decoding and embedding, summed over actors) and the driver's seconds from the dataset's
#: start to its last batch (benchmarks/bench_ray.py reads it)
LAST_RUN: dict[str, float] = {}


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide: ``address`` None starts a local instance (``num_cpus`` CPUs,
    default all); ``actors`` None is one per GPU, else one per CPU; ``device`` ``cpu``
    keeps the actors on CPUs."""

    address: str | None = None
    actors: int | None = None
    num_cpus: int | None = None
    device: str = "auto"   # "cpu": CPU actors even where the cluster has GPUs


def require_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise SearchError(EXTRA) from exc
    return ray


@contextlib.contextmanager
def _cluster(opts: RayOptions) -> Iterator[Any]:
    """Ray connected (a running instance is reused and left running)."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "logging_level": logging.ERROR}
    if opts.address is None:
        if opts.num_cpus:
            kwargs["num_cpus"] = opts.num_cpus
    else:
        kwargs["address"] = opts.address
    for attempt in (1, 2):
        try:
            ray.init(**kwargs)
            break
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception on a slow start
            ray.shutdown()
            if attempt == 1 and opts.address is None and "timed out during startup" in str(exc):
                continue  # a busy machine passed Ray's fixed 30 s start-up wait: once more
            raise SearchError(f"cannot start or join Ray ({opts.address or 'local'}): "
                              f"{' '.join(str(exc).split())[:300]}") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


class _EmbedActor:
    """One model per actor: a batch of photo names -> embeddings, the other outputs the
    index stores (``names``: one forward pass, as the one-process build) and file facts."""

    def __init__(self, model_ref: Any, root: str, device: str, threads: int,
                 names: tuple[str, ...] = ()):
        import ray
        import torch

        torch.set_num_threads(max(1, threads))
        data = ray.get(model_ref[0]) if isinstance(model_ref, list) else model_ref
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.pt"
            path.write_bytes(data)
            from zsbir.engine.index import load_trained

            self.tm = load_trained(path, device)
        self.root, self.names = root, tuple(names)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import time

        import torch

        from zsbir.data.base import PHOTO
        from zsbir.search import scan

        start = time.perf_counter()
        rels = [os.fsdecode(bytes(b)) for b in batch["name"]]
        ds = scan.PhotoDataset(self.root, rels, self.tm.transform, PHOTO)
        items = [ds[i] for i in range(len(rels))]
        n = len(rels)
        sha, size, mtime, error = [""] * n, [0] * n, [0] * n, [""] * n
        good = [it for it in items if "error" not in it]
        for it in items:
            if "error" in it:
                error[it["index"]] = it["error"]
            else:
                sha[it["index"]], size[it["index"]], mtime[it["index"]] = it["file"]
        emb = [b""] * n  # float32 bytes (a skipped photo: none), whatever the width
        outs = {name: [b""] * n for name in self.names}  # the same, per stored output
        shapes = {name: [""] * n for name in self.names}  # its row's shape, "2,3"
        if good:
            b = scan.collate_photos(good)
            autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                        if self.tm.device.type == "cuda" else contextlib.nullcontext())
            with autocast:
                got = self.tm.forward_batch(b, ("embedding", *self.names))
            for row, i in enumerate(np.asarray(b["index"]).tolist()):
                emb[i] = np.ascontiguousarray(got["embedding"][row], np.float32).tobytes()
                for name in self.names:
                    value = np.ascontiguousarray(got[name][row], np.float32)
                    outs[name][i] = value.tobytes()
                    shapes[name][i] = ",".join(map(str, value.shape))
        return {"name": batch["name"], "sha256": np.array(sha, dtype=object),
                "size": np.array(size, np.int64), "mtime_ns": np.array(mtime, np.int64),
                "error": np.array(error, dtype=object), "embedding": np.array(emb, dtype=object),
                **{f"out.{k}": np.array(v, dtype=object) for k, v in outs.items()},
                **{f"shape.{k}": np.array(v, dtype=object) for k, v in shapes.items()},
                "seconds": np.full(n, (time.perf_counter() - start) / max(n, 1))}


def _row(data: Any, shape: str) -> np.ndarray:
    """One stored output's row from the actor's bytes and its shape string."""
    dims = tuple(int(d) for d in str(shape).split(",") if d)
    return np.frombuffer(bytes(data), np.float32).reshape(dims)


def ray_embed_batches(opts: RayOptions, model_file: Path, root: Path, todo: list[str],
                      batch_size: int, names: tuple[str, ...] | list[str] = ()
                      ) -> Iterator[tuple[int, tuple[Any, ...]]]:
    """:func:`zsbir.search.embedding._embed_batches`'s results, computed on Ray: (done
    count, (kept, emb, skipped)) per batch, in path order; with ``names`` (the outputs the
    index stores besides the embedding) a fourth item, name -> (len(kept), ...) array,
    as the one-process build gives."""
    names = tuple(names)
    if not todo:
        return
    with _cluster(opts) as ray:
        gpus = 0 if opts.device == "cpu" else int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = opts.actors or (gpus if gpus else max(1, cpus))
        threads = max(1, cpus // actors) if not gpus else 1
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ref = ray.put(Path(model_file).read_bytes())
        ds = ray.data.from_items([{"name": os.fsencode(rel)} for rel in todo],
                                 override_num_blocks=max(1, min(len(todo) // batch_size + 1,
                                                                4 * actors)))
        embedded = ds.map_batches(
            _EmbedActor, batch_size=batch_size, batch_format="numpy",
            fn_constructor_args=([ref], str(root), "cuda" if gpus else "cpu", threads, names),
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if gpus else 0, num_cpus=0 if gpus else threads)
        import time

        done, busy, start = 0, 0.0, time.perf_counter()
        for out in embedded.iter_batches(batch_size=batch_size, batch_format="numpy",
                                         prefetch_batches=1):
            kept, vecs, skipped = [], [], []
            rows: dict[str, list[np.ndarray]] = {k: [] for k in names}
            for j, name in enumerate(out["name"]):
                rel = os.fsdecode(bytes(name))
                if out["error"][j]:
                    skipped.append((rel, str(out["error"][j])))
                else:
                    kept.append((rel, (str(out["sha256"][j]), int(out["size"][j]),
                                       int(out["mtime_ns"][j]))))
                    vecs.append(np.frombuffer(bytes(out["embedding"][j]), np.float32))
                    for k in names:
                        rows[k].append(_row(out[f"out.{k}"][j], out[f"shape.{k}"][j]))
            done += len(out["name"])
            busy += float(np.sum(out["seconds"]))
            LAST_RUN.update(photos=done, actors=actors, actor_seconds=busy,
                            seconds=time.perf_counter() - start)
            emb = np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, 0), np.float32)
            if names:
                yield done, (kept, emb, skipped,
                             {k: np.stack(v) for k, v in rows.items() if v})
            else:
                yield done, (kept, emb, skipped)
