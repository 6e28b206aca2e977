"""Stored per-photo outputs in a search index and pair re-scoring (issue 25, points 2 and
5): ``zsbir index build`` stores the outputs the run's pair scorer reads (and
``--outputs``), updates, resumes and shard merges keep them with their rows,
``zsbir search --pair-scorer`` and ``zsbir serve`` re-score the top K from them (equal to
a naive re-sort), and an index without them is refused with one line."""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from zsbir.cli import main
from zsbir.data.base import PHOTO
from zsbir.data.synthetic import render
from zsbir.manifest import apply_overrides, load, resolve
from zsbir.pairs.reference import maxsim_ref
from zsbir.search.api import Index
from zsbir.search.errors import SearchError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = [
    "protocol.num_classes=6", "protocol.num_unseen=2", "protocol.photos_per_class=4",
    "protocol.sketches_per_class=4", "protocol.image_size=64", "data.image_size=64",
    "data.workers=0", "model.head.embed_dim=16", "train.epochs=1", "train.batch_size=8",
    "sampler.sketches_per_batch=4", "evaluation.grid_queries=0", "hashers[1].bits=8",
    "run.device=\"cpu\"",
]
OPTS = ("--workers", "0", "--device", "cpu")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny finished run with ``[pair_scorer] name = "maxsim"``, top_k = 3."""
    from zsbir.engine.run import run_experiment

    tmp = tmp_path_factory.mktemp("pair-runs")
    raw = apply_overrides(load(EXAMPLES / "quickstart.toml"),
                          [*TINY, f"run.output_dir={json.dumps(str(tmp))}", "run.name=r"])
    raw["pair_scorer"] = {"name": "maxsim", "top_k": 3}
    run_experiment(resolve(raw))
    return tmp / "r"


def _photos(root: Path) -> Path:
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.fromarray(render(c, 0, i, 7, 64)).save(root / f"c{c}" / f"{i}.png")
    (root / "c0" / "bad.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def index_dir(run_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pair-index")
    cli("index", "build", run_dir, _photos(tmp / "photos"), tmp / "idx", *OPTS)
    return tmp / "idx"


def cli(*args: object, code: int = 0) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == code, res.output
    return res.output


def _sketch(tmp: Path, cls: int = 1) -> Path:
    path = tmp / f"sketch{cls}.png"
    Image.fromarray(render(cls, 1, 0, 7, 64)).save(path)
    return path


def _stored_rows(index: Path) -> list[tuple[str, str, bytes]]:
    con = sqlite3.connect(index / "index.sqlite")
    try:
        return list(con.execute("SELECT p.path, o.name, o.data FROM outputs o JOIN photos p "
                                "ON p.id = o.photo_id ORDER BY p.path, o.name"))
    finally:
        con.close()


def _check_consistent(index: Path) -> None:
    """One stored output per photo row and output name, none without a row."""
    con = sqlite3.connect(index / "index.sqlite")
    try:
        photos = con.execute("SELECT COUNT(*) FROM photos").fetchone()[0]
        per_name = dict(con.execute("SELECT name, COUNT(*) FROM outputs GROUP BY name"))
        orphans = con.execute("SELECT COUNT(*) FROM outputs WHERE photo_id NOT IN "
                              "(SELECT id FROM photos)").fetchone()[0]
    finally:
        con.close()
    assert per_name == {"tokens": photos} and orphans == 0


# ------------------------------------------------------------------------------ build
def test_build_stores_the_scorers_outputs_once_per_photo(index_dir, run_dir):
    from zsbir.engine.index import load_trained

    with Index.open(index_dir, "cpu") as idx:
        assert idx.output_names == ("tokens",) and len(idx) == 12
        ids = idx._fx.ids
        stored = idx.outputs("tokens", ids)
        assert stored.shape == (12, 4, 512) and stored.dtype == np.float32
        paths = [idx.root / p for p in idx._fx.paths]
        with pytest.raises(SearchError, match="stores no 'logits' output"):
            idx.outputs("logits", ids)
        with pytest.raises(SearchError, match="no photo 999999"):
            idx.outputs("tokens", [999999])
    tm = load_trained(index_dir / "model.pt", "cpu")
    want = tm.forward_images([Image.open(p) for p in paths], PHOTO, ("tokens",))["tokens"]
    np.testing.assert_allclose(stored, want, rtol=1e-5, atol=1e-5)
    _check_consistent(index_dir)


def test_query_outputs_come_from_one_forward_pass(index_dir, tmp_path, counted):
    with Index.open(index_dir, "cpu") as idx:
        counted.clear()
        got = idx.query_outputs([str(_sketch(tmp_path))], ("tokens",))
        assert counted == [1] and set(got) == {"embedding", "tokens"}
        assert got["tokens"].shape == (1, 4, 512)


# ----------------------------------------------------------------------------- search
def _naive(idx: Index, sketch: Path, top: int, k: int) -> list[tuple[int, float | None]]:
    """The plain ranking's first ``top``, its first ``k`` re-sorted by MaxSim computed pair
    by pair (descending, ties by path)."""
    plain = idx.search(str(sketch), top=max(top, k))
    q = idx.query_outputs([str(sketch)], ("tokens",))["tokens"][0]
    head = plain[:k]
    scored = [(r, maxsim_ref(q, idx.outputs("tokens", [r.id])[0])) for r in head]
    scored.sort(key=lambda rs: (-rs[1], rs[0].path))
    return ([(r.id, s) for r, s in scored] + [(r.id, None) for r in plain[k:]])[:top]


@pytest.mark.parametrize(("top", "k"), [(6, 4), (3, 5), (12, 12)])
def test_search_rescoring_equals_a_naive_resort(index_dir, tmp_path, top, k):
    sketch = _sketch(tmp_path)
    with Index.open(index_dir, "cpu") as idx:
        want = _naive(idx, sketch, top, k)
        got = idx.search(str(sketch), top=top, pair_scorer="maxsim", top_k=k)
    assert [r.id for r in got] == [i for i, _ in want]
    assert [r.rank for r in got] == list(range(1, len(want) + 1))
    for r, (_, s) in zip(got, want):
        assert (r.pair_score is None) == (s is None)
        if s is not None:
            assert r.pair_score == pytest.approx(s, rel=1e-5, abs=1e-5)


def test_search_cli_rescores_with_the_runs_scorer(index_dir, tmp_path):
    sketch = _sketch(tmp_path, 2)
    out = json.loads(cli("search", index_dir, sketch, "--pair-scorer", "maxsim",
                         "--top-k", "4", "--top", "6", "--json", "--device", "cpu"))
    res = out["queries"][0]["results"]
    assert ["pair_score" in r for r in res] == [True] * 4 + [False] * 2
    with Index.open(index_dir, "cpu") as idx:
        want = _naive(idx, sketch, 6, 4)
        # --top-k alone: the run's [pair_scorer] (top_k 3 by default with --pair-scorer)
        run_k = idx.search(str(sketch), top=6, pair_scorer="")
        assert [r.pair_score is not None for r in run_k] == [True] * 3 + [False] * 3
    assert [r["id"] for r in res] == [i for i, _ in want]
    table = cli("search", index_dir, sketch, "--top-k", "2", "--device", "cpu")
    assert "pair score" in table.splitlines()[0]
    assert "rerank" in cli("search", index_dir, sketch, "--pair-scorer", "maxsim", "--rerank",
                           "aqe", "--device", "cpu", code=1)


def test_an_index_without_the_outputs_is_refused_in_one_line(tiny_run, tmp_path):
    photos = _photos(tmp_path / "photos")
    cli("index", "build", tiny_run, photos, tmp_path / "plain", *OPTS)
    out = cli("search", tmp_path / "plain", _sketch(tmp_path), "--pair-scorer", "maxsim",
              "--device", "cpu", code=1)
    assert "stores no 'tokens' output" in out and "--outputs tokens" in out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1
    out = cli("search", tmp_path / "plain", _sketch(tmp_path), "--top-k", "3",
              "--device", "cpu", code=1)
    assert "has no [pair_scorer]" in out
    # a model that does not give the output asked for: refused before anything is written
    out = cli("index", "build", tiny_run, photos, tmp_path / "nope", "--outputs", "nope",
              *OPTS, code=1)
    assert "gives no output 'nope'" in out and not (tmp_path / "nope").exists()
    # --outputs on a run without a pair scorer: stored, and usable by name
    cli("index", "build", tiny_run, photos, tmp_path / "tok", "--outputs", "tokens", *OPTS)
    with Index.open(tmp_path / "tok", "cpu") as idx:
        assert idx.output_names == ("tokens",)
        assert idx.search(str(_sketch(tmp_path)), top=2, pair_scorer="maxsim",
                          top_k=2)[0].pair_score is not None


# ------------------------------------------------------------- update, resume, merge
def test_update_keeps_outputs_with_their_rows(run_dir, tmp_path, counted):
    photos = _photos(tmp_path / "photos")
    idx_dir = tmp_path / "idx"
    cli("index", "build", run_dir, photos, idx_dir, *OPTS)
    before = {(p, n): d for p, n, d in _stored_rows(idx_dir)}
    (photos / "c2" / "0.png").unlink()                                       # removed
    Image.fromarray(render(0, 0, 3, 7, 64)).save(photos / "c1" / "1.png")     # changed
    Image.fromarray(render(2, 0, 8, 7, 64)).save(photos / "c2" / "new.png")   # new
    counted.clear()
    cli("index", "update", idx_dir, *OPTS)
    assert sum(counted) == 2
    _check_consistent(idx_dir)
    after = {(p, n): d for p, n, d in _stored_rows(idx_dir)}
    assert ("c2/0.png", "tokens") not in after and ("c2/new.png", "tokens") in after
    assert after[("c1/1.png", "tokens")] != before[("c1/1.png", "tokens")]
    assert after[("c0/0.png", "tokens")] == before[("c0/0.png", "tokens")]
    from zsbir.engine.index import load_trained

    tm = load_trained(idx_dir / "model.pt", "cpu")
    want = tm.forward_images([Image.open(photos / "c1" / "1.png")], PHOTO, ("tokens",))
    with Index.open(idx_dir, "cpu") as idx:
        pos = list(idx._fx.paths).index("c1/1.png")
        np.testing.assert_allclose(idx.outputs("tokens", [idx._fx.ids[pos]]), want["tokens"],
                                   rtol=1e-5, atol=1e-5)
    # a build run again with the same settings resumes; another --outputs is refused
    counted.clear()
    assert "resumed" in cli("index", "build", run_dir, photos, idx_dir, *OPTS)
    assert counted == []
    out = cli("index", "build", run_dir, photos, idx_dir, "--outputs", "logits", *OPTS, code=1)
    assert "extra_outputs" in out


def test_a_resumed_build_stores_the_outputs_of_every_photo(run_dir, tmp_path, monkeypatch):
    """A build killed after its first batch resumes and ends with every photo's outputs."""
    from zsbir.search import rows

    photos = _photos(tmp_path / "photos")
    calls = []
    original = rows._commit_batch

    def dies_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr("zsbir.search.store._commit_batch", dies_after_one)
    from zsbir.search.store import build_index

    with pytest.raises(KeyboardInterrupt):
        build_index(run_dir, photos, tmp_path / "idx", device="cpu", workers=0, batch_size=4)
    _check_consistent(tmp_path / "idx")  # the committed batch: rows and outputs together
    monkeypatch.setattr("zsbir.search.store._commit_batch", original)
    s = build_index(run_dir, photos, tmp_path / "idx", device="cpu", workers=0, batch_size=4)
    assert s.resumed and s.embedded == 8
    _check_consistent(tmp_path / "idx")
    cli("index", "build", run_dir, photos, tmp_path / "whole", *OPTS)
    _same_outputs(_stored_rows(tmp_path / "idx"), _stored_rows(tmp_path / "whole"))


