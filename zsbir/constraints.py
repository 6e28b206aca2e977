"""Parameter constraints declared next to the parameter, checked by ``zsbir validate``.

A component (or a core manifest section) declares a range or a rule in its annotation::

    from typing import Annotated
    from zsbir.constraints import Range

    def itq(bits: Annotated[int, Range(ge=1, le=4096)] = 64): ...

:func:`zsbir.manifest.check_type` checks the base type first and then every constraint,
reporting ``hashers[1].bits: must be >= 1, got -7`` with the key path. Constraints are
plain frozen dataclasses, so ``zsbir describe`` can print them (``str(constraint)``).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BASE_WEIGHTS", "Constraint", "ExistingPath", "Length", "Ordered", "Pattern", "Range",
           "ResumeSafe", "WeightsFile", "paths_unchecked", "resume_safe_of"]


class Constraint:
    """Base class: ``check(value)`` returns an error message or ``None``."""

    def check(self, value: Any) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class Range(Constraint):
    """A numeric range: any of ``ge``, ``gt``, ``le``, ``lt``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def check(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None  # the type check reports it
        if self.ge is not None and value < self.ge:
            return f"must be >= {_num(self.ge)}, got {value}"
        if self.gt is not None and value <= self.gt:
            return f"must be > {_num(self.gt)}, got {value}"
        if self.le is not None and value > self.le:
            return f"must be <= {_num(self.le)}, got {value}"
        if self.lt is not None and value >= self.lt:
            return f"must be < {_num(self.lt)}, got {value}"
        return None

    def __str__(self) -> str:
        parts = [f"{op} {_num(v)}" for op, v in ((">=", self.ge), (">", self.gt),
                                                 ("<=", self.le), ("<", self.lt))
                 if v is not None]
        return ", ".join(parts)


@dataclass(frozen=True)
class Length(Constraint):
    """A list's length: ``exactly`` n items, or between ``min`` and ``max``."""

    min: int | None = None
    max: int | None = None
    exactly: int | None = None

    def check(self, value: Any) -> str | None:
        if not isinstance(value, (list, tuple, str)):
            return None
        n = len(value)
        if self.exactly is not None and n != self.exactly:
            return f"must have exactly {self.exactly} item(s), got {n}"
        if self.min is not None and n < self.min:
            return f"must have at least {self.min} item(s), got {n}"
        if self.max is not None and n > self.max:
            return f"must have at most {self.max} item(s), got {n}"
        return None

    def __str__(self) -> str:
        if self.exactly is not None:
            return f"length {self.exactly}"
        return f"length {self.min or 0}..{self.max if self.max is not None else ''}"


@dataclass(frozen=True)
class Pattern(Constraint):
    """A string matching a regular expression (``what`` names it in the error)."""

    regex: str
    what: str = ""

    def check(self, value: Any) -> str | None:
        if isinstance(value, str) and not re.fullmatch(self.regex, value):
            return f"must be {self.what or 'a string matching ' + self.regex}, got {value!r}"
        return None

    def __str__(self) -> str:
        return self.what or f"matches {self.regex}"


#: whether :class:`ExistingPath` looks at the filesystem (off while re-resolving a saved
#: manifest for ``embed``, which reads neither the data nor the pretrained weights)
_CHECK_PATHS: ContextVar[bool] = ContextVar("zsbir_check_paths", default=True)


@contextlib.contextmanager
def paths_unchecked() -> Iterator[None]:
    """Within this block, :class:`ExistingPath` accepts any path."""
    token = _CHECK_PATHS.set(False)
    try:
        yield
    finally:
        _CHECK_PATHS.reset(token)


@dataclass(frozen=True)
class ExistingPath(Constraint):
    """A path that must exist (``kind``: "dir", "file" or "any"); empty means unset.

    A "file" must be a regular, readable file (not a directory, a device or a FIFO)."""

    kind: str = "any"

    def check(self, value: Any) -> str | None:
        if not isinstance(value, str) or not value or not _CHECK_PATHS.get():
            return None
        p = Path(value).expanduser()
        if self.kind == "file" and p.exists():
            if p.is_dir():
                return f"{value!r} is a directory, not a file"
            if not p.is_file():
                return f"{value!r} is not a regular file (a device, FIFO or socket)"
            if not os.access(p, os.R_OK):
                return f"{value!r} is not readable (permission denied)"
            return None
        ok = {"dir": p.is_dir, "file": p.is_file}.get(self.kind, p.exists)()
        return None if ok else f"no such {self.kind if self.kind != 'any' else 'path'}: {value!r}"

    def __str__(self) -> str:
        return f"an existing {self.kind if self.kind != 'any' else 'path'}"


@dataclass(frozen=True)
class WeightsFile(Constraint):
    """A local weights file (empty or ``None``: unset): a regular, readable file holding a
    state dict, as :func:`zsbir.models.backbone.weights_file_problem` checks (a
    ``torch.save`` archive or pickle read with ``weights_only=True``, or .safetensors)."""

    def check(self, value: Any) -> str | None:
        if not isinstance(value, str) or not value or not _CHECK_PATHS.get():
            return None
        from zsbir.models.backbone import weights_file_problem

        return weights_file_problem(value)

    def __str__(self) -> str:
        return "a local state-dict file"


@dataclass(frozen=True)
class Ordered(Constraint):
    """A list of numbers in increasing order (``strict``: no two equal), e.g. a range's
    ``[low, high]``."""

    strict: bool = False

    def check(self, value: Any) -> str | None:
        if not isinstance(value, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return None
        for a, b in zip(value, value[1:]):
            if a > b or (self.strict and a == b):
                return (f"must be in {'strictly ' if self.strict else ''}increasing order "
                        f"([low, high]), got {value}")
        return None

    def __str__(self) -> str:
        return "strictly increasing" if self.strict else "increasing"


@dataclass(frozen=True)
class ResumeSafe:
    """Not a check but a fact about a parameter (or a section): changing it does not touch
    the trained state, so ``zsbir run --resume`` accepts a changed value (``why`` says
    why; a table-valued field covers everything under it). ``base``: safe only where the
    checkpoint's base reference checks the file's content by sha256 (the student's
    tables, :data:`zsbir.engine.checkpoint.BASE_SECTIONS`), e.g. a backbone's ``weights``
    path; a teacher's weights stay fixed."""

    why: str
    base: bool = False

    def __str__(self) -> str:
        return f"may change on resume: {self.why}"


#: a student's weights file: another path is fine on resume, its content is checked
BASE_WEIGHTS = ResumeSafe("in [model], whose checkpoint base reference checks its sha256",
                          base=True)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def constraints_of(metadata: tuple[Any, ...]) -> list[Constraint]:
    """The constraints among an ``Annotated`` type's metadata."""
    return [m for m in metadata if isinstance(m, Constraint)]


def resume_safe_of(metadata: tuple[Any, ...]) -> ResumeSafe | None:
    """The :class:`ResumeSafe` marker among an ``Annotated`` type's metadata, if any."""
    return next((m for m in metadata if isinstance(m, ResumeSafe)), None)
