"""Reliability of index build / update / merge and of the index files (issue 23): symlinks,
loops, undecodable names, FIFOs, files changing during a build, shards of other folders,
killed and failed builds, full disks, read-only and damaged indexes. Every CLI error is
one line on stderr with exit status 1."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
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
from zsbir.search import files, scan, store
from zsbir.search.api import Index

OPTS = ["--workers", "0", "--device", "cpu"]


def _photo(path: Path, cls: int, i: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render(cls, 0, i, 7, 32)).save(path)


@pytest.fixture
def photos(tmp_path) -> Path:
    """2 classes x 3 photos in class folders, one loose photo."""
    root = tmp_path / "photos"
    for c in range(2):
        for i in range(3):
            _photo(root / f"c{c}" / f"{i}.png", c, i)
    _photo(root / "loose.png", 0, 9)
    return root


@pytest.fixture
def sketch(tmp_path) -> Path:
    p = tmp_path / "sketch.png"
    Image.fromarray(render(1, 1, 0, 7, 32)).save(p)
    return p


def cli(*args: object, code: int = 0):
    res = CliRunner().invoke(main, [os.fspath(a) if isinstance(a, Path) else str(a)
                                    for a in args])
    assert res.exit_code == code, res.output
    if code:
        assert "Traceback" not in res.output and res.exception is not None
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr  # one line on stderr
    return res


def build(run, photos, out, *args: object, code: int = 0):
    return cli("index", "build", run, photos, out, *OPTS, *args, code=code)


def rows(index_dir: Path) -> dict[str, tuple]:
    con = sqlite3.connect(index_dir / "index.sqlite")
    try:
        return {scan.fs_name(p): (size, mtime, sha, np.frombuffer(e, np.float32))
                for p, size, mtime, sha, e in con.execute(
                    "SELECT path, size, mtime_ns, sha256, embedding FROM photos")}
    finally:
        con.close()


def skipped(res) -> dict[str, str]:
    """``skipped PATH: REASON`` lines of a build's output -> {PATH: REASON}."""
    out = {}
    for line in res.stderr.splitlines():
        if line.startswith("skipped "):
            path, _, reason = line[len("skipped "):].partition(": ")
            out[path] = reason
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------- folder contents
def test_links_inside_the_root_loops_and_duplicates_are_visited_once(tiny_run, photos,
                                                                       tmp_path):
    (photos / "c0" / "loop").symlink_to("..")                  # a loop: the root again
    (photos / "c1" / "dup.png").symlink_to("../c0/0.png")      # a second path to a file
    (photos / "alias").symlink_to("c1")                        # a folder reachable directly
    os.link(photos / "c1" / "2.png", photos / "c1" / "hard.png")  # a hard link
    (photos / "sub").mkdir()
    (photos / "sub" / "inner.png").symlink_to("../c0/1.png")
    (photos / "c1" / "moved").mkdir()
    _photo(photos / "c1" / "moved" / "only.png", 1, 7)         # reached directly and ...
    (photos / "via").symlink_to("c1/moved")                    # ... by a link: the real path
    res = build(tiny_run, photos, tmp_path / "idx")
    got = rows(tmp_path / "idx")
    assert sorted(got) == ["c0/0.png", "c0/1.png", "c0/2.png", "c1/0.png", "c1/1.png",
                           "c1/2.png", "c1/moved/only.png", "loose.png"]
    why = skipped(res)
    assert why[str(photos / "c0" / "loop")] == "same folder as ."
    assert why[str(photos / "c1" / "dup.png")] == "same file as c0/0.png"
    assert why[str(photos / "alias")] == "same folder as c1"
    assert why[str(photos / "c1" / "hard.png")] == "same file as c1/2.png"
    assert why[str(photos / "sub" / "inner.png")] == "same file as c0/1.png"
    assert why[str(photos / "via")] == "same folder as c1/moved"
    assert "8 photos in" in res.stdout


