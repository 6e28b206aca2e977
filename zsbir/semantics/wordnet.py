"""Finding WordNet 3.0 offline: nltk's own corpus when nltk finds one, else nltk's layout
built from the Debian/Ubuntu packages' files (``/usr/share/wordnet``) under
``<cache_dir>/nltk_data/corpora/wordnet``; and a cached nltk reader on it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["LEXNAMES", "WordNetNotFoundError", "build_wordnet_layout", "ensure_wordnet",
           "load_wordnet"]


#: WordNet 3.0's 45 lexicographer files: (number, name, syntactic category 1 noun,
#: 2 verb, 3 adjective, 4 adverb), from lexnames(5WN). nltk reads the file ``lexnames``;
#: the Debian packages do not ship it.
LEXNAMES: tuple[tuple[int, str, int], ...] = tuple(
    (i, name, {"adj": 3, "adv": 4, "noun": 1, "verb": 2}[name.split(".")[0]])
    for i, name in enumerate((
        "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal",
        "noun.artifact", "noun.attribute", "noun.body", "noun.cognition",
        "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
        "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon",
        "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
        "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body",
        "verb.change", "verb.cognition", "verb.communication", "verb.competition",
        "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
        "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
        "adj.ppl",
    ))
)

#: Where WordNet 3.0 database files (data.noun, index.sense, ...) are looked for.
#: ``WNSEARCHDIR`` / ``WNHOME`` are WordNet's own variables.
_SYSTEM_DIRS = ("/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/local/WordNet-3.0/dict",
                "/opt/homebrew/share/wordnet")


class WordNetNotFoundError(LookupError):
    """No WordNet 3.0 database nltk can read is on this machine."""


# ------------------------------------------------------------------------- WordNet setup
def _nltk_files() -> tuple[list[str], list[str]]:
    """(required, optional) files of nltk's WordNetCorpusReader, besides ``lexnames``."""
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    files = [f for f in WordNetCorpusReader._FILES if f != "lexnames"]
    optional = ["cntlist.rev"]  # only read for Lemma.count()
    return [f for f in files if f not in optional], optional


def _wordnet_dirs() -> list[Path]:
    dirs = [os.environ.get("WNSEARCHDIR", "")]
    if os.environ.get("WNHOME"):
        dirs.append(os.path.join(os.environ["WNHOME"], "dict"))
    return [Path(d) for d in [*dirs, *_SYSTEM_DIRS] if d]


def _find_system_wordnet() -> tuple[Path | None, list[str]]:
    """A directory with every file nltk needs; else (None, files missing in the best one)."""
    required, _ = _nltk_files()
    best: list[str] = []
    for d in _wordnet_dirs():
        if not (d / "data.noun").is_file():
            continue
        missing = [f for f in required if not (d / f).is_file()]
        if not missing:
            return d, []
        if not best or len(missing) < len(best):
            best = missing
    return None, best


def _layout_complete(root: Path) -> bool:
    required, _ = _nltk_files()
    return all((root / f).is_file() for f in [*required, "lexnames"])


def build_wordnet_layout(nltk_data: Path, source: Path | None = None) -> Path:
    """Build nltk's ``<nltk_data>/corpora/wordnet/`` from WordNet 3.0 database files.

    Copies (nltk refuses symlinks that leave its data directories) the files nltk's
    ``WordNetCorpusReader`` opens (``data.*``, ``index.*``, ``index.sense``, ``*.exc``,
    ``cntlist.rev``) from ``source`` (default: ``/usr/share/wordnet`` of Debian's
    ``wordnet-base`` + ``wordnet-sense-index``, or ``$WNSEARCHDIR``) and writes the
    ``lexnames`` table (:data:`LEXNAMES`). Idempotent and atomic (built aside, renamed).

    Returns the corpus directory (``.../corpora/wordnet``).
    """
    root = Path(nltk_data) / "corpora" / "wordnet"
    if _layout_complete(root):
        return root
    required, optional = _nltk_files()
    if source is None:
        source, missing = _find_system_wordnet()
        if source is None:
            raise WordNetNotFoundError(_not_found_message(missing))
    source = Path(source)
    missing = [f for f in required if not (source / f).is_file()]
    if missing:
        raise WordNetNotFoundError(f"{source} lacks WordNet files nltk needs: "
                                   f"{', '.join(missing)}\n" + _not_found_message(missing))
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=root.parent))
    try:
        for name in required + [f for f in optional if (source / f).is_file()]:
            shutil.copyfile(source / name, tmp / name)
        (tmp / "lexnames").write_text("".join(f"{i:02d}\t{name}\t{cat}\n"
                                              for i, name, cat in LEXNAMES))
        for notice in ("/usr/share/doc/wordnet-base/copyright", source / "LICENSE"):
            if Path(notice).is_file():  # WordNet's license asks to keep its notice
                shutil.copyfile(notice, tmp / "LICENSE")
                break
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if root.exists() and not _layout_complete(root):  # leftover of a failed build
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first
            if not _layout_complete(root):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _not_found_message(missing: Sequence[str] = ()) -> str:
    import nltk

    hint = ""
    if missing and any(f == "index.sense" for f in missing):
        hint = ("WordNet's database is there but index.sense is missing: install the "
                "Debian/Ubuntu package wordnet-sense-index.\n")
    searched = ", ".join(str(d) for d in _wordnet_dirs())
    return (
        f"{hint}WordNet 3.0 was not found. nltk has no corpora/wordnet in its data path "
        f"({os.pathsep.join(str(p) for p in nltk.data.path)}) and no WordNet database is "
        f"in {searched}. Get it with one of:\n"
        "  - Debian/Ubuntu: apt-get install wordnet-base wordnet-sense-index  (zsbir then "
        "builds nltk's layout in its cache by itself)\n"
        "  - on a machine with internet: python -m nltk.downloader wordnet  (and copy "
        "~/nltk_data here)\n"
        "  - set NLTK_DATA to a directory holding corpora/wordnet/ (or WNSEARCHDIR to a "
        "WordNet 3.0 dict/ directory)"
    )


