"""``zsbir data check`` (issue 27, point 4) and the same check at the start of ``zsbir run``.

Trees are generated in ``tmp_path`` with the helpers of ``tests/test_protocols.py`` (the
real class names, tiny real images), one per supported layout; the real
``../shared/data/sketchy-mini-seen`` is read when present (``shared_dir``).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from zsbir.cli import main
from zsbir.data.check import PUBLISHED_DIRS, SCHEMA, check_dataset, find_duplicates
from zsbir.data.classnames import read_class_list

_spec = importlib.util.spec_from_file_location(
    "_zsbir_test_protocols", Path(__file__).with_name("test_protocols.py"))
tp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tp)

TREES = {"sketchy_ext": tp.SKETCHY_TREES, "tuberlin_ext": tp.TUB_TREES,
         "quickdraw_ext": tp.QD_TREES}
CLASSES = {"sketchy_ext": tp.SKETCHY_ALL, "tuberlin_ext": tp.TUB_ALL,
           "quickdraw_ext": tp.QD_ALL}
CASES = [(p, lay) for p, trees in TREES.items() for lay in trees]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def png(seed: int) -> bytes:
    """A small PNG whose bytes differ for every seed."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def distinct_tree(root: Path, classes: list[str], per_class: int = 2) -> Path:
    """``root/{sketch,photo}/<class>/`` with distinct images (no duplicates)."""
    seed = 0
    for domain in ("sketch", "photo"):
        for c in classes:
            (root / domain / c).mkdir(parents=True)
            for i in range(per_class):
                seed += 1
                (root / domain / c / f"{i}.png").write_bytes(png(seed))
    tp.age_tree(root)
    return root


@pytest.fixture(scope="module")
def benchmark_tree(tmp_path_factory):
    """(protocol, layout) -> the root of a complete tree, built once per module."""
    made: dict[tuple[str, str], Path] = {}

    def get(protocol: str, layout: str) -> Path:
        if (protocol, layout) not in made:
            base = tmp_path_factory.mktemp(f"{protocol}-{layout}")
            sub, dirs = TREES[protocol][layout]
            tp.make_tree(base / sub, dirs, CLASSES[protocol])
            made[protocol, layout] = base
        return made[protocol, layout]

    return get


@pytest.mark.parametrize("protocol,layout", CASES)
def test_every_layout_is_recognized_and_split_as_the_protocol_does(protocol, layout,
                                                                   benchmark_tree):
    from zsbir.registry import protocols

    root = benchmark_tree(protocol, layout)
    r = check_dataset(str(root), protocol, duplicates=False)
    assert r.ok, r.text()
    assert r.layout["name"] == layout
    assert all(not c["missing"] and not c["extra"] for c in r.classes["by_role"].values())
    assert r.classes["expected"] == len(CLASSES[protocol])
    data = protocols.get(protocol)(str(root))  # the run's own split, same parameters
    assert r.split == {k: v for k, v in data.summary().items() if k != "skipped_files"}
    # one image a class folder: far from the published sizes, each named with its source
    for role, c in r.counts["by_role"].items():
        assert c["files"] == len(CLASSES[protocol])
        if role in PUBLISHED_DIRS.get(protocol, {}):
            assert c["published"] == PUBLISHED_DIRS[protocol][role][0] and c["source"]
            assert any(w.startswith(f"{role}: {c['files']:,} images where the published")
                       for w in r.warnings)
    assert any(w.startswith("split query:") for w in r.warnings)  # the test-list sizes
    assert f"layout: {layout} at" in r.text()


def test_folder_layout_and_real_protocol_parameters(tmp_path):
    root = distinct_tree(tmp_path / "ds", ["a", "b", "c", "d"])
    res = invoke("data", "check", str(root), "--protocol", "folder", "--set", 'unseen=["d"]',
                 "--set", "val_fraction=0.5")
    assert res.exit_code == 0, res.output
    assert "layout: folder at" in res.output
    assert ("split: 3 seen / 1 unseen classes; train 6, val 6, query 2, gallery 2 images"
            in res.output)
    assert "files duplicated across classes: 0 group(s)" in res.output
    assert res.output.rstrip().endswith("result: ok: the data can serve the protocol")
    # no unseen classes given: the protocol's own refusal is the problem
    res = invoke("data", "check", str(root), "--protocol", "folder")
    assert res.exit_code == 1 and "give exactly one of unseen" in res.output


