"""The backbone contract and pretrained-weights sources.

A registered backbone factory returns a :class:`Backbone`: an ``nn.Module`` mapping images
(and, for a conditional backbone such as SAKE's CSE-ResNet-50, the domain bit) to pooled
features, that also exposes its ImageNet classifier when it has pretrained weights, so
that heads can be initialized from it and it can serve as a frozen teacher.

Weights are separate from the constructor (as in timm): a factory takes
``pretrained: bool`` and ``weights: str | None`` (a local file). With ``pretrained = true``
and no file, the weights are looked up in timm's / Hugging Face's / torch.hub's local
caches, never downloaded unless ``download = true``; when none is found the error says
exactly which file would be used and how to provide one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["IMAGENET_CFG", "Backbone", "PretrainedCfg", "TimmBackbone", "WeightsNotFoundError",
           "find_cached_weights", "load_state_dict_file", "resolve_weights"]


@dataclass(frozen=True)
class PretrainedCfg:
    """What a backbone's weights expect of their input, after timm's ``pretrained_cfg``
    and torchvision's weights ``transforms()``: the data transform is derived from it.

    Attributes:
        mean, std: per-channel normalization in [0, 1] scale.
        input_size: (C, H, W) the weights were trained at (informational: the manifest's
            ``data.image_size`` decides the size used).
        interpolation: resize filter ("bilinear", "bicubic").
        source: where the weights came from (a file path, a package, ``"random init"``).
    """

    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    input_size: tuple[int, int, int] = (3, 224, 224)
    interpolation: str = "bilinear"
    source: str = "random init"

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std),
                "input_size": list(self.input_size), "interpolation": self.interpolation,
                "source": self.source}


#: ImageNet mean/std, 224 px, bilinear: what most ImageNet weights (and zsbir's own
#: untrained backbones) use
IMAGENET_CFG = PretrainedCfg()


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights were asked for and no local source has them."""


class Backbone(nn.Module):
    """Images (B, 3, H, W) and domain bits (B,) -> pooled features (B, num_features).

    Attributes:
        num_features: width of the pooled features.
        conditional: whether ``forward`` uses the domain bit (0 photo, 1 sketch).
        pretrained: whether ImageNet weights were loaded.
    """

    num_features: int
    conditional: bool = False
    pretrained: bool = False
    #: what the weights expect of their input (the data transform follows it)
    pretrained_cfg: PretrainedCfg = IMAGENET_CFG

    def forward(self, x: torch.Tensor, domain: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def imagenet_classifier(self) -> nn.Linear | None:
        """The pretrained 1000-way classifier on the pooled features, if there is one."""
        return None


class TimmBackbone(Backbone):
    """Any timm model, pooled features from ``forward_head(pre_logits=True)``."""

    def __init__(self, model: nn.Module, pretrained: bool, source: str | None = None):
        super().__init__()
        self.model = model
        self.num_features = int(model.num_features)
        self.pretrained = pretrained
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.pretrained_cfg = PretrainedCfg(
            mean=tuple(cfg.get("mean", IMAGENET_CFG.mean)),
            std=tuple(cfg.get("std", IMAGENET_CFG.std)),
            input_size=tuple(cfg.get("input_size", IMAGENET_CFG.input_size)),
            # the weights' filter; untrained models keep zsbir's bilinear
            interpolation=str(cfg.get("interpolation") or "bilinear") if pretrained
            else "bilinear",
            source=source or (f"timm {cfg.get('architecture', '?')}"
                              f"{'.' + cfg['tag'] if cfg.get('tag') else ''}"
                              if pretrained else "random init"))

    def forward(self, x: torch.Tensor, domain: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def imagenet_classifier(self) -> nn.Linear | None:
        head = self.model.get_classifier()
        if self.pretrained and isinstance(head, nn.Linear) and head.out_features == 1000:
            return head
        return None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file with ``weights_only=True`` (never falls back to pickle).

    Accepts a plain state dict or a checkpoint holding one under ``state_dict``/``model``.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - rewrap with the path
        raise ValueError(f"cannot read weights file {str(path)!r}: {exc}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"weights file {str(path)!r} holds no state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def find_cached_weights(timm_name: str) -> Path | None:
    """The locally cached pretrained file timm would use for ``timm_name``, if any.

    Looks in the Hugging Face hub cache (``hf_hub_id``) and torch.hub's checkpoint
    directory (``url``) without touching the network.
    """
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name.split(".")[0])
    if cfg is None:
        return None
    tag = timm_name.split(".", 1)[1] if "." in timm_name else None
    if tag:
        cfg = timm.models.get_pretrained_cfg(timm_name) or cfg
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for fname in ("model.safetensors", "pytorch_model.bin",
                          getattr(cfg, "hf_hub_filename", None)):
                if not fname:
                    continue
                found = try_to_load_from_cache(hub_id, fname)
                if isinstance(found, str) and os.path.isfile(found):
                    return Path(found)
        except ImportError:
            pass
    url = getattr(cfg, "url", None)
    if url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if candidate.is_file():
            return candidate
    return None


def resolve_weights(
    backbone: str, timm_name: str, pretrained: bool, weights: str | None, download: bool
) -> Path | None:
    """Where the pretrained weights come from: a file, the local cache, or ``None``.

    Raises :class:`WeightsNotFoundError` with instructions when they are asked for and
    cannot be found offline.
    """
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(
                f"backbone {backbone!r}: weights file {str(path)!r} does not exist"
            )
        return path
    if not pretrained:
        return None
    cached = find_cached_weights(timm_name)
    if cached is not None or download:
        return cached  # None + download: let timm fetch it
    raise WeightsNotFoundError(
        f"backbone {backbone!r}: pretrained weights were asked for (pretrained = true) but "
        f"none are on this machine: no `weights` file was given and timm's caches hold no "
        f"weights for {timm_name!r}. Give a local file with `backbone.weights = "
        f"\"/path/to/{timm_name}.pth\"` (a state dict readable by torch.load(weights_only="
        f"True), or .safetensors), set `backbone.download = true` on a machine with "
        f"internet access, or set `backbone.pretrained = false`."
    )


def create_timm(
    backbone: str, timm_name: str, pretrained: bool, weights: str | None, download: bool,
    **kwargs: Any,
) -> tuple[nn.Module, bool]:
    """Create a timm model with weights from :func:`resolve_weights`; returns (model, loaded)."""
    import timm

    source = resolve_weights(backbone, timm_name, pretrained, weights, download)
    if source is None and not (pretrained and download):
        return timm.create_model(timm_name, pretrained=False, **kwargs), False
    if source is not None and source.suffix not in (".safetensors",) and not str(
        source
    ).endswith(".bin"):
        # plain state dict: load it ourselves so nested checkpoints work too
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
        state = load_state_dict_file(source)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"backbone {backbone!r}: weights file {str(source)!r} does not match "
                f"{timm_name}: missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}"
                f", unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        return model, True
    overlay = {"file": str(source)} if source is not None else None
    model = timm.create_model(
        timm_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
    )
    return model, True
