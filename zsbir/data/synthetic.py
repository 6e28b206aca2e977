"""The built-in ``synthetic`` protocol: a small, seeded sketch/photo benchmark rendered on
the fly, so the toolkit runs offline with no data set on disk.

Classes are *compositional*: a class is an outer shape family times an inner part,
``"<family>-<inner>"`` (``"triangle-ring"``, ``"star-dot"``, ``"heart-bar"``...). The
families are triangle, square, circle, star, cross, heart, diamond, semicircle; the inner
parts are solid (nothing), ring (a hole shaped like the outline), dot (a small disc), bar
(a stripe) and twin (two small discs). Unseen classes are new combinations of parts that
seen classes also use, so features learned on seen classes can separate unseen ones.

The two domains differ the way real photos and sketches do:

- a **photo** is a filled, shaded object of a random hue (color never tells the class)
  with a drop shadow, on a random texture (noise, stripes, checks or a gradient);
- a **sketch** is sparse, jittery, near-black strokes on white: the outline drawn in one
  or two strokes that overshoot or leave a gap, with a slightly distorted shape.

Within a class, position, scale, rotation (up to 25 degrees either way), aspect and
(sketches) stroke width and jitter vary. Every image is a key,
``"synthetic:<seed>:<class>:<domain>:<instance>:<size>"`` (``class`` indexes
:data:`CLASS_NAMES`, ``domain`` is ``PHOTO``/``SKETCH``), rendered by :func:`render` from
a numpy generator seeded with the key's integers, so the same key gives the same pixels
in any process. The geometry does not depend on ``size``.
"""

from __future__ import annotations

import functools
import math
from typing import Annotated, Any

import numpy as np
from PIL import Image, ImageDraw

from zsbir.constraints import Range
from zsbir.data.base import PHOTO, SKETCH, ProtocolData, Split
from zsbir.registry import protocols

__all__ = [
    "CLASS_NAMES",
    "FAMILIES",
    "INNERS",
    "class_index",
    "make_key",
    "parse_key",
    "read_synthetic",
    "render",
    "synthetic",
]

KEY_PREFIX = "synthetic"
_SS = 2  # supersampling factor for anti-aliased drawing
_MIN_SIZE, _MAX_SIZE = 16, 512
_MAX_TILT = 25.0  # degrees of rotation either way


# ------------------------------------------------------------------------ class catalogue
def _regular(n: int, radius: float = 1.0, phase_deg: float = 90.0) -> np.ndarray:
    a = np.deg2rad(phase_deg) + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(a), np.sin(a)], 1)


