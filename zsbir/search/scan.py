"""The photos of a folder, found and read safely: :func:`scan_photos` and :func:`read_photo`.

Scanning (``zsbir index build|update``) walks the folder once, hidden entries left out:

- every directory and every file is visited once, by its ``(st_dev, st_ino)``: a symlink
  loop (``ln -s .. cls/loop``), two links to one file, a hard link or a link to a folder
  that is also reachable directly yield one photo; the other paths are reported as skipped
  ("same file as ...", "same folder as ..."). Real entries are walked before links, so the
  recorded path is the real one whenever there is one;
- a symlink whose target lies outside the real (resolved) photo folder is refused
  (skipped, with its target) unless ``follow_outside_links``: an index's server serves
  every indexed file, so a link must not smuggle in, say, ``/etc`` or a private folder;
- only regular files are photos: a FIFO, socket or device named ``*.jpg`` is skipped after
  a ``stat`` (never opened; :func:`read_photo` also opens with ``O_NONBLOCK`` and checks
  ``fstat`` as a second guard); a directory named ``*.jpg`` is walked as a folder;
- file names are ``str`` as :func:`os.fsdecode` gives them: a name that is not valid UTF-8
  holds lone surrogates (``surrogateescape``) and round-trips to the same bytes.
  :func:`db_name` / :func:`fs_name` store such a name losslessly in SQLite (as a BLOB of
  its bytes; valid names stay TEXT) and :func:`shown` prints any name safely.

Reading (:func:`read_photo`) takes a file's bytes once, with ``fstat`` before and after:
the SHA-256, size and mtime recorded for a photo are those of the very bytes that were
decoded and embedded (a file rewritten during the read is read again), so a later
``update`` that sees another size or mtime embeds it again.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["IMAGE_SUFFIXES", "MAX_PHOTO_BYTES", "PhotoDataset", "PhotoFileError", "Scan",
           "collate_photos", "db_name", "decode_photo", "fs_name", "read_photo",
           "scan_photos", "shown"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
MAX_PHOTO_BYTES = 256 * 2**20  # a larger "photo" is skipped, not read into memory
READ_TRIES = 3


class PhotoFileError(OSError):
    """A photo file that cannot be taken as it is (not regular, too large, changing)."""


# ------------------------------------------------------------------------- file names
def db_name(name: str | None) -> str | bytes | None:
    """A file name as stored in SQLite: TEXT when it is valid UTF-8, else a BLOB of the
    file system's bytes (lossless; a TEXT and a BLOB never compare equal)."""
    if name is None:
        return None
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name)


