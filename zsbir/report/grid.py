"""A PNG grid of sketch queries and their top-ranked photos, correct ones marked."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["pick_queries", "retrieval_grid"]

GREEN, RED, BLUE = (30, 170, 60), (210, 40, 40), (40, 90, 210)


def pick_queries(labels: np.ndarray, n: int) -> list[int]:
    """The first query of each of the first ``n`` classes (deterministic)."""
    seen: dict[int, int] = {}
    for i, lab in enumerate(labels.tolist()):
        seen.setdefault(lab, i)
    return [seen[k] for k in sorted(seen)[:n]]


def retrieval_grid(
    query_sources: list[str], query_labels: np.ndarray, ranked_sources: list[list[str]],
    ranked_labels: list[np.ndarray], reader: Callable[[str], Image.Image], path: str | Path,
    class_names: list[str] | None = None, cell: int = 96,
) -> Path:
    """Row i: query i (blue frame), then its ranked photos (green: same class, red: not)."""
    rows, cols = len(query_sources), 1 + max((len(r) for r in ranked_sources), default=0)
    label_h = 14 if class_names else 0
    pad = 4
    w, h = cols * (cell + pad) + pad, rows * (cell + pad + label_h) + pad
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    def put(source: str, r: int, c: int, color: tuple[int, int, int]) -> None:
        x, y = pad + c * (cell + pad), pad + r * (cell + pad + label_h) + label_h
        try:
            im = reader(source).resize((cell - 6, cell - 6))
        except Exception:  # noqa: BLE001 - an unreadable file gets a grey cell
            im = Image.new("RGB", (cell - 6, cell - 6), (200, 200, 200))
        draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=color)
        canvas.paste(im, (x + 3, y + 3))

    for r, (qs, ql) in enumerate(zip(query_sources, query_labels)):
        if class_names:
            draw.text((pad, pad + r * (cell + pad + label_h)), str(class_names[int(ql)]),
                      fill=(0, 0, 0))
        put(qs, r, 0, BLUE)
        for c, (gs, gl) in enumerate(zip(ranked_sources[r], ranked_labels[r]), start=1):
            put(gs, r, c, GREEN if gl == ql else RED)
    path = Path(path)
    canvas.save(path)
    return path
