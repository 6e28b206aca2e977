"""The SHA-256 of a file's content, read in 1 MiB blocks: one helper for every place that
records or checks a file by its digest (checkpoints' base weights, photo indexes' model
copy, imported and exported models)."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["file_sha256"]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
