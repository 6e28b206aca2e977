"""Data contracts shared by every protocol: a split is parallel arrays of sources,
labels and domains; a protocol returns the four splits of a zero-shot benchmark.

Labels index one class list: seen classes first (``0..n_seen-1``, the training labels),
then unseen classes (``n_seen..``). Domains: ``PHOTO = 0``, ``SKETCH = 1``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

PHOTO, SKETCH = 0, 1
DOMAIN_NAMES = {PHOTO: "photo", SKETCH: "sketch"}


def read_image_file(source: str) -> Image.Image:
    """Decode an image file fully (so truncation is found now) and convert to RGB."""
    with Image.open(source) as im:
        im.load()
        return im.convert("RGB")


@dataclass
class Split:
    """One split: ``sources[i]`` (a file path, or a key the protocol's reader knows),
    ``labels[i]`` (index into :attr:`ProtocolData.classes`), ``domains[i]``."""

    sources: list[str]
    labels: np.ndarray
    domains: np.ndarray

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.domains = np.asarray(self.domains, dtype=np.int64)
        if not (len(self.sources) == len(self.labels) == len(self.domains)):
            raise ValueError("Split: sources, labels and domains differ in length")

    def __len__(self) -> int:
        return len(self.sources)

    def subset(self, mask_or_index: np.ndarray) -> Split:
        idx = np.flatnonzero(mask_or_index) if mask_or_index.dtype == bool else mask_or_index
        return Split([self.sources[i] for i in idx], self.labels[idx], self.domains[idx])

    def of_domain(self, domain: int) -> Split:
        return self.subset(self.domains == domain)

    @staticmethod
    def concat(*splits: Split) -> Split:
        return Split(
            [s for sp in splits for s in sp.sources],
            np.concatenate([sp.labels for sp in splits]) if splits else np.zeros(0),
            np.concatenate([sp.domains for sp in splits]) if splits else np.zeros(0),
        )


@dataclass
class ProtocolData:
    """What a protocol component returns.

    - ``train``: seen-class sketches and photos used for training;
    - ``val``: a seeded held-out part of the seen classes' images (model selection);
    - ``query``: unseen-class sketches;
    - ``gallery``: unseen-class photos (plus seen-class photos when generalized).
    """

    name: str
    seen_classes: list[str]
    unseen_classes: list[str]
    train: Split
    val: Split
    query: Split
    gallery: Split
    #: turns a source into an RGB PIL image; raises on unreadable input
    reader: Callable[[str], Image.Image] = read_image_file
    #: (source, reason) of every file left out while indexing
    skipped: list[tuple[str, str]] = field(default_factory=list)
    generalized: bool = False

    @property
    def classes(self) -> list[str]:
        return self.seen_classes + self.unseen_classes

    def summary(self) -> dict[str, int]:
        return {
            "seen_classes": len(self.seen_classes),
            "unseen_classes": len(self.unseen_classes),
            "train": len(self.train),
            "val": len(self.val),
            "query": len(self.query),
            "gallery": len(self.gallery),
            "skipped_files": len(self.skipped),
        }
