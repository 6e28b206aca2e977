"""The import graph of zsbir/ has no cycle (issue 24, point 10).

The graph is read from the source with :mod:`ast`, nothing is imported. Its edges are the
imports a module runs when it is imported: statements at module level, including those
inside module-level ``if``/``try``/``with`` blocks, but not ``if TYPE_CHECKING:`` blocks and
not imports inside functions or classes (run later, on first use: allowed, and the usual way
to break a cycle). An import of ``a.b.c`` is an edge to ``a.b.c`` and to each package on its
way (``a``, ``a.b``) that the importing module is not itself inside: importing a module of
another package runs that package's ``__init__`` first. ``from a.b import c`` is an edge to
``a.b.c`` when that is a module, else to ``a.b``.

Cycles that remain in files other helpers own are named edge by edge in
:data:`ALLOWED_EDGES`; the test ignores exactly those edges and fails when one of them no
longer exists or no longer closes a cycle, so the list can only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "zsbir"

#: Module-level imports that close a cycle, in files outside this change's ownership
#: (issue 24 point 10: they are to go). Each entry: (importer, imported) -> why.
ALLOWED_EDGES: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Import statements run when the module is imported (not in functions or classes, not
    under ``if TYPE_CHECKING:``)."""
    out: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                out += _module_level(node.body)
            out += _module_level(node.orelse)
        elif isinstance(node, (ast.Try, ast.TryStar)):
            for block in (node.body, node.orelse, node.finalbody,
                          *[h.body for h in node.handlers]):
                out += _module_level(block)
        elif isinstance(node, (ast.With, ast.For, ast.While)):
            out += _module_level(node.body)
    return out


def import_graph() -> dict[str, set[str]]:
    """zsbir module -> the zsbir modules its module-level imports run."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _module_level(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                wanted = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                          for a in node.names]
            for target in wanted:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:i])
                    inside = name == prefix or name.startswith(prefix + ".")
                    if prefix in mods and prefix != name and (i == len(parts) or not inside):
                        targets.add(prefix)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth: the longest import chain (small)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _path(graph: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """A shortest import chain start -> ... -> goal (breadth first)."""
    seen, frontier = {start: [start]}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w not in seen:
                    seen[w] = [*seen[v], w]
                    if w == goal:
                        return seen[w]
                    nxt.append(w)
        frontier = nxt
    return None


def _describe(graph: dict[str, set[str]], component: list[str]) -> str:
    first = component[0]
    back = next(w for w in component[1:] if first in graph[w] or _path(graph, w, first))
    loop = (_path(graph, first, back) or [first]) + (_path(graph, back, first) or [])[1:]
    return " -> ".join(loop)


def test_the_graph_is_read_from_the_source():
    """The reader itself: known edges are found, function-local imports are not."""
    graph = import_graph()
    assert "zsbir.evaluation.metrics" in graph["zsbir.evaluation.ranking"]  # relative
    assert "zsbir.search.files" in graph["zsbir.search.store"]
    # a lazy import (in a function) is no edge: store embeds through the engine lazily
    assert "zsbir.engine.index" not in graph["zsbir.search.embedding"]
    # an import of another package's module runs that package's __init__ first
    assert "zsbir.evaluation" in graph["zsbir.search.faiss_index"]
    # TYPE_CHECKING imports are no edges
    assert "zsbir.engine.distributed.group" not in graph["zsbir.engine.distributed"]
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    for (src, dst), why in ALLOWED_EDGES.items():
        assert dst in graph.get(src, set()), (
            f"allowed edge {src} -> {dst} ({why}) no longer exists: remove it from "
            "ALLOWED_EDGES")
    pruned = {v: {w for w in ws if (v, w) not in ALLOWED_EDGES} for v, ws in graph.items()}
    found = cycles(pruned)
    assert not found, "import cycles (module-level imports):\n" + "\n".join(
        _describe(pruned, c) for c in found)
    for src, dst in ALLOWED_EDGES:
        assert _path(graph, dst, src), (
            f"allowed edge {src} -> {dst} no longer closes a cycle: remove it from "
            "ALLOWED_EDGES")


@pytest.mark.parametrize("module", ["zsbir.engine.distributed",
                                    "zsbir.engine.distributed.sharding"])
def test_sharding_arithmetic_imports_no_torch(module):
    """The search index shards file lists without torch (issue 24 point 10)."""
    import subprocess
    import sys

    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_the_core_imports_neither_pymilvus_nor_ray():
    """The milvus and ray extras are optional (issue 28 point 5): building and searching a
    faiss index, the CLI and the backends' registry import neither pymilvus nor ray."""
    import subprocess
    import sys

    code = ("import sys, zsbir, zsbir.cli, zsbir.search.store, zsbir.search.api, "
            "zsbir.search.commands, zsbir.search.backends.faiss_dir, "
            "zsbir.search.backends.milvus, zsbir.search.ray_embed\n"
            "from zsbir.registry import get_registry\n"
            "get_registry('index_backends').get('milvus')\n"
            "print(sorted(m for m in ('pymilvus', 'milvus_lite', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
