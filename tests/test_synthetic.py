"""Tests of the built-in ``synthetic`` protocol (zsbir.data.synthetic)."""

from __future__ import annotations

import hashlib
import inspect
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsbir.data.base import PHOTO, SKETCH, ProtocolData
from zsbir.data.synthetic import (
    CLASS_NAMES,
    FAMILIES,
    INNERS,
    class_index,
    make_key,
    parse_key,
    read_synthetic,
    render,
    synthetic,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(photos_per_class=6, sketches_per_class=5, image_size=32, val_fraction=0.2)


def _pixels(data: ProtocolData, source: str) -> np.ndarray:
    return np.asarray(data.reader(source))


@pytest.fixture(scope="module")
def data() -> ProtocolData:
    return synthetic(**SMALL)


# ------------------------------------------------------------------------ determinism
def test_same_key_same_pixels_and_fresh_images() -> None:
    a = render(7, SKETCH, 3, 0, 48)
    b = render(7, SKETCH, 3, 0, 48)
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    key = make_key(0, 7, PHOTO, 3, 48)
    im1, im2 = read_synthetic(key), read_synthetic(key)
    assert im1.mode == "RGB" and im1.size == (48, 48)
    assert im1 is not im2  # cached pixels, but a new image each call
    assert np.array_equal(np.asarray(im1), np.asarray(im2))
    assert np.array_equal(np.asarray(im1), render(7, PHOTO, 3, 0, 48))


def test_pixels_identical_in_another_process() -> None:
    key = make_key(3, 12, PHOTO, 5, 40)
    code = (
        "import hashlib, numpy as np\n"
        "from zsbir.data.synthetic import read_synthetic\n"
        f"print(hashlib.sha256(np.asarray(read_synthetic({key!r})).tobytes()).hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT),
                                                     "PYTHONHASHSEED": "123"})
    here = hashlib.sha256(np.asarray(read_synthetic(key)).tobytes()).hexdigest()
    assert out.stdout.strip() == here


def test_protocol_is_deterministic_and_seed_dependent() -> None:
    a, b = synthetic(seed=4, **SMALL), synthetic(seed=4, **SMALL)
    assert a.unseen_classes == b.unseen_classes and a.train.sources == b.train.sources
    assert a.val.sources == b.val.sources
    assert np.array_equal(_pixels(a, a.query.sources[0]), _pixels(b, b.query.sources[0]))

    others = [synthetic(seed=s, **SMALL) for s in (5, 6, 7)]
    assert any(o.unseen_classes != a.unseen_classes for o in others)
    # same class, domain and instance under another seed: different pixels
    assert not np.array_equal(render(0, PHOTO, 0, 0, 32), render(0, PHOTO, 0, 1, 32))
    assert not np.array_equal(render(0, SKETCH, 0, 0, 32), render(0, SKETCH, 0, 1, 32))
    # and instances of one class differ
    assert not np.array_equal(render(0, SKETCH, 0, 0, 32), render(0, SKETCH, 1, 0, 32))


def test_geometry_does_not_depend_on_size() -> None:
    def ink_centre(im: np.ndarray) -> np.ndarray:
        ys, xs = np.nonzero(im[..., 0] < 128)
        return np.array([xs.mean(), ys.mean()]) / im.shape[0]

    for k in range(4):
        small, big = render(5, SKETCH, k, 0, 32), render(5, SKETCH, k, 0, 96)
        assert np.abs(ink_centre(small) - ink_centre(big)).max() < 0.05


def test_keys_round_trip_and_bad_keys_raise() -> None:
    key = make_key(2, 11, SKETCH, 9, 64)
    assert key == "synthetic:2:11:1:9:64"
    assert parse_key(key) == (2, 11, SKETCH, 9, 64)
    for bad in ("synthetic:1:2:3", "photo.jpg", "synthetic:a:1:0:0:64",
                "synthetic:0:999:0:0:64", "synthetic:0:1:5:0:64", "synthetic:0:1:0:0:4"):
        with pytest.raises(ValueError):
            read_synthetic(bad)


def test_reader_pickles_for_worker_processes(data: ProtocolData) -> None:
    reader = pickle.loads(pickle.dumps(data.reader))
    src = data.train.sources[0]
    assert np.array_equal(np.asarray(reader(src)), _pixels(data, src))


