"""Hashers: turn retrieval embeddings into codes for the gallery search.

A hasher is registered in :data:`zsbir.registry.hashers` and built from its manifest table
(``[[hashers]] name = "itq" bits = 64``); its constructor arguments are the table's keys.

Contract (other code relies on it exactly):

- ``binary``: ``True`` when :meth:`Hasher.encode` returns packed binary codes (Hamming
  ranking), ``False`` for real-valued codes (cosine ranking);
- ``fit(features, seed=0) -> self``: learn from (N, D) float32 training embeddings (for
  SAKE: the training set's sketch *and* photo embeddings);
- ``encode(features)``: binary hashers return (N, ceil(bits/8)) ``uint8`` codes packed with
  :func:`numpy.packbits` (first bit = most significant bit of byte 0, the layout faiss's
  ``IndexBinaryFlat`` uses; a code length that is not a multiple of 8 is padded with zero
  bits, which never change a Hamming distance); real hashers return L2-normalized float32;
- ``state_dict()`` / ``load_state_dict(state)``: plain data (torch tensors, numbers,
  strings), loadable with ``torch.load(weights_only=True)``;
- ``tag``: a short label for results tables (``"itq64"``, ``"sign512"``, ``"real"``).

Bit convention: a projected value ``z`` gives bit 1 iff ``z > 0`` (0 for ``z <= 0``); ITQ's
training uses the same rule in sign form, ``sgn(z) = +1 if z > 0 else -1``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Annotated, Any

import numpy as np
import torch

from zsbir.constraints import Range
from zsbir.registry import hashers

__all__ = [
    "Hasher",
    "ITQHasher",
    "NoHasher",
    "NotFittedError",
    "SignHasher",
    "code_bytes",
    "itq_quantization_loss",
    "pack_bits",
    "random_rotation",
]


class NotFittedError(RuntimeError):
    """``encode`` (or ``state_dict``) called on a hasher that needs ``fit`` first."""


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack an (N, b) 0/1 (or bool) array into (N, ceil(b/8)) uint8, big-endian within a byte.

    Bit ``j`` of a code is bit ``7 - j % 8`` (value ``1 << (7 - j % 8)``) of byte ``j // 8``:
    :func:`numpy.packbits` with its default ``bitorder="big"``, as faiss's binary indexes
    expect. Trailing pad bits are 0.
    """
    return np.packbits(np.asarray(bits, dtype=bool), axis=1, bitorder="big")


def _as_features(features: np.ndarray, name: str = "features") -> np.ndarray:
    """Validate an (N, D) finite float array; return it as float64 (computations' dtype)."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ValueError(f"{name} must be a real-valued float array, got dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).copy())


def _array(t: Any, name: str) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy().astype(np.float64)
    if isinstance(t, np.ndarray):
        return t.astype(np.float64)
    raise TypeError(f"state entry {name!r} must be a tensor, got {type(t).__name__}")


def _check_keys(state: dict[str, Any], required: set[str], owner: str) -> None:
    missing = required - set(state)
    if missing:
        raise KeyError(f"{owner} state_dict is missing {sorted(missing)}")


class Hasher(ABC):
    """Base class of hashers; see the module docstring for the contract."""

    binary: bool = True

    @abstractmethod
    def fit(self, features: np.ndarray, seed: int = 0) -> Hasher:
        """Learn from (N, D) training embeddings; return ``self``."""

    @abstractmethod
    def encode(self, features: np.ndarray) -> np.ndarray:
        """Codes of (N, D) embeddings: packed uint8 if ``binary`` else float32 L2-normalized."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Plain data (tensors, numbers, strings) that :meth:`load_state_dict` restores."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    @property
    @abstractmethod
    def tag(self) -> str:
        """Short label for results tables."""

    @property
    def fitted(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tag={self.tag!r}, fitted={self.fitted})"


# ---------------------------------------------------------------------------- none
@hashers.register("none")
class NoHasher(Hasher):
    """No hashing: real-valued L2-normalized float32 embeddings, ranked by cosine similarity.

    ``fit`` is a no-op; ``tag`` is ``"real"``.
    """

    binary = False

    def __init__(self) -> None:
        pass

    def fit(self, features: np.ndarray, seed: int = 0) -> NoHasher:
        _as_features(features)
        return self

    def encode(self, features: np.ndarray) -> np.ndarray:
        x = _as_features(features)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return (x / np.maximum(norms, 1e-12)).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    @property
    def tag(self) -> str:
        return "real"


