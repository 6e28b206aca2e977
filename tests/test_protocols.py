"""Benchmark protocols: layouts, class splits, counts, the file index and its cache.

Fixture trees are built in ``tmp_path`` with the real class names and one or two tiny real
PNG/JPEG files per class folder (encoded once, then copied).
"""

from __future__ import annotations

import io
import os
import time
import typing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import zsbir.data.layouts as layouts
from zsbir.data.base import PHOTO, SKETCH, ProtocolData
from zsbir.data.classnames import class_split, normalize, read_class_list
from zsbir.data.layouts import ProtocolError, detect_layout
from zsbir.data.protocols import (
    QUICKDRAW_LAYOUTS,
    SKETCHY_LAYOUTS,
    TUBERLIN_LAYOUTS,
    folder,
    quickdraw_ext,
    sketchy_ext,
    tuberlin_ext,
)

SHARED = Path(os.environ.get("ZSBIR_SHARED")  # as tests/conftest.py finds ../shared
              or Path(__file__).resolve().parents[1].parent / "shared")
PACKAGED = Path(layouts.__file__).parent / "splits"


def _encode(fmt: str, size: int = 8) -> bytes:
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


PNG, JPEG = _encode("PNG"), _encode("JPEG")

SKETCHY_ALL = read_class_list("sketchy_all_classes.txt")
TUB_ALL = read_class_list("tuberlin_tub-sh_train.txt") + read_class_list("tuberlin_tub-sh_test.txt")
QD_ALL = read_class_list("quickdraw_all_classes.txt")

# layout -> (dataset folder relative to the tree root, {layout dir: file extension})
_SAKE_SK = {"256x256/sketch/tx_000000000000_ready": ".png",
            "256x256/photo/tx_000000000000_ready": ".jpg", "EXTEND_image_sketchy_ready": ".jpg"}
SKETCHY_TREES = {
    "sake": ("Sketchy", _SAKE_SK),
    "zse": ("datasets/Sketchy", _SAKE_SK),
    "sempcyc": ("Sketchy", {"sketch/tx_000000000000": ".png", "photo/tx_000000000000": ".jpg",
                            "extended_photo": ".jpg"}),
}
_SAKE_TUB = {"png_ready": ".png", "ImageResized_ready": ".JPEG"}
TUB_TREES = {"sake": ("TUBerlin", _SAKE_TUB), "zse": ("datasets/TUBerlin", _SAKE_TUB),
             "sempcyc": ("TU-Berlin", {"sketches": ".png", "images": ".jpg"})}
QD_TREES = {"zse": ("datasets/QuickDraw", {"sketches": ".png", "images": ".jpg"}),
            "doodle2search": ("QuickDraw", {"QuickDraw_sketches_final": ".png",
                                            "QuickDraw_images_final": ".jpg"})}


def make_tree(base: Path, dirs: dict[str, str], classes: list[str], per_class: dict[str, int]
              | int = 1, spell: dict[str, str] | None = None, age: bool = True) -> Path:
    """Class folders under each layout dir, ``per_class`` images each; ``age`` backdates
    every directory by an hour (a dataset copied long ago)."""
    for rel, ext in dirs.items():
        n = per_class if isinstance(per_class, int) else per_class[rel]
        for c in classes:
            d = base / rel / (spell or {}).get(c, c)
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"img{i}{ext}").write_bytes(PNG if ext == ".png" else JPEG)
    if age:
        age_tree(base)
    return base


def age_tree(root: Path) -> None:
    old = time.time() - 3600
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, (old, old))


def sketchy_tree(tmp_path: Path, layout: str = "sake", **kw) -> tuple[Path, Path]:
    """(tree root, dataset folder): 2 sketches, 1 original and 1 extended photo a class."""
    sub, dirs = SKETCHY_TREES[layout]
    per = {rel: 2 if "sketch/" in rel else 1 for rel in dirs}
    make_tree(tmp_path / "data" / sub, dirs, kw.pop("classes", SKETCHY_ALL), per, **kw)
    return tmp_path / "data", tmp_path / "data" / sub


@pytest.fixture(scope="module")
def read_only_sketchy(tmp_path_factory):
    """Sketchy trees shared by the tests that do not modify them, one per layout."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(layout: str = "sake") -> tuple[Path, Path]:
        if layout not in made:
            made[layout] = sketchy_tree(tmp_path_factory.mktemp(layout), layout)
        return made[layout]

    return get


class CountCalls:
    """Counts calls of a wrapped function (installed with monkeypatch)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.fn(*a, **k)


