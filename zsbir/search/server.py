"""``zsbir serve INDEX_DIR``: a Starlette app holding the model and the index in memory.

Routes:

- ``GET /``: the search page (``static/index.html``: drawing canvas, results grid);
- ``GET /static/...``: its script and style sheet (package data, no build step);
- ``GET /api/info``: the index's name, size, model, hasher, score name and labels;
- ``POST /api/search``: a sketch, either uploaded as a PNG/JPEG file (``multipart/form-data``
  field ``sketch``, or the raw bytes with an ``image/*`` content type) or as JSON
  ``{"drawing": [[[xs], [ys]], ...], "top": 10, "pen_width": 3, "class": null,
  "rerank": null}`` (``rerank``: a registered reranker's name, real-valued indexes)
  (QuickDraw's ``drawing`` field, :mod:`zsbir.search.strokes`) -> ``{"results": [{id,
  name, label, score, url, thumb}], "score": "cosine similarity", "ms": ...}``;
- ``GET /photos/{id}`` (``?size=N``: a JPEG thumbnail, longest side N): only photos the
  index holds, looked up by their integer id; a path never comes from the client.

Bad input gets a 4xx with a JSON ``{"error": message}``, never a 500: not an image, too
large (bytes: ``max_upload_bytes``, checked on the declared length and on the bytes
received; pixels: ``max_sketch_pixels``, checked before decoding), an empty or malformed
drawing, malformed JSON (``NaN``/``Infinity``, nesting deeper than :data:`MAX_JSON_DEPTH`),
a field of the wrong type or range. A body that does not arrive within ``body_timeout_s``
is a 408; a search or photo that does not finish within ``timeout_s`` (waiting included)
a 503. At most ``max_concurrent`` searches, thumbnails and photo reads run at once, so
memory stays bounded under many uploads.

Photos are served only as they were indexed (:mod:`zsbir.search.photos`): a file changed,
replaced (by another file, a directory, a FIFO) or whose link now leads outside the photo
folder is refused (409, 403), a removed one is a 404. Thumbnails are made from the verified
bytes and cached by their SHA-256. The index reloads itself after ``zsbir index update``
(:meth:`zsbir.search.api.Index.refresh`).
"""

from __future__ import annotations

import inspect
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from zsbir.search.api import Index
from zsbir.search.errors import SearchError
from zsbir.search.limits import DEFAULT_PHOTO_PIXELS, ImageTooLarge
from zsbir.search.photos import (
    DEFAULT_PHOTO_BYTES,
    PhotoChanged,
    PhotoError,
    PhotoGone,
    PhotoOutside,
    PhotoTooLarge,
    PhotoUnsupported,
    thumbnail,
)
from zsbir.search.scan import shown

__all__ = ["MAX_JSON_DEPTH", "create_app", "run_server"]

MAX_TOP = 100
MAX_NAME = 200  # characters of a class or reranker name
MAX_JSON_DEPTH = 16  # a drawing needs 4: {"drawing": [stroke: [[xs], [ys]]]}
THUMB_SIZES = (64, 128, 256, 512)
THUMB_CACHE_BYTES = 32 * 2**20
PHOTO_STATUS = {PhotoGone: 404, PhotoOutside: 403, PhotoChanged: 409, PhotoTooLarge: 413,
                PhotoUnsupported: 415}
T = TypeVar("T")


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# ------------------------------------------------------------------------- request body
async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError as exc:
            raise HTTPError(400, "invalid Content-Length") from exc
        if n > limit:
            raise HTTPError(413, f"upload too large ({n} bytes; the limit is {limit})")
    body = bytearray()
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise HTTPError(413, f"upload too large (more than {limit} bytes)")
    except TimeoutError as exc:
        raise HTTPError(408, _slow_body(timeout)) from exc
    return bytes(body)


def _slow_body(timeout: float) -> str:
    return f"the request body did not arrive within {timeout:g} s"


def _json_depth(body: bytes) -> int:
    """The deepest nesting of ``[``/``{`` outside strings, counted without parsing (so a
    hostile body cannot exhaust the parser's recursion)."""
    s = body.replace(b"\\\\", b"").replace(b'\\"', b"")  # escapes, left to right as JSON's
    a = np.frombuffer(s, np.uint8)
    inside = np.bitwise_xor.accumulate((a == ord('"')).view(np.uint8)).view(bool)
    step = ((a == ord("[")) | (a == ord("{"))).view(np.int8) - (
        (a == ord("]")) | (a == ord("}"))).view(np.int8)
    step[inside] = 0
    return int(np.cumsum(step, dtype=np.int32).max(initial=0))