def test_misspelled_missing_and_extra_classes(tmp_path):
    base = tmp_path / "data"
    sub, dirs = tp.SKETCHY_TREES["sempcyc"]
    tp.make_tree(base / sub, dirs, tp.SKETCHY_ALL,
                 spell={"cup": "cup (with handle)", "teddy_bear": "tedy bear"}, age=False)
    (base / sub / "sketch/tx_000000000000/zzz notes").mkdir()
    tp.age_tree(base)
    r = check_dataset(str(base), "sketchy_ext", duplicates=False)
    assert not r.ok and r.split is None
    sk = r.classes["by_role"]["sketch"]
    assert sk["missing"] == ["cup", "teddy_bear"]
    assert sk["extra"] == ["cup (with handle)", "tedy bear", "zzz notes"]
    assert sk["suggestions"] == [{"folder": "cup (with handle)", "class": "cup"},
                                 {"folder": "tedy bear", "class": "teddy_bear"}]
    assert r.classes["by_role"]["photo_extended"]["missing"] == ["cup", "teddy_bear"]
    text = r.text()
    assert "  'cup (with handle)' looks like class 'cup'" in text
    assert "problem: sketch: 2 of the protocol's 125 classes have no folder" in text
    res = invoke("data", "check", str(base), "--protocol", "sketchy_ext", "--json")
    assert res.exit_code == 1 and json.loads(res.stdout)["ok"] is False  # pure JSON
    assert res.stderr.startswith("error: the data under") and "(3 problems" in res.stderr


def test_zero_byte_unreadable_and_duplicated_files(tmp_path):
    root = distinct_tree(tmp_path / "ds", ["a", "b", "c"])
    (root / "sketch/a/empty.png").write_bytes(b"")
    (root / "photo/b/garbage.png").write_bytes(b"not an image at all")
    os.symlink(root / "nowhere.png", root / "photo/c/broken.png")
    (root / "photo/c/copy.png").write_bytes((root / "photo/a/0.png").read_bytes())
    (root / "photo/a/same-class-copy.png").write_bytes((root / "photo/a/1.png").read_bytes())
    tp.age_tree(root)
    r = check_dataset(str(root), "folder", {"unseen": ["c"]})
    assert r.ok, r.text()  # left out and reported, but the protocol can still be served
    bad = {b["path"]: (b["kind"], b["reason"]) for b in r.bad_files}
    assert bad[str(root / "sketch/a/empty.png")] == ("zero-byte", "zero-byte file")
    assert bad[str(root / "photo/b/garbage.png")][0] == "unreadable"
    assert bad[str(root / "photo/b/garbage.png")][1].startswith("cannot decode")
    assert bad[str(root / "photo/c/broken.png")][0] == "unreadable"
    groups = r.duplicates["groups"]  # across classes only: the same-class copy is not one
    assert [[f["path"] for f in g["files"]] for g in groups] == [
        [str(root / "photo/a/0.png"), str(root / "photo/c/copy.png")]]
    assert [f["class"] for f in groups[0]["files"]] == ["a", "c"]
    assert "3 image file(s) zero-byte or unreadable" in " ".join(r.warnings)
    text = r.text()
    assert f"  {root / 'sketch/a/empty.png'}: zero-byte file" in text
    # without decoding, the garbage file passes (and the split counts it)
    quick = check_dataset(str(root), "folder", {"unseen": ["c"]}, decode=False,
                          duplicates=False)
    assert str(root / "photo/b/garbage.png") not in {b["path"] for b in quick.bad_files}
    assert not quick.duplicates["checked"] and "(images not decoded)" not in quick.text()
    # --strict: warnings fail the check
    args = ("data", "check", str(root), "--protocol", "folder", "--set", 'unseen=["c"]')
    assert invoke(*args).exit_code == 0
    assert invoke(*args, "--strict").exit_code == 1


def test_find_duplicates_hashes_only_shared_sizes(tmp_path, monkeypatch):
    import zsbir.data.check as check

    files = []
    for i, (cls, data) in enumerate([("a", b"x" * 10), ("b", b"x" * 10), ("a", b"y" * 11),
                                     ("b", b"z" * 12), ("b", b"w" * 10)]):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(data)
        files.append((str(p), cls))
    hashed: list[tuple[str, int | None]] = []
    real = check._digest
    monkeypatch.setattr(check, "_digest", lambda p, n=None: hashed.append((p, n)) or real(p, n))
    groups = find_duplicates(files)
    path = [f for f, _ in files]
    # size 10 is shared across classes by 0, 1, 4: their heads are read; 4's head differs,
    # so only 0 and 1 are read whole; 2 and 3 have sizes of their own: never read
    assert sorted(hashed, key=str) == sorted([(path[0], check._HEAD), (path[1], check._HEAD),
                                              (path[4], check._HEAD), (path[0], None),
                                              (path[1], None)], key=str)
    assert [[f["path"] for f in g["files"]] for g in groups] == [[files[0][0], files[1][0]]]


