"""Approximate indexes, recall, shard files and merged results (zsbir.hashing.ann)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from zsbir.engine.distributed import partition_files
from zsbir.hashing import ann
from zsbir.hashing.hashers import ITQHasher, pack_bits
from zsbir.hashing.search import hamming_distance_matrix, search


def clustered(n: int, d: int, seed: int, centres: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32) * 3
    return (c[rng.integers(0, centres, n)] + rng.standard_normal((n, d))).astype(np.float32)


def random_codes(n: int, bits: int, seed: int) -> np.ndarray:
    return pack_bits(np.random.default_rng(seed).random((n, bits)) > 0.5)


# ---------------------------------------------------------------- recall
@pytest.mark.parametrize("binary", [False, True])
def test_recall_at_k_matches_the_reference_loop(binary):
    rng = np.random.default_rng(1)
    for trial in range(20):
        q, k, n = 7, int(rng.integers(1, 8)), 30
        if binary:
            ev = np.sort(rng.integers(0, 10, (q, k)), axis=1)
            av = np.sort(rng.integers(0, 12, (q, k)), axis=1)
        else:
            ev = -np.sort(-rng.random((q, k)), axis=1)
            av = -np.sort(-rng.random((q, k)), axis=1)
        ei = np.stack([rng.permutation(n)[:k] for _ in range(q)])
        ai = np.stack([rng.permutation(n)[:k] for _ in range(q)])
        ai[rng.random(ai.shape) < 0.1] = -1  # padding never counts
        got = ann.recall_at_k((av, ai), (ev, ei), k, binary=binary)
        ref = ann.recall_at_k_reference((av, ai), (ev, ei), k, binary=binary)
        assert got == pytest.approx(ref), trial


def test_recall_at_k_edge_cases():
    ev, ei = np.array([[0.9, 0.8]]), np.array([[3, 5]])
    assert ann.recall_at_k((ev, ei), (ev, ei), 2, binary=False) == 1.0
    assert ann.recall_at_k((ev, np.array([[5, 9]])), (ev, ei), 2, binary=False) == 0.5
    # Hamming ties: any item at the exact k-th distance is a correct k-th neighbour
    hv, hi = np.array([[1, 2, 2]]), np.array([[0, 1, 2]])
    assert ann.recall_at_k((np.array([[1, 2, 2]]), np.array([[0, 7, 8]])), (hv, hi), 3,
                           binary=True) == 1.0
    assert ann.recall_at_k((np.array([[1, 3, 4]]), np.array([[0, 7, 8]])), (hv, hi), 3,
                           binary=True) == pytest.approx(1 / 3)


# ---------------------------------------------------------------- indexes
def test_exact_index_equals_exact_search():
    g, q = clustered(500, 16, 0), clustered(20, 16, 1)
    v, i = ann.build_exact(g, binary=False).search(q, 10)
    rv, ri = search(q, g, 10, binary=False)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(v, rv, rtol=1e-5)
    c, cq = random_codes(500, 64, 0), random_codes(20, 64, 1)
    v, i = ann.build_exact(c, binary=True).search(cq, 10)
    rv, ri = search(cq, c, 10, binary=True)
    np.testing.assert_array_equal(v, rv)
    np.testing.assert_array_equal(i, ri)  # same tie rule (index ascending)


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_ivf_probing_every_cell_is_exact_and_few_cells_trade_recall(storage):
    g, q = clustered(4000, 32, 0), clustered(50, 32, 1)
    exact = search(q, g, 10, binary=False)
    idx = ann.build_ivf(g, nlist=32, nprobe=32, storage=storage)
    assert idx.ntotal == 4000 and idx.kind == f"ivf_{storage}"
    full = idx.search(q, 10)
    r_full = ann.recall_at_k(full, exact, 10, binary=False)
    if storage == "float32":
        assert r_full == 1.0
        np.testing.assert_allclose(full[0], exact[0], rtol=1e-5, atol=1e-6)
    else:  # scores rounded to float16: near-ties may swap
        assert r_full >= 0.95
        np.testing.assert_allclose(full[0], exact[0], atol=2e-3)
    idx.set_nprobe(1)
    r_one = ann.recall_at_k(idx.search(q, 10), exact, 10, binary=False)
    assert r_one < r_full


def test_binary_ivf_and_mih_against_exact_hamming():
    g = random_codes(3000, 64, 0)
    # queries: gallery codes with 0-3 bits flipped, so each has a planted near neighbour
    rng = np.random.default_rng(5)
    bits = np.unpackbits(g[:40], axis=1)
    for row in bits:
        row[rng.choice(64, int(rng.integers(0, 4)), replace=False)] ^= 1
    q = np.packbits(bits, axis=1)
    exact = search(q, g, 10, binary=True)
    ivf = ann.build_binary_ivf(g, nlist=16, nprobe=16)
    got = ivf.search(q, 10)
    assert ann.recall_at_k(got, exact, 10, binary=True) == 1.0
    np.testing.assert_array_equal(got[0], exact[0])
    ivf.set_nprobe(1)
    assert ann.recall_at_k(ivf.search(q, 10), exact, 10, binary=True) < 1.0

    mih = ann.build_mih(g, nflip=0)
    assert mih.params == {"nhash": 4, "substring_bits": 16, "nflip": 0}
    v, i = mih.search(q, 10)
    # returned distances are the true Hamming distances of the returned codes
    true = hamming_distance_matrix(q, g)
    for r in range(len(q)):
        ok = i[r] >= 0
        np.testing.assert_array_equal(v[r][ok], true[r, i[r][ok]])
    # pigeonhole (Norouzi et al.): a code within 3 bits matches one of 4 substrings exactly
    np.testing.assert_array_equal(v[:, 0], exact[0][:, 0])
    with pytest.raises(ValueError, match="substrings"):
        ann.build_mih(g, nhash=5)


def test_itq_codes_through_binary_ivf():
    g, q = clustered(3000, 32, 0), clustered(30, 32, 1)
    h = ITQHasher(bits=32).fit(g, seed=0)
    gc, qc = h.encode(g), h.encode(q)
    exact = search(qc, gc, 10, binary=True)
    idx = ann.build_binary_ivf(gc, nlist=16, nprobe=4)
    assert ann.recall_at_k(idx.search(qc, 10), exact, 10, binary=True) > 0.5


def test_index_save_load_roundtrip(tmp_path):
    g, q = clustered(2000, 16, 0), clustered(5, 16, 1)
    idx = ann.build_ivf(g, nlist=16, nprobe=4)
    back = ann.AnnIndex.load(idx.save(tmp_path / "g.faiss"))
    assert back.params == idx.params and back.kind == idx.kind and not back.binary
    for a, b in zip(idx.search(q, 5), back.search(q, 5)):
        np.testing.assert_array_equal(a, b)


def test_bad_inputs_are_refused():
    idx = ann.build_exact(clustered(100, 8, 0), binary=False)
    with pytest.raises(ValueError, match="dimensions"):
        idx.search(np.zeros((2, 9), np.float32), 3)
    with pytest.raises(ValueError, match="nprobe"):
        idx.set_nprobe(4)
    with pytest.raises(ValueError, match="storage"):
        ann.build_ivf(clustered(100, 8, 0), storage="int8")
    assert ann.default_nlist(1_000_000) == 4096 and ann.default_nlist(10) == 1


# ---------------------------------------------------------------- shards and merging
@pytest.mark.parametrize("binary", [False, True])
def test_merge_topk_of_exact_shards_is_exact_search(binary):
    g = random_codes(600, 16, 3) if binary else clustered(600, 8, 3)
    q = random_codes(25, 16, 4) if binary else clustered(25, 8, 4)
    bounds = [0, 130, 131, 600]  # uneven shards, one of a single item
    per_shard = [search(q, g[a:b], 10, binary=binary) for a, b in zip(bounds, bounds[1:])]
    v, i = ann.merge_topk(per_shard, bounds[:-1], 10, binary=binary)
    rv, ri = search(q, g, 10, binary=binary)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(v, rv, rtol=1e-6)


def _fake_embed(paths: list[str]) -> np.ndarray:
    """A deterministic stand-in for a model: the embedding depends only on the path."""
    return np.stack([np.random.default_rng(zlib.crc32(p.encode())).standard_normal(8)
                     for p in paths]).astype(np.float32)


def test_sharded_embedding_merges_into_the_unsharded_index(tmp_path):
    files = [f"/photos/c{c}/{i}.jpg" for c in range(7) for i in range(13)]
    meta = {"run": "runs/x", "hasher": "real"}
    shard_files = []
    for s in (2, 0, 1):  # written in any order, e.g. by different machines
        mine = partition_files(files, s, 3)
        shard_files.append(ann.save_shard(tmp_path / f"s{s}.npz", mine, shard=s,
                                          num_shards=3, embeddings=_fake_embed(mine),
                                          meta=meta))
    merged = ann.merge_shards(shard_files)
    assert merged.paths == sorted(files) and merged.meta == meta and merged.codes is None
    whole = _fake_embed(sorted(files))
    np.testing.assert_array_equal(merged.embeddings, whole)
    q = whole[:4] + 0.01
    a = ann.build_exact(merged.embeddings, binary=False).search(q, 5)
    b = ann.build_exact(whole, binary=False).search(q, 5)
    np.testing.assert_array_equal(a[1], b[1])


def test_merge_shards_refuses_inconsistent_sets(tmp_path):
    def shard(name, s, n, meta=None, width=4):
        return ann.save_shard(tmp_path / name, [f"{name}-{j}" for j in range(3)], shard=s,
                              num_shards=n, codes=np.zeros((3, width), np.uint8),
                              meta=meta or {"m": 1})

    a, b = shard("a.npz", 0, 2), shard("b.npz", 1, 2)
    assert len(ann.merge_shards([b, a]).paths) == 6
    with pytest.raises(ann.ShardFileError, match="missing shard"):
        ann.merge_shards([a])
    with pytest.raises(ann.ShardFileError, match="given twice"):
        ann.merge_shards([a, shard("a2.npz", 0, 2), b])
    with pytest.raises(ann.ShardFileError, match="another model"):
        ann.merge_shards([a, shard("c.npz", 1, 2, meta={"m": 2})])
    with pytest.raises(ann.ShardFileError, match="of 2"):
        ann.merge_shards([a, shard("d.npz", 1, 3)])
    with pytest.raises(ann.ShardFileError, match="width"):
        ann.merge_shards([a, shard("e.npz", 1, 2, width=8)])
    with pytest.raises(ann.ShardFileError, match="no shard file"):
        ann.merge_shards([tmp_path / "nope.npz"])
    with pytest.raises(ValueError, match="rows"):
        ann.save_shard(tmp_path / "f.npz", ["x"], shard=0, num_shards=1,
                       embeddings=np.zeros((2, 3)))
