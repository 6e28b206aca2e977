"""Pair scorer ``zse_rn``: ZSE-SBIR's retrieval by the relation network (Lin et al., CVPR
2023, Sec. 3.3; the released utils/valid.py ``valid_cls`` with ``retrieval = "rn"``):

    score(sketch q, photo g) = RN(cos(D(CA(T_q, T_g)_sketch), D(CA(T_q, T_g)_photo)))

from the self-attention tokens ``T`` of each image (computed once per image by the core,
not once per batch of 20 sketches as valid_cls does), ``CA`` the cross-attention, ``D``
the 2x2 down-sampling. valid_cls ranks by ``-score`` ascending, the same order.

With ``precompute = true`` the scorer also reads ``zse_ca``, each image's first-layer
cross-attention projections (query/key/value of its own tokens, which do not depend on the
pair: :meth:`zsbir_zse.cross.CrossAttention.item_projections`), so that a pair costs only
the attention, output projection, feed-forward, down-sampling and relation network
(about 2.2 instead of 3.6 GFLOP at ViT-B/16 size). The scores are the same up to float
rounding (tests: 1e-5 relative); the price is 3 more (T, 768) arrays stored per image.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from zsbir.registry import pair_scorers

from .model import is_zse

__all__ = ["ZseRelationScorer"]


@pair_scorers.register("zse_rn")
class ZseRelationScorer:
    """ZSE-SBIR's cross-attention + relation network as a pair scorer; its weights are
    the model's (``model`` is injected: the run's ``zse`` model).

    Args:
        precompute: read the per-image cross-attention projections ``zse_ca`` (stored
            with the tokens) instead of recomputing them for each pair.
    """

    tag = "zse_rn"
    #: the [model] table zsbir's contract suite checks this scorer with (64-px images)
    example_model: ClassVar[dict[str, Any]] = {
        "name": "zse", "image_size": 64, "patch_size": 8, "dim": 16, "depth": 1, "heads": 2,
        "mlp_dim": 32, "scale_channels": [4, 4], "ca_heads": 2, "ca_ff": 16, "conv_dim": 8,
        "anchors": 16}

    def __init__(self, model: Any, precompute: bool = False):
        if not is_zse(model):
            raise ValueError(f"pair scorer 'zse_rn' reads the cross-attention and relation "
                             f"network of a ZSE-SBIR model; the run's model is "
                             f"{type(model).__name__} (set [model] name = \"zse\")")
        self.model = getattr(model, "module", model)
        self.precompute = bool(precompute)
        self.outputs: tuple[str, ...] = ("tokens", "zse_ca") if precompute else ("tokens",)

    @torch.no_grad()
    def score_pairs(self, query: Mapping[str, torch.Tensor],
                    gallery: Mapping[str, torch.Tensor]) -> torch.Tensor:
        m = self.model
        was = m.training
        m.eval()
        try:
            dtype = next(m.parameters()).dtype
            q, g = query["tokens"].to(dtype), gallery["tokens"].to(dtype)
            if self.precompute:
                return m.score_pairs(q, g, query["zse_ca"].to(dtype), gallery["zse_ca"].to(dtype))
            return m.score_pairs(q, g)
        finally:
            m.train(was)
