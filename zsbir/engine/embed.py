"""Running a network over a split without gradients: embeddings for retrieval, seen-class
validation accuracy, and teacher logits for the offline ``class_mean`` teacher.

Data-parallel runs (:mod:`zsbir.engine.distributed`): every process embeds a contiguous
block of the split and the blocks are gathered in order, so every process returns what one
process would (each call is collective: every rank must make it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from zsbir.data.base import Split
from zsbir.data.loading import ImageDataset, make_loader, to_device, worker_count
from zsbir.engine import distributed as D

__all__ = ["embed_outputs", "embed_split", "teacher_outputs", "validation_accuracy"]


def _run(exp: Any, split: Split, fn: Callable[[dict[str, Any]], Any],
         label: str = "embedding") -> tuple[Any, np.ndarray, list[tuple[str, str]]]:
    """Apply ``fn`` to every batch of ``split`` (eval transform); returns the stacked
    outputs (a tensor, or a dict of tensors when ``fn`` returns a dict), the indices of
    the items that were read, and the skipped files. Progress is shown as the phase
    ``label``, counted in images."""
    from zsbir.progress import phase

    cfg = exp.manifest.data_cfg
    ds = ImageDataset(split, exp.data.reader, exp.eval_transform, cfg.on_corrupt)
    bs = cfg.eval_batch_size
    mine = D.shard_range(len(split), D.rank(), D.world_size())  # everything in one process
    batches = [list(range(i, min(i + bs, mine.stop))) for i in range(mine.start, mine.stop, bs)]
    loader = make_loader(ds, batches, worker_count(cfg.workers, exp.ctx.device),
                         pin_memory=exp.ctx.device.type == "cuda")
    outs: dict[str, list[torch.Tensor]] = {}
    kept, skipped = [], []
    single = True
    with torch.inference_mode(), phase(label, total=len(split), unit="images") as advance:
        for batch in loader:
            advance(len(batch.get("index", ())) + len(batch["skipped"]))
            skipped.extend(batch["skipped"])
            if "image" not in batch:
                continue
            b = to_device(batch, exp.ctx.device, exp.eval_transform)
            got = fn(b)
            single = not isinstance(got, dict)
            for name, t in ({"": got} if single else got).items():
                outs.setdefault(name, []).append(t.float().cpu())
            kept.append(batch["index"].numpy())
    if D.is_distributed():  # the ranks' blocks, in rank order
        names = [n for part in D.gather_objects(sorted(outs)) for n in part]
        single = names == [""] if names else single
        stacked = {n: D.gather_rows(torch.cat(outs[n]) if outs.get(n) else None)
                   for n in dict.fromkeys(names)}
        index = D.gather_concat(np.concatenate(kept) if kept else np.zeros(0, np.int64))
        skipped = [tuple(s) for part in D.gather_objects(skipped) for s in part]
        if not stacked or any(v is None for v in stacked.values()):
            raise ValueError("no image of the split could be read")
        return (stacked[""] if single else stacked), index, skipped
    if not kept:
        raise ValueError("no image of the split could be read")
    stacked = {n: torch.cat(ts) for n, ts in outs.items()}
    return (stacked[""] if single else stacked), np.concatenate(kept), skipped


def embed_outputs(exp: Any, split: Split, names: Sequence[str], label: str | None = None
                  ) -> tuple[dict[str, np.ndarray], np.ndarray, list[tuple[str, str]]]:
    """Every named per-item output of the model (keys of ``forward(image, domain)``'s
    dict: ``"embedding"``, ``"logits"``, ``"tokens"``, ...), float32, stacked on axis 0,
    of the readable items of ``split`` (one forward pass per batch for all of them); the
    split indices of those items and the skipped files, as :func:`embed_split`. A name the
    model does not give is a ``ValueError`` naming the output and the model."""
    names = list(dict.fromkeys(names))
    if not names:
        raise ValueError("embed_outputs: no output asked for")
    model = exp.model
    model_name = (getattr(exp.manifest, "model", None) or {}).get("name", type(model).__name__)

    def pick(b: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = model(b["image"], b["domain"])
        missing = [n for n in names if n not in out]
        if missing:
            raise ValueError(
                f"model {model_name!r} gives no output {', '.join(map(repr, missing))} "
                f"(it gives {', '.join(map(repr, out))}); the pair scorer or reranker "
                "that reads it needs a model that returns it")
        return {n: out[n] for n in names}

    was_training = model.training
    model.eval()
    try:
        outs, kept, skipped = _run(exp, split, pick, label or f"embedding {len(split)} images")
    finally:
        model.train(was_training)
    return {n: outs[n].numpy() for n in names}, kept, skipped


def embed_split(exp: Any, split: Split, label: str | None = None
                ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Retrieval embeddings (N, d) float32 of the readable items, the split indices of
    those items (``split.labels[kept]`` are their labels), and the skipped files:
    ``embed_outputs(exp, split, ("embedding",))`` with the embedding alone."""
    outs, kept, skipped = embed_outputs(exp, split, ("embedding",), label)
    return outs["embedding"], kept, skipped


def validation_accuracy(exp: Any) -> float:
    """Seen-class classification accuracy on the validation split (model selection), of
    the weights the run evaluates (:func:`zsbir.engine.lifecycle.inference_model`)."""
    from zsbir.engine.lifecycle import inference_model

    model = inference_model(exp)
    model.eval()
    logits, kept, _ = _run(exp, exp.data.val, lambda b: model(b["image"], b["domain"])["logits"],
                           f"validating on {len(exp.data.val)} images")
    pred = logits.argmax(1).numpy()
    return float((pred == exp.data.val.labels[kept]).mean())


def teacher_outputs(network: Any, split: Split, exp: Any
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's ImageNet logits and pooled features over a split (eval transform),
    with the labels of the items read."""
    network.to(exp.ctx.device).eval()
    n_logits: list[int] = []

    def both(b: dict[str, Any]) -> torch.Tensor:
        signal = network(b["image"], b["domain"])
        n_logits[:] = [signal["logits"].shape[1]]
        return torch.cat([signal["logits"], signal["features"]], dim=1)

    out, kept, _ = _run(exp, split, both, f"teacher over {len(split)} training images")
    return out[:, :n_logits[0]], out[:, n_logits[0]:], torch.as_tensor(split.labels[kept])
