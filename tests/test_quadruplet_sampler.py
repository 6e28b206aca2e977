"""Invariants of the ``quadruplet`` sampler over many draws."""

from __future__ import annotations

import numpy as np
import pytest

from zsbir.data.base import PHOTO, SKETCH
from zsbir.data.quadruplet import QuadrupletSampler, TripletSampler
from zsbir.data.samplers import batch_tuples, sampler_unit

DOMAINS_AT = np.array([SKETCH, PHOTO, PHOTO, SKETCH])


def make_split(seed: int, n_classes: int = 6, photo_only: int = 1, sketch_only: int = 1,
               per_class: tuple[int, int] = (1, 9)):
    """Shuffled items of ``n_classes`` classes with both domains, plus classes with photos
    only and with sketches only; labels are non-contiguous to exercise the class mapping."""
    rng = np.random.default_rng(seed)
    labels, domains = [], []
    for c in range(n_classes + photo_only + sketch_only):
        kinds = ([PHOTO, SKETCH] if c < n_classes
                 else [PHOTO] if c < n_classes + photo_only else [SKETCH])
        for dom in kinds:
            k = int(rng.integers(*per_class, endpoint=True))
            labels += [3 * c + 1] * k
            domains += [dom] * k
    perm = rng.permutation(len(labels))
    return np.array(labels)[perm], np.array(domains)[perm]


def check_epoch(sampler: QuadrupletSampler, labels, domains, batches) -> np.ndarray:
    """Check one epoch's batches; return the anchors in order."""
    q = sampler.batch_size // 4
    assert len(batches) == len(sampler)
    anchors = []
    for k, b in enumerate(batches):
        assert b.dtype == np.int64 and b.ndim == 1 and len(b) % 4 == 0
        assert len(b) == sampler.batch_size or (k == len(batches) - 1 and len(b) < 4 * q)
        quads = b.reshape(-1, 4)
        assert (domains[quads] == DOMAINS_AT).all()
        lab = labels[quads]
        assert (lab[:, 0] == lab[:, 1]).all()
        assert (lab[:, 2] != lab[:, 0]).all() and (lab[:, 3] != lab[:, 0]).all()
        if sampler.same_negative_class:
            assert (lab[:, 2] == lab[:, 3]).all()
        assert (np.bincount(domains[b], minlength=2) == len(quads) * 2).all()  # balanced
        anchors.append(quads[:, 0])
    return np.concatenate(anchors)


@pytest.mark.parametrize("same", [False, True])
@pytest.mark.parametrize("seed", range(8))
def test_invariants(seed, same):
    labels, domains = make_split(seed)
    batch_size = 4 * int(np.random.default_rng(seed).integers(1, 9))
    s = QuadrupletSampler(labels, domains, batch_size, seed=seed, same_negative_class=same)
    sketch_cls_with_photo = set(labels[domains == PHOTO].tolist())
    expected_anchors = np.flatnonzero((domains == SKETCH)
                                      & np.isin(labels, list(sketch_cls_with_photo)))
    assert s.num_skipped == int((domains == SKETCH).sum()) - len(expected_anchors)
    assert s.num_skipped > 0  # the sketch-only class
    for epoch in range(3):
        anchors = check_epoch(s, labels, domains, s.epoch(epoch))
        # every sketch whose class has photos is the anchor exactly once
        assert np.array_equal(np.sort(anchors), expected_anchors)


def test_negatives_cover_other_classes():
    """Over many epochs, negatives reach every other class (photo-only / sketch-only ones
    too when negatives are independent), positives reach every photo of the class."""
    labels, domains = make_split(0, n_classes=4)
    s = QuadrupletSampler(labels, domains, 16, seed=1)
    seen_neg_photo, seen_neg_sketch, seen_pos = set(), set(), set()
    for e in range(200):
        quads = np.concatenate(s.epoch(e)).reshape(-1, 4)
        seen_pos |= set(quads[:, 1].tolist())
        seen_neg_photo |= set(labels[quads[:, 2]].tolist())
        seen_neg_sketch |= set(labels[quads[:, 3]].tolist())
    assert seen_neg_photo == set(labels[domains == PHOTO].tolist())
    assert seen_neg_sketch == set(labels[domains == SKETCH].tolist())
    with_sketch = set(labels[domains == SKETCH].tolist())
    assert seen_pos == {i for i in np.flatnonzero(domains == PHOTO) if labels[i] in with_sketch}

    # same_negative_class: negatives come only from classes that have both domains
    s = QuadrupletSampler(labels, domains, 16, seed=1, same_negative_class=True)
    both = set(labels[domains == PHOTO].tolist()) & with_sketch
    quads = np.concatenate([np.concatenate(s.epoch(e)) for e in range(50)]).reshape(-1, 4)
    assert set(labels[quads[:, 2]].tolist()) == both


def test_negative_photo_uniform_over_other_class_items():
    labels = np.array([0] * 5 + [1] * 30 + [2] * 10 + [0, 1, 2])
    domains = np.array([PHOTO] * 45 + [SKETCH] * 3)
    s = QuadrupletSampler(labels, domains, 12, seed=0)
    quads = np.concatenate([np.concatenate(s.epoch(e)) for e in range(3000)]).reshape(-1, 4)
    neg = quads[quads[:, 0] == 45, 2]  # anchor of class 0: negatives from 40 photos
    counts = np.bincount(neg, minlength=45)[5:45]
    assert counts.min() > 0
    expected = len(neg) / 40
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)


