"""What a model expects of its input images, per domain: :class:`InputConfig` (size, mean,
std, interpolation), from which the data transforms are built
(:func:`zsbir.build.transforms_for`).

A model answers ``model.input_config("sketch")`` and ``model.input_config("photo")``: a
model with one backbone gives that backbone's weights' configuration for both (timm's
``pretrained_cfg``, torchvision's weights ``transforms()``); a model with a tower per
domain gives each tower's. ``size = None`` leaves the size to the manifest's
``data.image_size``; a model that needs one size (CLIP's 224-pixel towers) says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["DOMAINS", "Domain", "InputConfig", "domain_index", "from_pretrained_cfg",
           "from_record", "input_record"]

Domain = Literal["sketch", "photo"]
#: the domain names in the order of their bits (zsbir.data.base: PHOTO = 0, SKETCH = 1)
DOMAINS: tuple[str, str] = ("photo", "sketch")


def domain_index(domain: str) -> int:
    """The domain bit of a domain name (``"photo"`` -> 0, ``"sketch"`` -> 1)."""
    try:
        return DOMAINS.index(domain)
    except ValueError:
        raise ValueError(f"unknown domain {domain!r}; domains are 'sketch' and 'photo'") \
            from None


@dataclass(frozen=True)
class InputConfig:
    """A domain's input: ``size`` (pixels, square; ``None``: ``data.image_size``), per-channel
    ``mean`` and ``std`` in [0, 1] scale, and the resize ``interpolation`` ("bilinear",
    "bicubic", "nearest", "lanczos")."""

    size: int | None = None
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"


def from_pretrained_cfg(cfg: Any) -> InputConfig:
    """A backbone's :class:`~zsbir.models.backbone.PretrainedCfg` as an input
    configuration (its ``input_size`` is informational: the size stays the manifest's);
    ImageNet's defaults when there is none."""
    if cfg is None:
        return InputConfig()
    return InputConfig(size=None, mean=tuple(cfg.mean), std=tuple(cfg.std),
                       interpolation=str(cfg.interpolation))


def input_record(model: Any) -> dict[str, dict[str, Any]]:
    """The model's input configuration per domain as plain data (lists, floats, str), for
    a checkpoint: a model rebuilt from it without its pretrained weights (``zsbir evaluate
    RUN_DIR``, ``zsbir index``) would otherwise fall back to another normalization than the
    one it was trained with (an EfficientNet-Lite's TF-Lite weights: (x - 0.5) / 0.5)."""
    from zsbir.build import _input_config

    model = getattr(model, "module", model)  # a data-parallel wrapper's model
    out = {}
    for domain in DOMAINS:
        cfg = _input_config(model, domain)
        out[domain] = {"size": cfg.size, "mean": [float(v) for v in cfg.mean],
                       "std": [float(v) for v in cfg.std], "interpolation": cfg.interpolation}
    return out


def from_record(record: dict[str, Any]) -> InputConfig:
    """An :class:`InputConfig` from one domain's entry of :func:`input_record`."""
    return InputConfig(size=record.get("size"), mean=tuple(record["mean"]),
                       std=tuple(record["std"]), interpolation=str(record["interpolation"]))
