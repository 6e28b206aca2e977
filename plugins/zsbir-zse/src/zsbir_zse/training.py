"""How ZSE-SBIR trains (Lin et al., CVPR 2023, Sec. 3.4; the authors' train.py,
utils/loss.py and data_utils/dataset.py): sampler ``zse``, step ``zse_pairs``, losses
``zse_triplet`` and ``zse_relation``.

Each training tuple is ``(sketch s of class c, photo p of c, photo n of c' != c, sketch s2
of c)``. Two pairs go through the cross-attention and the relation network: the positive
pair (s, p) and the negative pair (s2, n). With ``t_x`` the cross-attended retrieval
token of image x *in its pair* and ``r`` the relation score of a pair, train.py minimizes

    L = 2 * mean_i max(0, ||t_s - t_p + eps|| - ||t_s - t_n + eps|| + 1)        (triplet)
      + 4 * mean over the 2T pairs of (r - y)^2,  y = 0.99 (positive), 0.01 (negative)

(``nn.TripletMarginLoss(margin=1, p=2)``, eps = 1e-6; ``nn.MSELoss`` on targets clamped to
[0.01, 0.99]); the weights 2 and 4 are the manifests' ``[[losses]] weight``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from zsbir.constraints import Range
from zsbir.data.base import PHOTO, SKETCH
from zsbir.data.samplers import Sampler, epoch_rng
from zsbir.engine.step import DefaultStep, StepContext
from zsbir.losses.base import Loss, tuple_rows
from zsbir.registry import losses, samplers, steps

__all__ = ["ZsePairStep", "ZseRelationLoss", "ZseSampler", "ZseTripletLoss", "pair_outputs"]

#: the tuple roles of the ``zse`` sampler (``negative_pair_sketch``: the sketch paired
#: with the negative photo, of the anchor's class)
ROLES = ("anchor", "positive", "negative", "negative_pair_sketch")


@samplers.register("zse")
class ZseSampler(Sampler):
    """The authors' training tuples (data_utils/dataset.py ``TrainSet``): each tuple draws
    a class c uniformly among the seen classes with sketches and photos and a class
    c' != c uniformly among the classes with photos, then uniformly a sketch of c
    (``anchor``), a photo of c (``positive``), a photo of c' (``negative``) and another
    draw of a sketch of c (``negative_pair_sketch``, possibly the anchor again), which the
    step pairs with the negative photo. An epoch is ``tuples_per_epoch`` tuples (their
    ``datasetLen``, 10,000), cut into batches of ``batch_size / 4`` tuples (their batch of
    15 = 60 images), the last incomplete batch dropped (their ``drop_last=True``).

    Unlike their loader, every item of a class can be drawn (their ``get_file_iccv``
    draws ``randint(1, len)``, never a class's first file).
    """

    roles: ClassVar[tuple[str, ...]] = ROLES

    def __init__(self, labels: np.ndarray, domains: np.ndarray, batch_size: int, seed: int,
                 tuples_per_epoch: Annotated[int, Range(ge=1)] = 10000):
        super().__init__(labels, domains, batch_size, seed)
        k = len(self.roles)
        if batch_size % k:
            raise ValueError(f"zse sampler: batch_size counts images and must be a multiple "
                             f"of {k} ({', '.join(self.roles)}), got {batch_size}")
        self.per_batch = batch_size // k
        self.tuples_per_epoch = int(tuples_per_epoch)
        if self.tuples_per_epoch < self.per_batch:
            raise ValueError(f"zse sampler: tuples_per_epoch = {tuples_per_epoch} is less "
                             f"than one batch ({self.per_batch} tuples)")
        _, cls = np.unique(self.labels, return_inverse=True)
        cls = cls.reshape(-1)
        n = int(cls.max()) + 1
        self._by = {d: [np.flatnonzero((self.domains == d) & (cls == c)) for c in range(n)]
                    for d in (SKETCH, PHOTO)}
        has_photo = np.array([len(x) > 0 for x in self._by[PHOTO]])
        has_sketch = np.array([len(x) > 0 for x in self._by[SKETCH]])
        self._anchor_classes = np.flatnonzero(has_photo & has_sketch)
        self._photo_classes = np.flatnonzero(has_photo)
        if len(self._anchor_classes) == 0 or len(self._photo_classes) < 2:
            raise ValueError("zse sampler needs a class with sketches and photos and at "
                             f"least 2 classes with photos (got {int(has_photo.sum())} with "
                             f"photos, {int((has_photo & has_sketch).sum())} with both)")

    def __len__(self) -> int:
        return self.tuples_per_epoch // self.per_batch

    def _draw(self, domain: int, classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        pools = self._by[domain]
        return np.array([pools[c][rng.integers(len(pools[c]))] for c in classes], np.int64)

    def epoch(self, epoch: int) -> list[np.ndarray]:
        rng = epoch_rng(self.seed, epoch)
        t = len(self) * self.per_batch
        c = self._anchor_classes[rng.integers(len(self._anchor_classes), size=t)]
        # c' uniform among the photo classes other than c (c is one of them)
        pc = self._photo_classes
        r = rng.integers(len(pc) - 1, size=t)
        neg_c = pc[r + (r >= np.searchsorted(pc, c))]
        cols = [self._draw(SKETCH, c, rng), self._draw(PHOTO, c, rng),
                self._draw(PHOTO, neg_c, rng), self._draw(SKETCH, c, rng)]
        tuples = np.stack(cols, axis=1)
        q = self.per_batch
        return [tuples[i * q:(i + 1) * q].reshape(-1) for i in range(len(self))]


def pair_outputs(model: torch.nn.Module, out: dict[str, torch.Tensor],
                 batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The pair outputs of a tuple batch: ``pair_embedding`` (B, dim), each image's
    cross-attended retrieval token in its pair, and ``pair_score`` (B,), its pair's
    relation score. Pairs: (anchor, positive) and (negative_pair_sketch, negative); with
    the core ``triplet`` sampler (no ``negative_pair_sketch``) the negative pair is
    (anchor, negative), and the anchor's ``pair_embedding`` is its positive pair's."""
    model = getattr(model, "module", model)
    tokens = out["tokens"]
    roles = tuple(batch.get("roles") or ())
    need = ("anchor", "positive", "negative")
    if not set(need) <= set(roles):
        raise ValueError("step 'zse_pairs' needs tuple batches with the roles anchor, "
                         f"positive, negative (sampler 'zse' or 'triplet'); got {roles or 'none'}")
    tuples = batch["tuples"].to(tokens.device)
    col = {r: tuples[:, roles.index(r)] for r in roles}
    a, p, n = col["anchor"], col["positive"], col["negative"]
    s2 = col.get("negative_pair_sketch", a)
    t = len(a)
    s_out, p_out = model.cross_pairs(torch.cat([tokens[a], tokens[s2]]),
                                     torch.cat([tokens[p], tokens[n]]))
    score = model.relation_score(s_out, p_out)
    rows, emb, sc = [a, p, n], [s_out[:t, 0], p_out[:t, 0], p_out[t:, 0]], \
        [score[:t], score[:t], score[t:]]
    if "negative_pair_sketch" in col:
        rows.append(s2)
        emb.append(s_out[t:, 0])
        sc.append(score[t:])
    idx = torch.cat(rows)
    b = tokens.shape[0]
    emb_t, sc_t = torch.cat(emb), torch.cat(sc)  # dtypes may differ under autocast
    pair_embedding = emb_t.new_zeros((b, tokens.shape[-1])).index_put((idx,), emb_t)
    pair_score = sc_t.new_zeros((b,)).index_put((idx,), sc_t)
    return {"pair_embedding": pair_embedding, "pair_score": pair_score}


@steps.register("zse_pairs")
class ZsePairStep(DefaultStep):
    """The default step, with the pair outputs of :func:`pair_outputs` added to the model's
    outputs before the losses (train.py: the model's forward on the concatenated sketches
    and photos runs the self-attention on each image, then the cross-attention and the
    relation network on the (positive, negative) pairs). Single process: the pairs run
    outside the data-parallel wrapper's forward."""

    def model_outputs(self, s: StepContext, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = s.forward(batch["image"], batch["domain"])
        return {**out, **pair_outputs(s.model, out, batch)}


@losses.register("zse_triplet")
class ZseTripletLoss(Loss):
    """``mean_i max(0, ||t_a - t_p + eps|| - ||t_a - t_n + eps|| + margin)`` on the
    cross-attended retrieval tokens ``pair_embedding`` (train.py's ``triplet_loss``:
    ``nn.TripletMarginLoss(margin=1.0, p=2)``, eps = 1e-6; weight 2 in train.py)."""

    roles: ClassVar[frozenset[str]] = frozenset({"anchor", "positive", "negative"})
    output_keys: ClassVar[frozenset[str]] = frozenset({"pair_embedding"})

    def __init__(self, margin: Annotated[float, Range(ge=0)] = 1.0):
        super().__init__()
        self.margin = margin

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, Any],
                teacher: Any = None) -> torch.Tensor:
        e = _pair_output(out, "pair_embedding", "zse_triplet").float()
        a, p, n = tuple_rows(batch, ("anchor", "positive", "negative"), len(e), "zse_triplet")
        return F.triplet_margin_loss(e[a], e[p], e[n], margin=self.margin, p=2, eps=1e-6)