def _nltk_wordnet_pointer() -> Any | None:
    """nltk's own ``wordnet`` corpus (directory or zip) if it has the needed files."""
    import nltk

    required, _ = _nltk_files()
    for resource in ("corpora/wordnet.zip/wordnet/", "corpora/wordnet"):
        try:
            ptr = nltk.data.find(resource)
        except LookupError:
            continue
        try:
            for f in [*required, "lexnames"]:
                ptr.join(f)
        except (OSError, ValueError):
            continue
        return ptr
    return None


def _default_cache_dir() -> Path:
    from zsbir.context import default_cache_dir

    return default_cache_dir()


def _add_nltk_path(nltk_data: Path) -> None:
    import nltk

    if str(nltk_data) not in [str(p) for p in nltk.data.path]:
        nltk.data.path.append(str(nltk_data))


def _pointer_path(ptr: Any) -> Path:
    if hasattr(ptr, "zipfile"):  # ZipFilePathPointer
        return Path(ptr.zipfile.filename)
    return Path(ptr.path if hasattr(ptr, "path") else str(ptr))


def _locate(cache_dir: Path | None) -> Any:
    """A path pointer to a WordNet corpus nltk can read; builds one if needed."""
    ptr = _nltk_wordnet_pointer()
    if ptr is not None:
        return ptr
    nltk_data = Path(cache_dir or _default_cache_dir()) / "nltk_data"
    if not _layout_complete(nltk_data / "corpora" / "wordnet"):
        build_wordnet_layout(nltk_data)
    _add_nltk_path(nltk_data)
    import nltk

    return nltk.data.find("corpora/wordnet")


def ensure_wordnet(cache_dir: Path | None = None) -> Path:
    """Make WordNet 3.0 loadable by nltk offline; return its corpus directory (or zip).

    Uses nltk's ``wordnet`` corpus when nltk finds one (``NLTK_DATA``, ``~/nltk_data``,
    ...); otherwise builds ``<cache_dir>/nltk_data/corpora/wordnet/`` from the Debian
    packages' files (:func:`build_wordnet_layout`) and appends ``<cache_dir>/nltk_data``
    to ``nltk.data.path``. ``cache_dir`` defaults to ``$ZSBIR_CACHE`` or ``~/.cache/zsbir``.

    Raises:
        WordNetNotFoundError: with the commands that install it.
    """
    return _pointer_path(_locate(cache_dir))


def _read_version(ptr: Any) -> str:
    """WordNet's version from the data.adj header (as nltk's ``get_version``)."""
    with ptr.join("data.adj").open() as fh:
        for i, raw in enumerate(fh):
            line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            match = re.search(r"Word[nN]et (\d+\+?|\d+\.\d+) Copyright", line)
            if match:
                return match.group(1)
            if i > 100:
                break
    return "unknown"


_READERS: dict[str, Any] = {}


def load_wordnet(cache_dir: Path | None = None) -> Any:
    """An nltk ``WordNetCorpusReader`` on the corpus :func:`ensure_wordnet` finds (cached).

    Skips nltk's WordNet-3.0-to-itself sense-key mapping (``map_wn``, only used by the
    multilingual OMW functions), which would read index.sense twice (seconds) on load.
    """
    ptr = _locate(cache_dir)
    key = str(_pointer_path(ptr)) + ("" if not hasattr(ptr, "entry") else f"/{ptr.entry}")
    if key not in _READERS:
        from nltk.corpus.reader import CorpusReader
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
        from nltk.corpus.util import LazyCorpusLoader

        class _Reader(WordNetCorpusReader):
            def map_wn(self, version: str = "wordnet") -> None:
                return None  # identity mapping for WordNet 3.0

        omw = LazyCorpusLoader("omw-2.0", CorpusReader, r".*/wn-data-.*\.tab",
                               encoding="utf8")
        _READERS[key] = _Reader(ptr, omw)
    return _READERS[key]
