"""Class similarity: benchmark class names -> WordNet noun synsets (user mapping, the
built-in table, the first noun sense), and SAKE's (n_classes, 1000) similarity matrix to the
ImageNet-1k classes, cached on disk. The rules: :mod:`zsbir.semantics`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from zsbir.semantics.wordnet import (
    _default_cache_dir,
    _locate,
    _pointer_path,
    _read_version,
    load_wordnet,
)

__all__ = ["BUILTIN_SYNSETS", "imagenet_wnids", "normalize_class_name", "resolve_synsets",
           "semantic_matrix"]

Similarity = Literal["path", "sake"]

#: Format of the cached matrices; bump when the computation changes.
_CACHE_FORMAT = 1

#: Built-in class -> synset table, keyed by :func:`normalize_class_name`. A user mapping
#: file wins over it.
BUILTIN_SYNSETS: dict[str, str] = {
    # -- named in SAKE's code (tuberlin_to_wnid.py / sketchy_to_wnid.py)
    "teddy_bear": "teddy.n.01",
    "flying_saucer": "unidentified_flying_object.n.01",
    "potted_plant": "pot_plant.n.01",
    "person_walking": "person.n.01",
    "person_sitting": "person.n.01",
    "outlet": "wall_socket.n.01",
    "power_outlet": "wall_socket.n.01",
    "human_skeleton": "skeletal_system.n.01",  # the body's bones, not skeleton.n.01
    "present": "present.n.02",  # a gift, not the time
    "flower_with_stem": "flower.n.01",
    "santa_claus": "santa_claus.n.01",
    "fire_hydrant": "fireplug.n.01",
    # -- no lemma for the whole name
    "tablelamp": "table_lamp.n.01",
    "satellite_dish": "dish.n.05",  # parabolic antenna
    "standing_bird": "bird.n.01",
    "jack_o_lantern": "jack-o'-lantern.n.02",  # carved pumpkin, not the marsh light
    "motorbike": "motorcycle.n.01",  # WordNet's "motorbike" is a minibike
    # -- parenthesized qualifiers in the benchmark lists
    "bear_(animal)": "bear.n.01",
    "mouse_(animal)": "mouse.n.01",
    "crane_(machine)": "crane.n.04",
    "pipe_(for_smoking)": "pipe.n.01",
    "car_(sedan)": "sedan.n.01",
    # -- first noun sense is another meaning of the word
    "banana": "banana.n.02",  # the fruit (n.01: the plant)
    "blimp": "blimp.n.02",  # airship (n.01: Colonel Blimp)
    "book": "book.n.02",  # the physical object (n.01: the written work)
    "cabin": "cabin.n.02",  # small wooden house (n.01: a ship's room)
    "cake": "cake.n.03",  # baked goods (n.01: a block of soap)
    "calculator": "calculator.n.02",  # the machine (n.01: a person)
    "castle": "castle.n.02",  # fortified building (first sense: palace.n.01)
    "chicken": "chicken.n.02",  # the bird (n.01: its meat)
    "church": "church.n.02",  # the building (n.01: the institution)
    "cloud": "cloud.n.02",  # in the sky (n.01: any visible particle mass)
    "crown": "crown.n.04",  # the headdress (n.01: the monarchy)
    "dolphin": "dolphin.n.02",  # the whale (first sense: dolphinfish)
    "hammer": "hammer.n.02",  # hand tool (n.01: part of a gunlock)
    "hedgehog": "hedgehog.n.02",  # Erinaceus (first sense: porcupine)
    "helmet": "helmet.n.02",  # protective headgear (n.01: armor plate)
    "hot_dog": "hotdog.n.02",  # the sandwich (n.01: a show-off)
    "hotdog": "hotdog.n.02",
    "jellyfish": "jellyfish.n.02",  # first sense: Portuguese man-of-war
    "keyboard": "computer_keyboard.n.01",
    "lighter": "lighter.n.02",  # the device (first sense: igniter, a substance)
    "lobster": "lobster.n.02",  # the animal (n.01: its flesh)
    "mug": "mug.n.04",  # the vessel (n.01: its contents)
    "octopus": "octopus.n.02",  # the animal (n.01: food)
    "pineapple": "pineapple.n.02",  # the fruit (n.01: the plant)
    "pumpkin": "pumpkin.n.02",  # the fruit (n.01: the vine)
    "raccoon": "raccoon.n.02",  # the animal (n.01: its fur)
    "racket": "racket.n.04",  # sports implement (n.01: noise)
    "radio": "radio_receiver.n.01",  # the set (n.01: the medium)
    "ray": "ray.n.07",  # the fish (first sense: a beam of light)
    "saw": "saw.n.02",  # hand tool (first sense: proverb)
    "scorpion": "scorpion.n.03",  # arachnid (first sense: Scorpio)
    "seal": "seal.n.09",  # the mammal (first sense: sealing wax)
    "table": "table.n.02",  # furniture (n.01: rows and columns)
    "teacup": "teacup.n.02",  # the cup (n.01: its contents)
    "tiger": "tiger.n.02",  # the cat (n.01: a fierce person)
    "toilet": "toilet.n.02",  # the fixture (n.01: the room)
    "turtle": "turtle.n.02",  # the reptile (first sense: turtleneck)
    "tv": "television_receiver.n.01",  # the set (first sense: broadcasting)
    "van": "van.n.05",  # the truck (first sense: avant-garde)
    "volcano": "volcano.n.02",  # the mountain (first sense: vent)
}

_STOPWORDS = frozenset({"a", "an", "the", "for", "of", "with", "in", "on"})


# ------------------------------------------------------------------------- class names
@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (timm's ``ImageNetInfo``).

    ``n01440764`` (tench) first, ``n15075141`` (toilet tissue) last.
    """
    from timm.data import ImageNetInfo

    wnids = tuple(ImageNetInfo("imagenet-1k").label_names())
    if len(wnids) != 1000:
        raise RuntimeError(f"timm's ImageNet-1k synset list has {len(wnids)} entries")
    return wnids


