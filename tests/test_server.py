"""``zsbir serve``'s app (zsbir/search/server.py) through Starlette's test client."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from zsbir.data.synthetic import render  # noqa: E402
from zsbir.search.api import Index  # noqa: E402
from zsbir.search.server import create_app  # noqa: E402
from zsbir.search.store import build_index  # noqa: E402

LIMIT = 50_000
STROKES = [[[10, 60, 110, 60, 10], [60, 10, 60, 110, 60]], [[30, 90], [60, 60]]]


@pytest.fixture(scope="module")
def index_dir(tiny_run, tmp_path_factory) -> Path:
    photos = tmp_path_factory.mktemp("photos")
    for c in range(3):
        (photos / f"c{c}").mkdir()
        for i in range(3):
            Image.fromarray(render(c, 0, i, 7, 32)).save(photos / f"c{c}" / f"{i}.png")
    out = tmp_path_factory.mktemp("idx") / "index"
    build_index(tiny_run, photos, out, device="cpu", workers=0, name="test photos")
    return out


@pytest.fixture(scope="module")
def client(index_dir) -> TestClient:
    return TestClient(create_app(index_dir, device="cpu", max_upload_bytes=LIMIT))


def _png(cls: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(render(cls, 1, 0, 7, 32)).save(buf, "PNG")
    return buf.getvalue()


def test_page_static_and_info(client):
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text and "/static/app.js" in page.text
    for asset, kind in (("app.js", "javascript"), ("style.css", "css")):
        r = client.get(f"/static/{asset}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    info = client.get("/api/info").json()
    assert info["name"] == "test photos" and info["size"] == 9
    assert info["score"] == "cosine similarity" and info["labels"] == ["c0", "c1", "c2"]
    assert "resnet18" in info["model"]


def test_search_by_strokes_upload_and_raw_body_agree_with_the_api(client, index_dir):
    from zsbir.search.strokes import render_strokes

    with Index.open(index_dir, "cpu") as idx:
        want_img = [(r.id, r.score) for r in idx.search(_png(), top=5)]
        want_strokes = [(r.id, r.score) for r in idx.search(render_strokes(STROKES), top=5)]
    r = client.post("/api/search", files={"sketch": ("s.png", _png(), "image/png")},
                    data={"top": "5"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["score"] == "cosine similarity" and body["ms"] > 0
    got = [(x["id"], x["score"]) for x in body["results"]]
    assert [i for i, _ in got] == [i for i, _ in want_img]
    assert [s for _, s in got] == pytest.approx([s for _, s in want_img], abs=1e-5)
    raw = client.post("/api/search?top=5", content=_png(), headers={"content-type": "image/png"})
    assert [x["id"] for x in raw.json()["results"]] == [i for i, _ in want_img]
    js = client.post("/api/search", json={"drawing": STROKES, "top": 5}).json()
    assert [x["id"] for x in js["results"]] == [i for i, _ in want_strokes]
    assert [x["score"] for x in js["results"]] == pytest.approx([s for _, s in want_strokes],
                                                                abs=1e-5)
    first = js["results"][0]
    assert first["url"] == f"/photos/{first['id']}" and first["label"] in {"c0", "c1", "c2"}
    only = client.post("/api/search", json={"drawing": STROKES, "top": 9, "class": "c2"}).json()
    assert len(only["results"]) == 3 and {x["label"] for x in only["results"]} == {"c2"}
    with Index.open(index_dir, "cpu") as idx:
        want = [r.id for r in idx.search(render_strokes(STROKES), top=4, rerank="alpha_qe")]
    reranked = client.post("/api/search", json={"drawing": STROKES, "top": 4,
                                                "rerank": "alpha_qe"}).json()
    assert [x["id"] for x in reranked["results"]] == want


@pytest.mark.parametrize("kwargs, status, message", [
    ({"json": {"drawing": []}}, 400, "empty"),
    ({"json": {"drawing": [[[], []]]}}, 400, "empty"),
    ({"json": {"strokes": STROKES}}, 400, '"drawing" field'),
    ({"json": [1, 2]}, 400, '"drawing" field'),
    ({"json": {"drawing": "abc"}}, 400, "list of strokes"),
    ({"json": {"drawing": [[[1, 2], [3]]]}}, 400, "2 x but 1 y"),
    ({"json": {"drawing": [[["a", 2], [3, 4]]]}}, 400, "finite numbers"),
    ({"json": {"drawing": STROKES, "top": 0}}, 400, "top must be between"),
    ({"json": {"drawing": STROKES, "top": "x"}}, 400, "top must be an integer"),
    ({"json": {"drawing": STROKES, "class": "zebra"}}, 400, "no photos labelled 'zebra'"),
    ({"json": {"drawing": STROKES, "pen_width": -1}}, 400, "pen_width"),
    ({"json": {"drawing": STROKES, "rerank": "no_such"}}, 400, "unknown reranker"),
    ({"json": {"drawing": STROKES, "rerank": 3}}, 400, "reranker name"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
     "malformed JSON"),
    ({"files": {"sketch": ("s.png", b"not an image", "image/png")}}, 400, "not an image"),
    ({"files": {"other": ("s.png", b"x", "image/png")}}, 400, 'file field "sketch"'),
    ({"content": b"GIF89a-broken", "headers": {"content-type": "image/gif"}}, 400,
     "not an image"),
    ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty"),
    ({"content": b"\x89PNG" + b"0" * LIMIT, "headers": {"content-type": "image/png"}}, 413,
     "too large"),
    ({"files": {"sketch": ("s.png", b"\x89PNG" + b"0" * LIMIT, "image/png")}}, 413,
     "too large"),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "PNG/JPEG"),
])
def test_bad_input_is_a_4xx_with_a_message(client, kwargs, status, message):
    r = client.post("/api/search", **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_photos_are_served_by_id_only(client, index_dir):
    with Index.open(index_dir, "cpu") as idx:
        some = idx.search(_png(), top=1)[0]
    r = client.get(f"/photos/{some.id}")
    assert r.status_code == 200 and r.content == Path(some.path).read_bytes()
    thumb = client.get(f"/photos/{some.id}?size=64")
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 64
    assert client.get("/photos/999999").status_code == 404
    assert client.get(f"/photos/{some.id}?size=big").status_code == 400
    for probe in ("/photos/..%2F..%2Fetc%2Fpasswd", "/photos/%2Fetc%2Fpasswd", "/photos/-1",
                  "/photos/1.5"):
        assert client.get(probe).status_code == 404, probe
    assert client.get("/static/../store.py").status_code == 404


def test_serve_binds_localhost_by_default():
    from zsbir.search.commands import serve

    defaults = {p.name: p.default for p in serve.params}
    assert defaults["host"] == "127.0.0.1" and defaults["port"] == 8000
