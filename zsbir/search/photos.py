"""Reading an indexed photo safely: only the bytes that were indexed leave the server.

:func:`read_indexed` opens a photo's file as its index row names it (path relative to the
photo folder, size, SHA-256 of the content) and returns its bytes only when

1. it lies inside the photo folder: the path is resolved (symbolic links inside the folder
   that stay inside it are fine), then opened one component at a time from the folder's
   real path with ``O_NOFOLLOW``, so a link swapped in meanwhile is not followed either;
2. it is a regular file (opened with ``O_NONBLOCK``: a FIFO does not block the worker; a
   directory, FIFO or device is refused);
3. its size and the SHA-256 of the bytes read equal the row's (a changed file is stale:
   ``zsbir index update`` indexes it again);
4. it is an image of a format the index takes (:data:`zsbir.search.limits.MEDIA_TYPES`),
   which also gives the media type it is served with.

Each refusal is a :class:`PhotoError` subclass naming the photo. :func:`thumbnail` makes a
JPEG thumbnail from verified bytes, its decode bounded by pixels before it starts.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from zsbir.search.errors import SearchError
from zsbir.search.limits import MEDIA_TYPES, ImageTooLarge, NotAnImage, check_pixels, open_image
from zsbir.search.scan import file_kind, read_fd

__all__ = ["DEFAULT_PHOTO_BYTES", "PhotoChanged", "PhotoError", "PhotoGone", "PhotoOutside",
           "PhotoRecord", "PhotoTooLarge", "PhotoUnsupported", "VerifiedPhoto",
           "read_indexed", "thumbnail"]

DEFAULT_PHOTO_BYTES = 64 * 2**20
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


@dataclass(frozen=True)
class PhotoRecord:
    """A photo's row in the index: id, path relative to the photo folder, size, SHA-256."""

    id: int
    path: str
    size: int
    sha256: str
    label: str | None


@dataclass(frozen=True)
class VerifiedPhoto:
    """The indexed bytes of a photo, checked, with their Pillow format and media type."""

    record: PhotoRecord
    data: bytes
    format: str
    media_type: str


class PhotoError(SearchError):
    """An indexed photo that cannot be served (the subclass says why)."""


class PhotoGone(PhotoError):
    """Not on disk any more (or unreadable)."""


class PhotoOutside(PhotoError):
    """Its path now leads outside the photo folder (a link retargeted)."""


class PhotoChanged(PhotoError):
    """Not the file that was indexed: another size, content or file type."""


class PhotoTooLarge(PhotoError):
    """Over the server's byte or pixel limit."""


class PhotoUnsupported(PhotoError):
    """Not an image of a format the index takes."""


def _name(rec: PhotoRecord) -> str:
    return f"photo {rec.id} ({rec.path!r})"


def _stale(rec: PhotoRecord, why: str) -> PhotoChanged:
    return PhotoChanged(f"{_name(rec)} {why} since it was indexed; it is not served: "
                        "re-index it with `zsbir index update INDEX_DIR`")


def _inside(root: str, rel: str) -> str | None:
    """``rel`` resolved (links followed) relative to the real ``root``; ``None`` when that
    leaves ``root``."""
    target = os.path.realpath(os.path.join(root, rel))
    inner = os.path.relpath(target, root)
    if inner == os.pardir or inner.startswith(os.pardir + os.sep) or os.path.isabs(inner):
        return None
    return inner


def _open_beneath(root: str, inner: str) -> int:
    """Open ``root/inner`` (no link in ``inner``) without following any link: each
    directory from ``root``'s descriptor, the file with ``O_NOFOLLOW | O_NONBLOCK``."""
    file_flags = os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC
    if os.open not in os.supports_dir_fd or not _NOFOLLOW:  # no openat: check afterwards
        fd = os.open(os.path.join(root, inner), file_flags)
        if not os.path.samestat(os.fstat(fd), os.stat(os.path.join(root, inner))):
            os.close(fd)
            raise OSError("the file changed while it was opened")
        return fd
    fd = os.open(root, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    try:
        *dirs, name = inner.split(os.sep)
        for part in dirs:
            nxt = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(name, file_flags, dir_fd=fd)
    finally:
        os.close(fd)


def read_indexed(root: str | Path, rec: PhotoRecord, max_bytes: int = DEFAULT_PHOTO_BYTES,
                 allow_outside: bool = False) -> VerifiedPhoto:
    """The bytes of ``rec`` under the photo folder ``root``, verified (module docstring).

    ``allow_outside``: the index was built with ``--follow-outside-links``, so its links may
    lead out of the folder; the file is then opened through its links (still only a regular
    file whose size and SHA-256 are the indexed ones is served)."""
    real_root = os.path.realpath(root)
    inner = _inside(real_root, rec.path)
    if inner is None and not allow_outside:
        raise PhotoOutside(f"{_name(rec)} now leads outside the indexed photo folder "
                           f"{str(root)!r}; it is not served (re-index with `zsbir index "
                           "update INDEX_DIR`)")
    try:
        if inner is None:
            fd = os.open(os.path.join(root, rec.path), os.O_RDONLY | _NONBLOCK | _CLOEXEC)
        else:
            fd = _open_beneath(real_root, inner)
    except FileNotFoundError as exc:
        raise PhotoGone(f"{_name(rec)} is no longer on disk (run `zsbir index update "
                        "INDEX_DIR`)") from exc
    except OSError as exc:  # ELOOP/ENOTDIR: a link or file swapped in meanwhile; EACCES
        raise PhotoGone(f"{_name(rec)} cannot be read: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _stale(rec, f"is {file_kind(st.st_mode)}, not the file")
        if st.st_size != rec.size:
            raise _stale(rec, f"changed size ({st.st_size} bytes, {rec.size} indexed)")
        if st.st_size > max_bytes:
            raise PhotoTooLarge(f"{_name(rec)} is {st.st_size} bytes, over the server's limit "
                                f"of {max_bytes} bytes")
        data = read_fd(fd, rec.size + 1)
    finally:
        os.close(fd)
    if len(data) != rec.size or hashlib.sha256(data).hexdigest() != rec.sha256:
        raise _stale(rec, "changed content")
    try:
        with open_image(data, 2**62, _name(rec)) as im:  # the header: format, not pixels
            fmt = im.format
    except ImageTooLarge as exc:
        raise PhotoTooLarge(str(exc)) from exc
    except NotAnImage as exc:
        raise PhotoUnsupported(str(exc)) from exc
    return VerifiedPhoto(rec, data, fmt, MEDIA_TYPES[fmt])


def thumbnail(photo: VerifiedPhoto, size: int, max_pixels: int) -> bytes:
    """A JPEG of ``photo`` whose longest side is ``size``; the decode is refused
    (:class:`PhotoTooLarge`) when it would be over ``max_pixels`` (JPEGs are decoded at a
    reduced scale first, so large camera photos fit)."""
    from PIL import Image

    what = _name(photo.record)
    try:
        with open_image(photo.data, 2**62, what) as im:
            im.draft("RGB", (size, size))
            check_pixels(im, max_pixels, what)
            rgb = im.convert("RGB")
        rgb.thumbnail((size, size))
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=85)
    except ImageTooLarge as exc:
        raise PhotoTooLarge(str(exc)) from exc
    except (NotAnImage, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise PhotoUnsupported(f"{what} cannot be decoded: {exc}") from exc
    return buf.getvalue()
