"""Manifest problems: :class:`Problem` (one thing wrong, at a key path) and
:class:`ManifestError` (every problem of a manifest, raised once)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ManifestError", "Problem"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest, at a key path."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ManifestError(ValueError):
    """A manifest with problems; ``problems`` lists every one."""

    def __init__(self, problems: Sequence[Problem], source: str = "<manifest>"):
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''}\n{lines}")

