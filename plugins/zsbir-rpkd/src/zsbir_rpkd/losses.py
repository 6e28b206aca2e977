"""RPKD's three distillation terms (Tian et al., "Relationship-Preserving Knowledge
Distillation for Zero-Shot Sketch Based Image Retrieval", ACM MM 2021).

Only the abstract is public; the paper's equations are not. The abstract names three
terms, and each class below states the exact formula this plugin chose for it:

- ``rpkd_instance``: "distill the instance-level knowledge to preserve inter-class
  relationships": the student's ImageNet head matches the teacher's per-item ImageNet
  distribution (temperature-softened KL, Hinton et al. 2015);
- ``rpkd_contrastive``: "reconcile the contrastive relationships among instances between
  different embedding spaces": each item's similarity distribution over the other items
  of the batch, in the student's embedding space, matches the same distribution in the
  teacher's feature space;
- ``rpkd_embedding_supervision``: "embedding-induced supervision, which measures the
  similarities of an instance to partial class embedding centers from the teacher, is
  developed to align the student's classification confidences": the teacher feature's
  similarities to its k nearest seen-class centers give a target over those k classes for
  the student's seen-class classifier.

All three follow zsbir's loss contract (:mod:`zsbir.losses.base`): ``forward(out, batch,
teacher)`` returns a scalar, computed in float32; the teacher signal is detached (no
gradient reaches it); ``requires`` tells manifest validation what the loss needs. Their
constructor parameters are their manifest keys (``name`` and ``weight`` are zsbir's).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from zsbir.context import BuildContext
from zsbir.losses.base import Batch, Loss, Outputs, Teacher, teacher_logits

__all__ = ["RpkdContrastiveLoss", "RpkdEmbeddingSupervisionLoss", "RpkdInstanceLoss"]


def _positive(loss: str, key: str, value: float) -> float:
    if isinstance(value, bool) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{loss}: {key} must be a finite number > 0, got {value!r}")
    return float(value)


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(p || q) = sum_j p_j (log p_j - log q_j)`` from log-probabilities;
    an entry with p_j = 0 contributes 0."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def _zero(like: torch.Tensor) -> torch.Tensor:
    """0 that keeps the graph (a finite, zero gradient), for a batch with nothing to use."""
    return like.float().sum() * 0.0


def _teacher_part(loss: str, teacher: Teacher | torch.Tensor | None, key: str) -> torch.Tensor:
    """``teacher[key]``, detached, float32; a clear error when the signal lacks it."""
    if not isinstance(teacher, dict) or key not in teacher:
        what = "None" if teacher is None else (
            "a bare tensor" if isinstance(teacher, torch.Tensor)
            else f"a signal with keys {sorted(teacher)}")
        hint = ('[teacher] name = "rpkd" (zsbir-rpkd) provides it' if key == "class_features"
                else '[teacher] name = "rpkd" or "online" provides it')
        raise ValueError(f"{loss} needs teacher[{key!r}], got {what}; {hint}")
    return teacher[key].detach().float()


class RpkdInstanceLoss(Loss):
    """RPKD instance-level distillation: per-item KL to the teacher's ImageNet distribution.

    The student's ImageNet distribution matches the teacher's, item by item, at
    temperature tau.

    Only the abstract of Tian et al. (ACM MM 2021) is public; this is the plugin's formula:
    with ``s_i = out["imagenet_logits"][i]`` (student ImageNet head) and
    ``t_i = teacher["logits"][i]`` (the frozen teacher's ImageNet logits for the same item),

        L = tau^2 / B * sum_i KL(softmax(t_i / tau) || softmax(s_i / tau))

    over the B items of the batch (photos and sketches). The tau^2 factor keeps gradient
    magnitudes comparable across temperatures (Hinton et al., 2015). The teacher's full
    1000-way distribution carries how similar each item is to every ImageNet class, hence
    the inter-class relationships, with no word vectors or WordNet.

    Args:
        tau: softening temperature, > 0.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"teacher", "imagenet_head"})
    teacher_keys: ClassVar[frozenset[str]] = frozenset({"logits"})

    def __init__(self, tau: float = 4.0):
        super().__init__()
        self.tau = _positive("rpkd_instance", "tau", tau)

    def forward(self, out: Outputs, batch: Batch, teacher: Teacher | None) -> torch.Tensor:
        if "imagenet_logits" not in out:
            raise KeyError("rpkd_instance needs out['imagenet_logits']: the model has no "
                           "ImageNet head (set model.imagenet_head)")
        s = out["imagenet_logits"].float()
        t = teacher_logits(teacher)
        if t is None:
            raise ValueError("rpkd_instance needs a teacher signal, got None")
        t = t.detach().float()
        if t.shape != s.shape:
            raise ValueError(f"rpkd_instance: teacher logits {tuple(t.shape)} do not match "
                             f"the student's ImageNet logits {tuple(s.shape)}")
        if s.shape[0] == 0:
            return _zero(s)
        tau = self.tau
        kl = _kl_rows(torch.log_softmax(t / tau, dim=1), torch.log_softmax(s / tau, dim=1))
        return kl.mean() * (tau * tau)


