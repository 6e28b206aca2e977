"""The built-in components, listed without importing them (``zsbir list`` / ``describe``).

The names come from entry points (zsbir's own and plugins', :mod:`zsbir.registry`), read
from metadata. What ``zsbir describe`` prints about a built-in (parameter table with the
types as validation names them, declarations, docstring) needs the component imported, and
importing the built-ins means importing torch, timm and every model: seconds. So
``catalog.json`` (next to this file, committed, never edited by hand) holds it for each of
zsbir's entry points: kind, name, module, qualname, source file, one-sentence summary,
plain-text docstring and parameter table. It is generated from the live registries::

    python -m zsbir.catalog --write

and ``tests/test_cli_fuzz.py::test_catalog_matches_live_registries`` fails when it differs
from them (a component added, renamed, or its docstring or parameters changed), so it
cannot go stale unnoticed; meanwhile a name it lacks is still listed (summary read from the
source, :func:`source_summary`) and described (by importing it). Plugins are never in it:
their summaries are read from their source files without importing them.

This module also derives zsbir's own entry-point table from the registrations in the
source (:func:`builtin_entry_points`, :func:`entry_point_toml`), which
``tests/test_registry.py`` checks ``pyproject.toml`` against.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["CATALOG_PATH", "builtin_entry_points", "entry", "entry_point_toml", "generate",
           "load", "param_rows", "registering_modules", "source_line", "source_summary"]

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
    """The catalog of the built-in components: every entry point of the ``zsbir``
    distribution, loaded (imports them all)."""
    from zsbir.registry import KINDS, get_registry

    out: dict[str, list[dict[str, Any]]] = {}
    for kind in KINDS:
        reg = get_registry(kind)
        out[kind] = [_entry_of(reg.component(n)) for n in reg.builtin_names()]
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


# ------------------------------------------------------- zsbir's own entry points
_REGISTER_CALL = re.compile(r"\b[A-Za-z_]\w*\.register\(\s*f?[\"']")


def registering_modules() -> list[str]:
    """Every module under ``zsbir/`` whose source calls ``<kind>.register("...")``."""
    pkg = Path(__file__).resolve().parent
    out = []
    for path in sorted(pkg.rglob("*.py")):
        if _REGISTER_CALL.search(path.read_text(encoding="utf-8")):
            parts = path.relative_to(pkg.parent).with_suffix("").parts
            out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def builtin_entry_points() -> dict[str, dict[str, str]]:
    """kind -> name -> ``module:qualname`` of every component zsbir's own modules register
    (imports :func:`registering_modules`): what ``pyproject.toml`` must declare as the
    ``zsbir`` distribution's entry points. A registered object that is not reachable as
    ``module:qualname`` gets ``"?"`` (make it a module attribute)."""
    import importlib

    from zsbir.registry import _BUILTIN_PACKAGE, registries

    for module in registering_modules():
        importlib.import_module(module)
    out: dict[str, dict[str, str]] = {}
    for reg in registries():
        for name, comp in sorted(reg._components.items()):
            if comp.package != _BUILTIN_PACKAGE:
                continue
            module = getattr(comp.obj, "__module__", "")
            qualname = getattr(comp.obj, "__qualname__", "")
            target: Any = importlib.import_module(module) if module else None
            for part in qualname.split("."):
                target = getattr(target, part, None)
            out.setdefault(reg.kind, {})[name] = (f"{module}:{qualname}" if target is comp.obj
                                                  else "?")
    return out


def entry_point_toml(eps: dict[str, dict[str, str]]) -> str:
    """``[project.entry-points."zsbir.<kind>"]`` tables for ``pyproject.toml``."""
    lines: list[str] = []
    for kind, names in eps.items():
        if not names:
            continue
        lines += ["", f'[project.entry-points."zsbir.{kind}"]']
        lines += [f'{name} = "{value}"' for name, value in sorted(names.items())]
    return "\n".join(lines).lstrip("\n") + "\n"


# ------------------------------------------------------------ summaries from source
@functools.cache
def _parsed(path: str) -> Any:
    import ast

    try:
        return ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None


def _module_file(module: str) -> Path | None:
    """The source file of ``module``, found without importing it (only its top-level
    package's spec is read)."""
    import importlib.util

    parts = module.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if len(parts) == 1:
        return Path(spec.origin) if spec.origin else None
    dirs = [Path(d) for d in (spec.submodule_search_locations or [])]
    for part in parts[1:-1]:
        dirs = [d / part for d in dirs if (d / part).is_dir()]
    for d in dirs:
        for cand in (d / f"{parts[-1]}.py", d / parts[-1] / "__init__.py"):
            if cand.is_file():
                return cand
    return None


def source_summary(value: str) -> str:
    """The docstring summary of an entry point's object (``pkg.module:Object``), read from
    its source file without importing anything; ``""`` when it cannot be found there (an
    object made at import time)."""
    import ast

    from zsbir.docstrings import first_sentence

    module, _, qualname = value.partition(":")
    path = _module_file(module.strip())
    tree = _parsed(str(path)) if path is not None else None
    node: Any = tree
    for part in qualname.strip().split("."):
        body = getattr(node, "body", [])
        node = next((n for n in body if isinstance(
            n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == part), None)
        if node is None:
            return ""
    return first_sentence(ast.get_docstring(node) or "")


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
