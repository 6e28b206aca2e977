"""Decoding, augmentation and batching.

Items are decoded and augmented in worker processes into uint8 tensors; normalization
happens on the device (:func:`to_device`), which keeps host-to-device copies small. The
transform is per domain (:class:`DomainTransforms`: the model says which input
configuration each domain uses): a sketch row is resized and normalized as the sketch
transform says, a photo row as the photo one (one normalization for the whole batch when
both agree).

Augmentation is deterministic per item: each training item carries a seed derived from
``(run seed, epoch, step, position)``, so a resumed run, any worker count and any
machine draw the same transforms. SAKE's recipe (Liu et al., ICCV 2019, reference code):
with probability 0.7, a random horizontal flip and an affine transform (scale 0.7-1.3,
rotation +-30 degrees, translation +-10 px), then resize to the input size.

An image that cannot be decoded is never silently kept or dropped: with
``data.on_corrupt = "skip"`` it is left out of its batch and reported (path and error) in
the batch's ``skipped`` list, which the engine logs and counts into ``metrics.json``; with
``"fail"`` the run stops with :class:`CorruptImageError` naming the file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from zsbir.data.base import PHOTO, SKETCH, Split
from zsbir.engine.threads import current_plan, loader_workers, worker_init

__all__ = ["CorruptImageError", "DomainTransforms", "ImageDataset", "Transform", "make_loader",
           "to_device", "worker_count"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CorruptImageError(RuntimeError):
    """An image that could not be decoded, with its path.

    Raised in a DataLoader worker, it reaches the main process rebuilt from torch's text
    "Caught CorruptImageError in DataLoader worker process N. Original Traceback ...":
    the constructor keeps only the original one-line message, so the user sees the file
    and the decoder's reason, not the worker's traceback."""

    def __init__(self, message: str = ""):
        if message.startswith("Caught CorruptImageError"):
            marker = "CorruptImageError: "
            lines = [ln for ln in message.splitlines() if marker in ln]
            if lines:
                message = lines[-1].split(marker, 1)[1]
        super().__init__(message)


_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
             "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


@dataclass
class Transform:
    """Resize (+ SAKE-style random affine and flip when ``train``) to uint8 CHW; the
    normalization (``mean``, ``std`` in [0, 1] scale, ``None``: none) is applied on the
    device by :func:`to_device`. Built from the backbone's
    :class:`~zsbir.models.backbone.PretrainedCfg`, so the weights decide it."""

    size: int
    train: bool = False
    augment_prob: float = 0.7
    flip: bool = True
    scale: Sequence[float] = (0.7, 1.3)
    rotation: float = 30.0
    translation: float = 10.0
    mean: Sequence[float] | None = IMAGENET_MEAN
    std: Sequence[float] | None = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        # the affine transform divides by the zoom (manifests: DataConfig.scale's checks)
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be [low, high] with 0 < low <= high, got "
                             f"{list(self.scale)}")

    def __call__(self, img: Image.Image, seed: int | None = None) -> torch.Tensor:
        resample = _RESAMPLE.get(self.interpolation, Image.BILINEAR)
        img = img.resize((self.size, self.size), resample) if img.size != (
            self.size, self.size) else img
        if self.train and seed is not None:
            rng = np.random.default_rng(seed)
            if rng.random() < self.augment_prob:
                img = self._augment(img, rng)
        arr = np.asarray(img, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def _augment(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        if self.flip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        s = float(rng.uniform(self.scale[0], self.scale[1]))
        angle = float(rng.uniform(-self.rotation, self.rotation))
        # translation is given in pixels of a 224 input; scale it to this size
        t = self.translation * self.size / 224.0
        tx, ty = (float(v) for v in rng.uniform(-t, t, size=2))
        return _affine(img, angle, s, tx, ty)

    def for_domain(self, domain: int | str) -> Transform:
        """The transform of a domain: this one, for every domain."""
        return self

    def describe(self) -> dict[str, Any]:
        """Plain data identifying the transform (cache keys)."""
        return {"size": self.size, "train": self.train, "augment_prob": self.augment_prob,
                "flip": self.flip, "scale": list(self.scale), "rotation": self.rotation,
                "translation": self.translation, "interpolation": self.interpolation,
                "mean": list(self.mean) if self.mean is not None else None,
                "std": list(self.std) if self.std is not None else None}


def _domain_bit(domain: int | str) -> int:
    if isinstance(domain, str):
        if domain not in ("photo", "sketch"):
            raise ValueError(f"unknown domain {domain!r}; domains are 'sketch' and 'photo'")
        return SKETCH if domain == "sketch" else PHOTO
    return int(domain)


@dataclass
class DomainTransforms:
    """A :class:`Transform` per domain (``photo``, ``sketch``), built from the model's
    per-domain input configuration. Items are transformed by their domain's
    (:meth:`for_domain`); :func:`to_device` normalizes each row with its domain's mean and
    std. ``size``, ``mean``, ``std``, ``interpolation`` and ``train`` read the photo
    transform's (older code that knew one transform)."""

    photo: Transform
    sketch: Transform

    def for_domain(self, domain: int | str) -> Transform:
        """The transform of a domain bit (``zsbir.data.base``: PHOTO = 0, SKETCH = 1) or
        name (``"photo"``, ``"sketch"``)."""
        return self.sketch if _domain_bit(domain) == SKETCH else self.photo

    @property
    def same(self) -> bool:
        """Whether both domains are transformed alike."""
        return self.photo == self.sketch

    def __call__(self, img: Image.Image, seed: int | None = None,
                 domain: int | str = PHOTO) -> torch.Tensor:
        return self.for_domain(domain)(img, seed)

    @property
    def size(self) -> int:
        return self.photo.size

    @property
    def mean(self) -> Sequence[float] | None:
        return self.photo.mean

    @property
    def std(self) -> Sequence[float] | None:
        return self.photo.std

    @property
    def interpolation(self) -> str:
        return self.photo.interpolation

    @property
    def train(self) -> bool:
        return self.photo.train

    def describe(self) -> dict[str, Any]:
        """Plain data identifying the transforms (cache keys): one transform's when both
        domains agree (as before there were two), else ``{"photo": ..., "sketch": ...}``."""
        if self.same:
            return self.photo.describe()
        return {"photo": self.photo.describe(), "sketch": self.sketch.describe()}


