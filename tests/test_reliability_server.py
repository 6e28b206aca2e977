"""A hostile but realistic user against ``zsbir serve``'s app (zsbir/search/server.py):
photos changed or swapped after indexing (links retargeted outside the folder, overwritten
files, directories, FIFOs, decompression bombs), malformed and hostile requests (NaN,
deep JSON, wrong types, bomb uploads), index updates while serving, timeouts, and memory
under concurrent bomb uploads (a real uvicorn server in its own process)."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from zsbir.data.synthetic import render  # noqa: E402
from zsbir.search.api import Index  # noqa: E402
from zsbir.search.limits import ImageTooLarge  # noqa: E402
from zsbir.search.server import create_app  # noqa: E402
from zsbir.search.store import build_index, update_index  # noqa: E402

STROKES = [[[10, 60, 110, 60, 10], [60, 10, 60, 110, 60]], [[30, 90], [60, 60]]]
SECRET = b"root:$6$not-a-photo:19000:0:99999:7:::\n"


def _save(path: Path, cls: int, i: int, size: int = 32, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render(cls, 0, i, 7, size)).save(path, fmt)


@pytest.fixture(scope="module")
def bomb_gif() -> bytes:
    """A 13000 x 13000 one-colour GIF: about 125 KB that decodes to 169 Mpx."""
    im = Image.new("P", (13000, 13000), 0)
    im.putpalette([255, 255, 255, 0, 0, 0])
    buf = io.BytesIO()
    im.save(buf, "GIF")
    data = buf.getvalue()
    assert len(data) < 200_000
    return data


def _served(tiny_run: Path, tmp_path: Path):
    """(client, index, photo root, {relative path: id}) over a fresh index of: ant/0-1.png,
    bee/0-1.png, cat/0.jpg (128 px), ant/link.png -> ../.store/1.png (bee/1.png's bytes in
    a hidden folder, so the link is the one path the index takes for it) and dog/0.png
    through dog -> .real_dog (a folder link that stays inside)."""
    root = tmp_path / "photos"
    for c, name in enumerate(("ant", "bee")):
        for i in range(2):
            _save(root / name / f"{i}.png", c, i)
    _save(root / "cat" / "0.jpg", 2, 0, 128, "JPEG")
    _save(root / ".store" / "1.png", 1, 1)
    _save(root / ".real_dog" / "0.png", 3, 0)
    os.symlink("../.store/1.png", root / "ant" / "link.png")
    os.symlink(".real_dog", root / "dog")
    outside = tmp_path / "outside"  # a folder link leaving the root (think: to /)
    _save(outside / "secret.png", 4, 0)
    os.symlink(outside, root / "everything")
    out = tmp_path / "index"
    build_index(tiny_run, root, out, device="cpu", workers=0)
    idx = Index.open(out, "cpu")
    ids = {Path(r.path).relative_to(root).as_posix(): r.id
           for r in idx.search(STROKES, top=100)}
    assert {"ant/link.png", "dog/0.png", "cat/0.jpg"} <= set(ids)
    with TestClient(create_app(idx, timeout_s=20)) as client:
        yield client, idx, root, ids
    idx.close()


@pytest.fixture
def served(tiny_run, tmp_path):
    """A fresh index per test: the test changes its photos."""
    yield from _served(tiny_run, tmp_path)


@pytest.fixture(scope="module")
def shared(tiny_run, tmp_path_factory):
    """One index for the tests that change nothing on disk."""
    yield from _served(tiny_run, tmp_path_factory.mktemp("shared"))


def _refused(r, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    message = r.json()["error"]
    assert "\n" not in message
    for w in words:
        assert w in message, message
    assert SECRET not in r.content


# ----------------------------------------------------------------------- serving photos
def test_links_inside_the_folder_are_served(served):
    client, _, root, ids = served
    r = client.get(f"/photos/{ids['ant/link.png']}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == (root / ".store" / "1.png").read_bytes()
    assert r.headers["x-content-type-options"] == "nosniff"
    jpg = client.get(f"/photos/{ids['cat/0.jpg']}")
    assert jpg.headers["content-type"] == "image/jpeg"
    assert client.get(f"/photos/{ids['dog/0.png']}").status_code == 200
    if "everything/secret.png" in ids:  # if the index took it, the server does not serve it
        _refused(client.get(f"/photos/{ids['everything/secret.png']}"), 403, "outside")


def test_a_link_retargeted_outside_the_folder_is_refused(served, tmp_path):
    client, _, root, ids = served
    shadow = tmp_path / "shadow"
    shadow.write_bytes(SECRET)
    link = root / "ant" / "link.png"
    link.unlink()
    link.symlink_to(shadow)  # ln -sfn /etc/shadow P/ant/link.png
    for url in (f"/photos/{ids['ant/link.png']}", f"/photos/{ids['ant/link.png']}?size=64"):
        _refused(client.get(url), 403, "outside the indexed photo folder", "ant/link.png")
    elsewhere = tmp_path / "elsewhere"  # the folder link now leads outside, same names
    _save(elsewhere / "0.png", 3, 0)
    (root / "dog").unlink()
    (root / "dog").symlink_to(elsewhere)
    _refused(client.get(f"/photos/{ids['dog/0.png']}"), 403, "outside")
    link.unlink()
    link.symlink_to(root / "bee" / "0.png")  # inside, but not the indexed bytes
    _refused(client.get(f"/photos/{ids['ant/link.png']}"), 409, "changed",
             "zsbir index update")


def test_an_overwritten_photo_is_stale_not_served(served):
    client, _, root, ids = served
    pid, path = ids["ant/0.png"], root / "ant" / "0.png"
    assert client.get(f"/photos/{pid}?size=64").status_code == 200  # now cached
    original = path.read_bytes()
    path.write_bytes(SECRET)
    _refused(client.get(f"/photos/{pid}"), 409, "changed size", "zsbir index update")
    same_size = bytearray(original)
    same_size[-20] ^= 0xFF  # other bytes, same length: only the hash tells
    path.write_bytes(bytes(same_size))
    _refused(client.get(f"/photos/{pid}"), 409, "changed content", "zsbir index update")
    _refused(client.get(f"/photos/{pid}?size=64"), 409, "changed content")
    path.write_bytes(original)  # the indexed bytes again: served again
    assert client.get(f"/photos/{pid}").content == original


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_photo_replaced_by_a_directory_a_fifo_or_a_bomb(served, bomb_gif):
    client, _, root, ids = served
    (root / "ant" / "0.png").unlink()
    (root / "ant" / "0.png").mkdir()
    _refused(client.get(f"/photos/{ids['ant/0.png']}"), 409, "a directory")
    fifo = root / "ant" / "1.png"
    fifo.unlink()
    os.mkfifo(fifo)
    got: list = []
    worker = threading.Thread(target=lambda: got.append(
        client.get(f"/photos/{ids['ant/1.png']}?size=64")), daemon=True)
    worker.start()
    worker.join(20)
    if worker.is_alive():  # unblock a reader stuck on the FIFO before failing
        with open(fifo, "wb"):
            pass
        pytest.fail("GET of a photo replaced by a FIFO hung")
    _refused(got[0], 409, "a FIFO")
    (root / "bee" / "0.png").write_bytes(bomb_gif)
    for url in (f"/photos/{ids['bee/0.png']}", f"/photos/{ids['bee/0.png']}?size=256"):
        _refused(client.get(url), 409, "changed")
    (root / "bee" / "1.png").unlink()
    (root / ".store" / "1.png").unlink()  # the target of ant/link.png
    _refused(client.get(f"/photos/{ids['bee/1.png']}"), 404, "no longer on disk")
    _refused(client.get(f"/photos/{ids['ant/link.png']}"), 404, "no longer on disk")
    _refused(client.get(f"/photos/{10**30}"), 404, "no photo")


def test_thumbnail_decodes_are_bounded_by_pixels(served):
    _, idx, _, ids = served
    small = TestClient(create_app(idx, max_photo_pixels=70 * 70))
    # 32 x 32 = 1024 px fits; the 128 px JPEG (16,384 px) fits at its 1/2 draft scale only
    assert small.get(f"/photos/{ids['ant/0.png']}?size=64").status_code == 200
    assert small.get(f"/photos/{ids['cat/0.jpg']}?size=64").status_code == 200
    _refused(small.get(f"/photos/{ids['cat/0.jpg']}?size=512"), 413, "128x128 pixels")
    tiny = TestClient(create_app(idx, max_photo_pixels=500))
    _refused(tiny.get(f"/photos/{ids['ant/0.png']}?size=64"), 413, "32x32 pixels", "limit")
    assert tiny.get(f"/photos/{ids['ant/0.png']}").status_code == 200  # not decoded


# --------------------------------------------------------------------- hostile requests
def _deep(n: int) -> bytes:
    return b'{"drawing": ' + b"[" * n + b"]" * n + b"}"


@pytest.mark.parametrize("body, message", [
    (b'{"drawing": %s, "pen_width": NaN}', "NaN is not allowed"),
    (b'{"drawing": %s, "pen_width": Infinity}', "Infinity is not allowed"),
    (b'{"drawing": %s, "pen_width": -Infinity}', "-Infinity is not allowed"),
    (b'{"drawing": %s, "pen_width": 1e999}', "finite"),
    (b'{"drawing": %s, "top": 1e400}', "finite"),
    (b'{"drawing": [[[0, NaN], [0, 1]]]}', "NaN is not allowed"),
    (b'{"drawing": %s, "pen_width": 1e300}', "pen_width must be a positive number up to"),
    (b'{"drawing": %s, "pen_width": "3"}', "pen_width must be a positive number"),
    (b'{"drawing": %s, "pen_width": true}', "pen_width must be a positive number"),
    (b'{"drawing": %s, "pen_width": 0}', "pen_width must be a positive number"),
    (b'{"drawing": [[[0, 1e300], [0, 1]]]}', "at most 1e+06 in magnitude"),
    (b'{"drawing": [[[0, 1' + b"0" * 400 + b'], [0, 1]]]}', "at most 1e+06"),
    (b'{"drawing": [[[0, 1' + b"0" * 5000 + b'], [0, 1]]]}', "malformed JSON"),
    (b'{"drawing": %s, "top": [5]}', "top must be an integer"),
    (b'{"drawing": %s, "top": true}', "top must be an integer"),
    (b'{"drawing": %s, "top": 5.5}', "top must be an integer"),
    (b'{"drawing": %s, "top": 1000}', "top must be between"),
    (b'{"drawing": %s, "class": 3}', '"class" must be a string'),
    (b'{"drawing": %s, "class": "' + b"x" * 300 + b'"}', '"class" is too long'),
    (b'{"drawing": %s, "rerank": ["alpha_qe"]}', "reranker name"),
    (b'{"drawing": [[[0, 1], [0, 1], [0, 1], [0, 1]]]}', "stroke 0 must be"),
    (b'{"drawing": [[[[0], 1], [0, 1]]]}', "finite numbers"),
    (b'{"drawing": {"a": 1}}', "list of strokes"),
    (b'{"drawing": ' + json.dumps([[[0], [0]]] * 5001).encode() + b"}", "too many strokes"),
    (_deep(5000), "nested 5001 levels deep"),
    (_deep(100), "nested 101 levels deep"),
    (b"[" * 3000, "nested 3000 levels deep"),
    (b'{"drawing": %s, "x": ' + b'{"a": ' * 2000 + b"1" + b"}" * 2000 + b"}",
     "levels deep"),
])
def test_hostile_json_is_a_400(shared, body, message):
    client = shared[0]
    if b"%s" in body:
        body = body.replace(b"%s", json.dumps(STROKES).encode())
    _refused(client.post("/api/search", content=body,
                         headers={"content-type": "application/json"}), 400, message)


def test_valid_odd_json_still_searches(shared):
    client = shared[0]
    brackets_in_a_string = json.dumps({"drawing": STROKES, "note": "[{" * 3000 + '\\"['})
    for body in (brackets_in_a_string,
                 json.dumps({"drawing": [[[1e5, 1e5 + 1e-9], [3.0, 3.0]]]}),  # a dot
                 json.dumps({"drawing": STROKES, "pen_width": 1e5, "top": "3"})):
        r = client.post("/api/search", content=body, headers={"content-type":
                                                              "application/json"})
        assert r.status_code == 200, r.text


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bomb_uploads_are_refused_before_decoding(shared, bomb_gif):
    client, idx, _, _ = shared
    for kwargs in ({"content": bomb_gif, "headers": {"content-type": "image/gif"}},
                   {"files": {"sketch": ("s.gif", bomb_gif, "image/gif")}}):
        _refused(client.post("/api/search", **kwargs), 413, "13000x13000 pixels",
                 "169.0 Mpx", "limit of 16.0 Mpx")
    _refused(client.post("/api/search", content=png_header(60000, 60000),
                         headers={"content-type": "image/png"}), 413, "too large")
    with pytest.raises(ImageTooLarge, match="13000x13000"):
        idx.search(bomb_gif)
    small = TestClient(create_app(idx, max_sketch_pixels=100))
    _refused(small.post("/api/search", files={"sketch": ("s.png", _png(), "image/png")}),
             413, "32x32 pixels")


def png_header(width: int, height: int) -> bytes:
    """The first bytes of a PNG declaring ``width`` x ``height`` (over Pillow's own
    decompression-bomb bound: its error, not ours, refuses it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(render(1, 1, 0, 7, 32)).save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------ index updates
def test_filters_and_photos_follow_an_index_update(served, tiny_run):
    client, idx, root, ids = served

    def search(**extra):
        r = client.post("/api/search", json={"drawing": STROKES, "top": 20, **extra})
        assert r.status_code == 200, r.text
        return [x["id"] for x in r.json()["results"]]

    assert ids["ant/0.png"] in search(**{"class": "ant"})
    (root / "ant" / "0.png").unlink()
    _save(root / "eel" / "0.png", 4, 0)
    update_index(idx.path, device="cpu", workers=0)
    gone = ids["ant/0.png"]
    for extra in ({"class": "ant"}, {}, {"class": "ant", "rerank": "alpha_qe"},
                  {"rerank": "alpha_qe"}):
        assert gone not in search(**extra), extra
    _refused(client.get(f"/photos/{gone}"), 404, f"no photo {gone}")
    _refused(client.get(f"/photos/{gone}?size=64"), 404)
    eel = search(**{"class": "eel"})  # a class added by the update, without a restart
    assert len(eel) == 1 and client.get(f"/photos/{eel[0]}").status_code == 200
    info = client.get("/api/info").json()
    assert info["size"] == len(ids) and "eel" in info["labels"]


def test_a_search_over_the_time_limit_is_a_503(shared):
    _, idx, _, _ = shared
    with TestClient(create_app(idx, timeout_s=0.5)) as slow:
        with idx._lock:  # another search holds the model: this one cannot finish in time
            r = slow.post("/api/search", json={"drawing": STROKES})
        _refused(r, 503, "did not finish within 0.5 s", "try again")
        assert slow.post("/api/search", json={"drawing": STROKES}).status_code == 200


# ----------------------------------------------------------- a real server, own process
SERVER = """
import sys
from zsbir.search.server import create_app, run_server
app = create_app(sys.argv[1], device="cpu", body_timeout_s=1.0, max_concurrent=2)
run_server(app, port=int(sys.argv[2]))
"""


def _rss_peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def live(tiny_run, tmp_path_factory):
    """(base url, pid) of ``run_server`` in a subprocess over a small index."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc (Linux) to read the server's peak memory")
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    tmp = tmp_path_factory.mktemp("live")
    for i in range(3):
        _save(tmp / "photos" / "c" / f"{i}.png", 0, i)
    build_index(tiny_run, tmp / "photos", tmp / "index", device="cpu", workers=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp / "index"), str(port)],
                            env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/api/info", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
            assert proc.poll() is None, "the server exited"
        else:
            pytest.fail("the server did not start")
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(20)


def test_a_slow_body_is_cut_off(live):
    url, _ = live
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: 1000\r\n\r\n" + b'{"drawing": [')
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = s.recv(4096)  # the server answers before the body is complete
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert b"did not arrive within 1 s" in body


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_memory_stays_bounded_under_concurrent_bomb_uploads(live, bomb_gif):
    import httpx

    url, pid = live
    before = _rss_peak_kb(pid)

    def upload(_: int) -> httpx.Response:
        return httpx.post(url + "/api/search", content=bomb_gif,
                          headers={"content-type": "image/gif"}, timeout=60)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(upload, range(8)))
    assert [r.status_code for r in answers] == [413] * 8
    grown_mb = (_rss_peak_kb(pid) - before) / 1024
    assert grown_mb < 100, f"peak RSS grew by {grown_mb:.0f} MB"  # one decode: 169+ MB


def test_undecodable_names_are_served_and_shown_safely(tiny_run, tmp_path):
    """A photo and a folder whose names are not valid UTF-8 (stored losslessly by the
    index): /api/search and /api/info answer JSON with the names shown as \\xNN, the class
    filter takes that shown name, and /photos/<id> serves the photo's indexed bytes."""
    root = tmp_path / "photos"
    _save(root / "ant" / "0.png", 0, 0)
    odd_dir = os.fsencode(root) + b"/caf\xe9"
    os.makedirs(odd_dir)
    buf = io.BytesIO()
    Image.fromarray(render(1, 0, 0, 7, 32)).save(buf, "PNG")
    with open(odd_dir + b"/\xff1.png", "wb") as f:
        f.write(buf.getvalue())
    out = tmp_path / "index"
    build_index(tiny_run, root, out, device="cpu", workers=0)
    with Index.open(out, "cpu") as idx, TestClient(create_app(idx)) as client:
        info = client.get("/api/info")
        assert info.status_code == 200 and "caf\\xe9" in info.json()["labels"]
        r = client.post("/api/search", json={"drawing": STROKES, "top": 5})
        assert r.status_code == 200, r.text
        odd = [x for x in r.json()["results"] if x["label"] == "caf\\xe9"]
        assert len(odd) == 1 and odd[0]["name"] == "\\xff1.png"
        only = client.post("/api/search", json={"drawing": STROKES, "class": "caf\\xe9"})
        assert only.status_code == 200 and [x["id"] for x in only.json()["results"]] == \
            [odd[0]["id"]]
        photo = client.get(odd[0]["url"])
        assert photo.status_code == 200 and photo.content == buf.getvalue()


def test_an_index_built_with_outside_links_serves_them_verified(tiny_run, tmp_path):
    """`index build --follow-outside-links`: a link leaving the folder is indexed and
    served, still only with its indexed bytes (a retargeted link is stale, 409)."""
    root, outside = tmp_path / "photos", tmp_path / "dataset"
    _save(root / "ant" / "0.png", 0, 0)
    _save(outside / "bee.png", 1, 0)
    os.symlink(outside / "bee.png", root / "ant" / "bee.png")
    out = tmp_path / "index"
    build_index(tiny_run, root, out, device="cpu", workers=0, follow_outside_links=True)
    with Index.open(out, "cpu") as idx, TestClient(create_app(idx)) as client:
        ids = {Path(r.path).name: r.id for r in idx.search(STROKES, top=10)}
        r = client.get(f"/photos/{ids['bee.png']}")
        assert r.status_code == 200 and r.content == (outside / "bee.png").read_bytes()
        shadow = tmp_path / "shadow"
        shadow.write_bytes(SECRET)
        (root / "ant" / "bee.png").unlink()
        (root / "ant" / "bee.png").symlink_to(shadow)
        _refused(client.get(f"/photos/{ids['bee.png']}"), 409, "changed")
