"""Docstrings as plain text for the terminal (``zsbir list`` / ``describe``).

Component docstrings are written for the documentation site: reStructuredText roles
(``:meth:`Trainer.fit```, ``:math:`\\lambda```), double-backquoted literals and
Markdown-style backquotes. :func:`plain_doc` drops that markup and keeps the words;
:func:`first_sentence` takes the summary shown by ``zsbir list``: the first full sentence
of the first paragraph (never cut in the middle of a sentence; the whole paragraph when it
has no sentence end). Standard library only: ``zsbir list`` must start fast.
"""

from __future__ import annotations

import re

__all__ = ["first_sentence", "plain_doc"]

# :role:`text` or :domain:role:`text`; `title <target>` keeps the title
_ROLE = re.compile(r":(?:[A-Za-z][\w-]*:)+`~?([^`]*)`")
_LITERAL = re.compile(r"``(.+?)``")
_SINGLE = re.compile(r"(?<![`\w])`([^`]+)`(?!`)")
_TITLE = re.compile(r"^(.*?)\s*<[^<>]+>$")
# a sentence ends with . ! or ? followed by whitespace or the end of the paragraph (and
# is not an abbreviation, an initial or a decimal point: :func:`_ends_sentence`)
_END = re.compile(r"([.!?])(?=\s|$)")
# abbreviations after which a period does not end the sentence
_ABBREV = ("e.g", "i.e", "et al", "etc", "cf", "vs", "Fig", "Eq", "Eqs", "Sec", "Tab",
           "approx", "resp", "No", "al")


def _role(match: re.Match[str]) -> str:
    text = match.group(1)
    title = _TITLE.match(text)
    return title.group(1) if title else text


def plain_doc(doc: str) -> str:
    """``doc`` without reST roles, ``literals`` or `backquotes` (their text kept)."""
    text = _ROLE.sub(_role, doc)
    text = _LITERAL.sub(r"\1", text)
    text = _SINGLE.sub(r"\1", text)
    text = re.sub(r"\\([\\`*_])", r"\1", text)  # reST escapes
    return text


def _ends_sentence(text: str, pos: int) -> bool:
    before = text[:pos]
    for abbr in _ABBREV:
        if before.endswith(abbr) and (len(before) == len(abbr)
                                      or not before[-len(abbr) - 1].isalnum()):
            return False
    # an initial ("Liu, L." / "A. Smith") or a decimal point is not a sentence end
    return not re.search(r"(?:^|\s)[A-Z]$", before)


def first_sentence(doc: str) -> str:
    """The first full sentence of ``doc``'s first paragraph, as plain text on one line."""
    text = plain_doc(doc).strip()
    if not text:
        return ""
    para = " ".join(re.split(r"\n\s*\n", text, maxsplit=1)[0].split())
    depth = 0
    for i, ch in enumerate(para):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        elif ch in ".!?" and depth == 0 and _END.match(para, i) and _ends_sentence(para, i):
            return para[: i + 1]
    return para