def check_contract(d: ProtocolData) -> None:
    n_seen = len(d.seen_classes)
    assert d.seen_classes == sorted(d.seen_classes)
    assert d.unseen_classes == sorted(d.unseen_classes)
    for sp in (d.train, d.val):
        assert np.all(sp.labels < n_seen)
    assert np.all(d.query.labels >= n_seen) and np.all(d.query.domains == SKETCH)
    assert np.all(d.gallery.domains == PHOTO)
    assert not set(d.train.sources) & set(d.val.sources)
    for sp in (d.train, d.val, d.query, d.gallery):  # each path sits in its class's folder
        for src, lab in zip(sp.sources, sp.labels):
            assert normalize(Path(src).parent.name) == normalize(d.classes[lab])


# ------------------------------------------------------------------------- class lists
def test_packaged_lists_equal_the_shared_ones():
    shared = SHARED / "protocols"
    if not shared.is_dir():
        pytest.skip(f"{shared} absent (only developer machines and CI have ../shared)")
    files = sorted(p.name for p in shared.glob("*.txt"))
    assert files == sorted(p.name for p in PACKAGED.glob("*.txt"))
    for name in files:
        published = [ln.strip() for ln in (shared / name).read_text().splitlines() if ln.strip()]
        assert read_class_list(name) == published, name


@pytest.mark.parametrize("dataset,split,n_seen,n_unseen", [
    ("sketchy", "sk-sh", 100, 25), ("sketchy", "sk-sh-sempcyc", 100, 25),
    ("sketchy", "sk-ye", 104, 21), ("tuberlin", "tub-sh", 220, 30), ("quickdraw", "qd-de", 80, 30),
])
def test_class_splits(dataset, split, n_seen, n_unseen):
    cs = class_split(dataset, split)
    assert (len(cs.seen), len(cs.unseen)) == (n_seen, n_unseen)
    assert len({normalize(c) for c in cs.all}) == n_seen + n_unseen


def test_split_names_use_the_dataset_spelling():
    # the SEM-PCYC list writes jack_o_lantern, the QD-DE list palm_tree
    assert "jack-o-lantern" in class_split("sketchy", "sk-sh-sempcyc").unseen
    assert "palm tree" in class_split("quickdraw", "qd-de").unseen
    assert set(class_split("sketchy", "sk-sh").unseen) == set(
        read_class_list("sketchy_sk-sh_sake_test.txt"))


def test_normalize():
    assert normalize("teddy_bear") == normalize("teddy bear") == normalize("Teddy-Bear")
    assert normalize("car_(sedan)") == normalize("Car (sedan)")
    assert normalize("jack-o-lantern") == normalize("jack_o_lantern")
    assert normalize("tablelamp") == normalize("table lamp")
    assert normalize("bear") != normalize("beer")


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("layout", sorted(SKETCHY_TREES))
@pytest.mark.parametrize("point_at", ["parent", "dataset"])
def test_sketchy_layouts_and_counts(tmp_path, read_only_sketchy, layout, point_at):
    parent, dataset = read_only_sketchy(layout)
    root = parent if point_at == "parent" else dataset
    if point_at == "parent":
        assert detect_layout(str(root), SKETCHY_LAYOUTS, ["sketch"]).layout == layout
    d = sketchy_ext(str(root), layout=layout, val_fraction=0.5, cache_dir=str(tmp_path / "c"))
    check_contract(d)
    assert d.name == "sketchy_ext/sk-sh"
    assert d.seen_classes == sorted(read_class_list("sketchy_sk-sh_sake_train.txt"))
    assert d.unseen_classes == sorted(read_class_list("sketchy_sk-sh_sake_test.txt"))
    # per seen class: 2 sketches + 2 photos (original + extended), half of each held out
    assert (len(d.train), len(d.val), len(d.query), len(d.gallery)) == (200, 200, 50, 50)
    assert d.skipped == []
    assert np.bincount(d.train.domains).tolist() == [100, 100]
    # SAKE: both photo directories are in the gallery
    assert {Path(p).parent.parent.name for p in d.gallery.sources} == {
        Path(r).name for r, ext in SKETCHY_TREES[layout][1].items() if "sketch/" not in r}