def test_links_outside_the_root_are_refused_unless_allowed(tiny_run, photos, tmp_path,
                                                           counted):
    outside = tmp_path / "private"
    _photo(outside / "a.png", 0, 5)
    _photo(outside / "b.png", 1, 5)
    (photos / "ext").symlink_to(outside)
    (photos / "c0" / "out.png").symlink_to(outside / "a.png")
    (photos / "gone.png").symlink_to(tmp_path / "nothing.png")
    res = build(tiny_run, photos, tmp_path / "idx")
    assert set(rows(tmp_path / "idx")) == {f"c{c}/{i}.png" for c in range(2)
                                           for i in range(3)} | {"loose.png"}
    why = skipped(res)
    for link in ("ext", "c0/out.png"):
        assert "outside the photo folder" in why[str(photos / link)]
        assert "--follow-outside-links" in why[str(photos / link)]
    assert why[str(photos / "ext")].startswith(f"link to {outside.resolve()},")
    assert why[str(photos / "gone.png")].startswith("link that cannot be followed")

    res = build(tiny_run, photos, tmp_path / "open", "--follow-outside-links")
    assert {"ext/b.png", "c0/out.png"} <= set(rows(tmp_path / "open"))
    assert len(rows(tmp_path / "open")) == 9  # ext/a.png is c0/out.png's file
    assert skipped(res)[str(photos / "ext" / "a.png")] == "same file as c0/out.png"
    con = sqlite3.connect(tmp_path / "open" / "index.sqlite")
    assert json.loads(con.execute("SELECT value FROM meta WHERE key = "
                                  "'follow_outside_links'").fetchone()[0]) is True
    con.close()
    _photo(outside / "c.png", 0, 6)  # the update keeps following the links
    counted.clear()
    res = cli("index", "update", tmp_path / "open", *OPTS)
    assert sum(counted) == 1 and "10 photos in" in res.stdout
    # the refusing index stays refusing: the new outside file is not taken in
    counted.clear()
    cli("index", "update", tmp_path / "idx", *OPTS)
    assert sum(counted) == 0 and len(rows(tmp_path / "idx")) == 7
    # resuming with another setting is refused in one line
    res = build(tiny_run, photos, tmp_path / "idx", "--follow-outside-links", code=1)
    assert "another follow_outside_links" in res.stderr


def test_undecodable_file_names_are_indexed_losslessly(tiny_run, photos, sketch, tmp_path,
                                                       counted):
    raw = os.fsencode(photos / "c1") + b"/caf\xe9.png"
    Image.fromarray(render(1, 0, 8, 7, 32)).save(os.fsdecode(raw))
    with open(os.fsencode(photos) + b"/bad\xff.png", "wb") as f:
        f.write(b"not an image")
    res = build(tiny_run, photos, tmp_path / "idx")
    assert "8 photos in" in res.stdout
    assert f"{photos}/bad\\xff.png: UnidentifiedImageError" in res.stderr  # printed safely
    name = os.fsdecode(b"c1/caf\xe9.png")
    got = rows(tmp_path / "idx")
    assert got[name][2] == hashlib.sha256(open(raw, "rb").read()).hexdigest()
    con = sqlite3.connect(tmp_path / "idx" / "index.sqlite")
    assert con.execute("SELECT path FROM photos WHERE typeof(path) = 'blob'").fetchall() == [
        (b"c1/caf\xe9.png",)]  # stored as its bytes, lossless
    con.close()
    with Index.open(tmp_path / "idx", "cpu") as idx:
        res_ = idx.search(sketch, top=8)
        hit = next(r for r in res_ if r.path.endswith(name))
        assert os.fsencode(hit.path) == raw and idx.photo(hit.id).is_file()
    out = cli("search", tmp_path / "idx", sketch, "--top", "8")
    assert "c1/caf\\xe9.png" in out.stdout
    counted.clear()
    res = cli("index", "update", tmp_path / "idx", *OPTS)
    assert sum(counted) == 0 and "0 photos embedded" in res.stdout  # the name round-trips