# ---------------------------------------------------------------------------- sign
@hashers.register("sign")
class SignHasher(Hasher):
    """Sign hashing without learning: bit ``j`` = ``x_j - mu_j > 0``.

    Args:
        bits: code length; the code uses the *first* ``bits`` feature dimensions (no
            projection). ``0`` (the default) uses all D dimensions, so the code has D bits.
        center: subtract the training mean ``mu`` (the mean of the features given to
            :meth:`fit`) before taking signs. With ``center=False`` ``mu = 0``, nothing is
            learned and :meth:`encode` works without :meth:`fit`.

    Tag: ``"sign{bits}"`` (``"sign"`` while the length is still unknown).
    """

    binary = True

    def __init__(self, bits: Annotated[int, Range(ge=0)] = 0, center: bool = True) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or bits < 0:
            raise ValueError(f"bits must be an integer >= 0 (0 = all dimensions), got {bits!r}")
        self.bits = bits
        self.center = bool(center)
        self.mean: np.ndarray | None = None  # (D,) training mean when center=True and fitted
        self.dim: int | None = None  # D seen by fit

    def _check_bits(self, dim: int) -> int:
        if self.bits > dim:
            raise ValueError(
                f"bits={self.bits} exceeds the feature dimension D={dim}; "
                "sign hashing takes at most one bit per dimension"
            )
        return self.bits or dim

    def fit(self, features: np.ndarray, seed: int = 0) -> SignHasher:
        x = _as_features(features)
        if x.shape[0] == 0:
            raise ValueError("features is empty: need at least one training sample")
        self._check_bits(x.shape[1])
        self.dim = x.shape[1]
        self.mean = x.mean(axis=0) if self.center else None
        return self

    @property
    def fitted(self) -> bool:
        return self.dim is not None or not self.center

    def encode(self, features: np.ndarray) -> np.ndarray:
        if self.center and self.mean is None:
            raise NotFittedError(
                "SignHasher(center=True) must be fitted before encode(): call fit() with the "
                "training embeddings (or use center=False)"
            )
        x = _as_features(features)
        if self.dim is not None and x.shape[1] != self.dim:
            raise ValueError(f"features have D={x.shape[1]}, the hasher was fitted on {self.dim}")
        n_bits = self._check_bits(x.shape[1])
        z = x[:, :n_bits]
        if self.mean is not None:
            z = z - self.mean[:n_bits]
        return pack_bits(z > 0)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"bits": self.bits, "center": self.center, "dim": self.dim or 0}
        if self.mean is not None:
            state["mean"] = _tensor(self.mean)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_keys(state, {"bits", "center"}, "SignHasher")
        self.bits, self.center = int(state["bits"]), bool(state["center"])
        self.dim = int(state.get("dim", 0)) or None
        self.mean = _array(state["mean"], "mean") if "mean" in state else None
        if self.center and self.mean is None:
            raise KeyError("SignHasher state_dict with center=True is missing 'mean'")

    @property
    def tag(self) -> str:
        n = self.bits or self.dim
        return f"sign{n}" if n else "sign"


# ---------------------------------------------------------------------------- itq
def itq_quantization_loss(b: np.ndarray, v: np.ndarray, r: np.ndarray) -> float:
    """ITQ's quantization loss ``Q(B, R) = ||B - V R||_F^2`` (Gong & Lazebnik, eq. 2)."""
    return float(np.sum((b - v @ r) ** 2))


def _sgn(z: np.ndarray) -> np.ndarray:
    """``+1`` where ``z > 0``, else ``-1`` (float64)."""
    return np.where(z > 0, 1.0, -1.0)


