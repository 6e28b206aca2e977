"""The photo index (zsbir/search): build, incremental update, resume, lock, search, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from zsbir.cli import main
from zsbir.data.synthetic import render
from zsbir.search import store
from zsbir.search.api import Index
from zsbir.search.errors import IndexLockedError, SearchError
from zsbir.search.lock import WriteLock
from zsbir.search.strokes import StrokesError, parse_strokes, render_strokes


def _photo(path: Path, cls: int, i: int, domain: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render(cls, domain, i, 7, 32)).save(path)


def build(run, photos, out, *args: str) -> str:
    res = CliRunner().invoke(main, ["index", "build", str(run), str(photos), str(out),
                                    "--workers", "0", "--device", "cpu", *args])
    assert res.exit_code == 0, res.output
    return res.output


def _ranking(idx: Index, sketches, top=20):
    return [[(r.path, r.score) for r in idx.search(s, top=top)] for s in sketches]


# ------------------------------------------------------------------------------ build
def test_build_writes_a_self_contained_index(tiny_run, photos, sketches, tmp_path):
    out = build(tiny_run, photos, tmp_path / "idx")
    assert "13 photos embedded" in out and "1 skipped" in out and "bad.png" in out
    assert "photos/s" in out and "embedding photos: done, 14 photos" in out  # progress lines
    idx_dir = tmp_path / "idx"
    for name in ("model.pt", "index.sqlite", "photos.faiss"):
        assert (idx_dir / name).is_file(), name
    assert not (idx_dir / "write.lock").exists()
    # the metadata table: path, size, mtime, content hash, label from the folder name
    con = sqlite3.connect(idx_dir / "index.sqlite")
    rows = {p: (size, mtime, sha, label) for p, size, mtime, sha, label in con.execute(
        "SELECT path, size, mtime_ns, sha256, label FROM photos")}
    assert len(rows) == 13 and "c0/bad.png" not in rows
    st = (photos / "c1" / "2.png").stat()
    assert rows["c1/2.png"] == (st.st_size, st.st_mtime_ns, hashlib.sha256(
        (photos / "c1" / "2.png").read_bytes()).hexdigest(), "c1")
    assert rows["loose.png"][3] is None
    assert [r[0] for r in con.execute("SELECT path FROM skipped")] == ["c0/bad.png"]
    # searching needs only the index: the run directory may go away
    tiny_run.rename(tiny_run.with_name("moved"))
    try:
        with Index.open(idx_dir, "cpu") as idx:
            assert len(idx) == 13 and idx.score_name == "cosine similarity"
            assert idx.labels == ["c0", "c1", "c2"]
            res = idx.search(sketches[1], top=5)
    finally:
        tiny_run.with_name("moved").rename(tiny_run)
    assert [r.rank for r in res] == [1, 2, 3, 4, 5]
    assert all(Path(r.path).is_file() for r in res)


def test_search_equals_brute_force_cosine(tiny_run, photos, sketches, tmp_path):
    build(tiny_run, photos, tmp_path / "idx")
    with Index.open(tmp_path / "idx", "cpu") as idx:
        got = idx.search_many([str(s) for s in sketches], top=13)
        # reference: embeddings straight from the model, cosine, a plain sort
        tm = idx.model
        q, _, _ = tm.embed([str(s) for s in sketches], 1)
        paths = sorted(str(p) for p in photos.rglob("*.png") if p.name != "bad.png")
        g, kept, _ = tm.embed(paths, 0)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    sims = qn @ gn.T
    for row, res in zip(sims, got):
        order = sorted(range(len(kept)), key=lambda j: (-row[j], kept[j]))
        assert [r.path for r in res] == [kept[j] for j in order]
        np.testing.assert_allclose([r.score for r in res], row[order], atol=1e-5)


def test_real_ivf_index_reports_recall(tiny_run, photos, sketches, tmp_path):
    out = build(tiny_run, photos, tmp_path / "idx", "--ann", "ivf")
    assert "IVF search: nprobe" in out and "recall@10 against exact search" in out
    build(tiny_run, photos, tmp_path / "flat")
    with Index.open(tmp_path / "idx", "cpu") as ivf, Index.open(tmp_path / "flat", "cpu") as flat:
        assert ivf.meta["ann"] == "ivf" and 0.95 <= ivf.meta["recall_at_10"] <= 1.0
        assert ivf.meta["nprobe"] <= ivf.meta["nlist"]
        # 13 photos: one cell, so the IVF ranking is the exact one
        for a, b in zip(_ranking(ivf, sketches), _ranking(flat, sketches)):
            assert [p for p, _ in a] == [p for p, _ in b]
            np.testing.assert_allclose([v for _, v in a], [v for _, v in b], atol=1e-5)


def test_binary_ivf_index_reports_recall_and_hamming(tiny_run, photos, sketches, tmp_path):
    out = build(tiny_run, photos, tmp_path / "idx", "--hasher", "itq8", "--ann", "ivf")
    assert "recall@10 against exact search" in out
    con = sqlite3.connect(tmp_path / "idx" / "index.sqlite")
    meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
    assert meta["ann"] == "ivf" and meta["binary"] and 0.95 <= meta["recall_at_10"] <= 1.0
    from zsbir.hashing.search import hamming_distance_matrix

    with Index.open(tmp_path / "idx", "cpu") as idx:
        assert idx.score_name == "Hamming distance"
        res = idx.search(sketches[0], top=13)
        emb = store.gallery_embeddings(idx._con, idx._fx.ids)
        codes = idx.hasher.encode(emb)
        qc = idx.hasher.encode(idx.model.embed_images([idx.query_image(sketches[0])], 1))
    d = hamming_distance_matrix(qc, codes)[0]
    paths = [str(photos / p) for p in idx._fx.paths]
    order = sorted(range(len(paths)), key=lambda j: (d[j], paths[j]))
    assert [r.path for r in res] == [paths[j] for j in order]  # ties by path
    assert [r.score for r in res] == [int(d[j]) for j in order]


# ---------------------------------------------------------------------- incremental
@pytest.mark.parametrize("backend", ["faiss", "milvus"])  # the same test on both backends
def test_update_embeds_only_new_and_changed(tiny_run, photos, sketches, tmp_path, counted,
                                            backend):
    if backend == "milvus":
        pytest.importorskip("pymilvus", reason="the milvus extra is not installed")
    build(tiny_run, photos, tmp_path / "idx", "--backend", backend)
    assert sum(counted) == 13
    counted.clear()
    for i in range(3):                                         # add 3
        _photo(photos / "c2" / f"new{i}.png", 2, 10 + i)
    _photo(photos / "c1" / "0.png", 0, 20)                     # change 1 (other content)
    (photos / "c0" / "3.png").unlink()                         # delete 1
    os.utime(photos / "c2" / "1.png", ns=(1, 10**18))          # touched, same content
    res = CliRunner().invoke(main, ["index", "update", str(tmp_path / "idx"), "--workers", "0",
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert sum(counted) == 4, counted                          # exactly 4 embeddings
    assert "4 photos embedded (3 new, 1 changed)" in res.output
    assert "1 removed" in res.output and "15 photos in" in res.output
    counted.clear()
    build(tiny_run, photos, tmp_path / "fresh")
    assert sum(counted) == 15
    with Index.open(tmp_path / "idx", "cpu") as a, Index.open(tmp_path / "fresh", "cpu") as b:
        assert len(a) == len(b) == 15
        for ra, rb in zip(_ranking(a, sketches), _ranking(b, sketches)):
            assert [p for p, _ in ra] == [p for p, _ in rb]
            np.testing.assert_allclose([s for _, s in ra], [s for _, s in rb], atol=1e-5)
    # nothing changed: nothing embedded
    counted.clear()
    CliRunner().invoke(main, ["index", "update", str(tmp_path / "idx"), "--workers", "0"])
    assert sum(counted) == 0


KILLER = """
import os, signal, sys
import zsbir.search.store as store
original, done = store._commit_batch, []
def commit_then_die(*args):
    original(*args)
    done.append(1)
    if len(done) == 2:  # SIGKILL right after the second committed batch: no cleanup at all
        os.kill(os.getpid(), signal.SIGKILL)