NONREGULAR = """
import os, socket, sys
root = sys.argv[1]
os.mkfifo(os.path.join(root, "pipe.png"))
s = socket.socket(socket.AF_UNIX)
s.bind(os.path.join(root, "sock.jpg"))
from zsbir.cli import main
main(["index", "build", *sys.argv[2:]])
"""


def test_fifos_sockets_and_folders_named_like_photos_are_not_opened(tiny_run, photos,
                                                                     tmp_path):
    _photo(photos / "album.jpg" / "x.png", 1, 4)  # a folder named like a photo: walked
    proc = subprocess.run([sys.executable, "-c", NONREGULAR, str(photos), str(tiny_run),
                           str(photos), str(tmp_path / "idx"), *OPTS],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"skipped {photos}/pipe.png: not a regular file (a FIFO)" in proc.stderr
    assert f"skipped {photos}/sock.jpg: not a regular file (a socket)" in proc.stderr
    assert "album.jpg/x.png" in rows(tmp_path / "idx")
    # the reader's own guard: a FIFO is refused at once, never waited on
    os.mkfifo(tmp_path / "late.png")
    with pytest.raises(scan.PhotoFileError, match="a FIFO"):
        scan.read_photo(tmp_path / "late.png")


# ---------------------------------------------------------- files changing mid-build
def test_photo_rewritten_after_reading_is_reembedded_by_update(tiny_run, photos, tmp_path,
                                                               monkeypatch, counted):
    target = photos / "c0" / "1.png"  # in the first batch: read before the first commit
    old = target.read_bytes()
    original, calls = store._commit_batch, []

    def rewrite_then_commit(*args):  # the photo changes after it was read and embedded
        if not calls:
            _photo(target, 0, 21)
            os.utime(target, ns=(10**18, 10**18 + 5))
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(store, "_commit_batch", rewrite_then_commit)
    build(tiny_run, photos, tmp_path / "idx", "--batch-size", "2")
    monkeypatch.setattr(store, "_commit_batch", original)
    got = rows(tmp_path / "idx")["c0/1.png"]
    assert got[2] == hashlib.sha256(old).hexdigest()  # the hash of what was embedded
    assert got[1] != target.stat().st_mtime_ns          # and its mtime: the update sees it
    counted.clear()
    res = cli("index", "update", tmp_path / "idx", *OPTS)
    assert sum(counted) == 1 and "(0 new, 1 changed)" in res.stdout
    build(tiny_run, photos, tmp_path / "fresh")
    a, b = rows(tmp_path / "idx"), rows(tmp_path / "fresh")
    assert a.keys() == b.keys()
    for p in a:
        assert a[p][:3] == b[p][:3], p
        np.testing.assert_allclose(a[p][3], b[p][3], atol=1e-5)
    assert a["c0/1.png"][2] == _sha(target)


def test_photo_rewritten_after_the_scan_is_stored_with_its_new_content(
        tiny_run, photos, tmp_path, monkeypatch, counted):
    target = photos / "c0" / "2.png"
    original = scan.scan_photos

    def scan_then_rewrite(*args, **kwargs):
        found = original(*args, **kwargs)
        _photo(target, 1, 22)  # changes between the scan and the read
        os.utime(target, ns=(10**18, 10**18 + 7))
        return found

    monkeypatch.setattr(scan, "scan_photos", scan_then_rewrite)
    build(tiny_run, photos, tmp_path / "idx")
    monkeypatch.setattr(scan, "scan_photos", original)
    build(tiny_run, photos, tmp_path / "fresh")
    a, b = rows(tmp_path / "idx")["c0/2.png"], rows(tmp_path / "fresh")["c0/2.png"]
    assert a[:3] == b[:3] == (target.stat().st_size, 10**18 + 7, _sha(target))
    np.testing.assert_allclose(a[3], b[3], atol=1e-5)
    counted.clear()
    cli("index", "update", tmp_path / "idx", *OPTS)
    assert sum(counted) == 0  # consistent: nothing to repair


def test_read_photo_reads_again_a_file_changing_during_the_read(tmp_path, monkeypatch):
    path = tmp_path / "p.png"
    path.write_bytes(b"first version")
    original, calls = scan.read_fd, []

    def read_while_appending(fd):
        data = original(fd)
        if not calls:
            with open(path, "ab") as f:
                f.write(b" and more")
        calls.append(1)
        return data

    monkeypatch.setattr(scan, "read_fd", read_while_appending)
    data, st = scan.read_photo(path)
    assert data == b"first version and more" and st.st_size == len(data) and len(calls) == 2

    def always_appending(fd):
        data = original(fd)
        with open(path, "ab") as f:
            f.write(b"!")
        return data

    monkeypatch.setattr(scan, "read_fd", always_appending)
    with pytest.raises(scan.PhotoFileError, match="changed while being read"):
        scan.read_photo(path)


# ---------------------------------------------------------------------------- merges
def test_merge_refuses_shards_of_different_photo_folders(tiny_run, photos, tmp_path):
    copy = tmp_path / "copy"
    for p in photos.rglob("*.png"):
        (copy / p.relative_to(photos)).parent.mkdir(parents=True, exist_ok=True)
        (copy / p.relative_to(photos)).write_bytes(p.read_bytes())
    build(tiny_run, photos, tmp_path / "s0", "--shard", "0/2")
    build(tiny_run, copy, tmp_path / "s1", "--shard", "1/2")
    res = cli("index", "merge", tmp_path / "m", tmp_path / "s0", tmp_path / "s1", code=1)
    assert "the shards index different photo folders" in res.stderr
    assert str(photos.resolve()) in res.stderr and str(copy.resolve()) in res.stderr
    assert not (tmp_path / "m").exists()
    # a merge killed early (its leftovers only) is started over by the same command
    build(tiny_run, photos, tmp_path / "s1b", "--shard", "1/2")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.pt.tmp").write_bytes(b"half a model")
    res = cli("index", "merge", tmp_path / "m", tmp_path / "s0", tmp_path / "s1b")
    assert "7 photos in" in res.stdout and not (tmp_path / "m" / "model.pt.tmp").exists()


# ------------------------------------------------------------- killed / failed builds
KILL_AT_FIRST_FSYNC = """
import os, signal, sys
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # while writing model.pt.tmp
from zsbir.cli import main
main(sys.argv[1:])
"""


def test_build_killed_before_the_database_exists_is_resumed(tiny_run, photos, tmp_path):
    idx = tmp_path / "idx"
    proc = subprocess.run([sys.executable, "-c", KILL_AT_FIRST_FSYNC, "index", "build",
                           str(tiny_run), str(photos), str(idx), *OPTS],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert not (idx / "index.sqlite").exists() and (idx / "model.pt.tmp").exists()
    assert json.loads((idx / "write.lock").read_text())["host"] == socket.gethostname()
    res = build(tiny_run, photos, idx)
    assert "7 photos in" in res.stdout and "stale write lock" in res.stderr
    assert sorted(p.name for p in idx.iterdir()) == ["index.sqlite", "model.pt",
                                                      "photos.faiss"]
    # a database created but killed before it held its settings (here: an empty file)
    idx2 = tmp_path / "idx2"
    idx2.mkdir()
    (idx2 / "model.pt").write_bytes(b"")
    (idx2 / "index.sqlite").write_bytes(b"")
    res = build(tiny_run, photos, idx2)
    assert "7 photos in" in res.stdout


def _enospc_on(monkeypatch, suffix: str) -> None:
    """os.fsync raises ENOSPC for a file whose name ends with ``suffix``."""
    real = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(suffix):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("where", ["model.pt.tmp", "photos.faiss.tmp"])
def test_full_disk_is_one_line_naming_the_index_and_resumes(tiny_run, photos, tmp_path,
                                                            monkeypatch, where):
    idx = tmp_path / "idx"
    _enospc_on(monkeypatch, where)
    res = build(tiny_run, photos, idx, code=1)
    assert res.stderr.startswith(f"error: no space left on the device holding '{idx}'")
    assert "final.pt" not in res.stderr and "run the same command again" in res.stderr
    assert not list(idx.glob("*.tmp")) and not (idx / "write.lock").exists()
    monkeypatch.undo()
    res = build(tiny_run, photos, idx)
    assert "7 photos in" in res.stdout
    assert ("resumed" in res.stdout) == (where == "photos.faiss.tmp")


def _sqlite_full() -> sqlite3.OperationalError:
    """A real "database or disk is full" from SQLite (a database that may not grow)."""
    con = sqlite3.connect(":memory:")
    con.execute("CREATE TABLE t (b BLOB)")
    con.execute(f"PRAGMA max_page_count = {con.execute('PRAGMA page_count').fetchone()[0]}")
    try:
        con.execute("INSERT INTO t VALUES (?)", (b"x" * 100_000,))
    except sqlite3.OperationalError as exc:
        return exc
    finally:
        con.close()
    raise AssertionError("SQLite accepted the row")


def test_sqlite_full_is_one_line_and_the_build_resumes(tiny_run, photos, tmp_path,
                                                       monkeypatch, counted):
    idx = tmp_path / "idx"
    full = _sqlite_full()
    assert full.sqlite_errorcode == sqlite3.SQLITE_FULL
    original, calls = store._commit_batch, []

    def commit_until_full(*args):
        calls.append(1)
        if len(calls) == 2:
            raise full
        return original(*args)

    monkeypatch.setattr(store, "_commit_batch", commit_until_full)
    res = build(tiny_run, photos, idx, "--batch-size", "2", code=1)
    assert res.stderr.startswith(f"error: no space left on the device holding '{idx}'")
    monkeypatch.setattr(store, "_commit_batch", original)
    counted.clear()
    res = build(tiny_run, photos, idx, "--batch-size", "2")
    assert "resumed: 5 photos embedded" in res.stdout and "7 photos in" in res.stdout
    assert sum(counted) == 5  # the first batch (2 photos) was committed before


def test_unknown_hasher_is_refused_before_anything_is_created(tiny_run, photos, tmp_path):
    res = build(tiny_run, photos, tmp_path / "idx", "--hasher", "itq64", code=1)
    assert "the run has no hasher 'itq64'; it has" in res.stderr
    assert not (tmp_path / "idx").exists()
    res = build(tiny_run, photos, tmp_path / "idx", "--hasher", "itq8")
    assert "7 photos in" in res.stdout
    res = build(tiny_run, photos, tmp_path / "idx", "--hasher", "itq64", code=1)
    assert "another hasher ('itq8', not 'itq64')" in res.stderr


# ----------------------------------------------------------------- read-only indexes
def _snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir()}


def test_read_only_index_is_searched_without_writing(tiny_run, photos, sketch, tmp_path,
                                                     monkeypatch):
    idx = tmp_path / "idx"
    build(tiny_run, photos, idx)
    before = _snapshot(idx)
    assert set(before) == {"index.sqlite", "model.pt", "photos.faiss"}
    # as root, chmod does not stop writes: the directory is made to look read-only
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode & os.W_OK and
                        str(p).startswith(str(idx)) else real_access(p, mode, **kw))
    res = cli("search", idx, sketch, "--top", "7", "--json")
    got = [(r["path"], r["score"]) for r in json.loads(res.stdout)["queries"][0]["results"]]
    assert _snapshot(idx) == before  # no -wal, no -shm, nothing touched
    monkeypatch.undo()
    monkeypatch.setenv(files.READ_ONLY_ENV, "1")
    with Index.open(idx, "cpu") as i:
        assert len(i.search(sketch, top=3)) == 3
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            i._con.execute("DELETE FROM photos")
    assert _snapshot(idx) == before
    monkeypatch.delenv(files.READ_ONLY_ENV)
    with Index.open(idx, "cpu") as i:  # the same results as a writable index's
        expected = [(r.path, r.score) for r in i.search(sketch, top=7)]
    assert [p for p, _ in got] == [p for p, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-6)


