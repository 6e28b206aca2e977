"""The ZSE-SBIR model (Lin et al., "Zero-Shot Everything Sketch-Based Image Retrieval, and
in Explainable Style", CVPR 2023; code: github.com/buptLinfy/ZSE-SBIR, model/model.py):
model ``zse``.

``forward(image, domain)`` runs the self-attention module alone (one image at a time):
``embedding`` is its retrieval (class) token, the paper's "ret-token" retrieval (the
released valid_cls with ``retrieval = "sa"``), ``tokens`` all its output tokens (B, T, 768),
what the pair scorer ``zse_rn`` and the training step ``zse_pairs`` feed to the
cross-attention and relation network. In eval mode it also returns ``zse_ca`` (B, 3, T,
768): the first cross-attention layer's projections that depend on the image alone (see
:meth:`zsbir_zse.cross.CrossAttention.item_projections`), which ``zse_rn`` with
``precompute = true`` reads instead of recomputing them for every pair.

Pair methods (used by the step and the scorer): :meth:`ZseModel.cross_pairs` (aligned
sketch/photo tokens -> cross-attended tokens) and :meth:`ZseModel.relation_score` (-> the
relation network's similarity, (P,) in (0, 1)).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import torch
from torch import nn

from zsbir.constraints import Range, WeightsFile
from zsbir.context import BuildContext
from zsbir.data.base import SKETCH
from zsbir.models.inputs import InputConfig, domain_index
from zsbir.registry import models

from .cross import CrossAttention, RelationNetwork, cosine_matrix
from .vit import SelfAttentionEncoder
from .weights import WeightsError, load_checkpoint, load_vit_weights

__all__ = ["ZSE_144_KEEP_RATE", "WeightsError", "ZseModel", "is_zse"]

#: the token-selection schedule of the released sa.py's comment (196 -> 177 -> 160 -> 144
#: patch tokens), used for ``anchors = 144`` when ``keep_rate`` is not given
ZSE_144_KEEP_RATE = (1, 1, 1, 0.9, 1, 1, 0.9, 1, 1, 0.9, 1, 1)

Pos = Annotated[int, Range(ge=1)]


@models.register("zse")
class ZseModel(nn.Module):
    """ZSE-SBIR: self-attention ViT (learnable tokenizer, token selection), cross-attention
    and kernel-based relation network (Lin et al., CVPR 2023, Secs. 3.1-3.3). The defaults
    are the paper's and the released code's (ViT-B/16 at 224 px, cross-attention 8 heads,
    FF 1024, 1 layer, 2x2 conv to 512-d, 49 anchors).

    Args:
        image_size / patch_size / dim / depth / heads / mlp_dim: the ViT (224 / 16 / 768 /
            12 / 12 / 3072).
        scale_channels: widths of the scale embedding's convs between 3 and ``dim``
            (``log2(patch_size) - 1`` of them; (64, 128, 256)).
        keep_rate: per-block token keep rates (default all 1; with ``anchors = 144`` the
            released comment's 196 -> 177 -> 160 -> 144 schedule).
        token_selection: ``"released_code"`` (their selection branch, default) or
            ``"evit"``; see :mod:`zsbir_zse.vit`.
        ca_heads / ca_ff / ca_layers: the cross-attention (8 / 1024 / 1).
        conv_dim: output width of the 2x2 down-sampling conv (512).
        anchors: tokens per image the relation network compares: ``(grid / 2)^2`` (49:
            2x2 conv down-sampling), ``grid^2`` (196: all patch tokens) or the token count
            after selection (144).
        dropout: every dropout of the three modules (0.1, as released).
        vit_weights: local path of the authors' ImageNet ``sam_ViT-B_16.pth`` (optional;
            without it and without ``checkpoint`` the ViT is random).
        checkpoint: local path of the authors' released/trained checkpoint
            (``checkpoint['model']``, fp16 allowed); loaded after ``vit_weights``.
    """

    #: a tiny configuration for zsbir's contract suite (seconds on a CPU)
    example: ClassVar[dict[str, Any]] = {
        "image_size": 32, "patch_size": 4, "dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32,
        "scale_channels": [4], "ca_heads": 2, "ca_ff": 16, "conv_dim": 8, "anchors": 16}

    def __init__(self, image_size: Pos = 224, patch_size: Pos = 16, dim: Pos = 768,
                 depth: Pos = 12, heads: Pos = 12, mlp_dim: Pos = 3072,
                 scale_channels: list[int] = [64, 128, 256],  # noqa: B006
                 keep_rate: list[float] | None = None,
                 token_selection: Literal["released_code", "evit"] = "released_code",
                 ca_heads: Pos = 8, ca_ff: Pos = 1024, ca_layers: Pos = 1,
                 conv_dim: Pos = 512, anchors: Pos = 49,
                 dropout: Annotated[float, Range(ge=0, lt=1)] = 0.1,
                 vit_weights: Annotated[str | None, WeightsFile()] = None,
                 checkpoint: Annotated[str | None, WeightsFile()] = None,
                 num_classes: int = 0, ctx: BuildContext | None = None):
        super().__init__()
        grid = image_size // patch_size
        if keep_rate is None and (anchors, grid, depth) == (144, 14, 12):
            keep_rate = list(ZSE_144_KEEP_RATE)
        self.encoder = SelfAttentionEncoder(image_size, patch_size, dim, depth, heads,
                                            mlp_dim, scale_channels, dropout, keep_rate,
                                            token_selection)
        n = self.encoder.num_tokens
        if n == grid * grid and grid % 2 == 0 and anchors == (grid // 2) ** 2:
            self.down: nn.Conv2d | None = nn.Conv2d(dim, conv_dim, 2, 2)
        elif anchors == n:
            self.down = None
        else:
            raise ValueError(
                f"model 'zse': anchors = {anchors} fits neither the 2x2 down-sampled grid "
                f"({(grid // 2) ** 2} for a {grid}x{grid} grid) nor the {n} patch tokens "
                "left after token selection (set keep_rate so that they are anchors)")
        self.cross = CrossAttention(dim, ca_heads, ca_ff, ca_layers, dropout)
        self.relation = RelationNetwork(anchors, dropout)
        self.grid, self.dim, self.image_size = grid, dim, image_size
        load = ctx is None or ctx.load_pretrained
        if load and vit_weights:
            load_vit_weights(self, vit_weights)
        if load and checkpoint:
            load_checkpoint(self, checkpoint)

    @property
    def embed_dim(self) -> int:
        return self.dim

    def input_config(self, domain: str) -> InputConfig:
        """The authors' preprocessing: ``image_size`` px, mean = std = 0.5 per channel,
        PIL's bicubic resize (their ``preprocess``)."""
        domain_index(domain)
        return InputConfig(size=self.image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                           interpolation="bicubic")

    def forward(self, image: torch.Tensor, domain: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        tokens = self.encoder(image)
        out = {"embedding": tokens[:, 0], "tokens": tokens}
        if not self.training and domain is not None:
            out["zse_ca"] = self.item_projections(tokens, domain)
        return out

    def item_projections(self, tokens: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, dim): each image's first-layer cross-attention projections, by its
        domain (sketches: the sketch side's; photos: the photo side's)."""
        is_sketch = domain.to(tokens.device) == SKETCH
        n_sketch = int(is_sketch.sum())
        if n_sketch in (0, len(domain)):
            return self.cross.item_projections(tokens, n_sketch > 0)
        out = tokens.new_empty((len(tokens), 3, *tokens.shape[1:]))
        out[is_sketch] = self.cross.item_projections(tokens[is_sketch], True)
        out[~is_sketch] = self.cross.item_projections(tokens[~is_sketch], False)
        return out

    def cross_pairs(self, sketch: torch.Tensor, photo: torch.Tensor,
                    sketch_proj: torch.Tensor | None = None,
                    photo_proj: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attended (P, T, dim) tokens of the aligned pairs (sketch[i], photo[i]),
        from the images' ``tokens`` (and, optionally, their ``zse_ca`` projections)."""
        if sketch.shape != photo.shape:
            raise ValueError(f"zse: sketch tokens {tuple(sketch.shape)} and photo tokens "
                             f"{tuple(photo.shape)} differ (the cross-attention pairs "
                             "token sets of one size)")
        if sketch_proj is None or photo_proj is None:
            return self.cross(sketch, photo)
        return self.cross.from_projections(sketch, photo, sketch_proj, photo_proj)

    def anchor_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(P, anchors, C): the patch tokens (class token dropped), down-sampled by the
        2x2 conv (on the released code's raw (dim, grid, grid) view) when it has one."""
        x = tokens[:, 1:]
        if self.down is None:
            return x
        b = x.shape[0]
        x = self.down(x.reshape(b, self.dim, self.grid, self.grid))
        return x.reshape(b, x.shape[1], -1).transpose(1, 2)

    def relation_score(self, sketch_out: torch.Tensor, photo_out: torch.Tensor
                       ) -> torch.Tensor:
        """(P,) relation-network similarities of cross-attended pair tokens."""
        return self.relation(cosine_matrix(self.anchor_features(sketch_out),
                                           self.anchor_features(photo_out)))

    def score_pairs(self, sketch: torch.Tensor, photo: torch.Tensor,
                    sketch_proj: torch.Tensor | None = None,
                    photo_proj: torch.Tensor | None = None) -> torch.Tensor:
        """(P,) similarities of the aligned pairs (cross-attention, then relation net)."""
        return self.relation_score(*self.cross_pairs(sketch, photo, sketch_proj, photo_proj))


def is_zse(model: Any) -> bool:
    """Whether ``model`` (or the module a wrapper holds) is a :class:`ZseModel`."""
    return isinstance(getattr(model, "module", model), ZseModel)