def fs_name(value: str | bytes | None) -> str | None:
    """The inverse of :func:`db_name`: the name as :func:`os.fsdecode` gives it."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def shown(name: str | os.PathLike[str]) -> str:
    """``name`` safe to print on one line: undecodable bytes as ``\\xNN``, control
    characters (a newline in a file name) escaped too."""
    s = os.fspath(name)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = os.fsencode(s).decode("utf-8", "backslashreplace")
    if any(ord(c) < 32 or ord(c) == 127 for c in s):
        s = "".join(f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c for c in s)
    return s


# ---------------------------------------------------------------------------- scanning
@dataclass
class Scan:
    """A folder's photos (relative '/'-separated path -> stat) and what was left out."""

    files: dict[str, os.stat_result] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
          (stat.S_ISBLK, "a device"), (stat.S_ISDIR, "a directory"))


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages (``"a FIFO"``, ``"a directory"``, ...)."""
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def scan_photos(root: str | Path, follow_outside_links: bool = False) -> Scan:
    """The image files under ``root`` (see the module docstring for the rules)."""
    root_path = os.fspath(root)
    real_root = os.path.realpath(root_path)
    out = Scan()
    st = os.stat(root_path)
    dirs: dict[tuple[int, int], str] = {(st.st_dev, st.st_ino): "."}
    files: dict[tuple[int, int], str] = {}
    stack: list[tuple[str, str]] = [("", root_path)]   # (relative, path) folders to list
    links: list[tuple[str, str]] = []                   # symlinks, taken after real entries

    def add_file(rel: str, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            out.skipped.append((rel, f"not a regular file ({file_kind(st.st_mode)})"))
            return
        key = (st.st_dev, st.st_ino)
        if key in files:
            out.skipped.append((rel, f"same file as {shown(files[key])}"))
            return
        files[key] = rel
        out.files[rel] = st

    def add_dir(rel: str, path: str, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if key in dirs:
            out.skipped.append((rel, f"same folder as {shown(dirs[key])}"))
            return
        dirs[key] = rel
        stack.append((rel, path))

    def add_link(rel: str, path: str) -> None:
        target = os.path.realpath(path)
        try:
            st = os.stat(path)
        except OSError as exc:
            if _is_image(rel):
                out.skipped.append((rel, f"link that cannot be followed ({exc.strerror})"))
            return
        if not stat.S_ISDIR(st.st_mode) and not _is_image(rel):
            return
        inside = target == real_root or target.startswith(real_root.rstrip(os.sep) + os.sep)
        if not inside and not follow_outside_links:
            out.skipped.append((rel, f"link to {shown(target)}, outside the photo folder "
                                     "(index build --follow-outside-links allows it)"))
        elif stat.S_ISDIR(st.st_mode):
            add_dir(rel, path, st)
        else:
            add_file(rel, st)

    while stack or links:
        if not stack:  # the real tree is done: the next link (in name order)
            links.sort(reverse=True)
            add_link(*links.pop())
            continue
        rel_dir, path = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            out.skipped.append((rel_dir or ".", f"cannot list the folder ({exc.strerror})"))
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            try:
                if e.is_symlink():
                    links.append((rel, e.path))
                    continue
                st = e.stat(follow_symlinks=False)
            except OSError as exc:
                out.skipped.append((rel, f"cannot stat ({exc.strerror})"))
                continue
            if stat.S_ISDIR(st.st_mode):
                subdirs.append((rel, e.path, st))
            elif _is_image(e.name):
                add_file(rel, st)
        for rel, p, st in reversed(subdirs):  # depth first, in name order
            add_dir(rel, p, st)
    return out


# ----------------------------------------------------------------------------- reading
def read_fd(fd: int, limit: int | None = None) -> bytes:
    """The bytes of ``fd`` to its end, or at most ``limit`` of them."""
    chunks, n = [], 0
    while limit is None or n < limit:
        b = os.read(fd, 1 << 20 if limit is None else min(limit - n, 1 << 20))
        if not b:
            break
        chunks.append(b)
        n += len(b)
    return b"".join(chunks)


def read_photo(path: str | Path) -> tuple[bytes, os.stat_result]:
    """The file's bytes and the ``fstat`` that describes exactly them.

    Never blocks on a FIFO (``O_NONBLOCK``, then ``fstat``: only regular files are read).
    A file whose size or mtime changes during the read is read again (up to 3 times), then
    refused with :class:`PhotoFileError`."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(READ_TRIES):
        fd = os.open(path, flags)
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                raise PhotoFileError(f"not a regular file ({file_kind(before.st_mode)})")
            if before.st_size > MAX_PHOTO_BYTES:
                raise PhotoFileError(f"larger than {MAX_PHOTO_BYTES >> 20} MiB")
            data = read_fd(fd)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        same = (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns)
        if same and len(data) == after.st_size:
            return data, after
    raise PhotoFileError(f"changed while being read ({READ_TRIES} tries)")


def decode_photo(data: bytes) -> Any:
    """Decode fully (truncation is found now) to 8-bit RGB (:func:`zsbir.data.base.to_rgb8`)."""
    from PIL import Image

    from zsbir.data.base import to_rgb8

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return to_rgb8(im)


class PhotoDataset:
    """Items for :func:`zsbir.data.loading.make_loader`: photo ``i`` of ``rels`` (under
    ``root``) read once by :func:`read_photo`, hashed and decoded from those bytes; bad
    files are items with an ``error`` (as :class:`zsbir.data.loading.ImageDataset`)."""

    def __init__(self, root: str | Path, rels: list[str], transform: Any, domain: int):
        self.root, self.rels, self.transform, self.domain = Path(root), rels, transform, domain

    def __len__(self) -> int:
        return len(self.rels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import UnidentifiedImageError

        rel = self.rels[index]
        try:
            data, st = read_photo(self.root / rel)
            img = decode_photo(data)
            if img.size[0] == 0 or img.size[1] == 0:
                raise ValueError("empty image")
        except PhotoFileError as exc:
            return {"index": index, "error": str(exc), "source": rel}
        except UnidentifiedImageError:  # its message would hold a BytesIO address
            return {"index": index, "source": rel,
                    "error": "UnidentifiedImageError: not an image file PIL can read"}
        except OSError as exc:
            if exc.errno is None:  # Pillow's decoding errors (truncated, broken data)
                return {"index": index, "error": f"{type(exc).__name__}: {exc}", "source": rel}
            return {"index": index, "error": f"cannot read ({exc.strerror})", "source": rel}
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the file's fault
            return {"index": index, "error": f"{type(exc).__name__}: {exc}", "source": rel}
        return {"image": self.transform(img, None), "index": index, "label": 0,
                "domain": self.domain, "file": (hashlib.sha256(data).hexdigest(), st.st_size,
                                                st.st_mtime_ns)}


def collate_photos(items: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`zsbir.data.loading.collate`, plus ``files``: (sha256, size, mtime_ns) of the
    good items, in the order of ``index``."""
    from zsbir.data.loading import collate

    batch = collate(items)
    batch["files"] = [it["file"] for it in items if "error" not in it]
    return batch
