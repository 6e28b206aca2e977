"""Reading and writing manifest TOML: :func:`load` (a file, checked to be UTF-8 TOML,
not nested absurdly deep), ``--set`` overrides (:func:`apply_overrides`) and
:func:`dump_toml` (the resolved manifest saved with every run)."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zsbir.manifest.errors import ManifestError, Problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["MAX_DEPTH", "apply_overrides", "dump_toml", "load", "nesting_problem"]


def load(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a TOML manifest (and apply ``key.path=value`` overrides) into a plain dict."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError([Problem("", f"cannot read: {exc.strerror}")], str(path)) from exc
    if b"\0" in data:
        raise ManifestError([Problem("", "a binary file, not a TOML manifest (it holds NUL "
                                         "bytes)")], str(path))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ManifestError([Problem("", f"not UTF-8 text: byte 0x{data[exc.start]:02x} on "
                                         f"line {line} cannot be decoded; a manifest is a "
                                         "UTF-8 TOML file")], str(path)) from None
    try:
        raw = tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError([Problem("", f"invalid TOML: {exc}")], str(path)) from exc
    except RecursionError:  # tomllib parses inline tables and arrays recursively
        raise ManifestError([Problem("", "invalid TOML: inline tables or arrays nested too "
                                         "deeply for the TOML parser (a manifest may nest "
                                         f"{MAX_DEPTH} levels at most)")],
                            str(path)) from None
    return apply_overrides(raw, overrides, source=str(path))


#: how deeply tables and arrays may nest in a manifest (the deepest built-in key,
#: ``teacher.network.backbone.weights``, is 4 levels down)
MAX_DEPTH = 32


def nesting_problem(raw: Any, prefix: str = "") -> Problem | None:
    """The first value nested deeper than :data:`MAX_DEPTH` tables and arrays, as a
    :class:`Problem` at its (shortened) key path; ``None`` when there is none. Iterative:
    it never recurses, whatever the depth."""
    stack: list[tuple[Any, list[str]]] = [(raw, [prefix] if prefix else [])]
    while stack:
        node, parts = stack.pop()
        if len(parts) > MAX_DEPTH:
            shown = parts[:6]
            path = "".join(p if p.startswith("[") or i == 0 else f".{p}"
                           for i, p in enumerate(shown))
            return Problem(path + "...", f"nested deeper than {MAX_DEPTH} levels of tables "
                                         "and arrays")
        if isinstance(node, dict):
            stack.extend((v, [*parts, str(k)]) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, [*parts, f"[{i}]"]) for i, v in enumerate(node))
    return None


_PART = re.compile(r"^([A-Za-z0-9_\-]+)((?:\[\d+\])*)$")


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str],
                    source: str = "<manifest>") -> dict[str, Any]:
    """Apply ``--set`` overrides: ``train.epochs=3``, ``losses[1].weight=0.5``,
    ``backbone.name="resnet50"``. Values are TOML literals; a bare word is a string.
    ``backbone.KEY`` sets ``model.backbone.KEY`` in a manifest that writes
    ``[model.backbone]`` (``[backbone]`` is its shorthand)."""
    problems: list[Problem] = []
    for item in overrides:
        if "=" not in item:
            problems.append(Problem(f"--set {item}", "expected KEY=VALUE"))
            continue
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        except RecursionError:
            problems.append(Problem(f"--set {key}", f"the value is nested deeper than "
                                    f"{MAX_DEPTH} levels of tables and arrays"))
            continue
        if re.match(r"backbone(\.|$)", key) and "backbone" not in raw and isinstance(
                raw.get("model"), dict) and isinstance(raw["model"].get("backbone"), dict):
            key = "model." + key  # the shorthand [backbone] of a manifest in [model] form
        try:
            _set_path(raw, key, value)
        except (KeyError, IndexError, TypeError) as exc:
            problems.append(Problem(f"--set {key}", str(exc).strip("'\"")))
    deep = nesting_problem(raw)
    if deep is not None:
        problems.append(deep)
    if problems:
        raise ManifestError(problems, source)
    return raw


def _set_path(root: dict[str, Any], key: str, value: Any) -> None:
    node: Any = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        m = _PART.match(part)
        if not m:
            raise KeyError(f"invalid key segment {part!r}")
        name, idx = m.group(1), [int(x) for x in re.findall(r"\[(\d+)\]", m.group(2))]
        last = i == len(parts) - 1
        if not isinstance(node, dict):
            raise TypeError(f"{'.'.join(parts[:i])} is not a table")
        if last and not idx:
            node[name] = value
            return
        node = node.setdefault(name, {} if not idx else [])
        for j, k in enumerate(idx):
            if not isinstance(node, list):
                raise TypeError(f"{name} is not an array of tables")
            if k >= len(node):
                raise IndexError(f"{name}[{k}] does not exist (it has {len(node)} entries)")
            if last and j == len(idx) - 1:
                node[k] = value
                return
            node = node[k]



# ---------------------------------------------------------------------------- TOML writing
_BARE = re.compile(r"^[A-Za-z0-9_\-]+$")


def _key(k: str) -> str:
    return k if _BARE.match(k) else _str(k)


def _str(s: str) -> str:
    out = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{out}"'


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if v != v else
                                                  ("inf" if v > 0 else "-inf"))
    if isinstance(v, (str, Path)):
        return _str(str(v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_scalar(x)}" for k, x in v.items()
                               if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(data: Mapping[str, Any]) -> str:
    """Write plain data (tables, arrays of tables, scalars) as TOML; ``None`` is omitted."""
    lines: list[str] = []

    def table(prefix: str, d: Mapping[str, Any], header: str | None) -> None:
        scalars = [(k, v) for k, v in d.items() if v is not None and not _is_table(v)]
        subs = [(k, v) for k, v in d.items() if _is_table(v)]
        if header is not None:
            if lines:
                lines.append("")
            lines.append(header)
        lines.extend(f"{_key(k)} = {_scalar(v)}" for k, v in scalars)
        for k, v in subs:
            full = f"{prefix}{_key(k)}"
            if isinstance(v, dict):
                table(full + ".", v, f"[{full}]")
            else:
                for item in v:
                    table(full + ".", item, f"[[{full}]]")

    table("", data, None)
    return "\n".join(lines) + "\n"


def _is_table(v: Any) -> bool:
    return isinstance(v, dict) or (isinstance(v, list) and bool(v)
                                   and all(isinstance(x, dict) for x in v))
