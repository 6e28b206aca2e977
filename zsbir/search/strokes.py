"""Render vector strokes into a sketch image, the form the model was trained on.

Strokes come as QuickDraw's ndjson ``drawing`` field (Ha & Eck, "A Neural Representation of
Sketch Drawings", ICLR 2018; the Quick, Draw! dataset format): a list of strokes, each
``[[x0, x1, ...], [y0, y1, ...]]`` (a third list of timestamps, as in the raw files, is
accepted and ignored). The drawing's bounding box is scaled, keeping its aspect ratio, to
85% of a white square and centered (Sketchy's sketches fill most of their frame), and the
strokes are drawn as black polylines with round joins.

Bounds (:class:`StrokesError` beyond them): at most :data:`MAX_STROKES` strokes and
:data:`MAX_POINTS` points, coordinates and the pen width finite with magnitude at most
:data:`MAX_COORD`.
"""

from __future__ import annotations

import math
from typing import Any

from PIL import Image, ImageDraw

from zsbir.search.errors import SearchError

__all__ = ["MAX_COORD", "MAX_POINTS", "MAX_STROKES", "StrokesError", "check_pen_width",
           "parse_strokes", "render_strokes"]

MAX_POINTS = 50_000
MAX_STROKES = 5_000
MAX_COORD = 1e6  # canvas pixels or QuickDraw's 0..255; far beyond any real drawing
FILL = 0.85


class StrokesError(SearchError):
    """Strokes that are not a QuickDraw ``drawing`` (or hold nothing to draw)."""


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (
            isinstance(v, float) and not math.isfinite(v)):
        raise StrokesError(f"stroke coordinates must be finite numbers, got {_short(v)}")
    if abs(v) > MAX_COORD:  # compared before float(): an int like 10**400 overflows it
        raise StrokesError(f"stroke coordinates must be at most {MAX_COORD:g} in magnitude, "
                           f"got {_short(v)}")
    return float(v)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def check_pen_width(pen_width: Any) -> float:
    """A pen width as a float: a positive finite number, at most :data:`MAX_COORD`."""
    if (isinstance(pen_width, bool) or not isinstance(pen_width, (int, float))
            or not 0 < pen_width <= MAX_COORD):  # NaN fails the comparison too
        raise StrokesError(f"pen_width must be a positive number up to {MAX_COORD:g}, got "
                           f"{_short(pen_width)}")
    return float(pen_width)


def parse_strokes(drawing: Any) -> list[list[tuple[float, float]]]:
    """Validate a ``drawing`` and return each stroke as a list of (x, y) points."""
    if not isinstance(drawing, list):
        raise StrokesError("strokes must be a list of [[xs], [ys]] strokes (QuickDraw's "
                           f"`drawing` field), got {type(drawing).__name__}")
    if len(drawing) > MAX_STROKES:
        raise StrokesError(f"too many strokes ({len(drawing)}; at most {MAX_STROKES})")
    strokes, total = [], 0
    for i, s in enumerate(drawing):
        if (not isinstance(s, list) or len(s) not in (2, 3)
                or not all(isinstance(c, list) for c in s)):
            raise StrokesError(f"stroke {i} must be [[xs], [ys]] (or [[xs], [ys], [ts]])")
        xs, ys = s[0], s[1]
        if len(xs) != len(ys):
            raise StrokesError(f"stroke {i} has {len(xs)} x but {len(ys)} y coordinates")
        total += len(xs)
        if total > MAX_POINTS:
            raise StrokesError(f"too many points (more than {MAX_POINTS})")
        if xs:
            strokes.append([(_number(x), _number(y)) for x, y in zip(xs, ys)])
    if not strokes:
        raise StrokesError("the drawing is empty: draw something first")
    return strokes


def render_strokes(drawing: Any, size: int = 256, pen_width: float | None = None
                   ) -> Image.Image:
    """An RGB ``size`` x ``size`` image of the strokes (see the module docstring).

    ``pen_width``: the line width in the drawing's own units (scaled with the drawing);
    default: ``size / 96`` pixels of the output (3 px at 256, as Sketchy's lines).
    """
    strokes = parse_strokes(drawing)
    if pen_width is not None:
        pen_width = check_pen_width(pen_width)
    xs = [x for s in strokes for x, _ in s]
    ys = [y for s in strokes for _, y in s]
    x0, y0 = min(xs), min(ys)
    extent = max(max(xs) - x0, max(ys) - y0)
    scale = FILL * size / extent if extent > 1e-6 else 1.0  # below: a dot
    ox = (size - (max(xs) - x0) * scale) / 2  # offsets from (x0, y0): no overflow
    oy = (size - (max(ys) - y0) * scale) / 2
    width = size / 96 if pen_width is None else pen_width * scale
    width = int(round(min(max(width, 1.0), size / 16)))
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    for s in strokes:
        pts = [((x - x0) * scale + ox, (y - y0) * scale + oy) for x, y in s]
        if len(pts) > 1:
            draw.line(pts, fill="black", width=width, joint="curve")
        r = width / 2
        for px, py in (pts[0], pts[-1]):  # round caps (and single-point dots)
            draw.ellipse((px - r, py - r, px + r, py + r), fill="black")
    return img