@pytest.mark.skipif(os.geteuid() == 0, reason="by design: root writes through chmod a-w")
def test_chmod_read_only_index_is_searched(tiny_run, photos, sketch, tmp_path):
    idx = tmp_path / "idx"
    build(tiny_run, photos, idx)
    for p in [*idx.iterdir(), idx]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        assert len(json.loads(cli("search", idx, sketch, "--json").stdout)["queries"]) == 1
    finally:
        idx.chmod(0o755)


# ------------------------------------------------------------------- damaged files
def test_empty_or_corrupted_database_is_one_line_and_rebuilt(tiny_run, photos, sketch,
                                                             tmp_path):
    idx = tmp_path / "idx"
    build(tiny_run, photos, idx)
    db = idx / "index.sqlite"
    db.write_bytes(b"")
    for args in (["search", idx, sketch], ["index", "update", idx, *OPTS]):
        res = cli(*args, code=1)
        assert f"index.sqlite in '{idx}' is damaged (an empty file): rebuild it with " \
               "`zsbir index build" in res.stderr
    res = build(tiny_run, photos, idx)  # the same build command builds it again
    assert "7 photos in" in res.stdout
    # a page in the middle overwritten
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) >= 3 * page and not (idx / "index.sqlite-wal").exists()
    data[page:2 * page] = np.random.default_rng(0).integers(0, 256, page, np.uint8).tobytes()
    db.write_bytes(bytes(data))
    res = cli("search", idx, sketch, code=1)
    assert f"index.sqlite in '{idx}' is damaged (" in res.stderr
    res = build(tiny_run, photos, idx)
    assert "set aside as index.sqlite.damaged" in res.stderr and "7 photos in" in res.stdout
    assert (idx / "index.sqlite.damaged").is_file()
    with Index.open(idx, "cpu") as i:
        assert len(i) == 7