def test_deterministic_per_seed_and_epoch():
    labels, domains = make_split(3)
    a = QuadrupletSampler(labels, domains, 8, seed=5)
    b = QuadrupletSampler(labels, domains, 8, seed=5)
    for e in (0, 1, 7):
        ea, eb = a.epoch(e), b.epoch(e)
        assert all(np.array_equal(x, y) for x, y in zip(ea, eb, strict=True))
        assert all(np.array_equal(x, y) for x, y in zip(ea, a.epoch(e), strict=True))
    flat = [np.concatenate(a.epoch(e)) for e in range(3)]
    assert not np.array_equal(flat[0], flat[1]) and not np.array_equal(flat[1], flat[2])
    other_seed = np.concatenate(QuadrupletSampler(labels, domains, 8, seed=6).epoch(0))
    assert not np.array_equal(flat[0], other_seed)


def test_batch_size_and_drop_last():
    labels, domains = make_split(2)
    n_anchor = len(QuadrupletSampler(labels, domains, 4, seed=0).epoch(0))
    for bs in (4, 8, 64):
        keep = QuadrupletSampler(labels, domains, bs, seed=0)
        drop = QuadrupletSampler(labels, domains, bs, seed=0, drop_last=True)
        assert len(keep) == -(-n_anchor // (bs // 4))
        assert len(drop) == n_anchor // (bs // 4)
        assert all(len(b) == bs for b in drop.epoch(0))
        assert keep.roles == ("anchor", "positive", "negative", "negative_sketch")


@pytest.mark.parametrize("bs", [1, 2, 6, 10, 63])
def test_batch_size_must_be_multiple_of_4(bs):
    labels, domains = make_split(0)
    with pytest.raises(ValueError, match="multiple of 4"):
        QuadrupletSampler(labels, domains, bs, seed=0)


def test_too_few_classes():
    one = (np.array([0, 0, 0, 0]), np.array([PHOTO, PHOTO, SKETCH, SKETCH]))
    with pytest.raises(ValueError, match="at least 2 classes"):
        QuadrupletSampler(*one, 4, seed=0)
    # two classes, but no class has both photos and sketches: no anchor possible
    disjoint = (np.array([0, 1, 2, 3]), np.array([PHOTO, PHOTO, SKETCH, SKETCH]))
    with pytest.raises(ValueError, match="at least 2 classes"):
        QuadrupletSampler(*disjoint, 4, seed=0)
    # independent negatives need 2 photo and 2 sketch classes; same-class negatives need 2
    # classes with both domains
    mixed = (np.array([0, 0, 1, 2]), np.array([PHOTO, SKETCH, PHOTO, SKETCH]))
    s = QuadrupletSampler(*mixed, 4, seed=0)
    assert np.array_equal(s.epoch(0)[0], [1, 0, 2, 3])
    with pytest.raises(ValueError, match="all with both"):
        QuadrupletSampler(*mixed, 4, seed=0, same_negative_class=True)


@pytest.mark.parametrize("seed", range(4))
def test_triplet_sampler(seed):
    """Triplets [anchor sketch (c), positive photo (c), negative photo (c' != c)]: three
    items per tuple (no negative sketch is drawn, so none is decoded), every usable sketch
    the anchor of one triplet per epoch; batch_size a multiple of 3."""
    labels, domains = make_split(seed)
    s = TripletSampler(labels, domains, 12, seed=seed)
    assert s.roles == ("anchor", "positive", "negative") and sampler_unit(s) == 3
    batches = s.epoch(0)
    assert all(len(b) % 3 == 0 for b in batches) and len(batches[0]) == 12
    tri = np.concatenate(batches).reshape(-1, 3)
    assert (domains[tri] == [SKETCH, PHOTO, PHOTO]).all()
    lab = labels[tri]
    assert (lab[:, 0] == lab[:, 1]).all() and (lab[:, 2] != lab[:, 0]).all()
    quad = QuadrupletSampler(labels, domains, 16, seed=seed)
    assert sorted(tri[:, 0]) == sorted(np.concatenate(quad.epoch(0)).reshape(-1, 4)[:, 0])
    t = batch_tuples(12, s.roles)
    assert t["tuples"].tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    with pytest.raises(ValueError, match="multiple of 3"):
        TripletSampler(labels, domains, 8, seed=seed)


@pytest.mark.parametrize("unit", [3, 4])
def test_a_tuple_that_lost_an_item_is_dropped_whole(unit):
    """The trainer drops every tuple (of the sampler's unit, not a hard-coded 4) with an
    unreadable file, keeping the others whole and in role order."""
    from types import SimpleNamespace

    import torch

    from zsbir.engine.trainer import Trainer

    expected = np.arange(3 * unit)  # three tuples of items 0.., sources "f<i>"
    sources = [f"f{i}" for i in range(3 * unit)]
    bad = {unit + 1}  # the second tuple's second item
    rows = [i for i in expected if i not in bad]  # what the loader decoded, in order
    batch = {"image": torch.tensor(rows), "label": torch.tensor(rows),
             "skipped": [(sources[i], "bad") for i in bad]}
    me = SimpleNamespace(unit=unit, exp=SimpleNamespace(
        data=SimpleNamespace(train=SimpleNamespace(sources=sources))))
    out = Trainer._drop_incomplete(me, batch, expected)
    keep = [*range(unit), *range(2 * unit, 3 * unit)]
    assert out["image"].tolist() == keep and out["label"].tolist() == keep