# ------------------------------------------------------------------------ splits
def test_class_lists(data: ProtocolData) -> None:
    assert len(data.seen_classes) == 16 and len(data.unseen_classes) == 8
    assert data.seen_classes == sorted(data.seen_classes)
    assert data.unseen_classes == sorted(data.unseen_classes)
    assert not set(data.seen_classes) & set(data.unseen_classes)
    assert all(c in CLASS_NAMES for c in data.classes)
    # zero-shot by composition: every part of an unseen class occurs in a seen class
    seen_fam = {c.split("-")[0] for c in data.seen_classes}
    seen_inner = {c.split("-")[1] for c in data.seen_classes}
    for c in data.unseen_classes:
        fam, inner = c.split("-")
        assert fam in seen_fam and inner in seen_inner
    assert len(CLASS_NAMES) == len(FAMILIES) * len(INNERS) == 40
    assert class_index("triangle-ring") == CLASS_NAMES.index("triangle-ring")


def test_split_invariants(data: ProtocolData) -> None:
    n_seen, n_unseen = len(data.seen_classes), len(data.unseen_classes)
    ppc, spc = SMALL["photos_per_class"], SMALL["sketches_per_class"]
    for split in (data.train, data.val):
        assert split.labels.min() >= 0 and split.labels.max() < n_seen
        assert set(split.domains.tolist()) == {PHOTO, SKETCH}
    assert len(data.train) + len(data.val) == n_seen * (ppc + spc)
    n_val = n_seen * (round(0.2 * ppc) + round(0.2 * spc))
    assert len(data.val) == n_val
    assert np.bincount(data.train.labels, minlength=n_seen).min() > 0

    assert (data.query.domains == SKETCH).all() and len(data.query) == n_unseen * spc
    assert (data.gallery.domains == PHOTO).all() and len(data.gallery) == n_unseen * ppc
    for split in (data.query, data.gallery):
        assert split.labels.min() >= n_seen and split.labels.max() < n_seen + n_unseen
        assert set(split.labels.tolist()) == set(range(n_seen, n_seen + n_unseen))

    every = data.train.sources + data.val.sources + data.query.sources + data.gallery.sources
    assert len(set(every)) == len(every)  # no image in two splits
    # each key's class is the class its label names
    for split in (data.train, data.val, data.query, data.gallery):
        for src, lab, dom in zip(split.sources, split.labels, split.domains, strict=True):
            _, cls, domain, _, size = parse_key(src)
            assert CLASS_NAMES[cls] == data.classes[lab] and domain == dom and size == 32
    assert data.reader(data.query.sources[0]).size == (32, 32)
    assert not data.generalized and data.skipped == []


def test_val_split_is_seeded() -> None:
    a = synthetic(seed=0, val_fraction=0.3, **{k: v for k, v in SMALL.items()
                                                 if k != "val_fraction"})
    b = synthetic(seed=0, val_fraction=0.0, **{k: v for k, v in SMALL.items()
                                                 if k != "val_fraction"})
    assert len(b.val) == 0 and len(b.train) == len(a.train) + len(a.val)


def test_generalized_gallery_adds_fresh_seen_photos(data: ProtocolData) -> None:
    g = synthetic(generalized=True, **SMALL)
    n_seen, n_unseen = len(g.seen_classes), len(g.unseen_classes)
    ppc = SMALL["photos_per_class"]
    assert g.generalized
    assert len(g.gallery) == (n_seen + n_unseen) * ppc
    assert (g.gallery.domains == PHOTO).all()
    assert set(g.gallery.labels.tolist()) == set(range(n_seen + n_unseen))
    assert set(g.gallery.sources).isdisjoint(g.train.sources + g.val.sources)
    assert g.query.sources == data.query.sources and g.train.sources == data.train.sources


def test_other_sizes_of_benchmark() -> None:
    d = synthetic(num_classes=40, num_unseen=10, photos_per_class=2, sketches_per_class=2,
                  image_size=16, val_fraction=0.0)
    assert sorted(d.classes) == sorted(CLASS_NAMES)
    d = synthetic(num_classes=3, num_unseen=1, photos_per_class=1, sketches_per_class=1)
    assert len(d.seen_classes) == 2 and len(d.unseen_classes) == 1
    assert len(d.train) == 4 and len(d.val) == 0  # val never empties a class
    d = synthetic(num_classes=20, num_unseen=5, **SMALL)
    assert len(d.seen_classes) == 15 and len(set(d.classes)) == 20