@losses.register("zse_relation")
class ZseRelationLoss(Loss):
    """``mean over pairs of (r - y)^2``: the relation score of the positive pair (anchor,
    positive) against ``positive_target`` (0.99) and of the negative pair against
    ``negative_target`` (0.01) (train.py's ``rn_loss``: ``nn.MSELoss`` on targets 1/0
    clamped to [0.01, 0.99]; weight 4 in train.py)."""

    roles: ClassVar[frozenset[str]] = frozenset({"anchor", "negative"})
    output_keys: ClassVar[frozenset[str]] = frozenset({"pair_score"})

    def __init__(self, positive_target: Annotated[float, Range(ge=0, le=1)] = 0.99,
                 negative_target: Annotated[float, Range(ge=0, le=1)] = 0.01):
        super().__init__()
        self.pos, self.neg = positive_target, negative_target

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, Any],
                teacher: Any = None) -> torch.Tensor:
        r = _pair_output(out, "pair_score", "zse_relation").float()
        a, n = tuple_rows(batch, ("anchor", "negative"), len(r), "zse_relation")
        pred = torch.cat([r[a], r[n]])
        target = torch.cat([torch.full_like(r[a], self.pos), torch.full_like(r[n], self.neg)])
        return F.mse_loss(pred, target)


def _pair_output(out: dict[str, torch.Tensor], key: str, who: str) -> torch.Tensor:
    if key not in out:
        raise ValueError(f"loss {who!r} reads the model output {key!r}, which the training "
                         "step adds: set [train.step] name = \"zse_pairs\"")
    return out[key]
