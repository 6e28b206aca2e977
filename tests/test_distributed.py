"""Data-parallel training and sharding (zsbir.engine.distributed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zsbir.data.base import PHOTO, SKETCH
from zsbir.data.quadruplet import QuadrupletSampler
from zsbir.data.samplers import MixedSampler, RandomSampler, sampler_unit
from zsbir.engine import distributed as D

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], world: int, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """``python tests/ddp_worker.py ARGS`` as ``world`` gloo processes on 127.0.0.1."""
    port = free_port()
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    done = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


# ---------------------------------------------------------------- pure sharding helpers
def _naive_shard(batch: np.ndarray, rank: int, world: int, unit: int) -> np.ndarray:
    units = [batch[i:i + unit] for i in range(0, len(batch), unit)]
    per = [[] for _ in range(world)]
    # first ranks take one more unit, contiguous blocks
    sizes = [len(units) // world + (1 if k < len(units) % world else 0) for k in range(world)]
    pos = 0
    for k in range(world):
        per[k] = units[pos:pos + sizes[k]]
        pos += sizes[k]
    return np.concatenate(per[rank]) if per[rank] else batch[:0]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("unit", [1, 4])
def test_shard_batch_matches_naive_and_reassembles(world, unit):
    rng = np.random.default_rng(world * 10 + unit)
    for n_units in range(world, 13):
        batch = rng.permutation(1000)[:n_units * unit]
        slices = [D.shard_batch(batch, r, world, unit) for r in range(world)]
        for r, s in enumerate(slices):
            np.testing.assert_array_equal(s, _naive_shard(batch, r, world, unit))
            assert len(s) % unit == 0
        np.testing.assert_array_equal(np.concatenate(slices), batch)


def test_shard_batches_refuses_indivisible_batches_clearly():
    batches = [np.arange(6), np.arange(6, 12)]
    with pytest.raises(D.ShardError, match=r"batch_size \(6\).*4 processes"):
        D.shard_batches(batches, 0, 4)
    quads = [np.arange(12)]  # 3 quadruplets over 2 ranks
    with pytest.raises(D.ShardError, match="quadruplet is never split"):
        D.shard_batches(quads, 0, 2, unit=4)
    with pytest.raises(D.ShardError, match="fewer than 2 processes"):
        D.shard_batches([np.arange(8), np.arange(8, 12)], 0, 2, unit=4)
    with pytest.raises(D.ShardError, match="not a whole number"):
        D.shard_batch(np.arange(6), 0, 2, unit=4)


def test_shard_batches_trailing_short_batch_is_split_unevenly():
    batches = [np.arange(8), np.arange(8, 13)]
    r0, r1 = D.shard_batches(batches, 0, 2), D.shard_batches(batches, 1, 2)
    np.testing.assert_array_equal(r0[1], [8, 9, 10])
    np.testing.assert_array_equal(r1[1], [11, 12])
    assert D.slice_weight(5, 3, 2) == pytest.approx(1.2)
    assert D.slice_weight(5, 2, 2) == pytest.approx(0.8)
    assert D.slice_weight(8, 4, 2) == 1.0


def _pool(n_classes=6, per=5):
    labels = np.repeat(np.arange(n_classes), 2 * per)
    domains = np.tile(np.r_[np.full(per, SKETCH), np.full(per, PHOTO)], n_classes)
    return labels, domains


@pytest.mark.parametrize("make", [
    lambda lab, dom: RandomSampler(lab, dom, 8, seed=3),
    lambda lab, dom: MixedSampler(lab, dom, 8, seed=3, sketches_per_batch=3),
    lambda lab, dom: QuadrupletSampler(lab, dom, 16, seed=3),
])
def test_every_sampler_shards_into_the_global_batches(make):
    lab, dom = _pool()
    sampler = make(lab, dom)
    unit = sampler_unit(sampler)
    for epoch in range(2):
        whole = sampler.epoch(epoch)
        for world in (1, 2):
            per_rank = [sampler.epoch_shard(epoch, r, world) for r in range(world)]
            assert all(len(p) == len(whole) for p in per_rank)
            for i, b in enumerate(whole):
                np.testing.assert_array_equal(np.concatenate([p[i] for p in per_rank]), b)
                if unit == 4:  # every rank's slice is whole quadruplets: sketch, photo x2, sketch
                    for p in per_rank:
                        d = dom[p[i]].reshape(-1, 4)
                        assert (d == [SKETCH, PHOTO, PHOTO, SKETCH]).all()
        # deterministic from the seed: a fresh sampler gives the same shards
        again = make(lab, dom).epoch_shard(epoch, 1, 2)
        for a, b in zip(again, sampler.epoch_shard(epoch, 1, 2)):
            np.testing.assert_array_equal(a, b)


def test_sampler_unit_for_plugin_samplers():
    class Plain:
        structure = "items"

    class Quad:
        structure = "quadruplet"

    assert sampler_unit(Plain()) == 1 and sampler_unit(Quad()) == 4
    assert sampler_unit(object()) == 1


def test_parse_shard_and_partition_files():
    assert D.parse_shard("0/4") == (0, 4) and D.parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/2", "a/b", "3", "1/0"):
        with pytest.raises(D.ShardError, match="--shard"):
            D.parse_shard(bad)
    files = [f"/photos/{c}/{i:03d}.jpg" for c in "zab" for i in range(7)]
    shuffled = list(np.random.default_rng(0).permutation(files))
    for n in (1, 2, 3, 5, 30):
        shards = [D.partition_files(shuffled, i, n) for i in range(n)]
        assert sum(shards, []) == sorted(files)  # contiguous blocks of the sorted list
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        assert shards == [D.partition_files(files, i, n) for i in range(n)]
    with pytest.raises(D.ShardError):
        D.partition_files(files, 2, 2)


def test_shard_range_covers_everything_once():
    for n in range(0, 12):
        for world in range(1, 5):
            got = [i for r in range(world) for i in D.shard_range(n, r, world)]
            assert got == list(range(n))


def test_single_process_helpers_are_identities(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    env = D.init_distributed()
    assert env == D.DistEnv() and D.is_main() and D.world_size() == 1
    x = np.arange(6).reshape(3, 2)
    assert D.gather_concat(x) is x and D.broadcast_object(5) == 5
    D.barrier()


def test_init_distributed_needs_the_rendezvous(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        D.init_distributed("cpu")


# ---------------------------------------------------------------- two gloo processes
def test_collectives_sync_batchnorm_and_weighted_ddp_on_two_processes(tmp_path):
    done = launch(["primitives", str(tmp_path)], world=2)
    for r, p in enumerate(done):
        assert p.returncode == 0, f"rank {r} failed:\n{p.stderr[-3000:]}"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["rank0.json", "rank1.json"]