def test_sketchy_auto_detect_and_extended_only(tmp_path, read_only_sketchy):
    parent, _ = read_only_sketchy("sempcyc")
    d = sketchy_ext(str(parent), photos="extended", val_fraction=0.0,
                    cache_dir=str(tmp_path / "c"))
    assert len(d.gallery) == 25 and len(d.val) == 0
    assert all("/extended_photo/" in p for p in d.gallery.sources)
    with pytest.raises(ProtocolError, match="no 'sake' layout found"):
        sketchy_ext(str(parent), layout="sake", cache_dir=str(tmp_path / "c"))


@pytest.mark.parametrize("split,n_seen,n_unseen", [("sk-ye", 104, 21), ("sk-sh-sempcyc", 100, 25)])
def test_sketchy_other_splits(tmp_path, read_only_sketchy, split, n_seen, n_unseen):
    parent, _ = read_only_sketchy()
    d = sketchy_ext(str(parent), split=split, val_fraction=0.5, cache_dir=str(tmp_path / "c"))
    check_contract(d)
    assert (len(d.seen_classes), len(d.unseen_classes)) == (n_seen, n_unseen)
    assert (len(d.train), len(d.query), len(d.gallery)) == (2 * n_seen, 2 * n_unseen,
                                                            2 * n_unseen)
    if split == "sk-ye":
        assert set(d.unseen_classes) == set(read_class_list("sketchy_sk-ye_test.txt"))


@pytest.mark.parametrize("layout", sorted(TUB_TREES))
def test_tuberlin_layouts(tmp_path, layout):
    sub, dirs = TUB_TREES[layout]
    make_tree(tmp_path / sub, dirs, TUB_ALL)
    d = tuberlin_ext(str(tmp_path), val_fraction=0.0, cache_dir=str(tmp_path / "c"))
    check_contract(d)
    assert (len(d.seen_classes), len(d.unseen_classes)) == (220, 30)
    assert "bottle opener" in d.unseen_classes and "frying-pan" in d.unseen_classes
    assert (len(d.train), len(d.val), len(d.query), len(d.gallery)) == (440, 0, 30, 30)
    if layout == "sake":
        assert all(p.endswith(".JPEG") for p in d.gallery.sources)


@pytest.mark.parametrize("layout", sorted(QD_TREES))
def test_quickdraw_layouts(tmp_path, layout):
    sub, dirs = QD_TREES[layout]
    spell = {"palm tree": "palm_tree"}  # ZSE-SBIR spells 'palm tree', Doodle2Search 'palm_tree'
    make_tree(tmp_path / sub, dirs, QD_ALL, spell=spell)
    d = quickdraw_ext(str(tmp_path), layout=layout, val_fraction=0.0,
                      cache_dir=str(tmp_path / "c"))
    check_contract(d)
    assert (len(d.seen_classes), len(d.unseen_classes)) == (80, 30)
    assert "palm tree" in d.unseen_classes
    assert (len(d.train), len(d.query), len(d.gallery)) == (160, 30, 30)
    assert detect_layout(str(tmp_path), QUICKDRAW_LAYOUTS, ["sketch"]).layout == layout


def test_generalized_gallery_adds_every_seen_photo(tmp_path, read_only_sketchy):
    parent, _ = read_only_sketchy()
    kw = dict(split="sk-ye", val_fraction=0.5, cache_dir=str(tmp_path / "c"))
    plain = sketchy_ext(str(parent), **kw)
    gen = sketchy_ext(str(parent), generalized=True, **kw)
    assert gen.generalized and not plain.generalized
    assert gen.query.sources == plain.query.sources
    seen_photos = [s for sp in (gen.train, gen.val) for s, dm in zip(sp.sources, sp.domains)
                   if dm == PHOTO]
    assert sorted(gen.gallery.sources) == sorted(plain.gallery.sources + seen_photos)
    assert len(gen.gallery) == 42 + 208
    assert set(np.unique(gen.gallery.labels)) == set(range(125))