def _not_finite(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (numbers must be finite)")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:30]} is out of range (numbers must be finite)")
    return v


def parse_json(body: bytes) -> Any:
    """Strict JSON: finite numbers only, nesting at most :data:`MAX_JSON_DEPTH`."""
    depth = _json_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise HTTPError(400, f"malformed JSON: nested {depth} levels deep (at most "
                             f"{MAX_JSON_DEPTH})")
    try:
        return json.loads(body, parse_constant=_not_finite, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise HTTPError(400, f"malformed JSON: {exc}") from exc


# ----------------------------------------------------------------------------- fields
def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        text = str(value) if isinstance(value, (str, float)) else "?"
        try:
            if len(text) > 20:
                raise ValueError(text)
            value = int(text)
        except ValueError as exc:
            raise HTTPError(400, f"{name} must be an integer, got {_short(value)}") from exc
    if not lo <= value <= hi:
        raise HTTPError(400, f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _short(v: Any) -> str:
    text = repr(v) if isinstance(v, (str, int, float, bool)) or v is None else \
        type(v).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _name(value: Any, field: str, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise HTTPError(400, f'"{field}" must be {what}')
    if len(value) > MAX_NAME:
        raise HTTPError(400, f'"{field}" is too long ({len(value)} characters; at most '
                             f"{MAX_NAME})")
    return value


def _json_query(data: Any) -> tuple[Any, int, str | None, float | None, str | None]:
    """(drawing, top, class, pen_width, rerank) of a JSON request, types checked."""
    from zsbir.search.strokes import check_pen_width

    if not isinstance(data, dict) or "drawing" not in data:
        raise HTTPError(400, 'JSON must be an object with a "drawing" field '
                             "(QuickDraw strokes: [[[xs], [ys]], ...])")
    top = _int(data.get("top", 10), "top", 1, MAX_TOP)
    label = _name(data.get("class"), "class", "a string")
    rerank = _name(data.get("rerank"), "rerank", "a reranker name")
    pen = data.get("pen_width")
    if pen is not None:
        pen = check_pen_width(pen)
    drawing = data["drawing"]
    if not isinstance(drawing, list):
        raise HTTPError(400, '"drawing" must be a list of strokes [[xs], [ys]]')
    return drawing, top, label, pen, rerank


# ---------------------------------------------------------------------------- workers
_ABANDON = ("abandon_on_cancel" if "abandon_on_cancel" in
            inspect.signature(anyio.to_thread.run_sync).parameters else "cancellable")


class _Busy(Exception):
    """No worker slot freed before the deadline."""


class _ThumbCache:
    """Thumbnails by (SHA-256 of the verified photo, size), least recently used evicted
    beyond ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[str, int], data: bytes) -> None:
        with self._lock:
            if key in self._items or len(data) > self.max_bytes:
                return
            self._items[key] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes:
                self.bytes -= len(self._items.popitem(last=False)[1])


# -------------------------------------------------------------------------------- app
def create_app(index: str | Path | Index, device: str = "auto",
               max_upload_bytes: int = 4 * 2**20, *, max_sketch_pixels: int | None = None,
               max_photo_pixels: int = DEFAULT_PHOTO_PIXELS,
               max_photo_bytes: int = DEFAULT_PHOTO_BYTES, max_concurrent: int = 4,
               timeout_s: float = 30.0, body_timeout_s: float = 30.0,
               pair_scorer: str | None = None, top_k: int | None = None) -> Starlette:
    """The app for an index directory (or an open :class:`Index`).

    ``max_sketch_pixels``: the largest sketch decoded (default: the Index's, 16 Mpx);
    ``max_photo_pixels``: the largest decode for a thumbnail (JPEGs count at their draft
    scale); ``max_photo_bytes``: the largest photo file served; ``max_concurrent``: searches,
    thumbnails and photo reads at once; ``timeout_s``: the limit of one search or photo,
    waiting for a slot included (503 beyond); ``body_timeout_s``: to receive a body (408).
    ``pair_scorer`` / ``top_k``: every search re-scores its top ``top_k`` photos with that
    pair scorer from the index's stored outputs (:meth:`Index.search`); checked here, so a
    scorer that reads an output the index lacks is a SearchError before serving.
    """
    if isinstance(index, Index):
        idx = index
        if max_sketch_pixels is not None:
            idx.max_sketch_pixels = int(max_sketch_pixels)
    elif max_sketch_pixels is not None:
        idx = Index.open(index, device, max_sketch_pixels)
    else:
        idx = Index.open(index, device)
    pairs: dict[str, Any] = {}
    if pair_scorer is not None or top_k is not None:
        idx.pair_scorer(pair_scorer or None)  # refused now rather than on every search
        pairs = {"pair_scorer": pair_scorer or "", "top_k": top_k}
    static = resources.files("zsbir.search") / "static"
    page = (static / "index.html").read_text("utf-8")
    slots = threading.BoundedSemaphore(max_concurrent)
    thumbs = _ThumbCache(THUMB_CACHE_BYTES)

    async def bounded(fn: Callable[..., T], *args: Any, what: str) -> T:
        """``fn(*args)`` on a worker thread holding one of the slots, within timeout_s."""
        deadline = time.monotonic() + timeout_s

        def job() -> T:
            if not slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise _Busy
            try:
                if time.monotonic() >= deadline:
                    raise _Busy
                return fn(*args)
            finally:
                slots.release()

        try:
            with anyio.fail_after(timeout_s):  # the thread is abandoned, its slot kept
                return await anyio.to_thread.run_sync(job, **{_ABANDON: True})
        except (TimeoutError, _Busy) as exc:
            raise HTTPError(503, f"{what} did not finish within {timeout_s:g} s (the server "
                                 "is busy); try again") from exc

    async def home(request: Request) -> Response:
        return HTMLResponse(page)

    def describe() -> dict[str, Any]:
        idx.refresh()
        d = idx.describe()
        return {**d, "labels": [shown(lab) for lab in d["labels"]]}  # JSON-safe names

    async def info(request: Request) -> Response:
        try:
            described = await bounded(describe, what="the index description")
        except HTTPError as exc:
            return _error(exc.status, exc.message)
        return JSONResponse({**described, "max_upload_bytes": max_upload_bytes,
                             "max_top": MAX_TOP, "max_sketch_pixels": idx.max_sketch_pixels})

    async def search(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            top, label, pen, rerank = 10, None, None, None
            if ctype == "application/json":
                body = await _read_body(request, max_upload_bytes, body_timeout_s)
                query, top, label, pen, rerank = _json_query(parse_json(body))
            elif ctype == "multipart/form-data":
                query, top, label = await _read_form(request, max_upload_bytes,
                                                     body_timeout_s)
            elif ctype.startswith("image/"):
                query = await _read_body(request, max_upload_bytes, body_timeout_s)
                top = _int(request.query_params.get("top", 10), "top", 1, MAX_TOP)
                label = _name(request.query_params.get("class"), "class", "a string")
            else:
                raise HTTPError(415, "send a PNG/JPEG sketch (multipart field \"sketch\" or "
                                     "an image/* body) or JSON strokes {\"drawing\": ...}")
            if isinstance(query, (bytes, bytearray)) and not query:
                raise HTTPError(400, "the uploaded sketch is empty")
            results = await bounded(_search, idx, query, top, label, pen, rerank, pairs,
                                    what="the search")
        except HTTPError as exc:
            return _error(exc.status, exc.message)
        except ImageTooLarge as exc:
            return _error(413, str(exc))
        except SearchError as exc:
            return _error(400, str(exc))
        except Exception as exc:  # multipart parser errors and the like  # noqa: BLE001
            from starlette.exceptions import HTTPException

            if isinstance(exc, HTTPException) and 400 <= exc.status_code < 500:
                return _error(exc.status_code, str(exc.detail))
            raise
        return JSONResponse({"results": results, "score": idx.score_name,
                             "ms": round(1000 * (time.perf_counter() - t0), 1)})

    def photo_bytes(photo_id: int, size: int | None) -> tuple[bytes, str]:
        photo = idx.read_photo(photo_id, max_photo_bytes)
        if size is None:
            return photo.data, photo.media_type
        key = (photo.record.sha256, size)
        data = thumbs.get(key)
        if data is None:
            data = thumbnail(photo, size, max_photo_pixels)
            thumbs.put(key, data)
        return data, "image/jpeg"

    async def photo(request: Request) -> Response:
        photo_id = request.path_params["photo_id"]
        size = request.query_params.get("size")
        try:
            if size is not None:
                s = _int(size, "size", 16, 1024)
                size = next((t for t in THUMB_SIZES if t >= s), THUMB_SIZES[-1])
            data, media = await bounded(photo_bytes, photo_id, size,
                                        what=f"photo {photo_id}")
        except HTTPError as exc:
            return _error(exc.status, exc.message)
        except PhotoError as exc:
            return _error(PHOTO_STATUS.get(type(exc), 404), str(exc))
        headers = {"X-Content-Type-Options": "nosniff"}
        if size is not None:
            headers["Cache-Control"] = "max-age=3600"
        return Response(data, media_type=media, headers=headers)

    routes = [Route("/", home), Route("/api/info", info),
              Route("/api/search", search, methods=["POST"]),
              Route("/photos/{photo_id:int}", photo),
              Mount("/static", StaticFiles(packages=[("zsbir.search", "static")]),
                    name="static")]
    app = Starlette(routes=routes)
    app.state.index = idx
    return app


async def _read_form(request: Request, limit: int, timeout: float
                     ) -> tuple[bytes, int, str | None]:
    """(sketch bytes, top, class) of a multipart upload, its size and time bounded."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise HTTPError(413, f"upload too large ({declared} bytes; the limit is {limit})")
    try:
        with anyio.fail_after(timeout):
            form = await request.form(max_files=1, max_fields=10, max_part_size=limit)
    except TimeoutError as exc:
        raise HTTPError(408, _slow_body(timeout)) from exc
    try:
        upload = form.get("sketch")
        if upload is None or isinstance(upload, str):
            raise HTTPError(400, 'the form needs a file field "sketch"')
        query = await upload.read()
        if len(query) > limit:
            raise HTTPError(413, f"upload too large ({len(query)} bytes; the limit is {limit})")
        top = _int(form.get("top", 10), "top", 1, MAX_TOP)
        label = _name(form.get("class"), "class", "a string")
    finally:
        await form.close()
    return query, top, label


def _search(idx: Index, query: Any, top: int, label: str | None, pen: float | None,
            rerank: str | None = None, pairs: dict[str, Any] | None = None
            ) -> list[dict[str, Any]]:
    if isinstance(query, list):
        from zsbir.search.strokes import render_strokes

        query = render_strokes(query, pen_width=pen)
    elif not isinstance(query, (bytes, bytearray)):
        raise HTTPError(400, '"drawing" must be a list of strokes [[xs], [ys]]')
    if label is not None:  # labels travel as shown() (undecodable bytes as \\xNN)
        label = {shown(lab): lab for lab in idx.labels}.get(label, label)
    out = []
    if pairs and rerank is not None:
        raise HTTPError(400, "this server re-scores with a pair scorer; \"rerank\" cannot "
                             "be combined with it")
    for r in idx.search(query, top=top, label=label, rerank=rerank, **(pairs or {})):
        out.append({"id": r.id, "name": shown(Path(r.path).name),
                    "label": None if r.label is None else shown(r.label),
                    "score": r.score, "rank": r.rank, "url": f"/photos/{r.id}",
                    "thumb": f"/photos/{r.id}?size=256",
                    **({"pair_score": r.pair_score} if pairs else {})})
    return out


def run_server(app: Starlette, host: str = "127.0.0.1", port: int = 8000, *,
               timeout_keep_alive: float = 5, limit_concurrency: int = 128,
               max_header_bytes: int = 16 * 1024, log_level: str = "warning") -> None:
    """Serve ``app`` with uvicorn, bounded: idle keep-alive connections closed after
    ``timeout_keep_alive`` s, more than ``limit_concurrency`` connections at once answered
    503, request heads over ``max_header_bytes`` refused (``zsbir serve`` calls this)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_keep_alive=int(timeout_keep_alive),
                            limit_concurrency=limit_concurrency,
                            h11_max_incomplete_event_size=max_header_bytes,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()
