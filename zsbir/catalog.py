"""The built-in components, listed without importing them (``zsbir list`` / ``describe``).

Importing the built-ins means importing torch, timm and every model: seconds before
``zsbir list`` can print a line. ``catalog.json`` (next to this file, committed) holds what
those commands print about each built-in component: kind, name, module, source file,
one-sentence summary, plain-text docstring and parameter table. It is generated from the
live registries::

    python -m zsbir.catalog --write

and ``tests/test_cli_fuzz.py::test_catalog_matches_live_registries`` fails when it differs
from them (a component added, renamed, or its docstring or parameters changed), so it
cannot go stale unnoticed. Plugins are never in it: they are listed from their metadata.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["CATALOG_PATH", "entry", "generate", "load", "param_rows", "source_line"]

CATALOG_PATH = Path(__file__).with_name("catalog.json")
_ROOT = Path(__file__).resolve().parents[1]


def param_rows(comp: Any) -> list[list[str]]:
    """``[name, type, default]`` of each parameter a manifest may set, as ``describe``
    prints them (``(required)`` when there is no default)."""
    from zsbir.manifest import _hints, _type_name

    hints = _hints(comp.obj)
    rows = []
    for p in comp.parameters():
        tp = hints.get(p.name, p.annotation)
        type_text = _type_text(tp, _type_name) if tp is not inspect.Parameter.empty else "any"
        default = "(required)" if p.default is inspect.Parameter.empty else repr(p.default)
        rows.append([p.name, type_text, default])
    return rows


def _type_text(tp: Any, type_name: Any) -> str:
    """``Annotated[int, Range(ge=1)]`` -> ``int (>= 1)``; other types as the validator
    names them."""
    import typing

    if typing.get_origin(tp) is typing.Annotated:
        base, *meta = typing.get_args(tp)
        if any(type(m).__name__ in ("Nested", "Factory") for m in meta):
            return type_name(tp)  # a nested component table: "backbone table"
        rules = [str(m) for m in meta if type(m).__str__ is not object.__str__]
        text = _type_text(base, type_name)
        return f"{text} ({'; '.join(rules)})" if rules else text
    return type_name(tp)


def _entry_of(comp: Any) -> dict[str, Any]:
    target = inspect.unwrap(comp.obj)
    try:
        file = Path(inspect.getsourcefile(target) or "").resolve()
        rel = file.relative_to(_ROOT).as_posix()
    except (TypeError, ValueError):
        rel = ""
    return {"name": comp.name, "module": getattr(target, "__module__", ""),
            "qualname": getattr(target, "__qualname__", comp.name), "file": rel,
            "summary": comp.summary, "doc": comp.doc, "params": param_rows(comp),
            "declares": declarations(comp)}


#: what a component may declare for validation (see zsbir.registry.declared)
DECLARED = ("requires", "provides", "output_keys", "teacher_keys")


def declarations(comp: Any) -> list[str]:
    """``requires``/``provides``/... lines for ``describe``: the set, evaluated at the
    default parameters, marked when it depends on the parameters."""
    from zsbir.registry import declared

    defaults = {p.name: p.default for p in comp.parameters()
                if p.default is not inspect.Parameter.empty}
    out = []
    for attr in DECLARED:
        raw = getattr(comp.obj, attr, None)
        if raw is None:
            continue
        value = declared(comp.obj, attr, defaults)
        dynamic = callable(raw) and not isinstance(raw, (set, frozenset))
        text = ", ".join(sorted(value)) or "nothing"
        if dynamic:
            text += " (at the defaults; depends on the parameters)"
        if value or dynamic:
            out.append(f"{attr}: {text}")
    return out


def generate() -> dict[str, list[dict[str, Any]]]:
    """The catalog of the built-in components, from the live registries (imports them)."""
    from zsbir.registry import _BUILTIN_PACKAGE, KINDS, _ensure_builtins, get_registry

    _ensure_builtins()
    out: dict[str, list[dict[str, Any]]] = {}
    for kind in KINDS:
        reg = get_registry(kind)
        comps = [c for n, c in sorted(reg._components.items()) if c.package == _BUILTIN_PACKAGE]
        out[kind] = [_entry_of(c) for c in comps]
    return out


def render(catalog: dict[str, list[dict[str, Any]]]) -> str:
    return json.dumps(catalog, indent=1, ensure_ascii=False) + "\n"


@functools.cache
def load() -> dict[str, list[dict[str, Any]]]:
    """The committed catalog (empty when the file is missing)."""
    try:
        return json.loads(CATALOG_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def entry(kind: str, name: str) -> dict[str, Any] | None:
    """The catalog entry of built-in ``kind``/``name``, or None."""
    for e in load().get(kind, []):
        if e["name"] == name:
            return e
    return None


def source_line(e: dict[str, Any]) -> str:
    """``file:line`` of an entry, the line found by reading the source (no import)."""
    if not e.get("file"):
        return "?"
    path = _ROOT / e["file"]
    last = e["qualname"].split(".")[-1]
    pattern = re.compile(rf"^\s*(?:async\s+def|def|class)\s+{re.escape(last)}\b")
    try:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if pattern.match(line):
                return f"{path}:{i}"
    except OSError:
        return "?"
    return str(path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render(generate())
    if args == ["--write"]:
        CATALOG_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {CATALOG_PATH}")
        return 0
    if args == ["--check"]:
        same = CATALOG_PATH.is_file() and CATALOG_PATH.read_text(encoding="utf-8") == text
        print("catalog is up to date" if same else
              f"{CATALOG_PATH} is stale: run python -m zsbir.catalog --write")
        return 0 if same else 1
    print("usage: python -m zsbir.catalog --write | --check", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
