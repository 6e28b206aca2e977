"""Class names: the matching key, the published class lists and the zero-shot splits.

The lists ship as package data in ``zsbir/data/splits/*.txt``: one class a line, spelled
exactly as the published source spells it, ``#`` lines are comments (each file's first line
names its source). Sources:

- SK-SH: SAKE, Liu et al., ICCV 2019, repository ``dataset/Sketchy/zeroshot1`` (25 unseen /
  100 seen; ZSE-SBIR's ``zeroshot1`` is byte-identical).
- SK-SH (SEM-PCYC variant): Dutta & Akata, CVPR 2019, the ``np.random.seed(0)`` draw of
  ``load_files_sketchy_zeroshot`` (12 validation + 13 test classes, merged as their code does).
- SK-YE: Yelamarthi et al., ECCV 2018 (21 unseen classes, none in ImageNet-1k; also used by
  SEM-PCYC, Doodle2Search and ZSE-SBIR ``zeroshot0``); seen = the other 104.
- TUB-SH: SAKE ``dataset/TUBerlin/zeroshot`` (30 unseen / 220 seen).
- QD-DE: Doodle2Search, Dey et al., CVPR 2019 (30 unseen of 110 classes); seen = the other 80.

Names are matched with :func:`normalize` (case, spaces, ``_`` and ``-`` ignored), so
``teddy_bear``, ``teddy bear`` and ``Teddy-Bear`` are one class. A split reports every name
in the spelling of its dataset's full class list (Sketchy ``jack-o-lantern`` even where the
SEM-PCYC list writes ``jack_o_lantern``), so labels never depend on how a user's folders
are spelled.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

__all__ = [
    "SPLITS",
    "ClassSplit",
    "SplitDef",
    "class_split",
    "normalize",
    "read_class_list",
    "spell_as",
]

_SEPARATORS = re.compile(r"[\s_\-]+")


def normalize(name: str) -> str:
    """The matching key of a class name: case-folded, spaces, ``_`` and ``-`` removed.

    Removing the separators (rather than unifying them) also matches ``tablelamp`` with
    ``table lamp``; no two classes of any shipped list share a key (tested).
    """
    return _SEPARATORS.sub("", name.strip()).casefold()


@cache
def _read(filename: str) -> tuple[str, ...]:
    text = resources.files("zsbir.data").joinpath("splits", filename).read_text("utf-8")
    names = tuple(s for s in (ln.strip() for ln in text.splitlines()) if s and s[0] != "#")
    keys = [normalize(n) for n in names]
    if len(set(keys)) != len(keys):
        raise ValueError(f"class list {filename} names a class twice (after normalization)")
    return names


def read_class_list(filename: str) -> list[str]:
    """The class names of a shipped list (``zsbir/data/splits/<filename>``), in file order."""
    return list(_read(filename))


def spell_as(names: Iterable[str], reference: Sequence[str]) -> list[str]:
    """Each of ``names`` in the spelling ``reference`` uses for it (matched by key).

    Raises ``KeyError`` naming every name that ``reference`` lacks.
    """
    by_key = {normalize(r): r for r in reference}
    names = list(names)
    unknown = [n for n in names if normalize(n) not in by_key]
    if unknown:
        raise KeyError(f"not in the reference list: {', '.join(map(repr, unknown))}")
    return [by_key[normalize(n)] for n in names]


@dataclass(frozen=True)
class SplitDef:
    """Where a split's lists live. ``seen_file=None`` means all classes minus the unseen."""

    dataset: str
    split: str
    all_files: tuple[str, ...]
    unseen_file: str
    seen_file: str | None
    source: str


@dataclass(frozen=True)
class ClassSplit:
    """Seen and unseen class names of one split, each sorted, in the dataset's spelling."""

    dataset: str
    split: str
    seen: tuple[str, ...]
    unseen: tuple[str, ...]
    source: str

    @property
    def all(self) -> tuple[str, ...]:
        return self.seen + self.unseen


_SKETCHY_ALL = ("sketchy_all_classes.txt",)
_TUB_ALL = ("tuberlin_tub-sh_train.txt", "tuberlin_tub-sh_test.txt")
_QD_ALL = ("quickdraw_all_classes.txt",)

#: every split the package ships, keyed by (dataset, split name)
SPLITS: dict[tuple[str, str], SplitDef] = {
    (d.dataset, d.split): d
    for d in (
        SplitDef("sketchy", "sk-sh", _SKETCHY_ALL, "sketchy_sk-sh_sake_test.txt",
                 "sketchy_sk-sh_sake_train.txt",
                 "SAKE (Liu et al., ICCV 2019), repository dataset/Sketchy/zeroshot1"),
        SplitDef("sketchy", "sk-sh-sempcyc", _SKETCHY_ALL,
                 "sketchy_sk-sh_sempcyc_seed0_test.txt", None,
                 "SEM-PCYC (Dutta & Akata, CVPR 2019), np.random.seed(0) class draw"),
        SplitDef("sketchy", "sk-ye", _SKETCHY_ALL, "sketchy_sk-ye_test.txt", None,
                 "Yelamarthi et al., ECCV 2018"),
        SplitDef("tuberlin", "tub-sh", _TUB_ALL, "tuberlin_tub-sh_test.txt",
                 "tuberlin_tub-sh_train.txt",
                 "SAKE (Liu et al., ICCV 2019), repository dataset/TUBerlin/zeroshot"),
        SplitDef("quickdraw", "qd-de", _QD_ALL, "quickdraw_qd-de_test.txt", None,
                 "Doodle2Search (Dey et al., CVPR 2019), zeroshot_classes_quickdraw.txt"),
    )
}


@cache
def class_split(dataset: str, split: str) -> ClassSplit:
    """The seen/unseen classes of a shipped split, checked against the full class list."""
    try:
        d = SPLITS[(dataset, split)]
    except KeyError:
        known = ", ".join(f"{a}/{b}" for a, b in SPLITS)
        raise ValueError(f"unknown split {dataset}/{split}; known: {known}") from None
    universe = [n for f in d.all_files for n in _read(f)]
    unseen = spell_as(_read(d.unseen_file), universe)
    if d.seen_file is None:
        taken = {normalize(n) for n in unseen}
        seen = [n for n in universe if normalize(n) not in taken]
    else:
        seen = spell_as(_read(d.seen_file), universe)
    if {normalize(n) for n in seen} & {normalize(n) for n in unseen}:
        raise ValueError(f"split {dataset}/{split}: seen and unseen classes overlap")
    if len(seen) + len(unseen) != len(universe):
        raise ValueError(f"split {dataset}/{split}: seen + unseen do not cover all classes")
    return ClassSplit(dataset, split, tuple(sorted(seen)), tuple(sorted(unseen)), d.source)
