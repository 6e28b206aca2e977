"""The self-attention module of ZSE-SBIR (Lin et al., "Zero-Shot Everything Sketch-Based
Image Retrieval, and in Explainable Style", CVPR 2023, Sec. 3.1; the authors' model/sa.py
and the ``Scale_Embedding`` of model/rn.py): a ViT-B/16 whose tokenizer averages the
patch projection and a learnable multi-scale convolutional embedding,

    X_0 = [cls, (P(x) + S(x)) / 2] + E_pos,     P: conv k = s = patch,
    S = conv7x7/2 -> ReLU -> conv3x3/2 -> ReLU -> ... -> conv3x3/2 (log2(patch) convs),

then pre-norm transformer blocks ``x <- x + MSA(LN(x)); x <- x + MLP(LN(x))`` and a final
LayerNorm. Token selection (EViT, Liang et al., ICLR 2022) keeps, after a block whose keep
rate r < 1, the ceil(r (N - 1)) patch tokens the class token attends to most (mean over
heads), in their original order.

The released code's selection branch returns the attention block's *input* (after its
LayerNorm) instead of the attention output, so a selecting block computes
``x + LN(x)`` before the MLP: ``token_selection = "released_code"`` (the default, equal to
their code) does the same, ``"evit"`` uses the attention output as EViT does. The released
configuration keeps every token (keep rate 1 in all 12 blocks), where both are identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ScaleEmbedding", "SelfAttentionEncoder"]


class ScaleEmbedding(nn.Module):
    """The learnable tokenizer's convolutional branch: ``log2(patch)`` stride-2 convs (the
    first 7x7, the others 3x3; no bias; ReLU between) from 3 channels to ``dim``, so that
    its output grid is the patch grid. Patch 16 with ``channels = (64, 128, 256)`` is the
    authors' ``Scale_Embedding`` (3 -> 64 -> 128 -> 256 -> 768)."""

    def __init__(self, dim: int, patch_size: int, channels: Sequence[int] = (64, 128, 256)):
        super().__init__()
        n = int(round(math.log2(patch_size)))
        if 2 ** n != patch_size or n < 1:
            raise ValueError(f"patch_size must be a power of 2 (the scale embedding halves "
                             f"the image {patch_size} times), got {patch_size}")
        if len(channels) != n - 1:
            raise ValueError(f"scale_channels needs {n - 1} widths for patch {patch_size} "
                             f"({n} stride-2 convs), got {list(channels)}")
        widths = [3, *channels, dim]
        layers: list[nn.Module] = []
        for i in range(n):
            k = 7 if i == 0 else 3
            layers.append(nn.Conv2d(widths[i], widths[i + 1], k, 2, k // 2, bias=False))
            if i < n - 1:
                layers.append(nn.ReLU(inplace=True))
        self.seq = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection; returns the output and the
    class token's attention to the patch tokens, mean over heads (B, N-1)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.scale = (dim / heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out), attn[:, :, 0, 1:].mean(dim=1)


class Block(nn.Module):
    """Pre-norm transformer block with optional token selection (see the module doc)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float,
                 keep_rate: float = 1.0, selection: str = "released_code"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.drop_attn = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, dim), nn.Dropout(dropout))
        self.keep_rate = float(keep_rate)
        self.selection = selection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        out, cls_attn = self.attn(h)
        if self.keep_rate < 1:
            if self.selection == "released_code":
                out = h  # the released code's selection branch (module docstring)
            x = x + self.drop_attn(out)
            keep = math.ceil(self.keep_rate * (x.shape[1] - 1))
            idx = cls_attn.topk(keep, dim=1).indices.sort(dim=1).values
            patches = x[:, 1:].gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :1], patches], dim=1)
        else:
            x = x + self.drop_attn(out)
        return x + self.mlp(self.norm2(x))


class SelfAttentionEncoder(nn.Module):
    """ZSE-SBIR's self-attention module: ``forward(images) -> (B, 1 + kept tokens, dim)``,
    token 0 the retrieval (class) token. See the module docstring for the equations."""

    def __init__(self, image_size: int = 224, patch_size: int = 16, dim: int = 768,
                 depth: int = 12, heads: int = 12, mlp_dim: int = 3072,
                 scale_channels: Sequence[int] = (64, 128, 256), dropout: float = 0.1,
                 keep_rate: Sequence[float] | None = None, selection: str = "released_code"):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size "
                             f"{patch_size}")
        self.grid = image_size // patch_size
        n = self.grid ** 2
        rates = list(keep_rate) if keep_rate is not None else [1.0] * depth
        if len(rates) != depth:
            raise ValueError(f"keep_rate has {len(rates)} entries for {depth} blocks")
        self.patch_embed = nn.Conv2d(3, dim, patch_size, patch_size)
        self.scale_embed = ScaleEmbedding(dim, patch_size, scale_channels)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, dropout, r, selection)
                                    for r in rates)
        self.norm = nn.LayerNorm(dim)
        tokens = n
        for r in rates:
            if r < 1:
                tokens = math.ceil(r * tokens)
        #: patch tokens after the last block
        self.num_tokens = tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (self.patch_embed(images) + self.scale_embed(images)) / 2
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.drop(x + self.pos_embed[:, :x.shape[1]])
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