class RpkdContrastiveLoss(Loss):
    """RPKD contrastive relationships: in-batch similarity distributions match the teacher's.

    Each item's similarity distribution over the other items of the batch, in the
    student's embedding space, matches the same distribution in the teacher's space.

    Only the abstract of Tian et al. (ACM MM 2021) is public; this is the plugin's formula:
    with student embeddings ``e_i = out["embedding"][i]`` and teacher features
    ``f_i = teacher["features"][i]`` (any widths: each space is compared with itself),

        p^S_i(j) = exp(cos(e_i, e_j) / tau) / sum_{k != i} exp(cos(e_i, e_k) / tau),  j != i
        p^T_i(j) = the same with f in place of e
        L = 1/B * sum_i KL(p^T_i || p^S_i)

    over the B items of the batch (photos and sketches together; self excluded). A batch of
    fewer than 2 items gives 0.

    Args:
        tau: temperature of the cosine similarities in both spaces, > 0.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"teacher"})
    teacher_keys: ClassVar[frozenset[str]] = frozenset({"features"})

    def __init__(self, tau: float = 0.1):
        super().__init__()
        self.tau = _positive("rpkd_contrastive", "tau", tau)

    def forward(self, out: Outputs, batch: Batch, teacher: Teacher | None) -> torch.Tensor:
        e = out["embedding"].float()
        f = _teacher_part("rpkd_contrastive", teacher, "features").to(e.device)
        b = e.shape[0]
        if f.shape[0] != b:
            raise ValueError(f"rpkd_contrastive: teacher features for {f.shape[0]} items, "
                             f"student embeddings for {b}")
        if b < 2:
            return _zero(e)
        off = ~torch.eye(b, dtype=torch.bool, device=e.device)

        def log_relations(x: torch.Tensor) -> torch.Tensor:
            x = F.normalize(x, dim=1)
            sim = (x @ x.T)[off].view(b, b - 1)  # row i: cos(x_i, x_j), j != i, in order
            return torch.log_softmax(sim / self.tau, dim=1)

        return _kl_rows(log_relations(f), log_relations(e)).mean()


class RpkdEmbeddingSupervisionLoss(Loss):
    """RPKD embedding-induced supervision: k nearest teacher class centers -> classifier.

    The teacher feature's similarities to its k nearest seen-class centers are a target
    for the student's seen-class classifier restricted to those k classes.

    Only the abstract of Tian et al. (ACM MM 2021) is public; this is the plugin's formula:
    with teacher class centers ``c_1..c_C`` (``teacher["class_features"]``, the mean teacher
    feature of each seen class over the training photos, computed once by the ``rpkd``
    teacher), the item's teacher feature ``f_i = teacher["features"][i]`` and the student's
    seen-class logits ``z_i = out["logits"][i]``:

        N_i   = the k classes with the largest cos(f_i, c_c)            ("partial" centers)
        q_i   = softmax over c in N_i of cos(f_i, c_c) / tau            (target)
        p_i   = softmax over c in N_i of z_{i,c} / student_temperature  (classifier confidences)
        L     = 1/B * sum_i KL(q_i || p_i)

    KL was chosen over the soft cross-entropy ``-sum q log p``: both have the same gradient
    (they differ by the target's entropy, a constant), and KL is 0 when the confidences
    match. The item's own label need not be among N_i; the ``ce`` loss supervises it.

    Args:
        k: number of nearest class centers, 1 <= k <= number of seen classes.
        tau: temperature of the target's cosine similarities, > 0.
        student_temperature: temperature of the student's logits, > 0.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"teacher"})
    teacher_keys: ClassVar[frozenset[str]] = frozenset({"features", "class_features"})

    def __init__(self, k: int = 10, tau: float = 0.1, student_temperature: float = 1.0,
                 ctx: BuildContext | None = None):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"rpkd_embedding_supervision: k must be an int >= 1, got {k!r}")
        num_seen = ctx.num_seen if ctx is not None else 0
        if num_seen and k > num_seen:
            raise ValueError(f"rpkd_embedding_supervision: k = {k} exceeds the {num_seen} "
                             "seen classes")
        self.k = k
        self.tau = _positive("rpkd_embedding_supervision", "tau", tau)
        self.student_temperature = _positive("rpkd_embedding_supervision",
                                             "student_temperature", student_temperature)

    def forward(self, out: Outputs, batch: Batch, teacher: Teacher | None) -> torch.Tensor:
        name = "rpkd_embedding_supervision"
        z = out["logits"].float()
        centers = _teacher_part(name, teacher, "class_features").to(z.device)
        f = _teacher_part(name, teacher, "features").to(z.device)
        if centers.ndim != 2 or centers.shape[0] != z.shape[1]:
            raise ValueError(f"{name}: teacher class_features {tuple(centers.shape)} do not "
                             f"match the {z.shape[1]} seen-class logits")
        if f.shape != (z.shape[0], centers.shape[1]):
            raise ValueError(f"{name}: teacher features {tuple(f.shape)}, expected "
                             f"({z.shape[0]}, {centers.shape[1]})")
        if self.k > centers.shape[0]:
            raise ValueError(f"{name}: k = {self.k} exceeds the {centers.shape[0]} seen "
                             "classes")
        if z.shape[0] == 0:
            return _zero(z)
        sim = F.normalize(f, dim=1) @ F.normalize(centers, dim=1).T  # (B, C)
        top, idx = sim.topk(self.k, dim=1)
        log_q = torch.log_softmax(top / self.tau, dim=1)
        log_p = torch.log_softmax(z.gather(1, idx) / self.student_temperature, dim=1)
        return _kl_rows(log_q, log_p).mean()