def normalize_class_name(name: str) -> str:
    """Lowercase, runs of spaces/``_``/``-`` -> ``_``: ``Teddy-Bear`` -> ``teddy_bear``,
    ``car (sedan)`` -> ``car_(sedan)``."""
    return re.sub(r"[\s_\-]+", "_", name.strip().lower()).strip("_")


def _read_mapping(mapping_file: str | Path | None) -> dict[str, list[str]]:
    """User class -> synsets (normalized names; [] = explicitly no synset)."""
    if not mapping_file:
        return {}
    path = Path(mapping_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"class -> synset mapping file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib

            data = tomllib.loads(text)
    except ValueError as exc:
        raise ValueError(f"cannot parse mapping file {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"mapping file {str(path)!r} must map class names to synsets")
    out: dict[str, list[str]] = {}
    for cls, value in data.items():
        values = [] if value in (None, "") else [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            raise ValueError(f"mapping file {str(path)!r}: {cls!r} must map to a synset name "
                             f"like 'dog.n.01', a wnid, a list of them, or '', got {value!r}")
        out[normalize_class_name(cls)] = values
    return out


def _synset(wn: Any, ref: str) -> Any:
    """A synset from ``dog.n.01`` or a WordNet 3.0 offset id ``n02084071``."""
    if re.fullmatch(r"[nvasr]\d{8}", ref):
        return wn.synset_from_pos_and_offset(ref[0], int(ref[1:]))
    return wn.synset(ref)


def _noun_senses(wn: Any, phrase: str) -> list[Any]:
    """Noun senses of the first spelling WordNet knows: ``a_b``, ``a-b``, ``ab`` mixes."""
    words = [w for w in phrase.split("_") if w]
    if not words:
        return []
    gaps = len(words) - 1
    combos: list[tuple[str, ...]] = [()]
    if gaps <= 3:  # every mix of separators (27 spellings at most)
        for _ in range(gaps):
            combos = [c + (s,) for c in combos for s in ("_", "-", "")]
    else:  # long names: one separator throughout
        combos = [(s,) * gaps for s in ("_", "-", "")]
    for combo in combos:
        form = words[0] + "".join(s + w for s, w in zip(combo, words[1:]))
        senses = wn.synsets(form, pos="n")
        if senses:
            return senses
    return []


def _similarity(a: Any, b: Any) -> float:
    return a.path_similarity(b) or 0.0


def _resolve(wn: Any, name: str, user: dict[str, list[str]]) -> tuple[list[Any], str]:
    """(synsets, how) for one class name."""
    key = normalize_class_name(name)
    if key in user:
        try:
            return [_synset(wn, ref) for ref in user[key]], "mapping file"
        except Exception as exc:  # noqa: BLE001 - nltk raises WordNetError/ValueError
            raise ValueError(f"mapping file: class {name!r} -> {user[key]!r}: {exc}") from exc
    if key in BUILTIN_SYNSETS:
        return [wn.synset(BUILTIN_SYNSETS[key])], "built-in"
    head, qualifier = key, ""
    match = re.fullmatch(r"(.*?)_?\((.*)\)", key)
    if match:
        head, qualifier = match.group(1).strip("_"), match.group(2).strip("_")
    senses = _noun_senses(wn, head)
    if qualifier:
        qual = _noun_senses(wn, qualifier)
        for word in qualifier.split("_"):
            if not qual and word not in _STOPWORDS:
                qual = _noun_senses(wn, word)
        if not senses:
            return qual[:1], "qualifier"
        if qual:  # the head's sense nearest to the qualifier (first one on ties)
            best = max(senses, key=lambda s: _similarity(s, qual[0]))
            return [best], "head + qualifier"
    return senses[:1], "first sense"


def resolve_synsets(class_names: Sequence[str], mapping_file: str | Path | None = None,
                    cache_dir: Path | None = None) -> dict[str, tuple[list[str], str]]:
    """Class name -> (synset names, how it was resolved); ``[]`` when none is found."""
    wn = load_wordnet(cache_dir)
    user = _read_mapping(mapping_file)
    out = {}
    for name in class_names:
        synsets, how = _resolve(wn, name, user)
        out[name] = ([s.name() for s in synsets], how if synsets else "no synset")
    return out


# ------------------------------------------------------------------------- the matrix
def _similarity_matrix(classes: list[list[Any]], targets: list[Any],
                       similarity: Similarity) -> np.ndarray:
    """(n, len(targets)) similarities; a class with several synsets takes the max.

    ``path``: nltk's ``path_similarity`` 1 / (1 + shortest is-a path length), computed
    from each synset's ancestor -> depth table (as nltk does, minus the per-pair walks).
    ``sake``: the released SAKE code's variant (``tuberlin_to_wnid.py``): 1 when one synset
    is a hypernym-ancestor of the other, else the path similarity when above 0.2, else 0.
    """
    def ancestors(s: Any) -> set[Any]:
        return set(s.closure(lambda x: x.hypernyms())) if similarity == "sake" else set()

    target_depths = [t._shortest_hypernym_paths(False) for t in targets]
    target_ancestors = [ancestors(t) for t in targets]
    from zsbir.progress import phase

    out = np.zeros((len(classes), len(targets)), dtype=np.float64)
    with phase("WordNet similarities", total=len(classes), unit="classes") as advance:
        for i, synsets in enumerate(classes):
            _similarity_row(out[i], synsets, targets, target_depths, target_ancestors,
                            ancestors, similarity)
            advance()
    return out


def _similarity_row(row: np.ndarray, synsets: list[Any], targets: list[Any],
                    target_depths: list[Any], target_ancestors: list[Any],
                    ancestors: Callable[[Any], set[Any]], similarity: Similarity) -> None:
    """One class's row of :func:`_similarity_matrix` (max over its synsets), in place."""
    for syn in synsets:
        depths = syn._shortest_hypernym_paths(False)
        syn_ancestors = ancestors(syn)
        for j, (t, tdepth) in enumerate(zip(targets, target_depths)):
            dist = min((d + tdepth[a] for a, d in depths.items() if a in tdepth),
                       default=None)
            value = 0.0 if dist is None else 1.0 / (dist + 1.0)
            if similarity == "sake":
                if syn == t or t in syn_ancestors or syn in target_ancestors[j]:
                    value = 1.0
                elif value <= 0.2:
                    value = 0.0
            row[j] = max(row[j], value)


def _cache_key(names: list[str], user: dict[str, list[str]], similarity: str,
               version: str) -> str:
    blob = json.dumps({
        "format": _CACHE_FORMAT, "classes": names, "mapping": user, "builtin": BUILTIN_SYNSETS,
        "similarity": similarity, "wordnet": version,
        "imagenet": hashlib.sha1("\n".join(imagenet_wnids()).encode()).hexdigest(),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _warn_missing(missing: list[str]) -> None:
    if missing:
        warnings.warn(
            f"{len(missing)} class(es) have no WordNet synset and get a zero row in the "
            f"SAKE semantic matrix: {', '.join(repr(m) for m in missing)}. Map them in a "
            "mapping file (TOML/JSON: \"class name\" = \"synset.n.01\").", stacklevel=3)


def semantic_matrix(class_names: list[str], mapping_file: str | None = None,
                    cache_dir: Path | None = None, *,
                    similarity: Similarity = "path") -> torch.Tensor:
    """SAKE's semantic matrix A: (len(class_names), 1000) float32, rows a_k in [0, 1].

    ``a_{k,m}`` is the WordNet path similarity between class ``k`` (resolved as in the
    module docstring) and ImageNet-1k class ``m`` (:func:`imagenet_wnids` order, the
    order of the teacher's logits), used in ``q_i = softmax(lambda1 * t_i + lambda2 *
    a_{y_i})`` (SAKE, Sec. 3.4). Computed once per (class names, mapping file contents,
    built-in table, similarity, WordNet version) and cached in
    ``<cache_dir>/semantics/``; later calls load it.

    Args:
        class_names: benchmark class names in label order.
        mapping_file: optional TOML/JSON class -> synset table; its entries win.
        cache_dir: zsbir's cache directory (default ``$ZSBIR_CACHE`` or ``~/.cache/zsbir``).
        similarity: ``path`` (the paper) or ``sake`` (the released code's variant: 1 for
            hypernyms/hyponyms, path similarity only above 0.2).

    Classes without a synset get a zero row, listed in one warning.
    """
    if similarity not in ("path", "sake"):
        raise ValueError(f"similarity must be 'path' or 'sake', got {similarity!r}")
    names = [str(n) for n in class_names]
    if not names or not all(n.strip() for n in names):
        raise ValueError("semantic_matrix needs a non-empty list of non-empty class names")
    user = _read_mapping(mapping_file)
    cache_root = Path(cache_dir or _default_cache_dir())
    ptr = _locate(cache_root)
    version = _read_version(ptr)
    if version != "3.0":
        raise RuntimeError(f"WordNet at {_pointer_path(ptr)} is version {version}; ImageNet's "
                           "wnids are WordNet 3.0 offsets (install WordNet 3.0)")
    key = _cache_key(names, user, similarity, version)
    path = cache_root / "semantics" / f"wordnet-{similarity}-{key}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            matrix = cached["matrix"]
            if tuple(matrix.shape) == (len(names), 1000):
                _warn_missing(list(cached.get("missing", [])))
                return matrix
        except Exception:  # noqa: BLE001 - a corrupt cache entry is recomputed
            pass
    wn = load_wordnet(cache_root)
    targets = [wn.synset_from_pos_and_offset("n", int(w[1:])) for w in imagenet_wnids()]
    resolved = [_resolve(wn, name, user)[0] for name in names]
    missing = [n for n, syns in zip(names, resolved) if not syns]
    matrix = torch.from_numpy(_similarity_matrix(resolved, targets, similarity)).float()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"matrix": matrix, "classes": names, "missing": missing,
                "synsets": [[s.name() for s in syns] for syns in resolved],
                "similarity": similarity, "wordnet": version}, tmp)
    os.replace(tmp, path)
    _warn_missing(missing)
    return matrix