def _same_outputs(a: list, b: list) -> None:
    """The same photos and outputs, equal values (batches of another size: float noise)."""
    assert [(p, n) for p, n, _ in a] == [(p, n) for p, n, _ in b]
    for (_, _, x), (_, _, y) in zip(a, b):
        np.testing.assert_allclose(np.frombuffer(x, np.float32), np.frombuffer(y, np.float32),
                                   atol=1e-5)


def test_merged_shards_hold_the_outputs_of_the_whole_index(run_dir, tmp_path, counted):
    photos = _photos(tmp_path / "photos")
    cli("index", "build", run_dir, photos, tmp_path / "whole", *OPTS)
    shards = [tmp_path / f"s{i}" for i in range(3)]
    for i, s in enumerate(shards):
        cli("index", "build", run_dir, photos, s, "--shard", f"{i}/3", *OPTS)
    counted.clear()
    cli("index", "merge", tmp_path / "merged", *shards)
    assert counted == []
    _check_consistent(tmp_path / "merged")
    _same_outputs(_stored_rows(tmp_path / "merged"), _stored_rows(tmp_path / "whole"))
    sketch = _sketch(tmp_path)
    with Index.open(tmp_path / "merged", "cpu") as a, Index.open(tmp_path / "whole", "cpu") as b:
        ra = a.search(str(sketch), top=5, pair_scorer="maxsim", top_k=4)
        rb = b.search(str(sketch), top=5, pair_scorer="maxsim", top_k=4)
    assert [r.path for r in ra] == [r.path for r in rb]
    # shards storing other outputs do not merge
    cli("index", "build", run_dir, photos, tmp_path / "o0", "--shard", "0/2", *OPTS)
    cli("index", "build", run_dir, photos, tmp_path / "o1", "--shard", "1/2",
        "--output-dtype", "float16", *OPTS)
    assert "output_dtype" in cli("index", "merge", tmp_path / "bad", tmp_path / "o0",
                                 tmp_path / "o1", code=1)