def test_val_split_is_seeded_and_stable(tmp_path):
    classes = [f"class{i:02d}" for i in range(6)]
    make_tree(tmp_path / "ds", {"sketch": ".png", "photo": ".jpg"}, classes, per_class=10)
    kw = dict(unseen=["class05"], cache_dir=str(tmp_path / "c"))
    a = folder(str(tmp_path / "ds"), seed=1, **kw)
    b = folder(str(tmp_path / "ds"), seed=1, **kw)
    c = folder(str(tmp_path / "ds"), seed=2, **kw)
    assert a.val.sources == b.val.sources and a.train.sources == b.train.sources
    assert a.val.sources != c.val.sources
    assert len(a.val) == 5 * 2 * 1 and len(a.train) == 5 * 2 * 9  # 10% of each (class, domain)
    # a class's validation images do not depend on the other classes of the split
    d = folder(str(tmp_path / "ds"), seed=1, unseen=["class04", "class05"],
               cache_dir=str(tmp_path / "c"))
    assert [s for s in a.val.sources if "/class00/" in s] == [
        s for s in d.val.sources if "/class00/" in s]


def test_folder_names_are_normalized_and_displayed_as_listed(tmp_path):
    spell = {"teddy_bear": "Teddy Bear", "wine_bottle": "wine-bottle",
             "jack-o-lantern": "jack_o_lantern", "car_(sedan)": "car (sedan)"}
    parent, _ = sketchy_tree(tmp_path, spell=spell)
    d = sketchy_ext(str(parent), cache_dir=str(tmp_path / "c"))
    check_contract(d)
    assert "teddy_bear" in d.unseen_classes and "car_(sedan)" in d.seen_classes
    assert any("/Teddy Bear/" in p for p in d.query.sources)


# ------------------------------------------------------------------------------ errors
def test_error_lists_every_problem(tmp_path):
    parent, dataset = sketchy_tree(tmp_path)
    sketches = dataset / "256x256/sketch/tx_000000000000_ready"
    for c in ("teddy_bear", "wine_bottle"):
        for f in (sketches / c).iterdir():
            f.unlink()
        (sketches / c).rmdir()
    (sketches / "teddy").mkdir()
    (sketches / "stray_folder").mkdir()
    (sketches / "Cup").mkdir()  # a second folder for class 'cup'
    for f in (dataset / "EXTEND_image_sketchy_ready" / "cup").iterdir():
        f.unlink()
    with pytest.raises(ProtocolError) as err:
        sketchy_ext(str(parent), cache_dir=str(tmp_path / "c"))
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert str(parent) in msg
    for expected in ("missing classes (2): 'teddy_bear', 'wine_bottle'", "'cup'",
                     "'teddy' (closest missing class: 'teddy_bear')", "'stray_folder'",
                     "EXTEND_image_sketchy_ready (photo_extended)",
                     "several folders for one class (1): 'Cup', 'cup' (class 'cup')"):
        assert expected in msg


def test_no_layout_found(tmp_path):
    with pytest.raises(ProtocolError, match="is not a directory"):
        tuberlin_ext(str(tmp_path / "nowhere"))
    (tmp_path / "TUBerlin" / "png_ready" / "cat").mkdir(parents=True)
    with pytest.raises(ProtocolError) as err:
        tuberlin_ext(str(tmp_path), cache_dir=str(tmp_path / "c"))
    msg = str(err.value)
    assert "partial matches" in msg and "ImageResized_ready" in msg
    assert "sempcyc: sketches/<class>/, images/<class>/" in msg


