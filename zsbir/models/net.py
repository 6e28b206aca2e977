"""The retrieval network: a registered backbone plus heads, with named outputs.

Two head arrangements cover the methods in this toolkit:

- ``heads_on = "embedding"`` (SAKE, Liu et al. ICCV 2019, Sec. 3.1): pooled features
  x -> embedding e = W_e x (d-dim, the retrieval feature) -> seen-class classifier
  ``alpha^T e + beta`` and ImageNet head ``zeta^T e + eta``.
- ``heads_on = "features"`` (SBTKNet, Tursun et al., Sec. 3): FC_sim (embedding),
  FC_id (seen classes) and FC_soft (ImageNet) side by side on the pooled features.

SVD initialization (SAKE reference code; Table 4's note "zeta and the weight for x_i are
initialized by decomposing the original weight matrix in the output layer"): with the
pretrained classifier W (1000 x F) = U S V^T and bias b, the embedding weight is
S_d V_d^T (d x F) and the ImageNet head weight U_d (1000 x d) with bias b, so that
head(embed(x)) = U_d S_d V_d^T x + b, the best rank-d approximation of the pretrained
logits W x + b.
"""

from __future__ import annotations

import torch
from torch import nn

from zsbir.models.backbone import Backbone

__all__ = ["RetrievalNet", "svd_init"]


def svd_init(classifier: nn.Linear, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD of a (1000 x F) classifier: (embed weight d x F, head weight 1000 x d,
    head bias)."""
    w = classifier.weight.detach().float()
    if dim > min(w.shape):
        raise ValueError(f"model.embed_dim ({dim}) exceeds the classifier's rank bound "
                         f"{min(w.shape)}; SVD initialization needs embed_dim <= {min(w.shape)}")
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    embed_w = s[:dim, None] * vh[:dim]
    head_w = u[:, :dim]
    bias = (classifier.bias.detach().float() if classifier.bias is not None
            else torch.zeros(w.shape[0]))
    return embed_w, head_w, bias


class RetrievalNet(nn.Module):
    """Backbone + embedding + seen-class classifier (+ ImageNet head).

    ``forward(image, domain)`` returns a dict: ``features`` (B, F), ``embedding`` (B, d),
    ``logits`` (B, n_seen) and, with an ImageNet head, ``imagenet_logits`` (B, 1000).
    """

    def __init__(self, backbone: Backbone, num_classes: int, embed_dim: int = 512,
                 heads_on: str = "embedding", imagenet_head: str = "none",
                 dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.heads_on = heads_on
        feat = backbone.num_features
        self.embed = nn.Linear(feat, embed_dim)
        head_in = embed_dim if heads_on == "embedding" else feat
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(head_in, num_classes)
        self.imagenet_head: nn.Linear | None = None
        if imagenet_head == "none":
            return
        self.imagenet_head = nn.Linear(head_in, 1000)
        pretrained = backbone.imagenet_classifier()
        if imagenet_head in ("svd", "pretrained") and pretrained is None:
            raise ValueError(
                f"model.imagenet_head = {imagenet_head!r} needs a backbone with pretrained "
                "ImageNet weights and classifier (set backbone.pretrained = true, or "
                "model.imagenet_head = \"random\")"
            )
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

    def forward(self, image: torch.Tensor, domain: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        features = self.backbone(image, domain)
        embedding = self.embed(features)
        head_in = self.dropout(embedding if self.heads_on == "embedding" else features)
        out = {"features": features, "embedding": embedding,
               "logits": self.classifier(head_in)}
        if self.imagenet_head is not None:
            out["imagenet_logits"] = self.imagenet_head(head_in)
        return out


class TeacherNet(nn.Module):
    """A frozen backbone with its pretrained ImageNet classifier: images -> logits."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        head = backbone.imagenet_classifier()
        if head is None:
            raise ValueError("the teacher's backbone has no pretrained ImageNet classifier "
                             "(set pretrained = true and provide weights)")
        self.backbone = backbone
        self.head = head
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TeacherNet:  # always frozen, always eval
        return super().train(False)

    def forward(self, image: torch.Tensor, domain: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.backbone(image, domain))
