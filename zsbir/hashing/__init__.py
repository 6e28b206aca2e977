"""Binary hashing of retrieval embeddings and exact code search.

Hashers (registered in :data:`zsbir.registry.hashers`): ``none`` (real-valued, cosine),
``sign`` (sign of the centered features) and ``itq`` (Iterative Quantization, Gong &
Lazebnik CVPR 2011; SAKE reports 64-bit ITQ results). :func:`search` ranks a gallery with
faiss (Hamming for packed codes, inner product for L2-normalized embeddings), ties broken
by gallery index ascending.
"""

from zsbir.hashing.hashers import (
    Hasher,
    ITQHasher,
    NoHasher,
    NotFittedError,
    SignHasher,
    code_bytes,
    itq_quantization_loss,
    pack_bits,
    random_rotation,
)
from zsbir.hashing.search import hamming_distance_matrix, search

__all__ = [
    "Hasher",
    "ITQHasher",
    "NoHasher",
    "NotFittedError",
    "SignHasher",
    "code_bytes",
    "hamming_distance_matrix",
    "itq_quantization_loss",
    "pack_bits",
    "random_rotation",
    "search",
]
