"""The two geometries retrieval scores live in, implemented once for the whole toolkit:

- :func:`l2_normalize`: rows scaled to unit L2 norm (cosine similarity = dot product of
  the normalized rows), ``x / max(||x||, 1e-12)``. Used by the evaluator's scorers, exact
  hash search (:mod:`zsbir.hashing.search`, :mod:`zsbir.hashing.ann`), the photo index
  (:mod:`zsbir.search.faiss_index`) and the rerankers (:mod:`zsbir.rerankers.base`).
- :func:`hamming_distances`: Hamming distances between packed uint8 codes
  (``numpy.packbits`` layout, as faiss ``IndexBinaryFlat``), for the evaluator and
  :func:`zsbir.hashing.search.hamming_distance_matrix`.

Hamming distances are integers, exact in every implementation. A normalized row is not:
numpy and torch compute the norm with different summation orders, so numpy arrays are
normalized in numpy (as the index and hash search always did) and tensors by
``torch.nn.functional.normalize`` (as the evaluator and rerankers always did); each caller
gets bit for bit the vectors it got before these were shared.
"""

from __future__ import annotations

from typing import overload

import numpy as np
import torch
import torch.nn.functional as F

from zsbir.evaluation.pool import _parallel, _workers

__all__ = ["hamming_distances", "l2_normalize"]

ArrayLike = torch.Tensor | np.ndarray


@overload
def l2_normalize(x: torch.Tensor) -> torch.Tensor: ...


@overload
def l2_normalize(x: np.ndarray) -> np.ndarray: ...


def l2_normalize(x: ArrayLike) -> ArrayLike:
    """Rows (the last axis) scaled to unit L2 norm, ``x / max(||x||_2, 1e-12)``.

    A tensor: ``torch.nn.functional.normalize(x, dim=-1)`` (same dtype and device). Anything
    else: a C-contiguous float32 numpy array, computed in float32 by numpy. Validation
    (shape, finiteness) is the caller's.
    """
    if isinstance(x, torch.Tensor):
        return F.normalize(x, dim=-1)
    a = np.asarray(x, np.float32)
    norms = np.linalg.norm(a, axis=-1, keepdims=True)
    return np.ascontiguousarray(a / np.maximum(norms, 1e-12), dtype=np.float32)


def _to_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        return x.detach()
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _np_words(codes: torch.Tensor) -> np.ndarray:
    """Packed uint8 codes as uint64 words (zero-padded to a multiple of 8 bytes)."""
    a = codes.cpu().numpy()
    a = np.pad(a, ((0, 0), (0, (-a.shape[1]) % 8)))
    return np.ascontiguousarray(a).view(np.uint64)


def _np_hamming_words(qw: np.ndarray, gw: np.ndarray) -> np.ndarray:
    """Hamming distances (int32 (n, G)) of uint64 words: xor + ``np.bitwise_count``."""
    n, g = qw.shape[0], gw.shape[0]
    out = np.zeros((n, g), dtype=np.int32)  # zeros: codes of 0 bytes
    gcols = [np.ascontiguousarray(gw[:, w]) for w in range(gw.shape[1])]

    def job(lo: int, hi: int) -> None:
        block = 32  # rows per step: the xor words stay in cache
        x = np.empty((block, g), dtype=np.uint64)
        c = np.empty((block, g), dtype=np.uint8)
        for r in range(lo, hi, block):
            k = min(block, hi - r)
            for w, gcol in enumerate(gcols):
                np.bitwise_xor(qw[r:r + k, w, None], gcol[None, :], out=x[:k])
                np.bitwise_count(x[:k], out=c[:k])
                if w == 0:
                    out[r:r + k] = c[:k]
                else:
                    out[r:r + k] += c[:k]

    step = max(1, -(-n // _workers()))
    _parallel([lambda lo=lo: job(lo, min(n, lo + step)) for lo in range(0, n, step)])
    return out


def _t_hamming(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Hamming distances (int32) in torch: xor, SWAR popcount per uint8 byte, summed."""
    acc = torch.zeros(query.shape[0], gallery.shape[0], dtype=torch.int32,
                      device=query.device)
    for b in range(query.shape[1]):
        x = query[:, b, None] ^ gallery[None, :, b]
        x = x - ((x >> 1) & 0x55)
        x = (x & 0x33) + ((x >> 2) & 0x33)
        x = (x + (x >> 4)) & 0x0F
        acc += x
    return acc


def hamming_distances(query: ArrayLike, gallery: ArrayLike,
                      use_numpy: bool | None = None) -> torch.Tensor:
    """Hamming distances (int32, (Q, G)) between packed uint8 codes.

    Codes are ``numpy.packbits`` rows (big-endian bits within a byte, the layout of faiss
    ``IndexBinaryFlat``); distance = popcount(q xor g). On CPU with numpy >= 2 the popcount
    is ``np.bitwise_count`` on 64-bit words (threaded over row blocks; ~25x faster than
    torch bit tricks on CPU); otherwise (CUDA, older numpy) a SWAR popcount on uint8 bytes
    in torch: ``x - ((x >> 1) & 0x55)``, ``(x & 0x33) + ((x >> 2) & 0x33)``,
    ``(x + (x >> 4)) & 0x0F``, summed over bytes. Both are exact.
    """
    q = _to_tensor(query, "query")
    g = _to_tensor(gallery, "gallery")
    if use_numpy is None:
        use_numpy = q.device.type == "cpu" and hasattr(np, "bitwise_count")
    if use_numpy:
        return torch.from_numpy(_np_hamming_words(_np_words(q), _np_words(g)))
    return _t_hamming(q, g.to(q.device))
