"""Registered heads: what sits on the backbone's pooled features (``[model.head]``).

A head is an ``nn.Module`` built by its model (a ``Factory("heads")`` parameter, e.g.
``backbone_head``'s ``head``) from its manifest table plus what the model provides:
``in_features`` (the width of the features it reads), ``num_classes`` (seen classes),
``classifier`` (the backbone's pretrained ImageNet classifier, ``None`` when there is
none; for SVD initialization) and ``ctx``. Its
``forward(features, domain)`` returns named outputs, at least ``"embedding"`` (B, d), the
retrieval feature; ``provides`` (a set, or a function of the head's parameters) names
them, so that validation can check every loss's ``output_keys`` against it.

Two arrangements cover SAKE and SBTKNet:

- ``stacked`` (SAKE, Liu et al. ICCV 2019, Sec. 3.1): pooled features x -> embedding
  e = W_e x (d-dim) -> seen-class classifier ``alpha^T e + beta`` and ImageNet head
  ``zeta^T e + eta``.
- ``parallel`` (SBTKNet, Tursun et al., Sec. 3): FC_sim (embedding), FC_id (seen classes)
  and FC_soft (ImageNet) side by side on the pooled features.

SVD initialization (SAKE reference code; Table 4's note "zeta and the weight for x_i are
initialized by decomposing the original weight matrix in the output layer"): with the
pretrained classifier W (1000 x F) = U S V^T and bias b, the embedding weight is
S_d V_d^T (d x F) and the ImageNet head weight U_d (1000 x d) with bias b, so that
head(embed(x)) = U_d S_d V_d^T x + b, the best rank-d approximation of the pretrained
logits W x + b.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import torch
from torch import nn

from zsbir.constraints import Range
from zsbir.context import BuildContext
from zsbir.registry import heads

__all__ = ["LinearHeads", "ParallelHead", "StackedHead", "svd_init"]

EmbedDim = Annotated[int, Range(ge=1, le=65536)]
Dropout = Annotated[float, Range(ge=0, lt=1)]


def svd_init(classifier: nn.Linear, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD of a (1000 x F) classifier: (embed weight d x F, head weight 1000 x d,
    head bias)."""
    w = classifier.weight.detach().float()
    if dim > min(w.shape):
        raise ValueError(f"model.head.embed_dim ({dim}) exceeds the classifier's rank bound "
                         f"{min(w.shape)}; SVD initialization needs embed_dim <= {min(w.shape)}")
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    embed_w = s[:dim, None] * vh[:dim]
    head_w = u[:, :dim]
    bias = (classifier.bias.detach().float() if classifier.bias is not None
            else torch.zeros(w.shape[0]))
    return embed_w, head_w, bias


def _outputs(params: dict[str, Any]) -> frozenset[str]:
    extra = {"imagenet_logits"} if params.get("imagenet_head", "none") != "none" else set()
    return frozenset({"embedding", "logits", *extra})


