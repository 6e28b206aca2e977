"""The zero-shot SBIR benchmark protocols (registered as ``protocols``).

Each protocol reads a dataset in the layout it ships in (see :mod:`zsbir.data.layouts`),
splits its classes as the literature does (lists in :mod:`zsbir.data.classnames`) and
returns a :class:`~zsbir.data.base.ProtocolData`:

- labels: seen classes ``0..n_seen-1`` in sorted order of their names, then unseen classes
  ``n_seen..`` in sorted order; names are spelled as the dataset's class list spells them;
- ``train`` / ``val``: seen-class sketches and photos; ``val`` takes ``val_fraction`` of each
  (class, domain), rounded to nearest, at most all but one image, chosen by a generator
  seeded with ``(seed, crc32(class key), domain)`` from the sorted file list, so a class's
  validation images do not depend on which other classes the split holds;
- ``query``: unseen-class sketches; ``gallery``: unseen-class photos;
- ``generalized=True`` (GZS-SBIR, SEM-PCYC's ``--gzs_sbir``, SBTKNet Table 3): the same
  queries, and the gallery also holds **every** seen-class photo (train and val ones), as
  SEM-PCYC pools its training photos into the gallery; SEM-PCYC's extra random 1.2x
  subsample of the pooled gallery is not applied.

``seed`` is the protocol's own split seed (validation images, ``folder``'s class draw),
kept apart from the training seed so runs that differ in training seed share one split.
``ctx`` (injected) only supplies the cache directory when ``cache_dir`` is not given.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np

from zsbir.constraints import ExistingPath, Range, ResumeSafe
from zsbir.context import BuildContext, default_cache_dir
from zsbir.data.base import PHOTO, SKETCH, ProtocolData, Split
from zsbir.data.classnames import class_split, normalize
from zsbir.data.layouts import (
    DirSpec,
    FileIndex,
    Layout,
    ProtocolError,
    ResolvedLayout,
    detect_layout,
    load_index,
)
from zsbir.registry import protocols

__all__ = [
    "FOLDER_LAYOUT",
    "QUICKDRAW_LAYOUTS",
    "SKETCHY_LAYOUTS",
    "TUBERLIN_LAYOUTS",
    "ProtocolError",
    "folder",
    "quickdraw_ext",
    "sketchy_ext",
    "tuberlin_ext",
]

log = logging.getLogger(__name__)

#: share of each seen (class, domain) held out for validation
ValFraction = Annotated[float, Range(ge=0, lt=1)]
Seed = Annotated[int, Range(ge=0, lt=2**63)]


def _dirs(sketch: Sequence[str], photo: Sequence[str], extended: Sequence[str] = ()
          ) -> tuple[DirSpec, ...]:
    specs = [DirSpec("sketch", SKETCH, tuple(sketch)), DirSpec("photo", PHOTO, tuple(photo))]
    if extended:
        specs.append(DirSpec("photo_extended", PHOTO, tuple(extended)))
    return tuple(specs)


_SAKE_SKETCHY = _dirs(["256x256/sketch/tx_000000000000_ready"],
                      ["256x256/photo/tx_000000000000_ready"], ["EXTEND_image_sketchy_ready"])
_SAKE_TUB = _dirs(["png_ready"], ["ImageResized_ready"])
_ZSE_QD = _dirs(["sketches"], ["images"])

#: Sketchy Extended: SAKE release, the same under ZSE-SBIR's ``datasets/``, SEM-PCYC's tree
SKETCHY_LAYOUTS = (
    Layout("sake", (".", "Sketchy"), _SAKE_SKETCHY),
    Layout("zse", ("datasets/Sketchy", "Sketchy", "."), _SAKE_SKETCHY),
    Layout("sempcyc", (".", "Sketchy"),
           _dirs(["sketch/tx_000000000000"], ["photo/tx_000000000000"], ["extended_photo"])),
)
#: TU-Berlin Extended: sketches ``png_ready``, photos ``ImageResized_ready`` (SAKE, ZSE-SBIR)
#: or ``sketches``/``images`` (SEM-PCYC)
TUBERLIN_LAYOUTS = (
    Layout("sake", (".", "TUBerlin"), _SAKE_TUB),
    Layout("zse", ("datasets/TUBerlin", "TUBerlin", "."), _SAKE_TUB),
    Layout("sempcyc", (".", "TU-Berlin"), _dirs(["sketches"], ["images"])),
)
#: QuickDraw Extended: ZSE-SBIR (also SEM-PCYC) ``QuickDraw/{sketches,images}``; the
#: Doodle2Search downloads (``QuickDraw_{sketches,images}[_final]``, or its code's
#: ``EXTEND_image_quickdraw`` for the photos)
QUICKDRAW_LAYOUTS = (
    Layout("zse", ("datasets/QuickDraw", "QuickDraw", "."), _ZSE_QD),
    Layout("doodle2search", (".", "QuickDraw"),
           _dirs(["QuickDraw_sketches", "QuickDraw_sketches_final"],
                 ["QuickDraw_images", "QuickDraw_images_final", "EXTEND_image_quickdraw"])),
)
#: any ``ROOT/sketch/<class>/`` + ``ROOT/photo/<class>/`` tree
FOLDER_LAYOUT = Layout("folder", (".",), _dirs(["sketch", "sketches"],
                                               ["photo", "photos", "images"]))


# ----------------------------------------------------------------------------- helpers
def _check_args(what: str, val_fraction: float, seed: int) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ProtocolError(f"{what}: val_fraction must be in [0, 1), got {val_fraction}")
    if seed < 0:
        raise ProtocolError(f"{what}: seed must be >= 0, got {seed}")


def _index_dir(cache_dir: str | None, ctx: BuildContext | None) -> Path:
    if cache_dir is not None:
        base = Path(cache_dir).expanduser()
    else:
        base = ctx.cache_dir if ctx is not None else default_cache_dir()
    return Path(base) / "index"


def _quote(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _match(
    what: str, resolved: ResolvedLayout, roles: Sequence[str], index: FileIndex,
    classes: Sequence[str], verified: bool,
) -> tuple[dict[str, dict[int, list[str]]], list[tuple[str, str]]]:
    """Pair each class with its folder in every layout directory of ``roles``.

    Returns the image paths per class and domain, and the files and folders left out.
    Raises :class:`ProtocolError` listing, per directory, every class missing, empty or
    matched by several folders, and the folders that match no class.
    """
    by_key = {normalize(c): c for c in classes}
    files: dict[str, dict[int, list[str]]] = {c: {SKETCH: [], PHOTO: []} for c in classes}
    skipped: list[tuple[str, str]] = []
    report: list[str] = []
    failed = False
    for role in roles:
        layout_dir, domain = resolved.dirs[role], resolved.domains[role]
        found: dict[str, list[str]] = {}
        for f in index.dirs[layout_dir]:
            found.setdefault(normalize(f), []).append(f)
        missing = sorted(c for c in classes if normalize(c) not in found)
        top = index.left_out_at(layout_dir)  # files, broken links, unreadable folders
        skipped += top
        why = {normalize(os.path.basename(path)): reason for path, reason in top}
        clashes = [f"{_quote(fs)} (class {by_key[k]!r})" for k, fs in found.items()
                   if k in by_key and len(fs) > 1]
        unmatched = [f for k, fs in found.items() if k not in by_key for f in fs]
        empty = []
        for k, fs in found.items():
            if k not in by_key or len(fs) > 1:
                continue
            paths = index.files(layout_dir, fs[0], verified)
            left = index.left_out(layout_dir, fs[0], verified)
            skipped += left
            if not paths:
                empty.append(repr(fs[0]) + (f" ({len(left)} files left out)" if left else ""))
            files[by_key[k]][domain] += paths
        lines = []
        if missing:
            lines.append(f"missing classes ({len(missing)}): " + ", ".join(
                repr(c) + (f" ({why[normalize(c)]})" if normalize(c) in why else "")
                for c in missing))
        if empty:
            lines.append(f"class folders with no usable image ({len(empty)}): {', '.join(empty)}")
        if clashes:
            lines.append(f"several folders for one class ({len(clashes)}): {'; '.join(clashes)}")
        if unmatched:
            hints = []
            for f in unmatched:
                close = difflib.get_close_matches(f, missing, n=1, cutoff=0.5)
                hints.append(repr(f) + (f" (closest missing class: {close[0]!r})" if close
                                        else ""))
            lines.append(f"folders matching no class ({len(unmatched)}): {', '.join(hints)}")
        failed |= bool(missing or empty or clashes)
        if lines:
            report.append(f"  {layout_dir} ({role}):\n" + "\n".join(f"    {ln}" for ln in lines))
        skipped += [(os.path.join(layout_dir, f), f"folder matches no class of {what}")
                    for f in unmatched]
    if failed:
        raise ProtocolError(
            f"{what}: the tree under root {resolved.root} (layout {resolved.layout!r}) does "
            f"not match the {len(classes)} classes of the split:\n" + "\n".join(report)
            + "\n  (folders are matched to classes ignoring case, spaces, '_' and '-')"
        )
    if report:
        warnings.warn(f"{what} under {resolved.root}: folders left out:\n" + "\n".join(report),
                      stacklevel=3)
    return files, skipped


def _num_val(n: int, val_fraction: float) -> int:
    return max(0, min(int(math.floor(val_fraction * n + 0.5)), n - 1))


def _assemble(
    name: str, seen: Sequence[str], unseen: Sequence[str],
    files: dict[str, dict[int, list[str]]], skipped: list[tuple[str, str]],
    generalized: bool, val_fraction: float, seed: int,
) -> ProtocolData:
    """Label the classes and cut train / val / query / gallery (rules in the module doc)."""
    seen, unseen = sorted(seen), sorted(unseen)
    parts: dict[str, list[tuple[str, int, int]]] = {k: [] for k in ("train", "val", "query",
                                                                      "gallery")}
    for label, c in enumerate(seen):
        for domain in (SKETCH, PHOTO):
            paths = sorted(files[c][domain])
            rng = np.random.default_rng([seed, zlib.crc32(normalize(c).encode()), domain])
            in_val = set(rng.permutation(len(paths))[: _num_val(len(paths), val_fraction)]
                         .tolist())
            for i, p in enumerate(paths):
                parts["val" if i in in_val else "train"].append((p, label, domain))
            if generalized and domain == PHOTO:
                parts["gallery"] += [(p, label, PHOTO) for p in paths]
    for label, c in enumerate(unseen, start=len(seen)):
        parts["query"] += [(p, label, SKETCH) for p in sorted(files[c][SKETCH])]
        parts["gallery"] += [(p, label, PHOTO) for p in sorted(files[c][PHOTO])]

    def split(rows: list[tuple[str, int, int]]) -> Split:
        return Split([r[0] for r in rows], np.array([r[1] for r in rows], dtype=np.int64),
                     np.array([r[2] for r in rows], dtype=np.int64))

    data = ProtocolData(name, seen, unseen, split(parts["train"]), split(parts["val"]),
                        split(parts["query"]), split(parts["gallery"]),
                        skipped=sorted(set(skipped)), generalized=generalized)
    log.info("%s: %s", name, data.summary())
    if data.skipped:
        log.warning("%s: %d files or folders left out, each with its reason in "
                    "ProtocolData.skipped (a run's log.txt and metrics.json); first: %s (%s)",
                    name, len(data.skipped), *data.skipped[0])
    return data


def _benchmark(
    protocol: str, dataset: str, split: str, root: str, layouts: Sequence[Layout],
    layout: str, roles: Sequence[str], generalized: bool, val_fraction: float, seed: int,
    verify_images: bool, cache_dir: str | None, rebuild_index: bool, ctx: BuildContext | None,
) -> ProtocolData:
    """The shared body of the published-benchmark protocols."""
    what = f"{protocol} (split {split!r})"
    _check_args(what, val_fraction, seed)
    try:
        cs = class_split(dataset, split)
    except ValueError as exc:
        raise ProtocolError(f"{what}: {exc}") from None
    resolved = detect_layout(root, layouts, roles, layout, what)
    index = load_index(resolved, _index_dir(cache_dir, ctx), verify_images, rebuild_index)
    files, skipped = _match(what, resolved, roles, index, cs.all, verify_images)
    return _assemble(f"{protocol}/{split}", cs.seen, cs.unseen, files, skipped, generalized,
                     val_fraction, seed)


# --------------------------------------------------------------------------- protocols
#: why these parameters may change on ``--resume``: the same files, found elsewhere
_MOVED = ResumeSafe("where the data and its file index live, for a moved run")
_INDEX = ResumeSafe("rebuilds the file index of the same files")


@protocols.register("sketchy_ext")
def sketchy_ext(
    root: Annotated[str, ExistingPath("dir"), _MOVED],
    split: Literal["sk-sh", "sk-sh-sempcyc", "sk-ye"] = "sk-sh",
    layout: Literal["auto", "sake", "zse", "sempcyc"] = "auto",
    photos: Literal["original+extended", "extended"] = "original+extended",
    generalized: bool = False,
    val_fraction: ValFraction = 0.1,
    seed: Seed = 0,
    verify_images: bool = False,
    cache_dir: Annotated[str | None, _MOVED] = None,
    rebuild_index: Annotated[bool, _INDEX] = False,
    ctx: BuildContext | None = None,
) -> ProtocolData:
    """Sketchy Extended (Sangkloy et al., SIGGRAPH 2016 + the extension of Liu et al., 2017).

    Splits (125 classes):

    - ``sk-sh`` (default): 25 unseen / 100 seen, the SAKE list (Liu et al., ICCV 2019,
      repository ``dataset/Sketchy/zeroshot1``; ZSE-SBIR's ``zeroshot1`` is identical);
    - ``sk-sh-sempcyc``: 25 unseen / 100 seen, SEM-PCYC's ``np.random.seed(0)`` draw
      (Dutta & Akata, CVPR 2019; only 4 classes overlap the SAKE list);
    - ``sk-ye``: 21 unseen (none in ImageNet-1k) / 104 seen (Yelamarthi et al., ECCV 2018).

    Layouts (``root`` is the dataset folder or its parent): ``sake``
    ``256x256/{sketch,photo}/tx_000000000000_ready/<class>/`` + ``EXTEND_image_sketchy_ready/``;
    ``zse`` the same under ``datasets/Sketchy/``; ``sempcyc``
    ``{sketch,photo}/tx_000000000000/`` + ``extended_photo/``. Sketches are the
    ``tx_000000000000`` set. ``photos="original+extended"`` uses both photo directories, as
    SAKE's lists do (SK-SH gallery 17,101 photos of which 2,499 duplicate an extended photo);
    ``"extended"`` uses the extended photos only, as SEM-PCYC's and Doodle2Search's code do.

    Args:
        root: dataset folder (or its parent, or ZSE-SBIR's repository folder).
        split: class split, see above.
        layout: directory layout; ``auto`` takes the first of sake, zse, sempcyc found.
        photos: which photo directories form the photo set.
        generalized: GZS-SBIR: the gallery also holds every seen-class photo.
        val_fraction: share of each seen (class, domain) held out as ``val``.
        seed: seed of the validation draw.
        verify_images: decode every image once at indexing; failures are left out and
            listed in ``skipped`` (the result is cached with the index).
        cache_dir: toolkit cache folder (the index goes in ``<cache_dir>/index``);
            default ``ctx.cache_dir`` or ``zsbir.context.default_cache_dir()``.
        rebuild_index: ignore a cached file index (after editing files in place).
    """
    roles = ("sketch", "photo", "photo_extended") if photos == "original+extended" else \
        ("sketch", "photo_extended")
    return _benchmark("sketchy_ext", "sketchy", split, root, SKETCHY_LAYOUTS, layout, roles,
                      generalized, val_fraction, seed, verify_images, cache_dir, rebuild_index,
                      ctx)


@protocols.register("tuberlin_ext")
def tuberlin_ext(
    root: Annotated[str, ExistingPath("dir"), _MOVED],
    split: Literal["tub-sh"] = "tub-sh",
    layout: Literal["auto", "sake", "zse", "sempcyc"] = "auto",
    generalized: bool = False,
    val_fraction: ValFraction = 0.1,
    seed: Seed = 0,
    verify_images: bool = False,
    cache_dir: Annotated[str | None, _MOVED] = None,
    rebuild_index: Annotated[bool, _INDEX] = False,
    ctx: BuildContext | None = None,
) -> ProtocolData:
    """TU-Berlin Extended (Eitz et al., SIGGRAPH 2012 + the photos of Liu et al., 2017).

    Split ``tub-sh``: 30 unseen classes (each with at least 400 photos) / 220 seen, the SAKE
    list (Liu et al., ICCV 2019, repository ``dataset/TUBerlin/zeroshot``; ZSE-SBIR
    identical). Layouts: ``sake`` ``png_ready/<class>/`` sketches and
    ``ImageResized_ready/<class>/*.JPEG`` photos under ``TUBerlin/``; ``zse`` the same under
    ``datasets/TUBerlin/``; ``sempcyc`` ``TU-Berlin/{sketches,images}/<class>/``.

    Args:
        root: dataset folder or its parent.
        split: class split.
        layout: directory layout; ``auto`` takes the first of sake, zse, sempcyc found.
        generalized: GZS-SBIR: the gallery also holds every seen-class photo.
        val_fraction: share of each seen (class, domain) held out as ``val``.
        seed: seed of the validation draw.
        verify_images: decode every image once at indexing (failures listed in ``skipped``).
        cache_dir: toolkit cache folder (index in ``<cache_dir>/index``).
        rebuild_index: ignore a cached file index.
    """
    return _benchmark("tuberlin_ext", "tuberlin", split, root, TUBERLIN_LAYOUTS, layout,
                      ("sketch", "photo"), generalized, val_fraction, seed, verify_images,
                      cache_dir, rebuild_index, ctx)


@protocols.register("quickdraw_ext")
def quickdraw_ext(
    root: Annotated[str, ExistingPath("dir"), _MOVED],
    split: Literal["qd-de"] = "qd-de",
    layout: Literal["auto", "zse", "doodle2search"] = "auto",
    generalized: bool = False,
    val_fraction: ValFraction = 0.1,
    seed: Seed = 0,
    verify_images: bool = False,
    cache_dir: Annotated[str | None, _MOVED] = None,
    rebuild_index: Annotated[bool, _INDEX] = False,
    ctx: BuildContext | None = None,
) -> ProtocolData:
    """QuickDraw Extended (Dey et al., CVPR 2019, Doodle2Search).

    Split ``qd-de``: 30 unseen / 80 seen of 110 classes, Doodle2Search's
    ``zeroshot_classes_quickdraw.txt``. Layouts: ``zse`` ``QuickDraw/{sketches,images}/<class>/``
    (also SEM-PCYC's), optionally under ``datasets/``; ``doodle2search``
    ``QuickDraw_sketches[_final]/<class>/`` + ``QuickDraw_images[_final]/<class>/``.

    Args:
        root: dataset folder or its parent.
        split: class split.
        layout: directory layout; ``auto`` takes the first of zse, doodle2search found.
        generalized: GZS-SBIR: the gallery also holds every seen-class photo.
        val_fraction: share of each seen (class, domain) held out as ``val``.
        seed: seed of the validation draw.
        verify_images: decode every image once at indexing (failures listed in ``skipped``).
        cache_dir: toolkit cache folder (index in ``<cache_dir>/index``).
        rebuild_index: ignore a cached file index.
    """
    return _benchmark("quickdraw_ext", "quickdraw", split, root, QUICKDRAW_LAYOUTS, layout,
                      ("sketch", "photo"), generalized, val_fraction, seed, verify_images,
                      cache_dir, rebuild_index, ctx)


def _read_names(path: str, what: str) -> list[str]:
    try:
        text = Path(path).expanduser().read_text("utf-8")
    except OSError as exc:
        raise ProtocolError(f"{what}: cannot read unseen_file {path}: {exc}") from None
    return [s for s in (ln.strip() for ln in text.splitlines()) if s and s[0] != "#"]


@protocols.register("folder")
def folder(
    root: Annotated[str, ExistingPath("dir"), _MOVED],
    unseen: list[str] | None = None,
    unseen_file: Annotated[str | None, ExistingPath("file")] = None,
    num_unseen: Annotated[int | None, Range(ge=1)] = None,
    generalized: bool = False,
    val_fraction: ValFraction = 0.1,
    seed: Seed = 0,
    verify_images: bool = False,
    cache_dir: Annotated[str | None, _MOVED] = None,
    rebuild_index: Annotated[bool, _INDEX] = False,
    ctx: BuildContext | None = None,
) -> ProtocolData:
    """Any ``ROOT/sketch/<class>/*`` + ``ROOT/photo/<class>/*`` tree as a zero-shot split.

    ``sketches`` is accepted for ``sketch``, ``photos`` and ``images`` for ``photo``.
    Every class folder needs both sketches and photos. Class names are the folder names
    (the sketch folder's spelling); give the unseen classes in exactly one way:

    - ``unseen``: a list of names (matched ignoring case, spaces, ``_`` and ``-``);
    - ``unseen_file``: a text file, one name a line (``#`` lines are comments);
    - ``num_unseen``: drawn as ``numpy.random.default_rng(seed).choice(sorted classes,
      num_unseen, replace=False)``.

    Args:
        root: the folder holding ``sketch/`` and ``photo/``.
        unseen: unseen class names.
        unseen_file: path of a file of unseen class names (relative to the working dir).
        num_unseen: number of unseen classes to draw.
        generalized: GZS-SBIR: the gallery also holds every seen-class photo.
        val_fraction: share of each seen (class, domain) held out as ``val``.
        seed: seed of the class draw and of the validation draw.
        verify_images: decode every image once at indexing (failures listed in ``skipped``).
        cache_dir: toolkit cache folder (index in ``<cache_dir>/index``).
        rebuild_index: ignore a cached file index.
    """
    what = f"folder at {root}"
    _check_args(what, val_fraction, seed)
    given = [k for k, v in (("unseen", unseen), ("unseen_file", unseen_file),
                            ("num_unseen", num_unseen)) if v is not None]
    if len(given) != 1:
        raise ProtocolError(f"{what}: give exactly one of unseen, unseen_file, num_unseen "
                            f"(got {', '.join(given) or 'none'})")
    roles = ("sketch", "photo")
    resolved = detect_layout(root, (FOLDER_LAYOUT,), roles, "auto", "folder")
    index = load_index(resolved, _index_dir(cache_dir, ctx), verify_images, rebuild_index)
    names: dict[str, str] = {}  # key -> display name (the sketch folder's spelling wins)
    for role in ("photo", "sketch"):
        names.update((normalize(f), f) for f in index.dirs[resolved.dirs[role]])
    classes = sorted(names.values())
    if num_unseen is not None:
        if not 0 < num_unseen < len(classes):
            raise ProtocolError(f"{what}: num_unseen must be in 1..{len(classes) - 1} "
                                f"({len(classes)} classes), got {num_unseen}")
        chosen = np.random.default_rng(seed).choice(classes, num_unseen, replace=False)
        unseen_names = sorted(str(c) for c in chosen)
    else:
        requested = unseen if unseen is not None else _read_names(unseen_file or "", what)
        unknown = [n for n in requested if normalize(n) not in names]
        if unknown:
            hints = [n + (f" (closest: {close[0]!r})" if (close := difflib.get_close_matches(
                n, classes, n=1, cutoff=0.5)) else "") for n in unknown]
            raise ProtocolError(f"{what}: {len(unknown)} unseen classes have no folder under "
                                f"{resolved.root}: {', '.join(hints)}")
        unseen_names = sorted({names[normalize(n)] for n in requested})
        if not unseen_names or len(unseen_names) == len(classes):
            raise ProtocolError(f"{what}: the unseen classes must be a non-empty proper subset "
                                f"of the {len(classes)} classes")
    files, skipped = _match(what, resolved, roles, index, classes, verify_images)
    taken = set(unseen_names)
    return _assemble("folder", [c for c in classes if c not in taken], unseen_names, files,
                     skipped, generalized, val_fraction, seed)


def _folder_check(params: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """Exactly one of unseen, unseen_file, num_unseen."""
    given = [k for k in ("unseen", "unseen_file", "num_unseen") if params.get(k) is not None]
    if len(given) != 1:
        return [f"give exactly one of unseen, unseen_file, num_unseen (got "
                f"{', '.join(given) or 'none'})"]
    if params.get("unseen") == []:
        return ["unseen is empty: name at least one unseen class"]
    return []


folder.check_manifest = _folder_check  # type: ignore[attr-defined]
