"""The type checker: a manifest value against a component's annotation
(:func:`check_type`, strict: ``"2"`` is not an int, an int is a float) and a table's keys
against a signature (:func:`validate_params`, defaults filled)."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from zsbir.constraints import constraints_of
from zsbir.manifest.errors import Problem
from zsbir.registry import INJECTED, Factory, Nested, _singular

__all__ = ["check_type", "constraint_text", "validate_params"]


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "none"
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:  # the base type; constraints: see constraint_text
        base, *meta = typing.get_args(tp)
        for m in meta:
            if isinstance(m, (Nested, Factory)):  # a component table, nested
                return f"{_singular(m.kind)} table" + ("s" if typing.get_origin(base) is list
                                                       else "")
        return _type_name(base)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, Sequence, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (dict, Mapping):
        return "table"
    return getattr(tp, "__name__", str(tp))


def constraint_text(tp: Any) -> str:
    """The declared constraints of an annotation, e.g. ``">= 1, <= 4096"`` (or "")."""
    if typing.get_origin(tp) is not typing.Annotated:
        return ""
    return "; ".join(str(c) for c in constraints_of(tuple(typing.get_args(tp)[1:])))


def _value_repr(v: Any) -> str:
    kind = {bool: "bool", int: "int", float: "float", str: "str", list: "array",
            dict: "table"}.get(type(v), type(v).__name__)
    text = repr(v)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{kind} {text}"


def check_type(value: Any, tp: Any, path: str, problems: list[Problem]) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints widened to float)."""
    if tp is inspect.Parameter.empty or tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(tp)
        sub: list[Problem] = []
        out = check_type(value, base, path, sub)
        problems.extend(sub)
        if not sub:
            for c in constraints_of(tuple(meta)):
                msg = c.check(out)
                if msg:
                    problems.append(Problem(path, msg))
        return out
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            sub: list[Problem] = []
            out = check_type(value, arg, path, sub)
            if not sub:
                return out
        problems.append(Problem(path, f"expected {_type_name(tp)}, got {_value_repr(value)}"))
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or type(value) is bool and True not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(Problem(path, f"expected one of {', '.join(map(repr, allowed))}, "
                                          f"got {_value_repr(value)}{hint}"))
        return value
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        if not isinstance(value, list):
            problems.append(Problem(path, f"expected {_type_name(tp)}, "
                                          f"got {_value_repr(value)}"))
            return value
        args = typing.get_args(tp)
        if not args or (origin is tuple and len(args) != 2):
            return value
        return [check_type(v, args[0], f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            problems.append(Problem(path, f"expected table, got {_value_repr(value)}"))
        return value
    if tp is type(None):
        if value is not None:
            problems.append(Problem(path, f"expected nothing, got {_value_repr(value)}"))
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(Problem(path, f"expected bool, got {_value_repr(value)}"))
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(Problem(path, f"expected int, got {_value_repr(value)}"))
        elif not -(2**63) <= value < 2**63:
            problems.append(Problem(path, f"integer out of the 64-bit range: {value}"))
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(Problem(path, f"expected float, got {_value_repr(value)}"))
            return value
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(Problem(path, f"expected a finite float, got {value}"))
        return float(value)
    if tp in (str, Path):
        if not isinstance(value, str):
            problems.append(Problem(path, f"expected {_type_name(tp)}, got {_value_repr(value)}"))
        return value
    return value  # a type manifests cannot spell: not checked here


def _hints(obj: Any) -> dict[str, Any]:
    """The evaluated annotations of a component's parameters (``Annotated`` extras kept).
    When one cannot be evaluated (a name imported only under ``TYPE_CHECKING``), the others
    still are, one by one, so that an unrelated annotation never hides a ``Nested`` marker;
    the unresolvable ones are left out (not checked)."""
    target = obj.__init__ if inspect.isclass(obj) and not dataclasses.is_dataclass(obj) else obj
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:  # noqa: BLE001 - unresolvable annotations: one at a time
        pass
    raw = getattr(target, "__annotations__", None) or {}
    namespace = {**vars(typing), **getattr(inspect.unwrap(target), "__globals__", {})}
    out: dict[str, Any] = {}
    for name, ann in raw.items():
        try:
            out[name] = eval(ann, namespace) if isinstance(ann, str) else ann  # noqa: S307
        except Exception:  # noqa: BLE001 - this one stays unchecked
            continue
    return out


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def validate_params(obj: Any, kind: str, table: Mapping[str, Any], path: str,
                    problems: list[Problem], skip: Sequence[str] = ()) -> dict[str, Any]:
    """Check a table's keys against ``obj``'s signature; return them with defaults filled."""
    sig = inspect.signature(obj)
    hints = _hints(obj)
    injected = INJECTED.get(kind, frozenset())
    params = {n: p for n, p in sig.parameters.items()
              if n not in injected and n != "self"
              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in skip:
            continue
        if key in injected and key in sig.parameters:
            what = "a table" if isinstance(value, dict) or (
                isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
            ) else "a value"
            problems.append(Problem(f"{path}.{key}", f"{what} under {key!r}, which zsbir "
                                    f"supplies to a {_singular(kind)} itself (injected): "
                                    "it is never written in a manifest"))
            continue
        if key not in params:
            allowed = list(params) + list(skip)
            problems.append(Problem(f"{path}.{key}", "unknown parameter"
                                    + (_suggest(key, allowed) or
                                       f" (parameters: {', '.join(allowed) or 'none'})")))
            continue
        out[key] = check_type(value, hints.get(key, params[key].annotation),
                              f"{path}.{key}", problems)
    for name, p in params.items():
        if name in out or name in skip:
            continue
        if p.default is inspect.Parameter.empty:
            problems.append(Problem(f"{path}.{name}", "required parameter is missing"))
        elif p.default is not None:
            out[name] = p.default
    return out

