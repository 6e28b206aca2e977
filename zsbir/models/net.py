"""The retrieval network (a registered backbone plus a registered head) and the
registered teacher networks.

``RetrievalNet(backbone, head).forward(image, domain)`` returns a dict: ``features``
(B, F) from the backbone plus the head's named outputs (``embedding`` (B, d) always;
``logits``, ``imagenet_logits`` and others as the head provides them).

Teacher networks (kind ``networks``, ``[teacher.network]``) are frozen modules that map
images to a teacher signal dict (``logits``, ``features``); the teacher strategies
(``online``, ``class_mean``, plugins) decide when they run.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from zsbir.models.backbone import Backbone
from zsbir.models.heads import svd_init
from zsbir.registry import networks

__all__ = ["ImageNetClassifier", "RetrievalNet", "svd_init"]


class RetrievalNet(nn.Module):
    """Backbone + head; ``forward(image, domain)`` -> ``{"features", **head outputs}``."""

    def __init__(self, backbone: Backbone, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def embed_dim(self) -> int:
        return int(self.head.embed_dim)

    def forward(self, image: torch.Tensor, domain: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        features = self.backbone(image, domain)
        return {"features": features, **self.head(features, domain)}


def _imagenet_weights_needed(params: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    bb = params.get("backbone") or {}
    if bb.get("pretrained") is False and not bb.get("weights"):
        return ["the teacher network needs ImageNet weights, but its backbone has "
                "pretrained = false (set backbone.pretrained = true, give backbone.weights, "
                "or give [teacher.network.backbone])"]
    return []


@networks.register("imagenet_classifier")
class ImageNetClassifier(nn.Module):
    """A frozen backbone with its pretrained ImageNet classifier: images -> ``logits``
    (B, 1000) and pooled ``features`` (B, F): SAKE's teacher (Liu et al., ICCV 2019,
    Sec. 3.2), also SBTKNet's and RPKD's.

    Args:
        backbone: ``[teacher.network.backbone]``; by default the student's backbone table
            (a separate, frozen copy with its pretrained weights).
    """

    provides: ClassVar[frozenset[str]] = frozenset({"logits", "features"})
    check_manifest = staticmethod(_imagenet_weights_needed)

    def __init__(self, backbone: Backbone):
        super().__init__()
        head = backbone.imagenet_classifier()
        if head is None:
            raise ValueError("the teacher network's backbone has no pretrained ImageNet "
                             "classifier (set pretrained = true and provide weights)")
        self.backbone = backbone
        self.head = head
        self.requires_grad_(False)
        self.eval()

    @property
    def pretrained_cfg(self) -> Any:
        return getattr(self.backbone, "pretrained_cfg", None)

    def train(self, mode: bool = True) -> ImageNetClassifier:  # always frozen, always eval
        return super().train(False)

    def forward(self, image: torch.Tensor, domain: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        features = self.backbone(image, domain)
        return {"logits": self.head(features), "features": features}


#: the name older code used
TeacherNet = ImageNetClassifier
