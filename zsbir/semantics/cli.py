"""``python -m zsbir.semantics CLASSES.txt [MAPPING]``: how each class resolves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from zsbir.semantics.similarity import resolve_synsets
from zsbir.semantics.wordnet import load_wordnet

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m zsbir.semantics CLASSES.txt [MAPPING]``: how each class resolves."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m zsbir.semantics", description=main.__doc__)
    parser.add_argument("classes", help="file with one class name a line")
    parser.add_argument("mapping", nargs="?", help="TOML/JSON class -> synset file")
    args = parser.parse_args(argv)
    names = [n.strip() for n in Path(args.classes).read_text().splitlines() if n.strip()]
    wn = load_wordnet()
    for name, (syns, how) in resolve_synsets(names, args.mapping).items():
        gloss = wn.synset(syns[0]).definition()[:60] if syns else ""
        print(f"{name:24s} {', '.join(syns) or '-':32s} {how:16s} {gloss}")
    return 0