def test_float16_storage_halves_the_size_and_keeps_the_ranking(run_dir, index_dir, tmp_path):
    cli("index", "build", run_dir, _photos(tmp_path / "photos"), tmp_path / "h", "--output-dtype",
        "float16", *OPTS)
    full, half = _stored_rows(index_dir), _stored_rows(tmp_path / "h")
    assert all(len(h) * 2 == len(f) for (_, _, f), (_, _, h) in zip(full, half))
    sketch = _sketch(tmp_path)
    with Index.open(index_dir, "cpu") as a, Index.open(tmp_path / "h", "cpu") as b:
        ra = a.search(str(sketch), top=12, pair_scorer="maxsim", top_k=12)
        rb = b.search(str(sketch), top=12, pair_scorer="maxsim", top_k=12)
    np.testing.assert_allclose([r.pair_score for r in rb], sorted(
        [r.pair_score for r in rb], reverse=True))
    by_id = {r.id: r.pair_score for r in ra}
    np.testing.assert_allclose([r.pair_score for r in rb], [by_id[r.id] for r in rb],
                               rtol=3e-3)


# ------------------------------------------------------------------------------ serve
def test_serve_rescores_with_the_stored_outputs(index_dir, tmp_path):
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    from starlette.testclient import TestClient

    from zsbir.search.server import create_app

    buf = io.BytesIO()
    Image.open(_sketch(tmp_path)).save(buf, "PNG")
    client = TestClient(create_app(index_dir, device="cpu", pair_scorer="maxsim", top_k=4))
    r = client.post("/api/search", files={"sketch": ("s.png", buf.getvalue(), "image/png")},
                    data={"top": "6"})
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    with Index.open(index_dir, "cpu") as idx:
        want = idx.search(str(_sketch(tmp_path)), top=6, pair_scorer="maxsim", top_k=4)
    assert [x["id"] for x in got] == [w.id for w in want]
    assert [x["pair_score"] for x in got] == pytest.approx([w.pair_score for w in want])
    bad = client.post("/api/search", json={"drawing": [[[1, 2], [3, 4]]], "rerank": "aqe"})
    assert bad.status_code == 400 and "pair scorer" in bad.json()["error"]


def test_serve_refuses_an_index_without_the_outputs(tiny_run, tmp_path):
    pytest.importorskip("starlette")
    from zsbir.search.server import create_app

    cli("index", "build", tiny_run, _photos(tmp_path / "photos"), tmp_path / "plain", *OPTS)
    with pytest.raises(SearchError, match="stores no 'tokens' output"):
        create_app(tmp_path / "plain", device="cpu", pair_scorer="maxsim")
    pytest.importorskip("uvicorn")
    out = cli("serve", tmp_path / "plain", "--pair-scorer", "maxsim", "--device", "cpu", code=1)
    assert "stores no 'tokens' output" in out and "Traceback" not in out
