"""Sharded photo indexing: `zsbir index build --shard I/N` on each shard, then
`zsbir index merge` into one index without embedding anything again."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from zsbir.cli import main
from zsbir.data.synthetic import render
from zsbir.search.api import Index


@pytest.fixture
def photos(tmp_path) -> Path:
    """3 classes x 4 photos, one loose photo, one unreadable file."""
    root = tmp_path / "photos"
    for c in range(3):
        for i in range(4):
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(render(c, 0, i, 7, 32)).save(root / f"c{c}" / f"{i}.png")
    Image.fromarray(render(0, 0, 9, 7, 32)).save(root / "loose.png")
    (root / "c0" / "bad.png").write_bytes(b"not an image")
    return root


def cli(*args: str, code: int = 0) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == code, res.output
    return res.output


def rows(index_dir: Path) -> list[tuple[str, bytes]]:
    con = sqlite3.connect(index_dir / "index.sqlite")
    return list(con.execute("SELECT path, embedding FROM photos ORDER BY path"))


def test_shards_merge_into_the_unsharded_index(tiny_run, photos, tmp_path, counted):
    opts = ["--workers", "0", "--device", "cpu"]
    cli("index", "build", tiny_run, photos, tmp_path / "whole", *opts)
    counted.clear()
    shards = [tmp_path / f"s{i}" for i in range(3)]
    for i in (2, 0, 1):  # any order, e.g. on different machines
        cli("index", "build", tiny_run, photos, shards[i], "--shard", f"{i}/3", *opts)
    assert sum(counted) == 13  # every readable photo embedded once, by one shard
    sizes = [len(rows(s)) for s in shards]
    assert sum(sizes) == 13 and max(sizes) - min(sizes) <= 1
    counted.clear()
    out = cli("index", "merge", tmp_path / "merged", *shards)
    assert counted == [] and "13 photos in" in out  # nothing embedded again

    whole, merged = rows(tmp_path / "whole"), rows(tmp_path / "merged")
    assert [p for p, _ in merged] == [p for p, _ in whole]
    np.testing.assert_allclose(
        np.stack([np.frombuffer(e, np.float32) for _, e in merged]),
        np.stack([np.frombuffer(e, np.float32) for _, e in whole]), atol=1e-5)
    sketch = tmp_path / "sketch.png"
    Image.fromarray(render(1, 1, 0, 7, 32)).save(sketch)
    with Index.open(tmp_path / "merged", "cpu") as a, Index.open(tmp_path / "whole", "cpu") as b:
        ra, rb = a.search(str(sketch), top=13), b.search(str(sketch), top=13)
        assert [r.path for r in ra] == [r.path for r in rb]
        np.testing.assert_allclose([r.score for r in ra], [r.score for r in rb], atol=1e-5)
        assert "shard" not in a.meta or a.meta["shard"] is None
    # a merged index updates like any other: nothing changed, nothing embedded
    counted.clear()  # (the two searches embedded their sketch)
    cli("index", "update", tmp_path / "merged", *opts)
    assert counted == []


def test_merge_refuses_incomplete_or_mixed_shards(tiny_run, photos, tmp_path):
    opts = ["--workers", "0", "--device", "cpu"]
    s0, s1 = tmp_path / "s0", tmp_path / "s1"
    cli("index", "build", tiny_run, photos, s0, "--shard", "0/2", *opts)
    cli("index", "build", tiny_run, photos, s1, "--shard", "1/2", *opts)
    cli("index", "build", tiny_run, photos, tmp_path / "whole", *opts)
    out = cli("index", "merge", tmp_path / "m1", s0, code=1)
    assert "missing shard(s) 1/2" in out
    out = cli("index", "merge", tmp_path / "m2", s0, s0, s1, code=1)
    assert "given twice" in out
    out = cli("index", "merge", tmp_path / "m3", s0, tmp_path / "whole", code=1)
    assert "not a shard index" in out
    out = cli("index", "build", tiny_run, photos, tmp_path / "bad", "--shard", "2/2", *opts,
              code=2)
    assert "--shard" in out
