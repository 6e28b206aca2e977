"""Every published ZS-SBIR metric variant, by name, as a small function of one ranking.

The ZS-SBIR literature reports "mAP" and "Precision" under several formulas that give
different numbers on the same ranking (see ``shared/protocols/README.md``). Each variant
here has its own name, so a number always travels with its formula:

=====================  =====================================================================
name                   per-query formula (mean over all queries is reported)
=====================  =====================================================================
``map@all``            VOC all-point interpolated AP: precision envelope (precision at a rank
                       replaced by the max precision at any later rank), summed over the ranks
                       of the positives, divided by #positives. SAKE (Liu et al., ICCV 2019)
                       code ``VOCap``/``eval_AP_inner``; ZSE-SBIR (Lin et al., CVPR 2023)
                       ``utils/ap.py``.
``map@all-sklearn``    Non-interpolated AP exactly as ``sklearn.metrics.
                       average_precision_score``: tied scores form one threshold, AP =
                       sum over thresholds of (recall step) x (precision at that threshold).
                       SEM-PCYC (Dutta & Akata, CVPR 2019); Doodle2Search (Dey et al., CVPR
                       2019).
``map@K``              SAKE/ZSE-SBIR ``eval_AP_inner(top=K)``: the ranking truncated to its
                       top K; envelope computed on that truncated list; sum of envelope
                       precisions at the positive ranks <= K, divided by min(K, #positives in
                       the whole gallery).
``map@K-sempcyc``      SEM-PCYC/Doodle2Search: sklearn AP run on the top K items only (their
                       scores and labels), i.e. divided by the positives found in the top K;
                       0 when the top K holds none.
``map@K-yelamarthi``   Yelamarthi et al. (ECCV 2018): (1/K) * sum_{k<=K} rel_k * P@k.
``p@K``                SAKE ``eval_precision``: hits in top K / min(K, gallery size).
``p@K-zse``            ZSE-SBIR ``utils/ap.py`` ``precision_eval``: hits in the top
                       min(K, #positives) / min(K, #positives) (R-precision when a
                       query has fewer than K positives).
=====================  =====================================================================

K is any positive integer (``map@200``, ``p@100``). Names are case-insensitive
(``mAP@all`` and ``P@100`` parse to ``map@all`` and ``p@100``).

Conventions chosen here (the published code leaves them undefined or implicit):

* **Ties.** Rank-based formulas (``map@all``, ``map@K``, ``map@K-yelamarthi``, ``p@K``,
  ``p@K-zse``) rank the gallery by descending score and break ties by gallery index,
  ascending (a stable sort on descending score). sklearn-style formulas
  (``map@all-sklearn``, ``map@K-sempcyc``) group tied scores into one threshold as sklearn
  does, so they do not depend on the order within a tie; ``map@K-sempcyc`` still uses the
  index rule to decide which members of a tie group straddling rank K are in the top K.
  (The published code uses ``np.argsort`` quicksort, whose order within ties is arbitrary.)
* **Queries whose class has no photo in the gallery** get 0 for every metric and are
  counted in the mean (SAKE's code would produce NaN for them via 0/0; recent sklearn
  returns 0 with a warning).
* **K larger than the gallery.** ``p@K`` and ``map@K-yelamarthi`` divide by min(K, G),
  like SAKE's ``top = min(top, tot)``; ``map@K`` with K >= G equals ``map@all``.

The functions at the bottom take the ranks of a query's positives (``ranks``: (n, P)
int64, 1-based, increasing along a row; positives outside a top-K window may all carry
G + 1) and, for the sklearn-style formulas, the tie-group counts ``ge`` (#items scoring
>= that positive) and ``pos_ge`` (#positives scoring >= it); they return one value per
query. :mod:`zsbir.evaluation.ranking` computes those inputs once per query chunk;
:mod:`zsbir.evaluation.reference` re-implements every formula literally per query, for
the tests.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "METRICS",
    "MetricSpec",
    "metric_info",
    "parse_metric",
    "compute_metric",
]

Family = Literal["voc_ap", "sklearn_ap", "yelamarthi", "precision", "precision_zse"]

#: The metric names, with ``K`` standing for any positive integer.
METRICS: tuple[str, ...] = (
    "map@all",
    "map@all-sklearn",
    "map@K",
    "map@K-sempcyc",
    "map@K-yelamarthi",
    "p@K",
    "p@K-zse",
)

_FORMULAS: dict[str, str] = {
    "map@all": (
        "VOC all-point interpolated AP (precision envelope, summed at positive ranks, "
        "/ #positives), ties by gallery index; SAKE (Liu et al. ICCV'19) code, ZSE-SBIR"
    ),
    "map@all-sklearn": (
        "non-interpolated AP as sklearn average_precision_score (tied scores = one "
        "threshold); SEM-PCYC (Dutta & Akata CVPR'19), Doodle2Search (Dey et al. CVPR'19)"
    ),
    "map@K": (
        "VOC interpolated AP on the top-{K} list (envelope on the truncated list) "
        "/ min({K}, #positives), ties by gallery index; SAKE (Liu et al. ICCV'19), ZSE-SBIR"
    ),
    "map@K-sempcyc": (
        "sklearn average_precision_score on the top-{K} items only (/ positives found in "
        "the top {K}; 0 if none); SEM-PCYC (Dutta & Akata CVPR'19), Doodle2Search"
    ),
    "map@K-yelamarthi": (
        "(1/{K}) * sum_(k<={K}) rel_k * P@k, ties by gallery index; "
        "Yelamarthi et al. ECCV'18"
    ),
    "p@K": (
        "hits in top {K} / min({K}, gallery size), ties by gallery index; "
        "SAKE (Liu et al. ICCV'19) eval_precision"
    ),
    "p@K-zse": (
        "hits in top min({K}, #positives) / min({K}, #positives), ties by gallery index; "
        "ZSE-SBIR (Lin et al. CVPR'23) utils/ap.py"
    ),
}

_FAMILY: dict[str, Family] = {
    "map@all": "voc_ap",
    "map@all-sklearn": "sklearn_ap",
    "map@K": "voc_ap",
    "map@K-sempcyc": "sklearn_ap",
    "map@K-yelamarthi": "yelamarthi",
    "p@K": "precision",
    "p@K-zse": "precision_zse",
}

_NAME_RE = re.compile(r"^(map|p)@(all|\d+)(?:-([a-z]+))?$")


@dataclass(frozen=True)
class MetricSpec:
    """A parsed metric name.

    ``name`` is the canonical spelling (lower case, e.g. ``map@200-sempcyc``), ``pattern``
    the entry of :data:`METRICS` it instantiates, ``family`` the formula family, ``k`` the
    cut-off (``None`` for the whole ranking), ``formula`` a one-line description naming
    its source.
    """

    name: str
    pattern: str
    family: Family
    k: int | None
    formula: str

    @property
    def needs_tie_groups(self) -> bool:
        """Whether the formula needs sklearn-style tie-group counts."""
        return self.family == "sklearn_ap"


# Variant spellings people use for a formula that has another name here.
_VARIANT_ALIASES = {"sklearn": "sempcyc", "doodle2search": "sempcyc", "sake": "", "voc": "",
                    "zsesbir": "zse"}


def _suggest(name: str) -> str:
    canon = name.strip().lower()
    close: list[str] = []
    m = re.match(r"^(map|p)@(all|\d+)-([a-z0-9-]+)$", canon)
    if m and m.group(3).replace("-", "") in _VARIANT_ALIASES:
        alias = _VARIANT_ALIASES[m.group(3).replace("-", "")]
        close.append(f"{m.group(1)}@{m.group(2)}" + (f"-{alias}" if alias else ""))
    cut = re.match(r"^[a-z]*@(all|\d+)", canon)
    k = cut.group(1) if cut and cut.group(1) != "all" else "200"
    candidates = list(dict.fromkeys([p.replace("K", k) for p in METRICS] + ["p@100"]))
    close += difflib.get_close_matches(canon, candidates, n=3, cutoff=0.5)
    close = [c for c in dict.fromkeys(close) if _NAME_RE.match(c) and c != canon][:3]
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (f"unknown metric {name!r}.{hint} Known metrics: {', '.join(METRICS)} "
            "(K = a positive integer, e.g. map@200, p@100).")


def parse_metric(name: str) -> MetricSpec:
    """Validate a metric name and return its :class:`MetricSpec`.

    Raises ``ValueError`` (with suggestions) for an unknown name, and for K < 1.
    """
    if not isinstance(name, str):
        raise ValueError(f"metric name must be a string, got {type(name).__name__}")
    canon = name.strip().lower()
    m = _NAME_RE.match(canon)
    if m is None:
        raise ValueError(_suggest(name))
    kind, cut, variant = m.groups()
    if cut == "all":
        pattern = f"{kind}@all" + (f"-{variant}" if variant else "")
        k = None
    else:
        pattern = f"{kind}@K" + (f"-{variant}" if variant else "")
        k = int(cut)
        if k < 1:
            raise ValueError(f"metric {name!r}: K must be a positive integer")
        canon = f"{kind}@{k}" + (f"-{variant}" if variant else "")  # drops leading zeros
    if pattern not in _FORMULAS:
        raise ValueError(_suggest(name))
    formula = _FORMULAS[pattern].replace("{K}", str(k))
    return MetricSpec(canon, pattern, _FAMILY[pattern], k, formula)


def metric_info(name: str) -> str:
    """The one-line formula of a metric name (``map@200``) or pattern (``map@K``)."""
    if name in _FORMULAS:
        return _FORMULAS[name]
    return parse_metric(name).formula


# ---------------------------------------------------------------------------------------
# Formulas as functions of the positives' ranks (vectorized over a block of queries).
# ranks: (n, P) int64, 1-based, increasing; ge/pos_ge: (n, P) int64 tie counts.
# Every function returns (n,) float64.
# ---------------------------------------------------------------------------------------

def _precision_at_positives(ranks: np.ndarray) -> np.ndarray:
    """P@r_i = i / r_i for the i-th positive (1-based) at rank r_i."""
    return np.arange(1, ranks.shape[1] + 1, dtype=np.float64) / ranks


def _reverse_cummax(x: np.ndarray) -> np.ndarray:
    return np.maximum.accumulate(x[:, ::-1], axis=1)[:, ::-1]


def voc_ap(ranks: np.ndarray, num_gallery: int, k: int | None) -> np.ndarray:
    """SAKE ``VOCap``: envelope precision summed at positive ranks <= K, / min(K, P).

    The envelope at a positive is the max precision at any later rank of the (truncated)
    list; precision only rises at positives, so that max is over the later positives.
    """
    n_pos = ranks.shape[1]
    prec = _precision_at_positives(ranks)
    if k is None or k >= num_gallery:
        return _reverse_cummax(prec).sum(1) / n_pos
    inside = ranks <= k
    env = _reverse_cummax(prec * inside)  # positives beyond K contribute 0 and come last
    return (env * inside).sum(1) / min(k, n_pos)


def sklearn_ap(ranks: np.ndarray, ge: np.ndarray, pos_ge: np.ndarray, num_gallery: int,
               k: int | None) -> np.ndarray:
    """sklearn ``average_precision_score`` (on the top K only when ``k`` is given).

    AP = sum over thresholds t of (R_t - R_{t-1}) * P_t. Each positive adds 1/#pos to the
    recall at its own score's threshold, whose precision counts every item scoring >= it:
    AP = (1/#pos) * sum_pos pos_ge / ge. On a top-K list, a tie group crossing rank K is
    cut at K: its threshold holds the top K and the positives found there.
    """
    n_pos = ranks.shape[1]
    if k is None or k >= num_gallery:
        return (pos_ge / ge).sum(1) / n_pos
    inside = ranks <= k
    found = inside.sum(1)
    tp_end = np.where(ge <= k, pos_ge, found[:, None])
    s = (tp_end / np.minimum(ge, k) * inside).sum(1)
    return np.divide(s, found, out=np.zeros_like(s), where=found > 0)


def yelamarthi_map(ranks: np.ndarray, num_gallery: int, k: int) -> np.ndarray:
    """Yelamarthi et al.: (1/K) * sum_{k<=K} rel_k * P@k (K capped at the gallery size)."""
    prec = _precision_at_positives(ranks)
    return (prec * (ranks <= k)).sum(1) / min(k, num_gallery)


def precision_at(ranks: np.ndarray, num_gallery: int, k: int, zse: bool) -> np.ndarray:
    """Hits in top K / min(K, G) (SAKE), or hits in top m / m with m = min(K, #positives)
    (ZSE-SBIR's ``precision_eval``: the mean relevance of the first m items)."""
    if zse:
        m = min(k, ranks.shape[1])
        return (ranks <= m).sum(1).astype(np.float64) / m
    return (ranks <= k).sum(1).astype(np.float64) / min(k, num_gallery)


def compute_metric(spec: MetricSpec, ranks: np.ndarray, num_gallery: int,
                   ge: np.ndarray | None = None,
                   pos_ge: np.ndarray | None = None) -> np.ndarray:
    """Per-query values of ``spec`` for queries with >= 1 positive (``ranks.shape[1] > 0``)."""
    if spec.family == "voc_ap":
        return voc_ap(ranks, num_gallery, spec.k)
    if spec.family == "sklearn_ap":
        if ge is None or pos_ge is None:
            raise ValueError(f"{spec.name} needs tie-group counts")
        return sklearn_ap(ranks, ge, pos_ge, num_gallery, spec.k)
    assert spec.k is not None
    if spec.family == "yelamarthi":
        return yelamarthi_map(ranks, num_gallery, spec.k)
    return precision_at(ranks, num_gallery, spec.k, zse=spec.family == "precision_zse")