# ------------------------------------------------------------------------ domain gap
def test_sketches_are_dark_strokes_on_white() -> None:
    for c in range(0, 40, 3):
        im = render(c, SKETCH, c, 0, 64).astype(np.float32)
        assert np.array_equal(im[..., 0], im[..., 1])  # grayscale
        white = (im[..., 0] > 240).mean()
        dark = (im[..., 0] < 100).mean()
        assert white > 0.75, CLASS_NAMES[c]
        assert 0.01 < dark < 0.25, CLASS_NAMES[c]


def test_photos_are_colored_objects_on_textured_backgrounds() -> None:
    means = []
    for c in range(0, 40, 3):
        im = render(c, PHOTO, c, 0, 64).astype(np.float32)
        assert (im.min(axis=2) > 240).mean() < 0.2  # not a white page
        assert im.std(axis=2).mean() > 5  # colored, not gray
        border = np.concatenate([im[:3].reshape(-1, 3), im[-3:].reshape(-1, 3)])
        assert border.std(axis=0).max() > 2  # textured / noisy background
        means.append(render(0, PHOTO, c, 0, 32).reshape(-1, 3).mean(0))
    # one class's photos come in many colors: color is no class cue
    assert np.ptp(np.array(means), axis=0).max() > 60


def test_render_is_fast() -> None:
    render(1, PHOTO, 0, 0, 64)  # warm up
    t = time.perf_counter()
    for k in range(40):
        render(k, k % 2, k, 9, 64)
    assert (time.perf_counter() - t) / 40 < 0.02  # ~1-2 ms on an idle core


# ------------------------------------------------------------------------ arguments
@pytest.mark.parametrize(("kwargs", "param"), [
    ({"num_classes": 2}, "num_classes"),
    ({"num_classes": 41}, "num_classes"),
    ({"num_classes": 10, "num_unseen": 9}, "num_unseen"),
    ({"num_classes": 10, "num_unseen": 10}, "num_unseen"),
    ({"num_unseen": 0}, "num_unseen"),
    ({"photos_per_class": 0}, "photos_per_class"),
    ({"sketches_per_class": -1}, "sketches_per_class"),
    ({"image_size": 8}, "image_size"),
    ({"image_size": 4096}, "image_size"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"val_fraction": -0.1}, "val_fraction"),
    ({"seed": -1}, "seed"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict, param: str) -> None:
    with pytest.raises(ValueError, match=param):
        synthetic(**kwargs)


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"num_classes": 24.0}, "num_classes"),
    ({"seed": True}, "seed"),
    ({"val_fraction": "0.1"}, "val_fraction"),
    ({"generalized": 1}, "generalized"),
])
def test_wrong_types_raise_type_error_naming_them(kwargs: dict, param: str) -> None:
    with pytest.raises(TypeError, match=param):
        synthetic(**kwargs)


def test_render_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="class_index"):
        render(len(CLASS_NAMES), PHOTO, 0, 0, 32)
    with pytest.raises(ValueError, match="domain"):
        render(0, 2, 0, 0, 32)
    with pytest.raises(ValueError, match="size"):
        render(0, PHOTO, 0, 0, 8)
    with pytest.raises(ValueError, match="unknown synthetic class"):
        class_index("blob-ring")


def test_registered_with_a_manifest_friendly_signature() -> None:
    from zsbir.registry import protocols

    # the registry's own table: no lookup, so zsbir.components is never imported here
    assert protocols._components["synthetic"].obj is synthetic
    import typing

    params = inspect.signature(synthetic).parameters.values()
    hints = typing.get_type_hints(synthetic)  # Annotated ranges stripped: the base types
    assert all(hints[p.name] in (int, float, bool, str) for p in params)
    assert all(p.default is not inspect.Parameter.empty for p in params)
    assert isinstance(read_synthetic(make_key(0, 0, 0, 0, 16)), Image.Image)