store._commit_batch = commit_then_die
from zsbir.cli import main
main(sys.argv[1:])
"""


def test_killed_build_is_usable_and_resumes(tiny_run, photos, sketches, tmp_path, counted):
    idx_dir = tmp_path / "idx"
    proc = subprocess.run([sys.executable, "-c", KILLER, "index", "build", str(tiny_run),
                           str(photos), str(idx_dir), "--batch-size", "4", "--workers", "0",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    lock = json.loads((idx_dir / "write.lock").read_text())  # left behind by the killed pid
    assert lock["host"] == socket.gethostname()
    assert not (idx_dir / "photos.faiss").exists()
    # the last committed state: 2 batches of 4 files in path order (c0/bad.png among them:
    # 7 photos), searchable although the faiss file was never written
    with Index.open(idx_dir, "cpu") as idx:
        assert len(idx) == 7
        assert len(idx.search(sketches[0], top=20)) == 7
    # running the build again resumes: the stale lock is replaced, only the rest embedded
    counted.clear()
    out = build(tiny_run, photos, idx_dir, "--batch-size", "4")
    assert "resumed" in out and f"stale write lock of pid {lock['pid']}" in out
    assert sum(counted) == 14 - 8  # the files not committed before (13 photos + bad.png)
    with Index.open(idx_dir, "cpu") as idx:
        assert len(idx) == 13
    assert not (idx_dir / "write.lock").exists()


def test_second_writer_is_refused(tiny_run, photos, tmp_path):
    build(tiny_run, photos, tmp_path / "idx")
    with WriteLock(tmp_path / "idx"):  # this (living) process holds the lock
        with pytest.raises(IndexLockedError, match=f"pid {os.getpid()} on "):
            store.update_index(tmp_path / "idx", device="cpu", workers=0)
        res = CliRunner().invoke(main, ["index", "update", str(tmp_path / "idx")])
        assert res.exit_code == 1 and "is in use by another zsbir process" in res.output
        assert "Traceback" not in res.output
    # another host's lock is never broken automatically
    (tmp_path / "idx" / "write.lock").write_text(json.dumps(
        {"pid": 1, "host": "elsewhere.invalid", "started": "now"}))
    with pytest.raises(IndexLockedError, match="delete .*write.lock"):
        store.update_index(tmp_path / "idx", device="cpu", workers=0)


def test_build_refuses_another_index_and_bad_folders(tiny_run, photos, tmp_path):
    build(tiny_run, photos, tmp_path / "idx")
    other = tmp_path / "other"
    _photo(other / "a.png", 0, 0)
    with pytest.raises(SearchError, match="already holds an index"):
        store.build_index(tiny_run, other, tmp_path / "idx", device="cpu")
    with pytest.raises(SearchError, match="no photo folder"):
        store.build_index(tiny_run, tmp_path / "nope", tmp_path / "i2")
    with pytest.raises(SearchError, match="checkpoints/final.pt"):
        store.build_index(tmp_path, photos, tmp_path / "i3")
    res = CliRunner().invoke(main, ["search", str(tmp_path / "nothing"), str(photos / "loose.png")])
    assert res.exit_code == 1 and "is not a zsbir index" in res.output


# --------------------------------------------------------------------------- search
def test_search_cli_table_json_class_and_errors(tiny_run, photos, sketches, tmp_path):
    build(tiny_run, photos, tmp_path / "idx")
    runner = CliRunner()
    res = runner.invoke(main, ["search", str(tmp_path / "idx"), str(sketches[0]),
                               str(sketches[1]), "--top", "3"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[0].split("\t") == ["query", "rank", "photo", "class", "cosine similarity"]
    assert len(lines) == 1 + 6
    assert [ln.split("\t")[0] for ln in lines[1:]] == [str(sketches[0])] * 3 + [
        str(sketches[1])] * 3  # the query on every result
    res = runner.invoke(main, ["search", str(tmp_path / "idx"), str(sketches[2]), "--json",
                               "--class", "c1", "--top", "10"])
    data = json.loads(res.output)
    assert data["score"] == "cosine similarity"
    ranked = data["queries"][0]["results"]
    assert len(ranked) == 4 and {r["label"] for r in ranked} == {"c1"}
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    for bad, msg in ((tmp_path / "missing.png", "no sketch file"),
                     (photos / "c0" / "bad.png", "cannot read sketch")):
        res = runner.invoke(main, ["search", str(tmp_path / "idx"), str(bad)])
        assert res.exit_code == 1 and msg in res.output
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    res = runner.invoke(main, ["search", str(tmp_path / "idx"), str(sketches[0]), "--class", "zz"])
    assert res.exit_code == 1 and "no photos labelled 'zz'" in res.output


def test_rerank_matches_reranker_on_the_gallery(tiny_run, photos, sketches, tmp_path):
    rerankers = pytest.importorskip("zsbir.rerankers")
    from zsbir.registry import rerankers as registry

    build(tiny_run, photos, tmp_path / "idx")
    with Index.open(tmp_path / "idx", "cpu") as idx:
        res = idx.search(sketches[0], top=5, rerank="alpha_qe")
        q = idx.model.embed_images([idx.query_image(sketches[0])], 1)
        g = store.gallery_embeddings(idx._con, idx._fx.ids)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        scores, order = rerankers.rerank_topk(registry.get("alpha_qe")(), q, g, 5)
        assert [r.path for r in res] == [str(photos / idx._fx.paths[j]) for j in order[0]]
        np.testing.assert_allclose([r.score for r in res], scores[0], atol=1e-5)
        with pytest.raises(SearchError, match="unknown reranker"):
            idx.search(sketches[0], rerank="no_such_reranker")


def test_python_api_records_and_lazy_export(tiny_run, photos, sketches, tmp_path):
    import zsbir

    build(tiny_run, photos, tmp_path / "idx")
    idx = zsbir.Index.open(tmp_path / "idx", device="cpu")
    strokes = [[[0, 30, 60], [0, 40, 0]], [[10, 50], [20, 20]]]
    for query in (sketches[0], str(sketches[0]), Image.open(sketches[0]),
                  sketches[0].read_bytes(), strokes):
        res = idx.search(query, top=4)
        assert len(res) == 4 and set(res[0].to_dict()) == {"id", "path", "score", "label",
                                                            "rank"}
    assert idx.photo(res[0].id) == Path(res[0].path) and idx.photo(10**6) is None
    with pytest.raises(SearchError, match="top must be a positive integer"):
        idx.search(strokes, top=0)
    # `import zsbir` stays light: neither torch nor faiss is imported
    code = "import sys, zsbir; print('torch' in sys.modules, 'faiss' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False"], out.stderr


# -------------------------------------------------------------------- strokes, lock
def test_render_strokes_fills_and_centers():
    img = np.asarray(render_strokes([[[100, 300], [50, 50]], [[200, 200], [0, 100]]], 256))
    ink = np.argwhere(img.min(axis=2) < 128)
    (y0, x0), (y1, x1) = ink.min(0), ink.max(0)
    # the wider extent (200 units) becomes 85% of 256 = 217.6 px (+ line width)
    assert 215 <= x1 - x0 <= 225
    assert abs((x0 + x1) / 2 - 128) <= 2 and abs((y0 + y1) / 2 - 128) <= 2
    assert img.shape == (256, 256, 3) and img[0, 0].tolist() == [255, 255, 255]
    # a third (timestamps) list is accepted; a single point is drawn as a dot
    assert np.asarray(render_strokes([[[5], [5], [0]]])).min() == 0


@pytest.mark.parametrize("bad, msg", [
    ([], "empty"), ([[[], []]], "empty"), ("x", "must be a list"), ([[[1, 2], [1]]], "2 x but 1 y"),
    ([[[1, None], [1, 2]]], "finite numbers"), ([[[1, float("nan")], [1, 2]]], "finite"),
    ([[1, 2]], "stroke 0 must be"), ([[[True], [1]]], "finite numbers"),
])
def test_parse_strokes_rejects(bad, msg):
    with pytest.raises(StrokesError, match=msg):
        parse_strokes(bad)


def test_lock_is_exclusive_and_released(tmp_path):
    with WriteLock(tmp_path) as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(IndexLockedError):
            WriteLock(tmp_path).acquire()
    assert not (tmp_path / "write.lock").exists()
    with pytest.raises(RuntimeError), WriteLock(tmp_path):
        raise RuntimeError("released on errors too")
    assert not (tmp_path / "write.lock").exists()