def test_damaged_faiss_file_is_rebuilt_from_the_database_with_a_warning(
        tiny_run, photos, sketch, tmp_path, caplog):
    idx = tmp_path / "idx"
    build(tiny_run, photos, idx)
    with Index.open(idx, "cpu") as i:
        expected = [(r.path, r.score) for r in i.search(sketch, top=7)]
    path = idx / "photos.faiss"
    data = bytearray(path.read_bytes())
    data[-7 * 16 * 4:] = b"\x7f" * (7 * 16 * 4)  # the vectors (float 3.4e38), header intact
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, "zsbir"), Index.open(idx, "cpu") as i:
        got = [(r.path, r.score) for r in i.search(sketch, top=7)]
    assert "photos.faiss in" in caplog.text and "cannot be trusted" in caplog.text
    assert [p for p, _ in got] == [p for p, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-6)
    cli("index", "update", idx, *OPTS)  # rewrites it
    caplog.clear()
    with caplog.at_level(logging.WARNING, "zsbir"), Index.open(idx, "cpu"):
        pass
    assert "cannot be trusted" not in caplog.text


def test_non_finite_stored_embedding_is_one_line(tiny_run, photos, sketch, tmp_path):
    idx = tmp_path / "idx"
    build(tiny_run, photos, idx)
    con = sqlite3.connect(idx / "index.sqlite")
    con.execute("UPDATE photos SET embedding = ? WHERE path = 'c0/1.png'",
                (np.full(16, np.nan, np.float32).tobytes(),))
    con.commit()
    con.close()
    # the faiss file still holds the good vector; a class search reads the stored ones
    res = cli("search", idx, sketch, "--class", "c0", code=1)
    assert "is damaged (photo 'c0/1.png' has a non-finite embedding)" in res.stderr
    (idx / "photos.faiss").unlink()
    res = cli("search", idx, sketch, code=1)
    assert "has a non-finite embedding" in res.stderr