def _pca(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (D, bits) top principal directions of ``x`` (columns by decreasing variance).

    Eigenvectors of the scatter matrix ``X_c^T X_c`` (``numpy.linalg.eigh``); each column's
    sign is fixed so that its largest-magnitude entry is positive (as scikit-learn's
    ``svd_flip``), which makes the projection, and so the codes, reproducible.
    """
    mean = x.mean(axis=0)
    xc = x - mean
    evals, evecs = np.linalg.eigh(xc.T @ xc)
    w = evecs[:, np.argsort(evals)[::-1][:bits]]
    pivot = np.abs(w).argmax(axis=0)
    w = w * np.sign(w[pivot, np.arange(bits)])
    return mean, w


def random_rotation(bits: int, seed: int) -> np.ndarray:
    """A random (bits, bits) orthogonal matrix: left singular vectors of a seeded Gaussian
    matrix (``numpy.random.default_rng(seed).standard_normal``), as the authors' ITQ.m."""
    g = np.random.default_rng(seed).standard_normal((bits, bits))
    u, _, _ = np.linalg.svd(g)
    return u


@hashers.register("itq")
class ITQHasher(Hasher):
    """Iterative Quantization (ITQ): PCA followed by a learned rotation, then signs.

    Gong & Lazebnik, "Iterative Quantization: A Procrustean Approach to Learning Binary
    Codes", CVPR 2011 (extended in TPAMI 35(12), 2013). With the centered training data
    ``X`` (N, D), PCA projection ``W`` (D, c) on the top ``c = bits`` principal directions and
    ``V = X W`` (N, c), ITQ minimizes the quantization loss

        Q(B, R) = || B - V R ||_F^2,   B in {-1, +1}^{N x c},   R^T R = I   (eq. 2)

    by alternating, from a random orthogonal ``R_0``:

        B <- sgn(V R)                                         (fix R, eq. 3)
        V^T B = U S Ŝ^T  (SVD),   R <- U Ŝ^T                   (fix B: orthogonal Procrustes)

    (the paper writes the SVD of ``B^T V = S Ω Ŝ^T`` and ``R = Ŝ S^T``; the same thing).
    Neither step can increase ``Q``. Codes of a new ``x`` are ``sgn((x - mean) W R)``,
    stored as bit 1 where the projection is > 0, packed with :func:`pack_bits`.

    SAKE (Liu et al., "Semantic-Aware Knowledge Preservation for Zero-Shot Sketch-Based
    Image Retrieval", ICCV 2019) trains ITQ on the training set's sketch and photo
    embeddings and reports 64-bit results; ``fit`` expects those embeddings stacked.

    Args:
        bits: code length ``c`` (32, 64, 128, ...); at most the feature dimension D and the
            number of training samples N.
        iterations: alternating (B, R) updates (the paper uses 50; the authors' ITQ.m loop
            ``for iter=0:n_iter`` runs one more). ``0`` keeps the random rotation ``R_0``
            (PCA + random rotation).

    ``fit(features, seed)`` is deterministic given ``seed`` (which draws ``R_0``). After
    fitting, ``loss_history[t]`` is ``Q(sgn(V R_t), R_t)`` for ``t = 0..iterations``
    (non-increasing). ``state_dict``: ``mean`` (D,), ``projection`` W (D, c), ``rotation``
    R (c, c) as float64 tensors, ``bits`` and ``iterations``.
    """

    binary = True

    def __init__(self, bits: Annotated[int, Range(ge=1)] = 64,
                 iterations: Annotated[int, Range(ge=0, le=100_000)] = 50) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
            raise ValueError(f"bits must be a positive integer, got {bits!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")
        self.bits = bits
        self.iterations = iterations
        self.mean: np.ndarray | None = None  # (D,)
        self.projection: np.ndarray | None = None  # W (D, bits)
        self.rotation: np.ndarray | None = None  # R (bits, bits)
        self.loss_history: list[float] = []

    @property
    def fitted(self) -> bool:
        return self.rotation is not None

    def fit(self, features: np.ndarray, seed: int = 0) -> ITQHasher:
        x = _as_features(features)
        n, d = x.shape
        if self.bits > d:
            raise ValueError(
                f"bits={self.bits} exceeds the feature dimension D={d}: ITQ projects onto "
                "`bits` principal directions, so bits must be <= D"
            )
        if self.bits > n:
            raise ValueError(
                f"bits={self.bits} exceeds the number of training samples N={n}: PCA cannot "
                "find more principal directions than samples, so bits must be <= N"
            )
        mean, w = _pca(x, self.bits)
        v = (x - mean) @ w
        r = random_rotation(self.bits, seed)
        history = []
        for _ in range(self.iterations):
            b = _sgn(v @ r)  # fix R, update B
            history.append(itq_quantization_loss(b, v, r))
            u, _, vt = np.linalg.svd(v.T @ b)  # fix B, update R (orthogonal Procrustes)
            r = u @ vt
        history.append(itq_quantization_loss(_sgn(v @ r), v, r))
        self.mean, self.projection, self.rotation = mean, w, r
        self.loss_history = history
        return self

    def project(self, features: np.ndarray) -> np.ndarray:
        """Real-valued rotated projections ``(x - mean) W R`` (N, bits), float64."""
        if self.rotation is None or self.projection is None or self.mean is None:
            raise NotFittedError(
                "ITQHasher must be fitted before encode(): call fit() with the training "
                "embeddings (SAKE: the training sketches' and photos' embeddings) or "
                "load_state_dict()"
            )
        x = _as_features(features)
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"features have D={x.shape[1]}, the hasher was fitted on D={self.mean.shape[0]}"
            )
        return (x - self.mean) @ self.projection @ self.rotation

    def encode(self, features: np.ndarray) -> np.ndarray:
        return pack_bits(self.project(features) > 0)

    def state_dict(self) -> dict[str, Any]:
        if self.rotation is None or self.projection is None or self.mean is None:
            raise NotFittedError("ITQHasher has no state before fit()")
        return {
            "bits": self.bits,
            "iterations": self.iterations,
            "mean": _tensor(self.mean),
            "projection": _tensor(self.projection),
            "rotation": _tensor(self.rotation),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_keys(state, {"bits", "mean", "projection", "rotation"}, "ITQHasher")
        bits = int(state["bits"])
        mean = _array(state["mean"], "mean")
        w = _array(state["projection"], "projection")
        r = _array(state["rotation"], "rotation")
        if mean.ndim != 1 or w.shape != (mean.shape[0], bits) or r.shape != (bits, bits):
            raise ValueError(
                f"inconsistent ITQ state: bits={bits}, mean {tuple(mean.shape)}, "
                f"projection {tuple(w.shape)}, rotation {tuple(r.shape)}"
            )
        self.bits = bits
        self.iterations = int(state.get("iterations", self.iterations))
        self.mean, self.projection, self.rotation = mean, w, r
        self.loss_history = []

    @property
    def tag(self) -> str:
        return f"itq{self.bits}"


def code_bytes(bits: int) -> int:
    """Bytes per packed code of ``bits`` bits: ``ceil(bits / 8)``."""
    return math.ceil(bits / 8)
