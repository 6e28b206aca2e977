"""The student models (kind ``models``, ``[model]``) and the registered teacher networks.

A model is an ``nn.Module``: ``forward(image, domain)`` returns a dict with at least
``embedding`` (B, d), the retrieval feature, plus ``features`` and the head's other named
outputs (``logits``, ``imagenet_logits``, ...); ``embed_dim`` is d; and
``input_config(domain)`` (``"sketch"`` / ``"photo"``) says which
:class:`~zsbir.models.inputs.InputConfig` its transform uses for that domain.

- ``backbone_head`` (the default): one backbone for both domains and a head on its pooled
  features (SAKE, Liu et al. ICCV 2019, Sec. 3.1; SBTKNet; RPKD). ``[backbone]`` at the
  top of a manifest is shorthand for its ``[model.backbone]``.
- ``towers``: a backbone per domain (``[model.sketch]``, ``[model.photo]``) and one head;
  each image goes through its domain's tower (the untied sketch and photo branches of
  Sangkloy et al., "The Sketchy Database", SIGGRAPH 2016, Sec. 4).

Heads are ``Factory("heads")`` parameters: the model builds its head with what the head
needs from it (``in_features``, ``num_classes``, the pretrained ImageNet ``classifier``).

Teacher networks (kind ``networks``, ``[teacher.network]``) are frozen modules that map
images to a teacher signal dict (``logits``, ``features``); the teacher strategies
(``online``, ``class_mean``, plugins) decide when they run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar

import torch
from torch import nn

from zsbir.context import BuildContext
from zsbir.data.base import SKETCH
from zsbir.injection import supply
from zsbir.models.backbone import Backbone, backbone_tokens
from zsbir.models.heads import svd_init
from zsbir.models.inputs import InputConfig, domain_index, from_pretrained_cfg
from zsbir.registry import Factory, Nested, models, networks

__all__ = ["BackboneHead", "HeadFactory", "ImageNetClassifier", "RetrievalNet", "Towers",
           "svd_init"]

#: what a ``Factory("heads")`` parameter receives: ``head(**provided) -> nn.Module``
HeadFactory = Callable[..., nn.Module]


def _make_head(head: HeadFactory | nn.Module, backbone: Backbone, num_classes: int
               ) -> nn.Module:
    """A head built for ``backbone`` (``head`` already built: kept as it is)."""
    if isinstance(head, nn.Module):
        return head
    if not callable(head):
        raise TypeError(f"a model's head is a heads factory or a module, got {head!r}")
    return head(**supply("heads", in_features=int(backbone.num_features),
                         num_classes=int(num_classes),
                         classifier=backbone.imagenet_classifier()))


@models.register("backbone_head")
class BackboneHead(nn.Module):
    """One backbone for sketches and photos, a head on its pooled features (SAKE, Liu et
    al., ICCV 2019, Sec. 3.1: a shared CSE-ResNet-50 and the stacked embedding and
    classifiers; SBTKNet and RPKD alike): ``forward(image, domain)`` ->
    ``{"features": backbone(image, domain), **head(features, domain)}``.

    Args:
        backbone: ``[model.backbone]`` (or the shorthand ``[backbone]``).
        head: ``[model.head]``: a registered head, built with the backbone's width, the
            number of seen classes and its pretrained ImageNet classifier.
    """

    def __init__(self, backbone: Annotated[Backbone, Nested("backbones")],
                 head: Annotated[HeadFactory, Factory("heads")] = {"name": "stacked"},
                 num_classes: int = 0, ctx: BuildContext | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = _make_head(head, backbone, num_classes)

    @property
    def embed_dim(self) -> int:
        return int(self.head.embed_dim)

    def input_config(self, domain: str) -> InputConfig:
        """The backbone weights' input configuration, for both domains."""
        domain_index(domain)
        return from_pretrained_cfg(getattr(self.backbone, "pretrained_cfg", None))

    def forward(self, image: torch.Tensor, domain: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        features, tokens = backbone_tokens(self.backbone, image, domain)
        out = {"features": features, **self.head(features, domain)}
        if tokens is not None:  # free: the backbone's unpooled output (pair scorers)
            out.setdefault("tokens", tokens)
        return out


#: the name older code used: ``RetrievalNet(backbone, head_module)``
RetrievalNet = BackboneHead


@models.register("towers")
class Towers(nn.Module):
    """A backbone per domain and one head: sketches go through ``sketch``, photos through
    ``photo`` (the untied sketch and photo branches of Sangkloy et al., "The Sketchy
    Database", SIGGRAPH 2016, Sec. 4), their pooled features (same width) into the head.
    A batch mixing both domains runs each tower on its rows only; the outputs are in the
    batch's order. Each tower keeps its own input configuration (mean, std,
    interpolation), so the two domains may be normalized differently.

    Args:
        sketch: ``[model.sketch]``, the sketches' backbone.
        photo: ``[model.photo]``, the photos' backbone; its pretrained ImageNet classifier
            initializes the head (``imagenet_head``), and the teacher network's default
            backbone is a copy of its table.
        head: ``[model.head]``: a registered head on the towers' features.
    """

    def __init__(self, sketch: Annotated[Backbone, Nested("backbones")],
                 photo: Annotated[Backbone, Nested("backbones")],
                 head: Annotated[HeadFactory, Factory("heads")] = {"name": "stacked"},
                 num_classes: int = 0, ctx: BuildContext | None = None):
        super().__init__()
        if int(sketch.num_features) != int(photo.num_features):
            raise ValueError(f"model 'towers': the sketch tower gives {sketch.num_features}-d "
                             f"features, the photo tower {photo.num_features}-d; one head "
                             "reads both, so they must have the same width")
        self.sketch = sketch
        self.photo = photo
        self.head = _make_head(head, photo, num_classes)

    @property
    def embed_dim(self) -> int:
        return int(self.head.embed_dim)

    def tower(self, domain: str) -> Backbone:
        """The backbone of a domain (``"sketch"`` / ``"photo"``)."""
        return self.sketch if domain_index(domain) == SKETCH else self.photo

    def input_config(self, domain: str) -> InputConfig:
        """The input configuration of the domain's tower's weights."""
        return from_pretrained_cfg(getattr(self.tower(domain), "pretrained_cfg", None))

    def forward(self, image: torch.Tensor, domain: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        if domain is None:
            raise ValueError("model 'towers' routes each image by its domain bit: pass the "
                             "batch's domain tensor")
        is_sketch = domain == SKETCH
        n_sketch = int(is_sketch.sum())
        tokens: torch.Tensor | None = None
        if n_sketch == len(domain):
            features, tokens = backbone_tokens(self.sketch, image, domain)
        elif n_sketch == 0:
            features, tokens = backbone_tokens(self.photo, image, domain)
        else:
            rows_s = is_sketch.nonzero().squeeze(1)
            rows_p = (~is_sketch).nonzero().squeeze(1)
            f_s, t_s = backbone_tokens(self.sketch, image[rows_s], domain[rows_s])
            f_p, t_p = backbone_tokens(self.photo, image[rows_p], domain[rows_p])
            features = f_s.new_zeros((len(domain), f_s.shape[1]))
            features = features.index_copy(0, rows_s, f_s).index_copy(
                0, rows_p, f_p.to(f_s.dtype))
            if t_s is not None and t_p is not None and t_s.shape[1:] == t_p.shape[1:]:
                tokens = t_s.new_zeros((len(domain), *t_s.shape[1:]))
                tokens = tokens.index_copy(0, rows_s, t_s).index_copy(
                    0, rows_p, t_p.to(t_s.dtype))
        out = {"features": features, **self.head(features, domain)}
        if tokens is not None:  # the towers' unpooled outputs (pair scorers)
            out.setdefault("tokens", tokens)
        return out


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

    def __init__(self, backbone: Annotated[Backbone, Nested("backbones")]):
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
