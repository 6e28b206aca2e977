"""A trained run's model, ready to embed images: :func:`load_trained`.

Used by the photo search (:mod:`zsbir.search`: ``zsbir index build|update``,
``zsbir search``, ``zsbir serve``), which copies the run's ``checkpoints/final.pt`` into
its index directory and loads it from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zsbir.build import build
from zsbir.constraints import paths_unchecked
from zsbir.data.base import Split, read_image_file
from zsbir.data.loading import ImageDataset, collate, to_device
from zsbir.engine.checkpoint import load_checkpoint
from zsbir.manifest import resolve

__all__ = ["TrainedModel", "load_trained"]


class TrainedModel:
    """A run's evaluated network, transform and fitted hashers, ready to embed images:
    built by :func:`zsbir.build.build` with ``purpose="embed"`` from ``final.pt`` (a run
    directory's, or a copy of it, e.g. inside a search index)."""

    def __init__(self, run_dir: str | Path, device: str = "auto"):
        run_dir = Path(run_dir)
        final = run_dir if run_dir.is_file() else run_dir / "checkpoints" / "final.pt"
        if not final.is_file():
            raise FileNotFoundError(f"{str(run_dir)!r} has no checkpoints/final.pt: only a "
                                    "finished `zsbir run` can index photos")
        ckpt = load_checkpoint(final)
        with paths_unchecked():  # embedding reads neither the data nor pretrained weights
            manifest = resolve(ckpt["manifest"], str(final))
        manifest.run.device = device
        exp = build(manifest, "embed", checkpoint=ckpt)
        self.manifest = manifest
        self.device = exp.ctx.device
        self.model = exp.model.eval()
        self.hashers = exp.hashers
        self.rerankers = exp.rerankers
        #: the run's ``[pair_scorer]`` around this model (``None`` without one)
        self.pair_scorer = exp.pair_scorer
        self.transform = exp.eval_transform
        self.classes = ckpt["classes"]

    @torch.inference_mode()
    def forward_batch(self, batch: dict[str, Any], names: Sequence[str] = ("embedding",)
                      ) -> dict[str, np.ndarray]:
        """The named outputs of the model (float32 arrays, (N, ...)) for a batch from
        :func:`zsbir.data.loading.collate` (uint8 images as the loader yields them;
        normalized here on the model's device): one forward pass for all of them. A name
        the model does not give is a :class:`~zsbir.search.errors.SearchError`."""
        b = to_device(batch, self.device, self.transform)
        out = self.model(b["image"], b["domain"])
        missing = [n for n in names if n not in out]
        if missing:
            from zsbir.search.errors import SearchError

            raise SearchError(
                f"the run's model ({self.manifest.model.get('name', '?')}) gives no output "
                f"{', '.join(map(repr, missing))}; it gives {', '.join(map(repr, out))}")
        return {n: out[n].float().cpu().numpy() for n in names}

    def embed_batch(self, batch: dict[str, Any]) -> np.ndarray:
        """Embeddings (N, d) of a batch (:meth:`forward_batch` of the embedding alone)."""
        return self.forward_batch(batch)["embedding"]

    def forward_images(self, images: list[Any], domain: int,
                       names: Sequence[str] = ("embedding",)) -> dict[str, np.ndarray]:
        """:meth:`forward_batch` of decoded images (PIL, converted to RGB here)."""
        if not images:
            return {n: np.zeros((0, self.model.embed_dim) if n == "embedding" else (0,),
                                dtype=np.float32) for n in names}
        tf = self.transform.for_domain(domain)
        batch = collate([{"image": tf(im.convert("RGB")), "index": i, "label": 0,
                          "domain": domain} for i, im in enumerate(images)])
        return self.forward_batch(batch, names)

    def embed_images(self, images: list[Any], domain: int) -> np.ndarray:
        """Embeddings (N, d) of decoded images (PIL, converted to RGB here)."""
        return self.forward_images(images, domain)["embedding"]

    def hasher(self, tag: str | None) -> Any:
        """The hasher of this tag (the first one for ``None``); an unknown tag is a
        :class:`~zsbir.search.errors.SearchError` (a ``ValueError``) listing the run's."""
        from zsbir.search.errors import SearchError

        if tag is None:
            return self.hashers[0]
        for h in self.hashers:
            if h.tag == tag:
                return h
        raise SearchError(f"the run has no hasher {tag!r}; it has "
                          f"{', '.join(h.tag for h in self.hashers)}")

    @torch.inference_mode()
    def embed(self, paths: list[str], domain: int, batch_size: int = 64
              ) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
        """Embeddings of the readable images, their paths, and (path, error) skipped."""
        split = Split(list(paths), np.zeros(len(paths)), np.full(len(paths), domain))
        ds = ImageDataset(split, read_image_file, self.transform, "skip")
        feats, kept, skipped = [], [], []
        for i in range(0, len(paths), batch_size):
            batch = collate([ds[j] for j in range(i, min(i + batch_size, len(paths)))])
            skipped += batch["skipped"]
            if "image" not in batch:
                continue
            feats.append(torch.from_numpy(self.embed_batch(batch)))
            kept += [paths[j] for j in batch["index"].tolist()]
        emb = torch.cat(feats).numpy() if feats else np.zeros((0, self.model.embed_dim))
        return emb, kept, skipped


def load_trained(run_dir: str | Path, device: str = "auto") -> TrainedModel:
    return TrainedModel(run_dir, device)

