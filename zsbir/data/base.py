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
    """Decode an image file fully (so truncation is found now) and convert to 8-bit RGB
    (:func:`to_rgb8`: high-bit-depth images are scaled, never clipped)."""
    with Image.open(source) as im:
        im.load()
        return to_rgb8(im)


def to_rgb8(im: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of ``im``.

    Pillow's ``convert("RGB")`` clips 16-bit grayscale (modes ``I;16*``, 16-bit PNGs) and
    32-bit integer (``I``) images at 255, which turns almost every pixel white. Those are
    scaled instead: ``I;16*`` by 255/65535; ``I`` by 255 over the smallest of 255, 65535 and
    the image maximum that holds it (an ``I`` image is usually a 16-bit file); float ``F``
    by 255 when its values lie in [0, 1], like ``I`` otherwise. 16-bit RGB PNGs are already
    reduced to 8 bits, correctly, by Pillow.
    """
    mode = im.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return im.convert("RGB")
    arr = np.asarray(im).astype(np.float64)
    peak = float(arr.max()) if arr.size else 0.0
    if mode.startswith("I;16"):
        top = 65535.0
    elif mode == "F" and peak <= 1.0:
        top = 1.0
    else:
        top = next((t for t in (255.0, 65535.0) if peak <= t), peak)
    gray = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")  # uint8 (H, W): mode "L"


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