def test_json_schema_and_exit_codes(tmp_path, benchmark_tree):
    root = benchmark_tree("tuberlin_ext", "sake")
    res = invoke("data", "check", str(root), "--protocol", "tuberlin_ext", "--json",
                 "--no-duplicates")
    assert res.exit_code == 0
    doc = json.loads(res.output)
    assert doc["schema"] == SCHEMA and doc["ok"] is True
    assert set(doc) == {"schema", "ok", "root", "protocol", "params", "layout", "classes",
                        "counts", "bad_files", "duplicates", "split", "problems",
                        "warnings", "decoded", "protocol_error"}
    assert set(doc["layout"]) == {"name", "base", "dirs"}
    assert set(doc["classes"]["by_role"]["sketch"]) == {"found", "matched", "missing",
                                                        "extra", "suggestions"}
    assert set(doc["counts"]["by_role"]["photo"]) == {"domain", "files", "published",
                                                      "source"}
    assert doc["counts"]["by_domain"] == {"sketch": 250, "photo": 250}
    assert set(doc["split"]) == {"seen_classes", "unseen_classes", "train", "val", "query",
                                 "gallery"}
    assert doc["split"]["unseen_classes"] == 30 and doc["params"]["split"] == "tub-sh"
    # 1: no layout; 2: a bad parameter, an unknown protocol, a root that is not there;
    # never a traceback
    empty = tmp_path / "empty"
    empty.mkdir()
    res = invoke("data", "check", str(empty), "--protocol", "quickdraw_ext")
    assert res.exit_code == 1 and "no known layout found" in res.output
    for args, code in [(("--protocol", "tuberlin_ext", "--set", "split=nope"), 2),
                       (("--protocol", "synthetic"), 2),
                       (("--protocol", "tuberlin_ext", "--set", "val_fraction=2.0"), 2)]:
        res = CliRunner().invoke(main, ["data", "check", str(root), *args])
        assert res.exit_code == code, (args, res.output)
        assert "Traceback" not in res.output and res.exception is None or \
            isinstance(res.exception, SystemExit)
    res = CliRunner().invoke(main, ["data", "check", str(tmp_path / "absent"), "--protocol",
                                    "folder", "--set", "num_unseen=1"])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit)


def test_run_stops_with_the_same_report(tmp_path):
    root = distinct_tree(tmp_path / "ds", ["cat", "dog", "fish"])
    (root / "photo/fish").rename(root / "photo/fishes")
    tp.age_tree(root)
    manifest = tmp_path / "m.toml"
    manifest.write_text(f"""
[run]
name = "x"
output_dir = "{tmp_path / 'runs'}"
[protocol]
name = "folder"
root = "{root}"
unseen = ["dog"]
[backbone]
name = "resnet18"
pretrained = false
[model.head]
name = "stacked"
embed_dim = 8
[[losses]]
name = "ce"
""")
    res = CliRunner().invoke(main, ["run", str(manifest)])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    check = invoke("data", "check", str(root), "--protocol", "folder", "--set",
                   'unseen=["dog"]', "--no-decode", "--no-duplicates")
    assert check.exit_code == 1
    report = check.stdout.strip().splitlines()
    assert "missing classes (1): 'fishes'" in res.output  # the protocol's own error first
    for line in report:  # then the report data check prints, line for line
        assert line in res.output
    assert "  'fishes' looks like class 'fish'" in report


def test_real_sketchy_mini_seen(shared_dir, tmp_path):
    src = shared_dir / "data" / "sketchy-mini-seen"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    r = check_dataset(str(src), "folder", {"num_unseen": 20, "seed": 0})
    assert r.ok and r.decoded and not r.bad_files, r.text()
    assert r.counts["by_domain"] == {"sketch": 2600, "photo": 2600}
    assert r.duplicates == {"checked": True, "groups": []}
    assert r.split == {"seen_classes": 84, "unseen_classes": 20, "train": 84 * 44,
                       "val": 84 * 6, "query": 500, "gallery": 500}
    # the same files in SEM-PCYC's Sketchy layout: the 21 SK-YE unseen classes are withheld
    sk = tmp_path / "Sketchy"
    for rel, target in (("sketch/tx_000000000000", "sketch"), ("photo/tx_000000000000",
                        "photo"), ("extended_photo", "photo")):
        (sk / rel).parent.mkdir(parents=True, exist_ok=True)
        (sk / rel).symlink_to(src / target)
    r = check_dataset(str(tmp_path), "sketchy_ext", {"split": "sk-ye"}, decode=False,
                      duplicates=False)
    assert r.layout["name"] == "sempcyc" and not r.ok
    unseen = read_class_list("sketchy_sk-ye_test.txt")
    for role in ("sketch", "photo", "photo_extended"):
        assert sorted(r.classes["by_role"][role]["missing"]) == sorted(unseen)
    assert r.counts["by_role"]["sketch"]["files"] == 2600
    assert any("2,600 images where the published dataset has 75,471" in w
               for w in r.warnings)


def test_long_lists_are_cut_in_the_text_report_only():
    from zsbir.data.check import CheckReport

    r = CheckReport("/d", "folder", {}, layout={"name": "folder", "base": "/d", "dirs": {}},
                    bad_files=[{"path": f"/d/{i}.png", "reason": "zero-byte file",
                                "kind": "zero-byte"} for i in range(60)])
    assert "  ... and 10 more (all listed by --json)" in r.text()
    assert "/d/49.png" in r.text() and "/d/50.png" not in r.text()
    assert len(r.to_dict()["bad_files"]) == 60
