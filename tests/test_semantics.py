"""SAKE's WordNet semantic matrix A (Liu et al., ICCV 2019, Sec. 3.4; q = softmax(lambda1 t
+ lambda2 a_y)): WordNet set up offline from the Debian packages, class resolution, path
similarities, the on-disk cache. CI installs wordnet-base + wordnet-sense-index
(.ci/setup_wordnet.sh), so these run there; they skip only when no WordNet is found."""

from __future__ import annotations

import json
import random
from pathlib import Path

import nltk
import pytest
import torch

import zsbir
from zsbir import semantics as sem
from zsbir.semantics import similarity, wordnet

TABBY, AIRLINER, LABRADOR, BANANA = "n02123045", "n02690373", "n02099712", "n07753592"


@pytest.fixture(scope="session")
def wn_cache(tmp_path_factory) -> Path:
    """A zsbir cache with WordNet set up (built from the Debian files when needed)."""
    cache = tmp_path_factory.mktemp("wordnet-cache")
    try:
        sem.ensure_wordnet(cache)
    except sem.WordNetNotFoundError as exc:
        pytest.skip(f"WordNet cannot be found on this machine: {exc}")
    return cache


@pytest.fixture(scope="session")
def wn(wn_cache):
    return sem.load_wordnet(wn_cache)


def _index(wnid: str) -> int:
    return sem.imagenet_wnids().index(wnid)


def test_imagenet_wnids_in_class_index_order():
    wnids = sem.imagenet_wnids()
    assert len(wnids) == 1000 == len(set(wnids))
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"  # tench, toilet tissue
    assert wnids.index(TABBY) == 281 and wnids.index(AIRLINER) == 404


def test_imagenet_wnids_map_to_synsets(wn):
    first, last = (wn.synset_from_pos_and_offset("n", int(w[1:]))
                   for w in (sem.imagenet_wnids()[0], sem.imagenet_wnids()[-1]))
    assert first.name() == "tench.n.01" and last.name() == "toilet_tissue.n.01"


def test_layout_built_from_debian_files_loads_in_nltk(tmp_path, monkeypatch):
    source, _ = wordnet._find_system_wordnet()
    if source is None:
        pytest.skip("no WordNet database files (apt-get install wordnet-base "
                    "wordnet-sense-index)")
    monkeypatch.setattr(nltk.data, "path", [])  # hide any other WordNet
    root = sem.ensure_wordnet(tmp_path)
    assert root == tmp_path / "nltk_data" / "corpora" / "wordnet"
    assert str(tmp_path / "nltk_data") in nltk.data.path
    assert Path(nltk.data.find("corpora/wordnet").path) == root
    lexnames = (root / "lexnames").read_text().splitlines()
    assert len(lexnames) == 45
    assert lexnames[0] == "00\tadj.all\t3" and lexnames[5] == "05\tnoun.animal\t1"
    assert lexnames[44] == "44\tadj.ppl\t3"
    assert not any(p.is_symlink() for p in root.iterdir())  # nltk refuses escaping links
    reader = sem.load_wordnet(tmp_path)
    assert Path(reader.root.path) == root
    assert reader.get_version() == "3.0"
    dog = reader.synset("dog.n.01")
    assert dog.lexname() == "noun.animal"  # read through lexnames
    assert reader.synset_from_pos_and_offset("n", int(TABBY[1:])).name() == "tabby.n.01"
    assert sem.build_wordnet_layout(tmp_path / "nltk_data") == root  # idempotent


def test_incomplete_layout_is_rebuilt(tmp_path):
    source, _ = wordnet._find_system_wordnet()
    if source is None:
        pytest.skip("no WordNet database files (apt-get install wordnet-base "
                    "wordnet-sense-index)")
    root = tmp_path / "corpora" / "wordnet"
    root.mkdir(parents=True)
    (root / "data.noun").write_text("left over from an interrupted build")
    assert sem.build_wordnet_layout(tmp_path, source) == root
    assert (root / "data.noun").stat().st_size > 10**6 and (root / "lexnames").is_file()
    assert not list(tmp_path.glob("corpora/.wordnet-*"))  # no temporary left behind


def test_no_wordnet_anywhere_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.setattr(wordnet, "_SYSTEM_DIRS", (str(tmp_path / "nothing"),))
    monkeypatch.delenv("WNSEARCHDIR", raising=False)
    monkeypatch.delenv("WNHOME", raising=False)
    with pytest.raises(sem.WordNetNotFoundError) as info:
        sem.ensure_wordnet(tmp_path / "cache")
    msg = str(info.value)
    assert "apt-get install wordnet-base wordnet-sense-index" in msg
    assert "python -m nltk.downloader wordnet" in msg and "NLTK_DATA" in msg


