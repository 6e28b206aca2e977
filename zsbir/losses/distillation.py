"""Knowledge-preservation losses: the student's ImageNet head learns soft ImageNet labels.

- ``sake``: SAKE's semantic-aware teacher loss (Liu et al., ICCV 2019, Sec. 3.4);
- ``knowledge_preservation``: SBTKNet's class-level soft-label loss (Eq. 5).

Both are a soft cross-entropy ``-sum_m q_{i,m} log softmax(s_i)_m`` between a target
distribution ``q_i`` and the student's ImageNet logits ``s_i = out["imagenet_logits"]``
(``zeta^T x_i + eta`` in SAKE, ``FC_soft`` in SBTKNet), averaged over the selected items;
they differ only in how the target logits are formed (:meth:`_SoftLabelLoss.target_logits`).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar

import torch

from zsbir.constraints import ExistingPath, Range
from zsbir.context import BuildContext
from zsbir.data.base import PHOTO
from zsbir.losses.base import Batch, Loss, Outputs, Teacher, soft_cross_entropy, teacher_logits
from zsbir.registry import losses

__all__ = ["KnowledgePreservationLoss", "SakeLoss"]


class _SoftLabelLoss(Loss):
    """Shared body: soft cross-entropy against ``softmax(target_logits)``, averaged over the
    batch's photos (``photos_only``) or all items. A selection without items gives 0 (with a
    zero, finite gradient), never NaN. Subclasses implement :meth:`target_logits`."""

    requires: ClassVar[Any] = frozenset({"teacher"})
    #: the model outputs it reads: the head must provide an ImageNet head
    output_keys: ClassVar[frozenset[str]] = frozenset({"imagenet_logits"})
    teacher_keys: ClassVar[frozenset[str]] = frozenset({"logits"})
    #: whether :meth:`target_logits` uses the ``teacher`` argument
    needs_teacher: bool = True

    def __init__(self, photos_only: bool, temperature: float = 1.0):
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature}")
        self.photos_only = bool(photos_only)
        self.temperature = float(temperature)

    def target_logits(self, student: torch.Tensor, batch: Batch,
                      teacher: torch.Tensor | None) -> torch.Tensor:
        """(B, C) logits whose softmax is the target distribution ``q_i``."""
        raise NotImplementedError

    def forward(self, out: Outputs, batch: Batch, teacher: Teacher | None) -> torch.Tensor:
        if "imagenet_logits" not in out:
            raise KeyError(f"{type(self).__name__} needs out['imagenet_logits']: the model has "
                           "no ImageNet head (set model.imagenet_head)")
        student = out["imagenet_logits"].float()
        teacher = teacher_logits(teacher)
        if self.needs_teacher:
            if teacher is None:
                raise ValueError(f"{type(self).__name__} needs a teacher signal, got None")
            if teacher.shape != student.shape:
                raise ValueError(f"teacher logits {tuple(teacher.shape)} do not match the "
                                 f"student's ImageNet logits {tuple(student.shape)}")
            teacher = teacher.detach().float()
        target = self.target_logits(student, batch, teacher).detach()
        t = self.temperature
        # Hinton et al.'s distillation at temperature T: both softened, scaled by T^2 so
        # that gradient magnitudes do not depend on T; T = 1 is the plain soft CE.
        per_item = soft_cross_entropy(student / t, torch.softmax(target / t, dim=1)) * (t * t)
        if not self.photos_only:
            return per_item.mean()
        # mask instead of boolean indexing: no host sync, and 0 (not NaN) without photos
        mask = batch["domain"].to(per_item.device) == PHOTO
        total = torch.where(mask, per_item, per_item.new_zeros(())).sum()
        return total / mask.sum().clamp(min=1)


@losses.register("sake")
class SakeLoss(_SoftLabelLoss):
    """SAKE's semantic-aware knowledge-preservation loss (Liu et al., ICCV 2019, Sec. 3.4).

    ``L_SAKE = 1/N sum_i sum_m -q_{i,m} log softmax(zeta^T x_i + eta)_m`` with the
    semantic-aware teacher signal ``q_i = softmax(lambda1 * t_i + lambda2 * a_{y_i})``:
    ``t_i`` the teacher's logits for item i (the ``teacher`` argument), ``a_{y_i}`` row
    ``y_i`` (the item's seen-class label) of the (n_seen, 1000) WordNet similarity matrix A
    between seen classes and ImageNet classes. ``lambda2 = 0`` is the plain teacher loss
    L_teacher (no WordNet needed); ``lambda1 = 0`` the semantic-only variant (the teacher
    argument is then ignored and may be None). Paper: lambda1 = 1, lambda2 = 0.3 (Table 3).

    ``photos_only``: the reference implementation averages the term over the batch's photos
    (domain 0), the teacher's own domain; False averages over all N items. A batch without
    photos then contributes 0.

    The matrix A is ``zsbir.semantics.semantic_matrix(ctx.seen_classes, mapping_file,
    ctx.cache_dir)``, computed once at construction when ``lambda2 != 0`` and kept as a
    non-persistent buffer (it follows ``.to(device)``, stays out of checkpoints).
    ``mapping_file``: optional user class -> WordNet synset mapping, passed on. To supply A
    directly (tests, precomputed matrices) use :meth:`from_matrix` or :meth:`set_semantics`.

    The paper reports (not measured by zsbir: full datasets and GPU training) Table 1,
    TU-Berlin Ext 512-d: mAP@all 0.475, P@100 0.599; 64-bit ITQ 0.359 / 0.481; Table 4,
    64-d: mAP@all 0.434; SK-SH 512-d: 0.547 / 0.692; SK-YE: mAP@200 0.497, P@200 0.598.
    ``examples/sake_tuberlin.toml`` and ``examples/sake_sketchy.toml`` set up those runs.
    mAP@all is the VOC all-point interpolated AP (``map@all``).
    """

    semantics: torch.Tensor | None
    #: the teacher signal is read only when lambda1 != 0 (lambda1 = 0: WordNet alone)
    requires = staticmethod(lambda params: frozenset(
        {"teacher"} if params.get("lambda1", 1.0) != 0 else ()))

    def __init__(self, lambda1: Annotated[float, Range(ge=0)] = 1.0,
                 lambda2: Annotated[float, Range(ge=0)] = 0.3, photos_only: bool = True,
                 mapping_file: Annotated[str | None, ExistingPath("file")] = None,
                 ctx: BuildContext | None = None):
        super().__init__(photos_only)
        for key, value in (("lambda1", lambda1), ("lambda2", lambda2)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"sake: {key} must be a finite number >= 0, got {value}")
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.needs_teacher = self.lambda1 != 0
        self.mapping_file = mapping_file
        self._num_seen = len(ctx.seen_classes) if ctx is not None else None
        self.register_buffer("semantics", None, persistent=False)
        if self.lambda2 != 0 and ctx is not None:
            if not ctx.seen_classes:
                raise ValueError("sake: lambda2 != 0 needs the seen class names (ctx is empty)")
            from zsbir.semantics import semantic_matrix  # WordNet only when needed

            self.set_semantics(semantic_matrix(list(ctx.seen_classes), mapping_file=mapping_file,
                                               cache_dir=ctx.cache_dir))

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor, lambda1: float = 1.0, lambda2: float = 0.3,
                    photos_only: bool = True) -> SakeLoss:
        """A ``sake`` loss whose semantic matrix A (n_seen, C) is given rather than computed."""
        loss = cls(lambda1=lambda1, lambda2=lambda2, photos_only=photos_only)
        loss.set_semantics(matrix)
        return loss

    def set_semantics(self, matrix: torch.Tensor) -> None:
        """Set A (n_seen, C): row k holds the similarities of seen class k to the C ImageNet
        classes (label order of ``ctx.seen_classes``)."""
        a = torch.as_tensor(matrix).detach().to(torch.float32)
        if a.ndim != 2:
            raise ValueError(f"sake: the semantic matrix must be 2-D, got {tuple(a.shape)}")
        if self._num_seen is not None and a.shape[0] != self._num_seen:
            raise ValueError(f"sake: the semantic matrix has {a.shape[0]} rows for "
                             f"{self._num_seen} seen classes")
        if self.semantics is not None:
            a = a.to(self.semantics.device)
        self.semantics = a

    def target_logits(self, student: torch.Tensor, batch: Batch,
                      teacher: torch.Tensor | None) -> torch.Tensor:
        target = student.new_zeros(student.shape)
        if self.lambda1 != 0:
            assert teacher is not None
            target = target + self.lambda1 * teacher
        if self.lambda2 != 0:
            if self.semantics is None:
                raise RuntimeError("sake: lambda2 != 0 but no semantic matrix: build it with "
                                   "ctx, or use SakeLoss.from_matrix / set_semantics")
            if self.semantics.shape[1] != student.shape[1]:
                raise ValueError(f"sake: the semantic matrix has {self.semantics.shape[1]} "
                                 f"columns for {student.shape[1]} ImageNet logits")
            a = self.semantics.to(student.device)[batch["label"].to(student.device)]
            target = target + self.lambda2 * a
        return target


@losses.register("knowledge_preservation")
class KnowledgePreservationLoss(_SoftLabelLoss):
    """SBTKNet's semantic knowledge-preservation loss (Eq. 5).

    ``L_knowledge = 1/(4N) sum_i sum_{I in Q_i} -q(l(I)) . log softmax(FC_soft(I))``, the
    soft cross-entropy between the student's ImageNet head and the class-level soft label
    ``q(c) = softmax(mean teacher logits of the photos of class c)``. (Eq. 5 as printed
    carries a second minus sign; the loss is the usual positive cross-entropy.) With the
    offline ``class_mean`` teacher the toolkit passes, as ``teacher``, each item's row of the
    per-class mean logits; any per-item teacher logits work the same way.

    ``photos_only``: False (the paper) averages over all items, photos and sketches.
    ``temperature``: T > 0; targets are ``softmax(t / T)``, the student ``log_softmax(s / T)``
    and the loss is scaled by T^2 (Hinton et al.). T = 1 is the paper's loss.

    The paper reports (not measured by zsbir: full datasets and GPU training) SK-SH 512-d:
    mAP@all 0.5525, P@100 0.6977; SK-YE: mAP@200 0.502, P@200 0.596; TU-Berlin: mAP@all
    0.480, P@100 0.608; QuickDraw: mAP@all 0.1188, P@200 0.1665. ``examples/sbtknet_*.toml``
    set up those runs.
    """

    def __init__(self, temperature: Annotated[float, Range(gt=0)] = 1.0,
                 photos_only: bool = False):
        super().__init__(photos_only, temperature)

    def target_logits(self, student: torch.Tensor, batch: Batch,
                      teacher: torch.Tensor | None) -> torch.Tensor:
        assert teacher is not None
        return teacher