def _needs_weights(params: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """An initialization from the pretrained classifier needs a pretrained backbone."""
    init = params.get("imagenet_head", "none")
    bb = manifest.get("backbone") or {}  # the student's backbone (the photo tower's)
    if init in ("svd", "pretrained") and bb.get("pretrained") is False and not bb.get("weights"):
        return [f"imagenet_head = {init!r} initializes from the backbone's pretrained "
                "ImageNet classifier, but backbone.pretrained = false (set it to true, give "
                "backbone.weights, or use imagenet_head = \"random\")"]
    return []


class LinearHeads(nn.Module):
    """Embedding, seen-class classifier and optional ImageNet head, linear layers;
    ``heads_on`` says whether the classifiers read the embedding or the features."""

    heads_on: ClassVar[str] = "embedding"
    provides = staticmethod(_outputs)
    check_manifest = staticmethod(_needs_weights)

    def __init__(self, in_features: int, num_classes: int, classifier: nn.Linear | None,
                 ctx: BuildContext | None, embed_dim: int, imagenet_head: str, dropout: float):
        super().__init__()
        feat = int(in_features)
        self.embed = nn.Linear(feat, embed_dim)
        head_in = embed_dim if self.heads_on == "embedding" else feat
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(head_in, num_classes)
        self.imagenet_head: nn.Linear | None = None
        if imagenet_head == "none":
            return
        self.imagenet_head = nn.Linear(head_in, 1000)
        if ctx is not None and not ctx.load_pretrained:
            return  # weights come from a checkpoint: shapes are all that matter
        pretrained = classifier
        if imagenet_head in ("svd", "pretrained") and pretrained is None:
            raise ValueError(
                f"model.head.imagenet_head = {imagenet_head!r} needs a backbone with "
                "pretrained ImageNet weights and classifier (set backbone.pretrained = true, "
                "or model.head.imagenet_head = \"random\")")
        with torch.no_grad():
            if imagenet_head == "svd":
                ew, hw, hb = svd_init(pretrained, embed_dim)
                self.embed.weight.copy_(ew)
                self.embed.bias.zero_()
                self.imagenet_head.weight.copy_(hw)
                self.imagenet_head.bias.copy_(hb)
            elif imagenet_head == "pretrained":
                self.imagenet_head.weight.copy_(pretrained.weight)
                if pretrained.bias is not None:
                    self.imagenet_head.bias.copy_(pretrained.bias)

    @property
    def embed_dim(self) -> int:
        return self.embed.out_features

    def forward(self, features: torch.Tensor, domain: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        embedding = self.embed(features)
        head_in = self.dropout(embedding if self.heads_on == "embedding" else features)
        out = {"embedding": embedding, "logits": self.classifier(head_in)}
        if self.imagenet_head is not None:
            out["imagenet_logits"] = self.imagenet_head(head_in)
        return out


@heads.register("stacked")
class StackedHead(LinearHeads):
    """SAKE's heads, stacked on the embedding (Liu et al., ICCV 2019, Sec. 3.1):
    e = W_e x, seen-class logits alpha^T e + beta, ImageNet logits zeta^T e + eta.

    Args:
        embed_dim: d, the retrieval embedding's width (SAKE: 512; 64 for 64-bit codes).
        imagenet_head: "svd" initializes W_e and zeta by truncated SVD of the pretrained
            classifier (SAKE's reference code), "random", or "none" (no ImageNet head).
        dropout: on the classifiers' input.
    """

    heads_on: ClassVar[str] = "embedding"

    def __init__(self, in_features: int, num_classes: int, classifier: nn.Linear | None = None,
                 ctx: BuildContext | None = None, embed_dim: EmbedDim = 512,
                 imagenet_head: Literal["svd", "random", "none"] = "none",
                 dropout: Dropout = 0.0):
        super().__init__(in_features, num_classes, classifier, ctx, embed_dim, imagenet_head,
                         dropout)


@heads.register("parallel")
class ParallelHead(LinearHeads):
    """SBTKNet's heads side by side on the pooled features (Tursun et al., "An Efficient
    Framework for ZS-SBIR", Sec. 3): FC_sim (embedding), FC_id (seen classes), FC_soft
    (ImageNet).

    Args:
        embed_dim: FC_sim's width.
        imagenet_head: "pretrained" copies the backbone's ImageNet classifier into
            FC_soft (the paper), "random", or "none".
        dropout: on the classifiers' input.
    """

    heads_on: ClassVar[str] = "features"

    def __init__(self, in_features: int, num_classes: int, classifier: nn.Linear | None = None,
                 ctx: BuildContext | None = None, embed_dim: EmbedDim = 512,
                 imagenet_head: Literal["pretrained", "random", "none"] = "none",
                 dropout: Dropout = 0.0):
        super().__init__(in_features, num_classes, classifier, ctx, embed_dim, imagenet_head,
                         dropout)
