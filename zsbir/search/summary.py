"""What ``zsbir index build``, ``update`` and ``merge`` report: :class:`BuildSummary`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["BuildSummary"]


@dataclass
class BuildSummary:
    """What a build or update did."""

    embedded: int = 0                 # photos embedded by this call (new or changed)
    new: int = 0
    changed: int = 0
    unchanged: int = 0                # rows kept as they were (incl. touched, same content)
    removed: int = 0                  # files gone from the folder, rows deleted
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    total: int = 0                    # photos in the index afterwards
    seconds: float = 0.0
    ann: str = "flat"
    recall_at_10: float | None = None  # IVF only: against exact search
    nprobe: int | None = None
    search_param: str | None = None   # the tuned ANN parameter, e.g. "HNSW search: ef 32"
    resumed: bool = False
    stale_lock: dict | None = None
    notes: list[str] = field(default_factory=list)  # e.g. a damaged database set aside

    @property
    def photos_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items()}
        d["photos_per_s"] = self.photos_per_s
        return d


def _search_param(info: dict[str, Any]) -> str | None:
    """How the ANN search was tuned, for the summary line (None: exact search)."""
    if info.get("hnsw_ef"):
        return f"HNSW search: ef {info['hnsw_ef']}"
    if info.get("nprobe"):
        kind = "IVF" if "milvus_index" not in info else info["milvus_index"]
        return f"{kind} search: nprobe {info['nprobe']}"
    return None
