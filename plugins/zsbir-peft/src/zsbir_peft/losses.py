"""``peft_ema_distill``: the student's embedding (or features) pulled towards the EMA
teacher's, for self-distillation with ``peft_ema``.

Per item i with student vector s_i and teacher vector t_i (``out[key]``, ``teacher[key]``;
the teacher's is a constant, no gradient reaches it):

- ``metric = "cosine"``: ``1 - cos(s_i, t_i)`` (BYOL, Grill et al., NeurIPS 2020, Eq. 2,
  ``2 - 2 cos`` up to the factor 2);
- ``metric = "mse"``: ``||s_i - t_i||^2 / d`` (the mean squared error over the d dimensions),
  of the L2-normalized vectors when ``normalize``;

averaged over the batch, in float32.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from zsbir.losses.base import Batch, Loss, Outputs, Teacher

__all__ = ["EmaDistillLoss"]


def _teacher_keys(params: dict[str, Any]) -> frozenset[str]:
    return frozenset({params.get("key", "embedding")})


class EmaDistillLoss(Loss):
    """Self-distillation towards a momentum teacher (DINO, Caron et al., ICCV 2021,
    Sec. 3.1 uses a cross-entropy over prototypes; this loss matches the retrieval
    embeddings directly, as BYOL, Grill et al., NeurIPS 2020, Eq. 2, does): the batch mean
    of ``1 - cos(s_i, t_i)`` or of ``||s_i - t_i||^2 / d``.

    Args:
        metric: ``"cosine"`` or ``"mse"``.
        key: which vector of the student's outputs and of the teacher signal:
            ``"embedding"`` or ``"features"``.
        normalize: for ``mse``, L2-normalize both vectors first.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"teacher"})
    teacher_keys: ClassVar[Any] = staticmethod(_teacher_keys)
    #: zsbir's contract suite (``zsbir.testing``) makes random teacher signals as wide as
    #: the student's ``features``: the example distills those
    example: ClassVar[dict[str, Any]] = {"key": "features"}

    def __init__(self, metric: Literal["cosine", "mse"] = "cosine",
                 key: Literal["embedding", "features"] = "embedding",
                 normalize: bool = False):
        super().__init__()
        if metric not in ("cosine", "mse"):
            raise ValueError(f"metric must be 'cosine' or 'mse', got {metric!r}")
        if key not in ("embedding", "features"):
            raise ValueError(f"key must be 'embedding' or 'features', got {key!r}")
        self.metric, self.key, self.normalize = metric, key, bool(normalize)

    def forward(self, out: Outputs, batch: Batch, teacher: Teacher | None) -> torch.Tensor:
        if not isinstance(teacher, dict) or self.key not in teacher:
            raise ValueError(f"peft_ema_distill needs the teacher signal's {self.key!r} "
                             "(use [teacher] name = \"peft_ema\")")
        s = out[self.key].float()
        t = teacher[self.key].detach().float().to(s.device)
        if s.shape != t.shape:
            raise ValueError(f"student {self.key} {tuple(s.shape)} and teacher "
                             f"{self.key} {tuple(t.shape)} differ in shape")
        if self.metric == "cosine":
            return (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()
        if self.normalize:
            s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
        return ((s - t) ** 2).mean()
