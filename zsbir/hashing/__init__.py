"""Binary hashing of retrieval embeddings and exact code search.

Hashers (registered in :data:`zsbir.registry.hashers`): ``none`` (real-valued, cosine),
``sign`` (sign of the centered features) and ``itq`` (Iterative Quantization, Gong &
Lazebnik CVPR 2011; SAKE reports 64-bit ITQ results). :func:`search` ranks a gallery with
faiss (Hamming for packed codes, inner product for L2-normalized embeddings), ties broken
by gallery index ascending.

:func:`search` and :func:`hamming_distance_matrix` are loaded on first use (module
``__getattr__``, PEP 562): ``import zsbir.hashing`` (and looking up a hasher) does not import
faiss.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from zsbir.hashing.search import hamming_distance_matrix, search

_LAZY = {"search": "zsbir.hashing.search", "hamming_distance_matrix": "zsbir.hashing.search"}

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


def __getattr__(name: str) -> Any:
    """The faiss-backed names, imported on first access."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """Keeps ``zsbir.hashing.search`` the function: importing the submodule of the same name
    (``zsbir.hashing.search``, e.g. by ``zsbir.hashing.ann``) would otherwise bind the module
    over it, as the eager ``from ... import search`` used to undo."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
