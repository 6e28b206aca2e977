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

Bad input gets a 4xx with a JSON ``{"error": message}`` (not an image, too large, empty
drawing, malformed JSON), never a 500. Uploads are limited to ``max_upload_bytes`` (413),
checked on the declared length and on the bytes actually received.
"""

from __future__ import annotations

import io
import json
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from zsbir.search.api import Index
from zsbir.search.errors import SearchError

__all__ = ["create_app"]

MAX_TOP = 100
THUMB_SIZES = (64, 128, 256, 512)


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError as exc:
            raise HTTPError(400, "invalid Content-Length") from exc
        if n > limit:
            raise HTTPError(413, f"upload too large ({n} bytes; the limit is {limit})")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPError(413, f"upload too large (more than {limit} bytes)")
    return bytes(body)


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value))
        except ValueError as exc:
            raise HTTPError(400, f"{name} must be an integer, got {value!r}") from exc
    if not lo <= value <= hi:
        raise HTTPError(400, f"{name} must be between {lo} and {hi}, got {value}")
    return value


def create_app(index: str | Path | Index, device: str = "auto",
               max_upload_bytes: int = 4 * 2**20) -> Starlette:
    """The app for an index directory (or an open :class:`Index`)."""
    idx = index if isinstance(index, Index) else Index.open(index, device)
    static = resources.files("zsbir.search") / "static"
    page = (static / "index.html").read_text("utf-8")

    async def home(request: Request) -> Response:
        return HTMLResponse(page)

    async def info(request: Request) -> Response:
        return JSONResponse({**idx.describe(), "max_upload_bytes": max_upload_bytes,
                             "max_top": MAX_TOP})

    async def search(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            top, label, pen, rerank = 10, None, None, None
            if ctype == "application/json":
                body = await _read_body(request, max_upload_bytes)
                try:
                    data = json.loads(body)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise HTTPError(400, f"malformed JSON: {exc}") from exc
                if not isinstance(data, dict) or "drawing" not in data:
                    raise HTTPError(400, 'JSON must be an object with a "drawing" field '
                                         "(QuickDraw strokes: [[[xs], [ys]], ...])")
                top = _int(data.get("top", 10), "top", 1, MAX_TOP)
                label = data.get("class")
                if label is not None and not isinstance(label, str):
                    raise HTTPError(400, '"class" must be a string')
                rerank = data.get("rerank")
                if rerank is not None and not isinstance(rerank, str):
                    raise HTTPError(400, '"rerank" must be a reranker name')
                pen = data.get("pen_width")
                if pen is not None and (isinstance(pen, bool)
                                        or not isinstance(pen, (int, float)) or pen <= 0):
                    raise HTTPError(400, '"pen_width" must be a positive number')
                query: Any = data["drawing"]
            elif ctype == "multipart/form-data":
                await _read_body_limit_only(request, max_upload_bytes)
                async with request.form(max_files=1, max_fields=10,
                                        max_part_size=max_upload_bytes) as form:
                    upload = form.get("sketch")
                    if upload is None or isinstance(upload, str):
                        raise HTTPError(400, 'the form needs a file field "sketch"')
                    query = await upload.read()
                    if len(query) > max_upload_bytes:
                        raise HTTPError(413, f"upload too large ({len(query)} bytes; the "
                                             f"limit is {max_upload_bytes})")
                    top = _int(form.get("top", 10), "top", 1, MAX_TOP)
                    label = form.get("class") or None
            elif ctype.startswith("image/"):
                query = await _read_body(request, max_upload_bytes)
                top = _int(request.query_params.get("top", 10), "top", 1, MAX_TOP)
                label = request.query_params.get("class") or None
            else:
                raise HTTPError(415, "send a PNG/JPEG sketch (multipart field \"sketch\" or "
                                     "an image/* body) or JSON strokes {\"drawing\": ...}")
            if isinstance(query, (bytes, bytearray)) and not query:
                raise HTTPError(400, "the uploaded sketch is empty")
            results = await run_in_threadpool(_search, idx, query, top, label, pen, rerank)
        except HTTPError as exc:
            return _error(exc.status, exc.message)
        except SearchError as exc:
            return _error(400, str(exc))
        except Exception as exc:  # multipart parser errors and the like  # noqa: BLE001
            from starlette.exceptions import HTTPException

            if isinstance(exc, HTTPException) and 400 <= exc.status_code < 500:
                return _error(exc.status_code, str(exc.detail))
            raise
        return JSONResponse({"results": results, "score": idx.score_name,
                             "ms": round(1000 * (time.perf_counter() - t0), 1)})

    @lru_cache(maxsize=2048)
    def thumbnail(photo_id: int, size: int, mtime_ns: int) -> bytes:
        from PIL import Image

        path = idx.photo(photo_id)
        with Image.open(path) as im:
            im.draft("RGB", (size, size))
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=85)
        return buf.getvalue()

    async def photo(request: Request) -> Response:
        photo_id = request.path_params["photo_id"]
        path = idx.photo(photo_id)
        if path is None:
            return _error(404, f"no photo {photo_id} in the index")
        try:
            st = path.stat()
        except OSError:
            return _error(404, f"photo {photo_id} is no longer on disk")
        size = request.query_params.get("size")
        if size is None:
            return FileResponse(path)
        try:
            s = _int(size, "size", 16, 1024)
        except HTTPError as exc:
            return _error(exc.status, exc.message)
        s = next((t for t in THUMB_SIZES if t >= s), THUMB_SIZES[-1])
        try:
            data = await run_in_threadpool(thumbnail, photo_id, s, st.st_mtime_ns)
        except OSError:
            return _error(404, f"photo {photo_id} cannot be read")
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

    routes = [Route("/", home), Route("/api/info", info),
              Route("/api/search", search, methods=["POST"]),
              Route("/photos/{photo_id:int}", photo),
              Mount("/static", StaticFiles(packages=[("zsbir.search", "static")]),
                    name="static")]
    app = Starlette(routes=routes)
    app.state.index = idx
    return app


async def _read_body_limit_only(request: Request, limit: int) -> None:
    """Refuse a multipart upload whose declared length is over the limit (the parser's
    ``max_part_size`` bounds what it reads)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise HTTPError(413, f"upload too large ({declared} bytes; the limit is {limit})")


def _search(idx: Index, query: Any, top: int, label: str | None, pen: float | None,
            rerank: str | None = None) -> list[dict[str, Any]]:
    if isinstance(query, list):
        from zsbir.search.strokes import render_strokes

        query = render_strokes(query, pen_width=pen)
    elif not isinstance(query, (bytes, bytearray)):
        raise HTTPError(400, '"drawing" must be a list of strokes [[xs], [ys]]')
    out = []
    for r in idx.search(query, top=top, label=label, rerank=rerank):
        out.append({"id": r.id, "name": Path(r.path).name, "label": r.label,
                    "score": r.score, "rank": r.rank, "url": f"/photos/{r.id}",
                    "thumb": f"/photos/{r.id}?size=256"})
    return out