def test_stray_folder_alone_is_reported_not_fatal(tmp_path):
    sub, dirs = QD_TREES["zse"]
    make_tree(tmp_path / sub, dirs, QD_ALL)
    (tmp_path / sub / "images" / "not_a_class").mkdir()
    with pytest.warns(UserWarning, match="not_a_class"):
        d = quickdraw_ext(str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert [r for p, r in d.skipped if p.endswith("not_a_class")] == [
        "folder matches no class of quickdraw_ext (split 'qd-de')"]


# ------------------------------------------------------------------------ index, cache
def test_cache_hit_does_not_rewalk(tmp_path, monkeypatch, read_only_sketchy):
    parent, _ = read_only_sketchy()
    cache = tmp_path / "c"
    first = sketchy_ext(str(parent), cache_dir=str(cache))
    assert len(list((cache / "index").glob("*.json"))) == 1
    scandir = CountCalls(os.scandir)
    monkeypatch.setattr(os, "scandir", scandir)
    second = sketchy_ext(str(parent), cache_dir=str(cache))
    assert scandir.calls == 0
    assert second.train.sources == first.train.sources
    assert second.gallery.sources == first.gallery.sources
    # another split of the same tree shares the index
    sketchy_ext(str(parent), split="sk-ye", cache_dir=str(cache))
    assert scandir.calls == 0


def test_cache_invalidated_by_a_new_file(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "ds", {"sketch": ".png", "photo": ".jpg"}, ["a", "b", "c"])
    kw = dict(unseen=["c"], cache_dir=str(tmp_path / "cache"))
    before = folder(str(root), **kw)
    new = root / "sketch/c/new.png"
    new.write_bytes(PNG)
    scandir = CountCalls(os.scandir)
    monkeypatch.setattr(os, "scandir", scandir)
    after = folder(str(root), **kw)
    assert scandir.calls > 0
    assert str(new) in after.query.sources and len(after.query) == len(before.query) + 1


def test_cache_invalidated_by_a_removed_class_folder(tmp_path):
    root = make_tree(tmp_path / "ds", {"sketch": ".png", "photo": ".jpg"}, ["a", "b", "c"])
    kw = dict(unseen=["c"], cache_dir=str(tmp_path / "cache"))
    folder(str(root), **kw)
    (root / "photo/b/img0.jpg").unlink()
    (root / "photo/b").rmdir()
    with pytest.raises(ProtocolError, match=r"missing classes \(1\): 'b'"):
        folder(str(root), **kw)


def test_racy_index_is_rebuilt_once(tmp_path, monkeypatch):
    classes = ["a", "b", "c"]
    root = make_tree(tmp_path / "ds", {"sketch": ".png", "photo": ".jpg"}, classes, age=False)
    kw = dict(unseen=["c"], cache_dir=str(tmp_path / "cache"))
    folder(str(root), **kw)
    scandir = CountCalls(os.scandir)
    monkeypatch.setattr(os, "scandir", scandir)
    folder(str(root), **kw)  # directories changed within the racy window: not trusted
    assert scandir.calls > 0
    age_tree(root)  # later: the tree has settled (mtimes changed, so one more walk)
    folder(str(root), **kw)
    calls = scandir.calls
    folder(str(root), **kw)
    assert scandir.calls == calls


def test_zero_byte_and_corrupt_images(tmp_path, monkeypatch):
    classes = ["a", "b", "c"]
    root = make_tree(tmp_path / "ds", {"sketch": ".png", "photo": ".jpg"}, classes,
                     per_class=2, age=False)
    empty = root / "sketch/a/empty.png"
    empty.write_bytes(b"")
    garbage = root / "photo/a/garbage.jpg"
    garbage.write_bytes(b"this is not an image")
    truncated = root / "photo/c/truncated.JPG"
    truncated.write_bytes(_encode("JPEG", 64)[:400])
    (root / "sketch/b/notes.txt").write_text("ignored: not an image extension")
    age_tree(root)
    kw = dict(unseen=["c"], val_fraction=0.0, cache_dir=str(tmp_path / "cache"))

    d = folder(str(root), **kw)
    notes = str(root / "sketch/b/notes.txt")  # listed too: every file left out has a reason
    assert dict(d.skipped) == {str(empty): "zero-byte file",
                               notes: dict(d.skipped)[notes]}
    assert dict(d.skipped)[notes].startswith("not an image file name (.txt")
    assert str(garbage) in d.train.sources and str(truncated) in d.gallery.sources
    assert str(empty) not in d.train.sources

    v = folder(str(root), verify_images=True, **kw)
    reasons = dict(v.skipped)
    assert reasons[str(empty)] == "zero-byte file"
    assert reasons[str(garbage)].startswith("cannot decode: UnidentifiedImageError")
    assert "truncated" in reasons[str(truncated)].lower()
    assert str(garbage) not in v.train.sources and str(truncated) not in v.gallery.sources
    assert len(v.train) == len(d.train) - 1 and len(v.gallery) == len(d.gallery) - 1

    # the decode results are cached with the index: no walk, no decode
    scandir, decode = CountCalls(os.scandir), CountCalls(layouts.read_image_file)
    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(layouts, "read_image_file", decode)
    again = folder(str(root), verify_images=True, **kw)
    assert (scandir.calls, decode.calls) == (0, 0) and again.skipped == v.skipped
    # ... and a repaired file is noticed although its directory did not change
    garbage.write_bytes(JPEG)
    fixed = folder(str(root), verify_images=True, **kw)
    assert str(garbage) in fixed.train.sources


# ------------------------------------------------------------------------ folder protocol
def test_folder_protocol_unseen_given_three_ways(tmp_path):
    classes = [f"c{i}" for i in range(8)]
    root = make_tree(tmp_path / "ds", {"sketches": ".png", "images": ".jpg"}, classes)
    kw = dict(cache_dir=str(tmp_path / "cache"), val_fraction=0.0)
    by_list = folder(str(root), unseen=["C 1", "c3"], **kw)  # names normalized
    (tmp_path / "unseen.txt").write_text("# held out\nc1\n\nc3\n")
    by_file = folder(str(root), unseen_file=str(tmp_path / "unseen.txt"), **kw)
    for d in (by_list, by_file):
        check_contract(d)
        assert d.unseen_classes == ["c1", "c3"] and len(d.seen_classes) == 6
        assert (len(d.train), len(d.query), len(d.gallery)) == (12, 2, 2)
    drawn = folder(str(root), num_unseen=3, seed=7, **kw)
    expected = sorted(np.random.default_rng(7).choice(sorted(classes), 3, replace=False))
    assert drawn.unseen_classes == expected
    assert drawn.seen_classes == sorted(set(classes) - set(expected))

    with pytest.raises(ProtocolError, match="exactly one of"):
        folder(str(root), unseen=["c1"], num_unseen=2, **kw)
    with pytest.raises(ProtocolError, match="exactly one of"):
        folder(str(root), **kw)
    with pytest.raises(ProtocolError, match=r"'c9' \(closest: 'c0'\)|c9"):
        folder(str(root), unseen=["c1", "c9"], **kw)
    with pytest.raises(ProtocolError, match="num_unseen must be in 1..7"):
        folder(str(root), num_unseen=8, **kw)


def test_folder_class_without_photos(tmp_path):
    root = make_tree(tmp_path / "ds", {"sketch": ".png", "photo": ".jpg"}, ["a", "b", "c"])
    (root / "sketch" / "d").mkdir()
    (root / "sketch" / "d" / "x.png").write_bytes(PNG)
    with pytest.raises(ProtocolError, match=r"photo \(photo\):\n    missing classes \(1\): 'd'"):
        folder(str(root), unseen=["a"], cache_dir=str(tmp_path / "cache"))


def test_folder_reads_sketchy_mini_seen(tmp_path):
    root = SHARED / "data" / "sketchy-mini-seen"
    if not root.is_dir():
        pytest.skip(f"{root} absent (only developer machines and CI have ../shared)")
    d = folder(str(root), num_unseen=20, seed=0, cache_dir=str(tmp_path / "cache"))
    check_contract(d)
    assert (len(d.seen_classes), len(d.unseen_classes)) == (84, 20)
    # 25 sketches + 25 photos a class; val takes round(2.5) = 3 of each seen (class, domain)
    assert d.summary() == {"seen_classes": 84, "unseen_classes": 20, "train": 84 * 44,
                           "val": 84 * 6, "query": 500, "gallery": 500, "skipped_files": 0}
    seen_ye = set(SKETCHY_ALL) - set(read_class_list("sketchy_sk-ye_test.txt"))
    assert set(d.classes) == seen_ye
    again = folder(str(root), num_unseen=20, seed=0, cache_dir=str(tmp_path / "cache"))
    assert again.unseen_classes == d.unseen_classes and again.val.sources == d.val.sources


# ------------------------------------------------------------------------- registration
@pytest.mark.parametrize("fn", [sketchy_ext, tuberlin_ext, quickdraw_ext, folder])
def test_signatures_are_manifest_friendly(fn):
    from zsbir.registry import protocols

    assert protocols._components[fn.__name__].obj is fn
    hints = typing.get_type_hints(fn)
    allowed = {bool, int, float, str, list[str], str | None, list[str] | None, int | None}
    for name, param in __import__("inspect").signature(fn).parameters.items():
        assert param.kind is param.POSITIONAL_OR_KEYWORD
        if name == "ctx":
            continue
        hint = hints[name]
        assert hint in allowed or typing.get_origin(hint) is typing.Literal, (name, hint)
        assert name == "root" or param.default is not param.empty
    assert fn.__doc__ and "Args:" in fn.__doc__


def test_layout_tables_cover_every_literal():
    for fn, table in ((sketchy_ext, SKETCHY_LAYOUTS), (tuberlin_ext, TUBERLIN_LAYOUTS),
                      (quickdraw_ext, QUICKDRAW_LAYOUTS)):
        choices = typing.get_args(typing.get_type_hints(fn)["layout"])
        assert set(choices) == {"auto"} | {lay.name for lay in table}
