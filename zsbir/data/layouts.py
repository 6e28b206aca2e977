"""Dataset layouts on disk: detection, the file index and its cache.

**Layouts.** A :class:`Layout` names the directories of one release of a dataset, relative
to the dataset folder, and where that folder may sit relative to the ``root`` a user gives
(``"."``: root is the dataset folder; ``"Sketchy"``: root is its parent; ZSE-SBIR adds
``"datasets/Sketchy"``). Auto-detection tries the layouts in their listed order, each at each
of its places, and takes the first with every directory the protocol needs; if none fits,
the error lists what was found and what is missing for every partial match.

**Index.** Every image file (extensions in :data:`IMAGE_EXTENSIONS`, case-insensitive;
names starting with ``.`` are ignored) in every class folder of every directory of the
layout is listed once: ``os.scandir`` plus one ``stat`` per file. Zero-byte and unstat-able
files are left out and recorded with their reason; with ``verify`` every image is decoded
once (PIL, full load) and failures are recorded too. Only class folders directly under a
layout directory are read (no deeper recursion).

**Cache.** The index is written as JSON to ``<cache_dir>/<hash of root + layout>.json`` and
reused while it is *valid*:

- the same layout directories were found;
- every directory it read (each layout directory and each class folder) still has the
  recorded ``(st_mtime_ns, st_ino)``: adding, removing or renaming a file or class folder
  changes the directory's mtime, replacing a folder changes its inode;
- no recorded directory mtime falls within :data:`RACY_WINDOW_NS` before the walk began (a
  change in the same timestamp tick as the walk would go unseen, as in git's "racy clean"
  rule): such an index is rebuilt on its next use, after which it is trusted;
- every skipped or undecodable file still has its recorded size and mtime (few files, so
  repairing one in place is noticed).

So validation costs one ``stat`` per class folder, never a listing. Not noticed: a good
file overwritten in place (same name, so no directory change); pass ``rebuild=True``
(``rebuild_index`` in the protocols) after editing files in place.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zsbir.data.base import read_image_file

__all__ = [
    "IMAGE_EXTENSIONS",
    "RACY_WINDOW_NS",
    "DirSpec",
    "FileIndex",
    "Layout",
    "ProtocolError",
    "ResolvedLayout",
    "detect_layout",
    "load_index",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
#: directories modified this close before a walk began make the index untrusted
RACY_WINDOW_NS = 2_000_000_000
INDEX_FORMAT = 2  # 2: every left-out entry recorded


class ProtocolError(ValueError):
    """A dataset tree that does not fit its protocol; the message names the root and lists
    every problem found."""


@dataclass(frozen=True)
class DirSpec:
    """One directory of a layout: its role, domain and candidate paths (first found wins)."""

    role: str
    domain: int
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class Layout:
    """A release's directory layout; ``bases`` are where the dataset folder may sit."""

    name: str
    bases: tuple[str, ...]
    dirs: tuple[DirSpec, ...]

    def describe(self, roles: Sequence[str]) -> str:
        parts = [" or ".join(s.candidates) + "/<class>/" for s in self.dirs if s.role in roles]
        where = " or ".join("ROOT" if b == "." else f"ROOT/{b}" for b in self.bases)
        return f"{self.name}: {', '.join(parts)} under {where}"


@dataclass(frozen=True)
class ResolvedLayout:
    """A layout found on disk: ``dirs`` maps each role found to its absolute path."""

    root: str
    layout: str
    base: str
    dirs: dict[str, str]
    domains: dict[str, int]


def _abs(path: str) -> str:
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))


def detect_layout(
    root: str, layouts: Sequence[Layout], need: Sequence[str], name: str = "auto",
    what: str = "dataset",
) -> ResolvedLayout:
    """Find ``name`` (or, for ``"auto"``, the first of ``layouts``) under ``root`` with every
    role in ``need``; other roles of the layout are included when present."""
    root_abs = _abs(root)
    if not os.path.isdir(root_abs):
        raise ProtocolError(f"{what}: root {root_abs} is not a directory")
    tried = [lay for lay in layouts if name in ("auto", lay.name)]
    if not tried:
        known = ", ".join(repr(lay.name) for lay in layouts)
        raise ProtocolError(f"{what} at {root_abs}: unknown layout {name!r}; known: {known}")
    partial: dict[str, list[str]] = {}  # what was found -> layouts that found it
    for lay in tried:
        for base in lay.bases:
            base_abs = os.path.normpath(os.path.join(root_abs, base))
            found = {}
            for spec in lay.dirs:
                path = next((os.path.join(base_abs, c) for c in spec.candidates
                             if os.path.isdir(os.path.join(base_abs, c))), None)
                if path is not None:
                    found[spec.role] = path
            missing = [s for s in lay.dirs if s.role in need and s.role not in found]
            if not missing:
                log.info("%s: layout %r at %s", what, lay.name, base_abs)
                return ResolvedLayout(root_abs, lay.name, base_abs, found,
                                      {s.role: s.domain for s in lay.dirs if s.role in found})
            if any(r in found for r in need):
                miss = "; ".join(" or ".join(os.path.join(base_abs, c) for c in s.candidates)
                                 for s in missing)
                detail = (f"at {base_abs}: found {', '.join(found[r] for r in need if r in found)}"
                          f"; missing {miss}")
                partial.setdefault(detail, []).append(lay.name)
    lines = [f"{what}: no {'known' if name == 'auto' else repr(name)} layout found "
             f"under root {root_abs}"]
    if partial:
        lines += ["partial matches:", *(f"  {'/'.join(n)} {d}" for d, n in partial.items())]
    lines += ["expected one of:", *(f"  {lay.describe(need)}" for lay in tried)]
    raise ProtocolError("\n".join(lines))