def test_missing_sense_index_names_the_package(tmp_path, monkeypatch):
    fake = tmp_path / "dict"
    fake.mkdir()
    for name in ("data.noun", "data.adj", "index.noun"):
        (fake / name).write_text("")
    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.setenv("WNSEARCHDIR", str(fake))
    monkeypatch.setattr(wordnet, "_SYSTEM_DIRS", ())
    with pytest.raises(sem.WordNetNotFoundError, match="wordnet-sense-index"):
        sem.ensure_wordnet(tmp_path / "cache")


def test_normalize_class_name():
    for name in ("teddy_bear", "teddy bear", "Teddy-Bear", " teddy  -bear "):
        assert sem.normalize_class_name(name) == "teddy_bear"
    assert sem.normalize_class_name("car (sedan)") == "car_(sedan)"
    assert sem.normalize_class_name("car_(sedan)") == "car_(sedan)"


def test_builtin_table_is_valid(wn):
    for key, synset in sem.BUILTIN_SYNSETS.items():
        assert sem.normalize_class_name(key) == key
        assert wn.synset(synset).pos() == "n", key


@pytest.mark.parametrize("name, synset", [
    ("teddy-bear", "teddy.n.01"), ("teddy_bear", "teddy.n.01"), ("Teddy Bear", "teddy.n.01"),
    ("flying saucer", "unidentified_flying_object.n.01"), ("potted plant", "pot_plant.n.01"),
    ("person walking", "person.n.01"), ("person sitting", "person.n.01"),
    ("outlet", "wall_socket.n.01"), ("power outlet", "wall_socket.n.01"),
    ("human-skeleton", "skeletal_system.n.01"), ("present", "present.n.02"),
    ("flower with stem", "flower.n.01"), ("crane (machine)", "crane.n.04"),
    ("car_(sedan)", "sedan.n.01"), ("mouse (animal)", "mouse.n.01"),
    ("tiger", "tiger.n.02"), ("seal", "seal.n.09"), ("hedgehog", "hedgehog.n.02"),
    # no override: spellings WordNet knows once the separators vary
    ("hot-air_balloon", "hot-air_balloon.n.01"), ("ice-cream-cone", "ice-cream_cone.n.01"),
    ("walkie talkie", "walkie-talkie.n.01"), ("wrist-watch", "wristwatch.n.01"),
    ("dog", "dog.n.01"), ("cat", "cat.n.01"),
])
def test_class_resolution(wn_cache, name, synset):
    assert sem.resolve_synsets([name], cache_dir=wn_cache)[name][0] == [synset]


def test_skeleton_is_the_body_structure(wn):
    assert "bones" in wn.synset(sem.BUILTIN_SYNSETS["human_skeleton"]).definition()


def test_qualifier_picks_the_sense(wn_cache):
    # not in the built-in table: the head word's sense nearest to the qualifier
    got = sem.resolve_synsets(["bat (animal)", "mouse (computer)"], cache_dir=wn_cache)
    assert got["bat (animal)"] == (["bat.n.01"], "head + qualifier")
    assert got["mouse (computer)"][0] == ["mouse.n.04"]


def test_benchmark_class_lists_resolve():
    """Every Sketchy / TU-Berlin / QuickDraw class has a synset except 'sponge bob'."""
    splits = Path(zsbir.__file__).parent / "data" / "splits"
    if not splits.is_dir():
        pytest.skip(f"no packaged class lists in {splits}")
    names = sorted({n.strip() for f in splits.glob("*.txt") for n in f.read_text().splitlines()
                    if n.strip() and not n.startswith("#")})
    assert len(names) > 250
    try:
        resolved = sem.resolve_synsets(names)
    except sem.WordNetNotFoundError as exc:
        pytest.skip(f"WordNet cannot be found on this machine: {exc}")
    assert [n for n, (syns, _) in resolved.items() if not syns] == ["sponge bob"]


def test_known_pairs(wn_cache):
    a = sem.semantic_matrix(["cat", "dog", "airplane", "banana"], cache_dir=wn_cache)
    cat, dog, plane, banana = a
    assert cat[_index(TABBY)] > cat[_index(AIRLINER)]
    assert cat[_index(TABBY)] == pytest.approx(1 / 3)  # cat -> domestic_cat -> tabby
    # dog -> hunting dog -> sporting dog -> retriever -> Labrador: 1 / (1 + 4)
    assert dog[_index(LABRADOR)] == pytest.approx(0.2)
    assert dog[_index(LABRADOR)] > dog[_index(AIRLINER)]
    assert plane[_index(AIRLINER)] > plane[_index(TABBY)]
    assert banana[_index(BANANA)] == 1.0  # the built-in fruit sense is the ImageNet class