def _affine(img: Image.Image, angle: float, scale: float, tx: float, ty: float) -> Image.Image:
    """Rotate by ``angle`` degrees and scale about the centre, then translate; white fill."""
    import math

    w, h = img.size
    cx, cy = w / 2.0, h / 2.0
    a = math.radians(angle)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    # inverse map: output (x, y) -> input coordinates
    m = (cos, sin, cx - cos * (cx + tx) - sin * (cy + ty),
         -sin, cos, cy + sin * (cx + tx) - cos * (cy + ty))
    return img.transform((w, h), Image.AFFINE, m, resample=Image.BILINEAR,
                         fillcolor=(255, 255, 255))


class ImageDataset(torch.utils.data.Dataset):
    """Items of a split; keys are ``(index, augmentation seed or -1)``."""

    def __init__(self, split: Split, reader: Callable[[str], Image.Image],
                 transform: Transform | DomainTransforms, on_corrupt: str = "skip"):
        self.split = split
        self.reader = reader
        self.transform = transform
        self.on_corrupt = on_corrupt

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, -1)
        source = self.split.sources[index]
        try:
            img = self.reader(source)
            if img.size[0] == 0 or img.size[1] == 0:
                raise ValueError("empty image")
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the file's fault
            if self.on_corrupt == "fail":
                raise CorruptImageError(f"cannot decode image {source!r}: {exc}") from exc
            return {"index": index, "error": f"{type(exc).__name__}: {exc}", "source": source}
        domain = int(self.split.domains[index])
        return {"image": self.transform.for_domain(domain)(img, None if seed < 0 else seed),
                "index": index, "label": int(self.split.labels[index]), "domain": domain}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack good items; list the bad ones under ``skipped`` as (source, error)."""
    good = [it for it in items if "error" not in it]
    batch: dict[str, Any] = {"skipped": [(it["source"], it["error"]) for it in items
                                         if "error" in it]}
    if good:
        batch["image"] = torch.stack([it["image"] for it in good])
        for k in ("index", "label", "domain"):
            batch[k] = torch.tensor([it[k] for it in good], dtype=torch.int64)
    return batch


class BatchList:
    """A batch sampler over a list that can be replaced between epochs."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    def __iter__(self) -> Iterator[list[Any]]:
        return iter(list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


def worker_count(requested: int, device: torch.device | None = None) -> int:
    """-1 (automatic): from the CPUs this process may use, divided among the run's
    processes (:mod:`zsbir.engine.threads`): with CUDA one worker per CPU (at most 8); on
    the CPU, where decoding competes with the model for the same cores, one worker to
    overlap input and compute (none on a single CPU)."""
    if requested >= 0:
        return requested
    kind = device.type if device is not None else "cpu"
    plan = current_plan(kind)  # from the run's CPUs, not the concurrent processes' number
    return loader_workers(max(1, plan.cpus // plan.processes), kind)


def make_loader(dataset: ImageDataset, batches: BatchList | Sequence[Sequence[Any]],
                workers: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over explicit batches (lists of dataset keys)."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
        pin_memory=pin_memory, persistent_workers=workers > 0 and isinstance(batches, BatchList),
        prefetch_factor=4 if workers > 0 else None,
        # a private generator: creating an iterator must not consume the global RNG
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=worker_init if workers > 0 else None,
    )


def to_device(batch: dict[str, Any], device: torch.device,
              transform: Transform | DomainTransforms | None = None,
              channels_last: bool = False) -> dict[str, Any]:
    """Move a batch to the device and turn uint8 images into float32 normalized with the
    transform's ``mean``/``std`` (none without a transform or when they are ``None``);
    with :class:`DomainTransforms` each row with its domain's (one normalization for the
    batch when both domains agree)."""
    out = dict(batch)
    img = batch["image"].to(device, non_blocking=True).float().div_(255.0)
    if isinstance(transform, DomainTransforms) and (
            (transform.photo.mean, transform.photo.std)
            == (transform.sketch.mean, transform.sketch.std)):
        transform = transform.photo
    if isinstance(transform, DomainTransforms):  # per row: table[domain bit]
        rows = [transform.photo, transform.sketch]  # PHOTO = 0, SKETCH = 1
        mean = torch.tensor([list(t.mean) if t.mean is not None else [0.0] * 3 for t in rows],
                            device=device)
        std = torch.tensor([list(t.std) if t.std is not None else [1.0] * 3 for t in rows],
                           device=device)
        dom = batch["domain"].to(device, non_blocking=True)
        img = (img - mean[dom].view(-1, 3, 1, 1)) / std[dom].view(-1, 3, 1, 1)
    elif transform is not None and transform.mean is not None and transform.std is not None:
        mean = torch.tensor(transform.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(transform.std, device=device).view(1, 3, 1, 1)
        img = (img - mean) / std
    if channels_last:
        img = img.contiguous(memory_format=torch.channels_last)
    out["image"] = img
    for k in ("index", "label", "domain"):
        out[k] = batch[k].to(device, non_blocking=True)
    return out
