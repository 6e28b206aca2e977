"""The ``clip_text_classifier`` head: CLIP text embeddings of the class names as the
seen-class classifier (Sain et al., CVPR 2023, Sec. 4)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from zsbir.constraints import Pattern, Range
from zsbir.registry import Nested

__all__ = ["ClipTextClassifier", "class_prompt"]

Template = Annotated[str, Pattern(r"[^{}]*\{\}[^{}]*",
                                  "a template with exactly one {} for the class name")]


def class_prompt(template: str, name: str) -> str:
    """``template`` filled with a class name as words (``"hot-air_balloon"`` ->
    ``"hot air balloon"``)."""
    words = " ".join(name.replace("_", " ").replace("-", " ").split())
    return template.format(words)


def _same_clip(params: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """The text tower (``network``) and the image tower (``backbone``) must be one CLIP."""
    net, bb = params.get("network") or {}, manifest.get("backbone") or {}
    if not (isinstance(net, dict) and net.get("name") == "clip_text"
            and bb.get("name") == "clip_vit"):
        return []
    key = "config" if net.get("config") or bb.get("config") else "arch"
    for k in (key, "weights"):
        if net.get(k, "") != bb.get(k, ""):
            return [f"network.{k} ({net.get(k)!r}) differs from backbone.{k} "
                    f"({bb.get(k)!r}): the text and image towers must come from the same "
                    "CLIP"]
    return []


class ClipTextClassifier(nn.Module):
    """Retrieval embedding e = f / ||f|| and seen-class logits against CLIP text embeddings
    (Sain et al., CVPR 2023, Sec. 4):

        t_c   = T("a photo of a {c}") / ||T(..)||        for each seen class c (frozen)
        z_c   = s * cos(f, t_c) = s * e . t_c            (the classification logits)

    f: the backbone's projected CLIP image embedding; T: CLIP's text tower (the nested
    ``[model.head.network]``, e.g. ``clip_text``); s: ``logit_scale`` ("clip": CLIP's own
    learned exp(t), 100 for OpenAI's weights, which the paper's CLIP classifier uses). The
    ``ce`` loss on ``logits`` is then the paper's classification term. The class texts are
    encoded once, when the head is built, and kept as a buffer (saved in checkpoints, so
    a trained model needs no text tower to embed images); the text tower itself is not
    kept.

    Outputs: ``embedding`` (B, D) L2-normalized, ``logits`` (B, n_seen).
    """

    provides: ClassVar[frozenset[str]] = frozenset({"embedding", "logits"})
    check_manifest = staticmethod(_same_clip)
    #: zsbir.testing's contract suite: a text tower with random weights
    example: ClassVar[dict[str, Any]] = {"network": {"name": "clip_text", "pretrained": False}}

    def __init__(self, in_features: int, num_classes: int,
                 network: Annotated[nn.Module, Nested("networks")],
                 template: Template = "a photo of a {}",
                 logit_scale: Annotated[float, Range(gt=0)] | Literal["clip"] = "clip",
                 ctx: Any = None):
        super().__init__()
        names = list(getattr(ctx, "seen_classes", []) or [])
        if len(names) != num_classes:
            raise ValueError(f"clip_text_classifier: {num_classes} seen classes but "
                             f"{len(names)} class names")
        if not hasattr(network, "encode_text"):
            raise ValueError("clip_text_classifier: model.head.network must be a text tower "
                             "with encode_text(texts) (e.g. name = \"clip_text\")")
        dim = int(in_features)
        text = network.encode_text([class_prompt(template, c) for c in names]).float()
        if text.shape != (num_classes, dim):
            raise ValueError(f"clip_text_classifier: the text tower gives {tuple(text.shape)} "
                             f"class embeddings, the image tower {dim}-d features: use the "
                             "same CLIP architecture for both")
        scale = network.logit_scale if logit_scale == "clip" else float(logit_scale)
        self.register_buffer("text_features", F.normalize(text, dim=-1).cpu())
        self.register_buffer("logit_scale", torch.tensor(float(scale)))
        self.template = template
        self.embed_dim = dim

    def forward(self, features: torch.Tensor, domain: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        e = F.normalize(features.float(), dim=-1)
        return {"embedding": e, "logits": self.logit_scale * e @ self.text_features.t()}