def _star(points: int = 5, inner: float = 0.5) -> np.ndarray:
    a = np.pi / 2 + np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _cross(w: float = 0.38) -> np.ndarray:
    pts = [(w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
           (-w, -w), (-w, -1), (w, -1), (w, -w), (1, -w), (1, w)]
    return np.array(pts, dtype=np.float64) * 0.95


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    pts = np.stack([x, y], 1) / 17.0
    return pts - np.array([0.0, 0.05])  # centre the inner parts in the heart's body


def _semicircle() -> np.ndarray:
    a = np.linspace(0, np.pi, 25)
    pts = np.stack([np.cos(a), np.sin(a)], 1)
    return (pts - np.array([0.0, 0.45])) * 0.9


#: family -> (outline polygon with max radius ~1 around the inner centre,
#:            radius free for inner parts, scale of the ring's hole)
_FAMILY_SPECS: dict[str, tuple[np.ndarray, float, float]] = {
    "triangle": (_regular(3), 0.5, 0.5),
    "square": (_regular(4, phase_deg=45), 0.7, 0.55),
    "circle": (_regular(40, 0.9), 0.85, 0.55),
    "star": (_star(5, 0.5), 0.4, 0.45),
    "cross": (_cross(), 0.36, 0.42),
    "heart": (_heart(), 0.5, 0.5),
    "diamond": (np.array([(0, 1), (-0.55, 0), (0, -1), (0.55, 0)], dtype=np.float64), 0.46, 0.5),
    "semicircle": (_semicircle(), 0.42, 0.5),
}
#: outer shape families, most distinct first (small grids use a prefix)
FAMILIES: tuple[str, ...] = tuple(_FAMILY_SPECS)
#: inner parts, in the same sense
INNERS: tuple[str, ...] = ("solid", "ring", "dot", "bar", "twin")
#: the full catalogue; a class's index here is the ``<class>`` field of a key
CLASS_NAMES: tuple[str, ...] = tuple(f"{f}-{i}" for f in FAMILIES for i in INNERS)


def class_index(name: str) -> int:
    """Catalogue index of a class name such as ``"triangle-ring"``."""
    try:
        return CLASS_NAMES.index(name)
    except ValueError:
        raise ValueError(f"unknown synthetic class {name!r}") from None


# ------------------------------------------------------------------------ geometry
def _inner_parts(inner: str, family: str) -> list[tuple[str, np.ndarray]]:
    """Inner parts as (kind, closed polygon) in the family's unit frame; kind is
    ``"hole"`` (cut out of the object) or ``"part"`` (painted on it)."""
    outline, r_in, ring_scale = _FAMILY_SPECS[family]
    if inner == "solid":
        return []
    if inner == "ring":
        return [("hole", outline * ring_scale)]
    if inner == "dot":
        return [("part", _regular(20, 0.42 * r_in))]
    if inner == "bar":
        hx, hy = 0.9 * r_in, 0.24 * r_in
        return [("part", np.array([(-hx, -hy), (hx, -hy), (hx, hy), (-hx, hy)]))]
    if inner == "twin":
        disc = _regular(16, 0.26 * r_in)
        off = np.array([0.5 * r_in, 0.0])
        return [("part", disc - off), ("part", disc + off)]
    raise ValueError(f"unknown inner part {inner!r}")


def _pose(rng: np.random.Generator) -> np.ndarray:
    """A random similarity-plus-aspect transform (3x2: [A; t]) into [-1, 1] image coords."""
    radius = rng.uniform(0.55, 0.85)
    theta = np.deg2rad(rng.uniform(-_MAX_TILT, _MAX_TILT))  # objects stand roughly upright
    aspect = math.exp(rng.uniform(-0.15, 0.15))
    c, s = math.cos(theta), math.sin(theta)
    a = np.diag([aspect, 1 / aspect]) @ np.array([[c, s], [-s, c]]) * radius
    slack = max(0.0, 0.95 - radius * max(aspect, 1 / aspect))
    t = rng.uniform(-slack, slack, size=2)
    return np.vstack([a, t])


def _apply(pose: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ pose[:2] + pose[2]


def _to_px(pts: np.ndarray, size: int) -> list[tuple[float, float]]:
    """[-1, 1] coords (y up) -> supersampled pixel coords (y down), as PIL wants them."""
    px = (np.array([1.0, -1.0]) * pts + 1.0) * (0.5 * size * _SS)
    return [tuple(p) for p in px.tolist()]


# ------------------------------------------------------------------------ photos
@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``xx, yy`` in the [-1, 1] frame (y up) of :func:`_to_px`."""
    v = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return np.meshgrid(v, -v)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One HSV color (all in [0, 1]) as an RGB float array in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


def _mask(polys: list[np.ndarray], size: int) -> np.ndarray:
    """Anti-aliased coverage (size, size) float32 of filled polygons in [-1, 1] coords."""
    im = Image.new("L", (size * _SS, size * _SS), 0)
    draw = ImageDraw.Draw(im)
    for poly in polys:
        draw.polygon(_to_px(poly, size), fill=255)
    im = im.resize((size, size), Image.BOX)
    return np.asarray(im, dtype=np.float32) * (1 / 255)


def _background(rng: np.random.Generator, size: int, hue: float, value: float) -> np.ndarray:
    """A textured background whose hues avoid ``hue`` and whose brightness stands off
    ``value`` (the object's), so the object is salient, as in a photo of one."""
    xx, yy = _grid(size)
    h1 = (hue + rng.uniform(0.2, 0.8)) % 1
    h2 = (h1 + rng.uniform(-0.15, 0.15)) % 1
    gap = rng.uniform(0.25, 0.45)
    darker = value - gap >= 0.15 and (value + gap > 1 or rng.random() < 0.5)
    v = value - gap if darker else min(value + gap, 1.0)
    c1 = _hsv(h1, rng.uniform(0.1, 0.7), np.clip(v + rng.uniform(-0.1, 0.1), 0.1, 1))
    c2 = _hsv(h2, rng.uniform(0.1, 0.7), np.clip(v + rng.uniform(-0.2, 0.2), 0.1, 1))
    kind = rng.integers(4)
    if kind == 0:  # smooth blotchy noise
        cells = int(rng.integers(3, 7))
        low = (rng.random((cells, cells)) * 255).astype(np.uint8)
        w = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), np.float32)
        w = w[..., None] / 255
    elif kind == 1:  # stripes
        ang, freq = rng.uniform(0, np.pi), rng.uniform(2, 7)
        ph = rng.uniform(0, 2 * np.pi)
        w = 0.5 + 0.5 * np.sin(np.pi * freq * (xx * np.cos(ang) + yy * np.sin(ang)) + ph)
        w = w[..., None]
    elif kind == 2:  # checks
        ang, freq = rng.uniform(0, np.pi), rng.uniform(2, 5)
        u = xx * np.cos(ang) + yy * np.sin(ang)
        v = -xx * np.sin(ang) + yy * np.cos(ang)
        w = (np.sin(np.pi * freq * u) * np.sin(np.pi * freq * v) > 0)[..., None]
        w = w.astype(np.float32) * 0.8 + 0.1
    else:  # linear gradient
        ang = rng.uniform(0, 2 * np.pi)
        w = (0.5 + 0.5 * (xx * np.cos(ang) + yy * np.sin(ang)))[..., None]
    w = 0.5 + (w - 0.5) * rng.uniform(0.3, 0.8)  # tone the texture down
    bg = c1 * (1 - w) + c2 * w
    # per-pixel grain from a child generator, so the draws after it do not depend on size
    grain_rng = np.random.default_rng(int(rng.integers(2**62)))
    grain = grain_rng.normal(0, rng.uniform(0.005, 0.03), size=(size, size, 1))
    return bg + grain


def _shading(rng: np.random.Generator, size: int,
             pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Directional light with a specular-ish highlight, centred on the object."""
    xx, yy = _grid(size)
    ang = rng.uniform(0, 2 * np.pi)
    lx, ly = math.cos(ang), math.sin(ang)
    scale = float(np.abs(pose[:2]).max()) + 1e-6
    u = ((xx - pose[2, 0]) * lx + (yy - pose[2, 1]) * ly) / scale
    hx, hy = pose[2, 0] + 0.4 * scale * lx, pose[2, 1] + 0.4 * scale * ly
    spec = np.exp(-((xx - hx) ** 2 + (yy - hy) ** 2) / (0.08 * scale * scale))
    return (0.8 + 0.25 * u)[..., None], (0.35 * spec)[..., None]


def _render_photo(rng: np.random.Generator, family: str, inner: str, size: int) -> np.ndarray:
    outline = _FAMILY_SPECS[family][0]
    pose = _pose(rng)
    hue = rng.uniform()
    value = rng.uniform(0.45, 1.0)
    color = _hsv(hue, rng.uniform(0.45, 1.0), value)
    bg = _background(rng, size, hue, value)

    parts = _inner_parts(inner, family)
    obj = _mask([_apply(pose, outline)], size)
    holes = [_apply(pose, p) for k, p in parts if k == "hole"]
    if holes:
        obj = obj * (1 - _mask(holes, size))
    # drop shadow: the object's mask shifted away from the light, darkening the background
    dist = rng.uniform(0.04, 0.1)
    ang = rng.uniform(0, 2 * np.pi)
    shift = dist * np.array([math.cos(ang), math.sin(ang)])
    shadow_pose = pose.copy()
    shadow_pose[2] += shift
    shadow = _mask([_apply(shadow_pose, outline)], size)
    if holes:
        shadow = shadow * (1 - _mask([_apply(shadow_pose, p) for k, p in parts
                                      if k == "hole"], size))
    img = bg * (1 - rng.uniform(0.3, 0.55) * shadow[..., None])

    light, spec = _shading(rng, size, pose)
    fill = color * light + spec
    painted = [_apply(pose, p) for k, p in parts if k == "part"]
    if painted:
        # inner parts in a contrasting hue (random too, so still not a class cue)
        pc = _hsv((hue + rng.uniform(0.25, 0.75)) % 1, rng.uniform(0.4, 1.0),
                  rng.uniform(0.3, 1.0))
        pm = _mask(painted, size)[..., None]
        fill = fill * (1 - pm) + (pc * light + spec) * pm
    m = obj[..., None]
    img = img * (1 - m) + fill * m
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# ------------------------------------------------------------------------ sketches
def _resample(poly: np.ndarray, step: float) -> np.ndarray:
    """A closed polygon resampled to points ``step`` apart along its perimeter; keeps the
    vertices' arc positions so corners stay sharp."""
    closed = np.vstack([poly, poly[:1]])
    seg = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    perim = float(cum[-1])
    t = np.union1d(np.linspace(0, perim, max(8, int(perim / step)), endpoint=False), cum[:-1])
    return np.stack([np.interp(t, cum, closed[:, 0]), np.interp(t, cum, closed[:, 1])], 1)


def _stroke(rng: np.random.Generator, poly: np.ndarray, amp: float) -> np.ndarray:
    """One jittery pass around a closed polygon ([-1, 1] frame), starting anywhere, ending
    with an overshoot or a gap, wobbling with low-frequency noise plus a tremor."""
    pts = _resample(poly, 0.05)
    n = len(pts)
    start = int(rng.integers(n))
    extent = rng.uniform(0.9, 1.12)
    m = max(3, round(n * extent))
    idx = (start + np.arange(m)) % n
    t = np.arange(m, dtype=np.float64) / n
    out = pts[idx]
    k = np.arange(1, 4)[:, None]
    for d in range(2):  # smooth wobble: a few random sinusoids along the arc, plus drift
        a = rng.normal(0, amp, size=(3, 1)) / k
        ph = rng.uniform(0, 2 * np.pi, size=(3, 1))
        out[:, d] += (a * np.sin(2 * np.pi * k * t + ph)).sum(0) + rng.normal(0, amp) * t
    return out + rng.normal(0, amp * 0.15, size=out.shape)


def _distort(rng: np.random.Generator, pts: np.ndarray, strength: float) -> np.ndarray:
    """A small random affine distortion (the sketcher's imprecision), in the unit frame."""
    return pts @ (np.eye(2) + rng.normal(0, strength, size=(2, 2)))


def _render_sketch(rng: np.random.Generator, family: str, inner: str, size: int) -> np.ndarray:
    outline = _FAMILY_SPECS[family][0]
    pose = _pose(rng)
    amp = rng.uniform(0.015, 0.035)
    width = int(rng.integers(3, 6))  # pen width in pixels at _SS x: 1.5 to 2.5 px
    ink = int(rng.integers(0, 50))
    im = Image.new("L", (size * _SS, size * _SS), 255)
    draw = ImageDraw.Draw(im)

    def pen(poly_unit: np.ndarray, filled: bool = False) -> None:
        poly = _apply(pose, _distort(rng, poly_unit, 0.06))
        if filled:
            draw.polygon(_to_px(poly + rng.normal(0, amp * 0.3, size=poly.shape), size),
                         fill=ink)
        passes = 2 if rng.random() < 0.3 else 1  # sometimes traced twice
        for _ in range(passes):
            draw.line(_to_px(_stroke(rng, poly, amp), size), fill=ink, width=width,
                      joint="curve")

    pen(outline)
    for kind, part in _inner_parts(inner, family):
        pen(part, filled=kind == "part" and inner != "bar")
    im = im.resize((size, size), Image.BOX)
    return np.repeat(np.asarray(im)[..., None], 3, axis=2)


# ------------------------------------------------------------------------ rendering API
def render(class_index: int, domain: int, instance: int, seed: int, size: int) -> np.ndarray:
    """Render one image, (size, size, 3) uint8, deterministically.

    ``class_index`` indexes :data:`CLASS_NAMES`, ``domain`` is ``PHOTO`` or ``SKETCH``;
    the pixels depend only on the arguments (numpy's generator seeded with
    ``[seed, class_index, domain, instance]``), and the geometry not on ``size``.
    """
    if not 0 <= class_index < len(CLASS_NAMES):
        raise ValueError(f"class_index {class_index} out of range 0..{len(CLASS_NAMES) - 1}")
    if domain not in (PHOTO, SKETCH):
        raise ValueError(f"domain must be {PHOTO} (photo) or {SKETCH} (sketch), got {domain}")
    if instance < 0 or seed < 0:
        raise ValueError("instance and seed must be >= 0")
    if not _MIN_SIZE <= size <= _MAX_SIZE:
        raise ValueError(f"size must be in {_MIN_SIZE}..{_MAX_SIZE}, got {size}")
    family, inner = CLASS_NAMES[class_index].split("-")
    rng = np.random.default_rng([seed, class_index, domain, instance])
    if domain == PHOTO:
        return _render_photo(rng, family, inner, size)
    return _render_sketch(rng, family, inner, size)


def make_key(seed: int, class_idx: int, domain: int, instance: int, size: int) -> str:
    """The source key of one image."""
    return f"{KEY_PREFIX}:{seed}:{class_idx}:{domain}:{instance}:{size}"


def parse_key(source: str) -> tuple[int, int, int, int, int]:
    """``(seed, class_index, domain, instance, size)`` of a key; ValueError if malformed."""
    parts = source.split(":")
    if len(parts) != 6 or parts[0] != KEY_PREFIX:
        raise ValueError(f"not a synthetic image key: {source!r} "
                         f"(expected '{KEY_PREFIX}:<seed>:<class>:<domain>:<instance>:<size>')")
    try:
        seed, cls, domain, instance, size = (int(p) for p in parts[1:])
    except ValueError:
        raise ValueError(f"synthetic image key with a non-integer field: {source!r}") from None
    return seed, cls, domain, instance, size


@functools.lru_cache(maxsize=4096)
def _render_key(source: str) -> np.ndarray:
    seed, cls, domain, instance, size = parse_key(source)
    arr = render(cls, domain, instance, seed, size)
    arr.setflags(write=False)
    return arr


def read_synthetic(source: str) -> Image.Image:
    """The reader of the synthetic protocol: a key -> a fresh RGB PIL image (cached)."""
    return Image.fromarray(_render_key(source))


# ------------------------------------------------------------------------ the protocol
def _grid_shape(n: int) -> tuple[int, int]:
    """The smallest (families, inners) grid holding ``n`` classes, balanced in use."""
    nf, ni = len(FAMILIES), len(INNERS)
    cands = [(f * i, abs(f / nf - i / ni), f, i)
             for f in range(1, nf + 1) for i in range(1, ni + 1) if f * i >= n]
    _, _, f, i = min(cands)
    return f, i


def _covered(chosen: list[int], others: list[int]) -> bool:
    """Whether every family and inner part used in ``chosen`` also occurs in ``others``."""
    fam = {CLASS_NAMES[c].split("-")[0] for c in others}
    inn = {CLASS_NAMES[c].split("-")[1] for c in others}
    return all(CLASS_NAMES[c].split("-")[0] in fam and CLASS_NAMES[c].split("-")[1] in inn
               for c in chosen)


def _choose_classes(num_classes: int, num_unseen: int,
                    rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Seen and unseen catalogue indices. The classes fill the smallest balanced grid of
    leading families x inner parts (a seeded few dropped); unseen classes are drawn so each
    of their parts also occurs in a seen class when possible (zero-shot by composition)."""
    f, i = _grid_shape(num_classes)
    grid = [fi * len(INNERS) + ii for fi in range(f) for ii in range(i)]
    for _ in range(200):
        pool = sorted(rng.choice(grid, size=num_classes, replace=False).tolist())
        if _covered(grid, pool):  # every family and inner part of the grid still in use
            break
    # among seeded draws, keep the covered one whose parts are spread most evenly (so
    # every family and inner part keeps as many seen examples as possible)
    best: tuple[int, list[int]] | None = None
    for _ in range(300):
        draw = sorted(rng.choice(pool, size=num_unseen, replace=False).tolist())
        fam = np.bincount([c // len(INNERS) for c in draw], minlength=len(FAMILIES))
        inn = np.bincount([c % len(INNERS) for c in draw], minlength=len(INNERS))
        score = int((fam**2).sum() + (inn**2).sum())
        if not _covered(draw, [c for c in pool if c not in draw]):
            score += 10**6
        if best is None or score < best[0]:
            best = (score, draw)
    unseen = best[1] if best is not None else []
    seen = [c for c in pool if c not in unseen]
    return seen, unseen


def _split(items: list[tuple[int, int, int, int]], seed: int, size: int) -> Split:
    """A Split of (catalogue class, label, domain, instance) items."""
    return Split([make_key(seed, c, d, k, size) for c, _, d, k in items],
                 np.array([lab for _, lab, _, _ in items], dtype=np.int64),
                 np.array([d for _, _, d, _ in items], dtype=np.int64))


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


@protocols.register("synthetic")
def synthetic(
    num_classes: Annotated[int, Range(ge=3, le=len(CLASS_NAMES))] = 24,
    num_unseen: Annotated[int, Range(ge=1)] = 8,
    photos_per_class: Annotated[int, Range(ge=1, le=100_000)] = 30,
    sketches_per_class: Annotated[int, Range(ge=1, le=100_000)] = 30,
    image_size: Annotated[int, Range(ge=_MIN_SIZE, le=_MAX_SIZE)] = 64,
    val_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.1,
    generalized: bool = False,
    seed: Annotated[int, Range(ge=0, lt=2**63)] = 0,
) -> ProtocolData:
    """Seeded, offline sketch/photo benchmark of compositional shape classes.

    A class is ``<family>-<inner>`` (e.g. ``triangle-ring``): ``num_classes`` classes from
    8 families x 5 inner parts, ``num_unseen`` of them held out (chosen by ``seed``, each
    a new combination of parts seen in training). Photos are shaded objects of random
    color on textured backgrounds; sketches are jittery black strokes on white.

    Splits: ``train``/``val`` are seen-class sketches and photos (``val_fraction`` of each
    class and domain, seeded); ``query`` is every unseen-class sketch; ``gallery`` every
    unseen-class photo, plus ``photos_per_class`` fresh photos per seen class (never in
    train/val) when ``generalized``. Sources are keys rendered by the protocol's reader.
    """
    n_all = len(CLASS_NAMES)
    num_classes = _check_int("num_classes", num_classes, 3, n_all)
    num_unseen = _check_int("num_unseen", num_unseen, 1)
    if num_classes - num_unseen < 2:
        raise ValueError(f"num_unseen must leave at least 2 seen classes: num_unseen="
                         f"{num_unseen} with num_classes={num_classes}")
    photos_per_class = _check_int("photos_per_class", photos_per_class, 1)
    sketches_per_class = _check_int("sketches_per_class", sketches_per_class, 1)
    image_size = _check_int("image_size", image_size, _MIN_SIZE, _MAX_SIZE)
    seed = _check_int("seed", seed, 0)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float):
        raise TypeError(f"val_fraction must be a number, got {val_fraction!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not isinstance(generalized, bool | np.bool_):
        raise TypeError(f"generalized must be a boolean, got {generalized!r}")

    rng = np.random.default_rng([seed, 0x5B1])
    seen_idx, unseen_idx = _choose_classes(num_classes, num_unseen, rng)
    seen_idx.sort(key=lambda c: CLASS_NAMES[c])
    unseen_idx.sort(key=lambda c: CLASS_NAMES[c])
    n_seen = len(seen_idx)

    train: list[tuple[int, int, int, int]] = []
    val: list[tuple[int, int, int, int]] = []
    for label, c in enumerate(seen_idx):
        for domain, count in ((SKETCH, sketches_per_class), (PHOTO, photos_per_class)):
            n_val = min(round(val_fraction * count), count - 1)
            held = set(rng.choice(count, size=n_val, replace=False).tolist())
            for k in range(count):
                (val if k in held else train).append((c, label, domain, k))
    query = [(c, n_seen + j, SKETCH, k)
             for j, c in enumerate(unseen_idx) for k in range(sketches_per_class)]
    gallery = [(c, n_seen + j, PHOTO, k)
               for j, c in enumerate(unseen_idx) for k in range(photos_per_class)]
    if generalized:  # fresh instances, disjoint from the train/val photos
        gallery += [(c, label, PHOTO, photos_per_class + k)
                    for label, c in enumerate(seen_idx) for k in range(photos_per_class)]

    return ProtocolData(
        name="synthetic",
        seen_classes=[CLASS_NAMES[c] for c in seen_idx],
        unseen_classes=[CLASS_NAMES[c] for c in unseen_idx],
        train=_split(train, seed, image_size),
        val=_split(val, seed, image_size),
        query=_split(query, seed, image_size),
        gallery=_split(gallery, seed, image_size),
        reader=read_synthetic,
        generalized=bool(generalized),
    )


def _synthetic_check(params: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """At least 2 seen classes must remain."""
    n, k = params.get("num_classes", 24), params.get("num_unseen", 8)
    if isinstance(n, int) and isinstance(k, int) and n - k < 2:
        return [f"num_unseen ({k}) must leave at least 2 seen classes of num_classes ({n})"]
    return []


synthetic.check_manifest = _synthetic_check  # type: ignore[attr-defined]