# ----------------------------------------------------------------------------- index
@dataclass
class FileIndex:
    """The image files under a resolved layout.

    ``dirs[layout_dir][class_folder]`` lists the usable file names (sorted); ``skipped`` maps
    absolute paths of files left out (zero-byte, unreadable) to the reason;
    ``decode_failures`` does the same for files that failed to decode, or is ``None`` when
    the images were not verified.
    """

    dirs: dict[str, dict[str, list[str]]]
    skipped: dict[str, str]
    decode_failures: dict[str, str] | None
    from_cache: bool = False

    def files(self, layout_dir: str, folder: str, verified: bool) -> list[str]:
        """Absolute paths of the usable images of one class folder."""
        base = os.path.join(layout_dir, folder)
        paths = [os.path.join(base, n) for n in self.dirs[layout_dir].get(folder, [])]
        if verified and self.decode_failures:
            paths = [p for p in paths if p not in self.decode_failures]
        return paths

    def left_out(self, layout_dir: str, folder: str, verified: bool) -> list[tuple[str, str]]:
        """(path, reason) of every file of one class folder that was left out."""
        base = os.path.join(layout_dir, folder)
        found = self._skipped_at.get(base, []) + (self._failed_at.get(base, []) if verified
                                                   else [])
        return sorted(found)

    def left_out_at(self, layout_dir: str) -> list[tuple[str, str]]:
        """(path, reason) of the entries directly in a layout directory that were left out
        (files, broken or looping links, unreadable folders)."""
        return sorted(self._skipped_at.get(layout_dir, []))

    def __post_init__(self) -> None:
        self._skipped_at = _by_folder(self.skipped)
        self._failed_at = _by_folder(self.decode_failures or {})


def _by_folder(reasons: dict[str, str]) -> dict[str, list[tuple[str, str]]]:
    grouped: dict[str, list[tuple[str, str]]] = {}
    for path, reason in reasons.items():
        grouped.setdefault(os.path.dirname(path), []).append((path, reason))
    return grouped


def _dir_stamp(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_mtime_ns, st.st_ino]


