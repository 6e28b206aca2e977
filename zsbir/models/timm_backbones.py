"""Backbones from timm: ResNet-18/50 (SBTKNet uses ResNet-50) and any timm model by name."""

from __future__ import annotations

from zsbir.models.backbone import Backbone, TimmBackbone, WeightsPath, create_timm
from zsbir.registry import backbones


def _timm(name: str, timm_name: str, pretrained: bool, weights: str | None,
          download: bool) -> Backbone:
    model, loaded = create_timm(name, timm_name, pretrained, weights, download)
    return TimmBackbone(model, pretrained=loaded)


@backbones.register("resnet18")
def resnet18(pretrained: bool = False, weights: WeightsPath = None,
             download: bool = False) -> Backbone:
    """ResNet-18 (He et al., CVPR 2016), 512-d pooled features; small and fast on CPU."""
    return _timm("resnet18", "resnet18", pretrained, weights, download)


@backbones.register("resnet50")
def resnet50(pretrained: bool = True, weights: WeightsPath = None,
             download: bool = False) -> Backbone:
    """ResNet-50 (He et al., CVPR 2016), 2048-d pooled features: SBTKNet's backbone
    (Tursun et al., "An Efficient Framework for ZS-SBIR", Sec. 3)."""
    return _timm("resnet50", "resnet50", pretrained, weights, download)


@backbones.register("timm")
def timm_model(model: str, pretrained: bool = False, weights: WeightsPath = None,
               download: bool = False) -> Backbone:
    """Any timm architecture by name (``model = "convnext_tiny"``), pooled features."""
    return _timm(f"timm:{model}", model, pretrained, weights, download)