def test_shape_range_and_agreement_with_nltk(wn_cache, wn):
    names = ["cat", "dog", "teddy-bear", "hot-dog", "windmill", "eiffel tower"]
    a = sem.semantic_matrix(names, cache_dir=wn_cache)
    assert a.shape == (len(names), 1000) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0 and bool((a > 0).all())
    resolved = sem.resolve_synsets(names, cache_dir=wn_cache)
    rng = random.Random(0)
    for i, name in enumerate(names):
        syn = wn.synset(resolved[name][0][0])
        for j in rng.sample(range(1000), 25):
            target = wn.synset_from_pos_and_offset("n", int(sem.imagenet_wnids()[j][1:]))
            assert float(a[i, j]) == pytest.approx(syn.path_similarity(target), abs=1e-6)


def test_sake_code_variant(wn_cache):
    a = sem.semantic_matrix(["dog"], cache_dir=wn_cache, similarity="sake")[0]
    assert a[_index(LABRADOR)] == 1.0  # a hyponym of dog.n.01
    assert bool(((a == 0) | (a > 0.2)).all())
    with pytest.raises(ValueError, match="similarity"):
        sem.semantic_matrix(["dog"], cache_dir=wn_cache, similarity="lch")


def test_unknown_class_zero_row_and_one_warning(wn_cache):
    names = ["cat", "qwxzv blorp", "sponge bob"]
    with pytest.warns(UserWarning) as record:
        a = sem.semantic_matrix(names, cache_dir=wn_cache)
    ours = [w for w in record if "no WordNet synset" in str(w.message)]
    assert len(ours) == 1
    assert "'qwxzv blorp'" in str(ours[0].message) and "'sponge bob'" in str(ours[0].message)
    assert "'cat'" not in str(ours[0].message)
    assert float(a[0].sum()) > 0 and float(a[1].abs().sum()) == 0 == float(a[2].abs().sum())


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_mapping_file_wins(wn_cache, tmp_path, suffix):
    entries = {"dog": "cat.n.01", "sponge bob": "sponge.n.04", "Tabby Thing": TABBY,
               "teddy bear": ["teddy.n.01", "bear.n.01"], "cat": ""}
    path = tmp_path / f"map{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(entries))
    else:
        path.write_text("\n".join(f"{json.dumps(k)} = {json.dumps(v)}"
                                  for k, v in entries.items()))
    got = sem.resolve_synsets(["dog", "sponge_bob", "tabby thing", "teddy-bear", "cat"],
                              mapping_file=str(path), cache_dir=wn_cache)
    assert got["dog"] == (["cat.n.01"], "mapping file")
    assert got["sponge_bob"][0] == ["sponge.n.04"]
    assert got["tabby thing"][0] == ["tabby.n.01"]
    assert got["cat"] == ([], "no synset")
    a = sem.semantic_matrix(["dog", "teddy-bear"], mapping_file=str(path), cache_dir=wn_cache)
    plain = sem.semantic_matrix(["cat", "teddy-bear", "bear"], cache_dir=wn_cache)
    assert torch.equal(a[0], plain[0])
    assert torch.equal(a[1], torch.maximum(plain[1], plain[2]))  # several synsets: max


def test_bad_mapping_entry_names_the_class(wn_cache, tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"dog": "dgo.n.01"}))
    with pytest.raises(ValueError, match="'dog'"):
        sem.semantic_matrix(["dog"], mapping_file=str(path), cache_dir=wn_cache)
    path.write_text(json.dumps({"dog": 3}))
    with pytest.raises(ValueError, match="synset name"):
        sem.semantic_matrix(["dog"], mapping_file=str(path), cache_dir=wn_cache)


def test_cache_hit_does_not_recompute(wn_cache, tmp_path, monkeypatch):
    calls = []
    compute = similarity._similarity_matrix

    def counting(*args, **kwargs):
        calls.append(1)
        return compute(*args, **kwargs)

    monkeypatch.setattr(similarity, "_similarity_matrix", counting)
    cache = tmp_path / "cache"
    first = sem.semantic_matrix(["cat", "dog"], cache_dir=cache)
    second = sem.semantic_matrix(["cat", "dog"], cache_dir=cache)
    assert len(calls) == 1 and torch.equal(first, second)
    assert len(list((cache / "semantics").glob("wordnet-path-*.pt"))) == 1
    sem.semantic_matrix(["dog", "cat"], cache_dir=cache)  # other classes: other entry
    mapping = tmp_path / "m.json"
    mapping.write_text(json.dumps({"cat": "dog.n.01"}))
    sem.semantic_matrix(["cat", "dog"], mapping_file=str(mapping), cache_dir=cache)
    assert len(calls) == 3
    with pytest.warns(UserWarning, match="qwxzv"):  # the warning repeats on a hit
        sem.semantic_matrix(["qwxzv"], cache_dir=cache)
    with pytest.warns(UserWarning, match="qwxzv"):
        sem.semantic_matrix(["qwxzv"], cache_dir=cache)
    assert len(calls) == 4
