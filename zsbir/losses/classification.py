"""Classification losses on the seen classes."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from zsbir.constraints import Range
from zsbir.losses.base import Batch, Loss, Outputs, Teacher
from zsbir.registry import losses


@losses.register("ce")
class CrossEntropy(Loss):
    """Cross-entropy over the seen classes, averaged over the batch.

    SAKE's L_benchmark (Liu et al., ICCV 2019, Eq. 1):
    (1/N) sum_i -log softmax(alpha^T x_i + beta)_{y_i}; SBTKNet's semantic classification
    loss (Tursun et al., Eq. 4) is the same over the four images of each quadruplet.
    """

    def __init__(self, label_smoothing: Annotated[float, Range(ge=0, lt=1)] = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, out: Outputs, batch: Batch, teacher: Teacher | None) -> torch.Tensor:
        return F.cross_entropy(out["logits"].float(), batch["label"],
                               label_smoothing=self.label_smoothing)