def _file_stamp(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _kind(mode: int) -> str:
    """What a non-regular file is, for the reason it was left out."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _stat_failure(entry: os.DirEntry[str], exc: OSError) -> str:
    """Why ``entry`` could not be followed: a broken or looping link, or unreadable."""
    if entry.is_symlink():
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        if exc.errno == errno.ENOENT:
            try:
                target = os.readlink(entry.path)
            except OSError:
                target = "?"
            return f"broken symbolic link (to {target})"
    return f"unreadable: {exc.strerror or exc}"


def _scan(resolved: ResolvedLayout) -> dict[str, Any]:
    """Walk the layout's directories once; every entry left out is recorded with its reason
    (hidden names, starting with ``.``, are not part of the tree and are not listed)."""
    started = time.time_ns()
    dirs: dict[str, dict[str, list[str]]] = {}
    stamps: dict[str, list[int]] = {}
    skipped: dict[str, str] = {}
    for layout_dir in sorted(set(resolved.dirs.values())):
        stamps[layout_dir] = _dir_stamp(layout_dir)
        folders = []
        with os.scandir(layout_dir) as it:
            for e in it:
                if e.name[0] == ".":
                    continue
                try:
                    st = e.stat()  # follows links
                except OSError as exc:
                    skipped[e.path] = f"class folder left out: {_stat_failure(e, exc)}"
                    continue
                if stat.S_ISDIR(st.st_mode):
                    folders.append(e.name)
                else:
                    skipped[e.path] = (f"not a class folder ({_kind(st.st_mode)}): only "
                                       "folders are read here")
        classes: dict[str, list[str]] = {}
        for folder in sorted(folders):
            cdir = os.path.join(layout_dir, folder)
            try:
                stamps[cdir] = _dir_stamp(cdir)
                entries = list(os.scandir(cdir))
            except OSError as exc:
                skipped[cdir] = f"class folder left out: unreadable: {exc.strerror or exc}"
                continue
            names = []
            for e in entries:
                if e.name[0] == ".":
                    continue
                ext = os.path.splitext(e.name)[1].lower()
                try:
                    st = e.stat()  # follows links
                except OSError as exc:
                    skipped[e.path] = _stat_failure(e, exc)
                    continue
                if not stat.S_ISREG(st.st_mode):
                    skipped[e.path] = _kind(st.st_mode)
                elif ext not in IMAGE_EXTENSIONS:
                    skipped[e.path] = (f"not an image file name ({ext or 'no extension'}; "
                                       f"read: {', '.join(sorted(IMAGE_EXTENSIONS))})")
                elif st.st_size == 0:
                    skipped[e.path] = "zero-byte file"
                else:
                    names.append(e.name)
            classes[folder] = sorted(names)
        dirs[layout_dir] = classes
    return {"format": INDEX_FORMAT, "root": resolved.root, "layout": resolved.layout,
            "indexed_at_ns": started, "dirs": dirs, "stamps": stamps, "skipped": skipped,
            "decode_failures": None}


def _decode_error(path: str) -> str | None:
    try:
        read_image_file(path)
    except Exception as exc:  # noqa: BLE001 - any decoder error makes the file unusable
        return f"cannot decode: {type(exc).__name__}: {exc}"
    return None


def _verify(data: dict[str, Any]) -> dict[str, str]:
    paths = [os.path.join(d, folder, n) for d, classes in data["dirs"].items()
             for folder, names in classes.items() for n in names]
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # PIL's decoders release the GIL
        errors = list(pool.map(_decode_error, paths, chunksize=64))
    return {p: e for p, e in zip(paths, errors) if e is not None}


def _file_stamps(data: dict[str, Any]) -> dict[str, list[int] | None]:
    return {p: _file_stamp(p) for p in [*data["skipped"], *(data["decode_failures"] or {})]}


def _stale_reason(data: dict[str, Any], resolved: ResolvedLayout) -> str | None:
    """Why a cached index no longer describes the tree (``None``: it does)."""
    if data.get("format") != INDEX_FORMAT:
        return "index format changed"
    if data.get("root") != resolved.root or data.get("layout") != resolved.layout:
        return "different root or layout"
    if sorted(data["dirs"]) != sorted(set(resolved.dirs.values())):
        return "the layout's directories changed"
    racy_after = data["indexed_at_ns"] - RACY_WINDOW_NS
    for path, (mtime, ino) in data["stamps"].items():
        try:
            now = _dir_stamp(path)
        except OSError:
            return f"{path} is gone"
        if now != [mtime, ino]:
            return f"{path} changed"
        if mtime >= racy_after:
            return f"{path} was modified just before the last index was built"
    for path, stamp in data.get("file_stamps", {}).items():
        if _file_stamp(path) != stamp:
            return f"{path} changed"
    return None


def _cache_file(cache_dir: Path, resolved: ResolvedLayout) -> Path:
    key = hashlib.sha256(f"{resolved.root}\0{resolved.layout}".encode()).hexdigest()[:24]
    return cache_dir / f"{key}.json"


def _write(path: Path, data: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, separators=(",", ":"))
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"could not write the file index cache {path}: {exc}", stacklevel=3)


def load_index(
    resolved: ResolvedLayout, cache_dir: Path | None, verify: bool = False, rebuild: bool = False
) -> FileIndex:
    """The file index of ``resolved``: from ``cache_dir`` when still valid, else built (and
    written there). ``cache_dir=None`` disables the cache. ``verify`` decodes every image
    unless the cached index already holds the decode results."""
    path = _cache_file(cache_dir, resolved) if cache_dir is not None else None
    data: dict[str, Any] | None = None
    if path is not None and not rebuild and path.is_file():
        try:
            data = json.loads(path.read_text("utf-8"))
            reason = _stale_reason(data, resolved)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            reason = f"unreadable cache ({exc})"
        if reason is not None:
            log.info("file index of %s rebuilt: %s", resolved.root, reason)
            data = None
    from_cache = data is not None
    dirty = not from_cache
    if data is None:
        data = _scan(resolved)
    if verify and data["decode_failures"] is None:
        data["decode_failures"] = _verify(data)
        dirty = True
    if dirty and path is not None:
        data["file_stamps"] = _file_stamps(data)
        _write(path, data)
    return FileIndex(data["dirs"], data["skipped"], data["decode_failures"], from_cache)
