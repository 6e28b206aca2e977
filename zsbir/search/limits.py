"""Decode bounds for untrusted images: formats and pixel counts checked from the header.

A small file can declare a huge picture (a 125 KB GIF decodes to 13000 x 13000 pixels,
169 MB as a palette image and 507 MB in RGB). :func:`open_image` opens an image lazily
(only the header is read), restricted to the formats the search product handles, and
refuses one whose width x height is over a limit before anything is decoded; Pillow's own
decompression-bomb error is reported the same way.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from zsbir.search.errors import SearchError

__all__ = ["DEFAULT_PHOTO_PIXELS", "DEFAULT_SKETCH_PIXELS", "MEDIA_TYPES", "ImageTooLarge",
           "NotAnImage", "check_pixels", "open_image"]

DEFAULT_SKETCH_PIXELS = 16_000_000   # a phone photo of a drawing (4000 x 3000) fits
DEFAULT_PHOTO_PIXELS = 40_000_000    # decoded for thumbnails (after JPEG draft reduction)

# Pillow format -> media type; the index takes these suffixes (store.IMAGE_SUFFIXES):
# .jpg .jpeg (JPEG, or MPO: a multi-picture JPEG from a camera), .png, .bmp, .gif, .webp
MEDIA_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png",
               "GIF": "image/gif", "BMP": "image/bmp", "WEBP": "image/webp"}
OPEN_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")  # Pillow's JPEG opener returns MPOs too


class ImageTooLarge(SearchError):
    """An image whose declared size is over the pixel limit (refused before decoding)."""


class NotAnImage(SearchError):
    """Bytes that are not an image of an accepted format."""


def _mpx(n: int) -> str:
    return f"{n / 1e6:.1f} Mpx"


def check_pixels(im: Any, limit: int, what: str) -> None:
    """Refuse ``im`` (opened, not loaded) when width x height is over ``limit``."""
    w, h = im.size
    if w * h > limit:
        raise ImageTooLarge(f"{what} is {w}x{h} pixels ({_mpx(w * h)}), over the limit of "
                            f"{_mpx(limit)}")


def open_image(source: bytes | bytearray | str | Path, limit: int, what: str) -> Any:
    """``PIL.Image.open`` of an accepted format, refused (:class:`ImageTooLarge`) when its
    declared size is over ``limit`` pixels; nothing is decoded yet (call ``load()``)."""
    from PIL import Image, UnidentifiedImageError

    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        im = Image.open(fp, formats=OPEN_FORMATS)
    except Image.DecompressionBombError as exc:  # declared size over Pillow's own bound
        raise ImageTooLarge(f"{what} is too large to decode: {exc}") from exc
    except (UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise NotAnImage(f"{what} is not an image of an accepted format "
                         f"({', '.join(OPEN_FORMATS)})") from exc
    try:
        check_pixels(im, limit, what)
    except ImageTooLarge:
        im.close()
        raise
    return im
