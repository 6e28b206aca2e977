"""mkdocs hook: the component reference, generated from zsbir's registries at build time.

``on_config`` fills the "Components" section of the nav with one page per registry kind
(``zsbir.registry.KINDS``); ``on_files`` adds those pages (``reference/components/*.md``),
rendered by :func:`render_kind` from the registries, so a component registered in the code
or by an installed plugin appears without editing the docs. ``on_page_content`` turns the
Sphinx roles the docstrings use (``:func:`zsbir.manifest.load```) into code, linked when
mkdocstrings documents the target.

Plain functions, no mkdocs import at module level: ``tests/test_docs.py`` imports this file
and calls :func:`render_kind` directly.
"""

from __future__ import annotations

import importlib.metadata as md
import inspect
import re
from pathlib import Path
from typing import Any

COMPONENTS_DIR = "reference/components"
NAV_PLACEHOLDER = f"{COMPONENTS_DIR}/index.md"

#: manifest section of each kind, and what the section is
_SECTION_NOTES = {
    "protocols": "The benchmark: which images, which classes are seen and unseen.",
    "backbones": "The network under the heads: images (and the domain bit) to pooled features.",
    "losses": "Training objectives; the total loss is the `weight`-ed sum of the list.",
    "teachers": "How a frozen pretrained network's ImageNet signal reaches the losses.",
    "samplers": "Which training items form each batch.",
    "optimizers": "The optimizer over the model's (and the losses') trainable parameters.",
    "schedulers": "The learning-rate schedule, stepped once per epoch.",
    "hashers": "How embeddings are indexed for retrieval: real-valued or binary codes.",
}

_TITLES = {
    "protocols": "Protocols", "backbones": "Backbones", "losses": "Losses",
    "teachers": "Teachers", "samplers": "Samplers", "optimizers": "Optimizers",
    "schedulers": "Schedulers", "hashers": "Hashers",
}


def _title(kind: str) -> str:
    return _TITLES.get(kind, kind.capitalize())


def _anchor(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _section_of(kind: str) -> tuple[str, bool, bool, Any, dict[str, Any]] | None:
    from zsbir.manifest import COMPONENT_SECTIONS

    for key, (k, is_list, required, default, reserved) in COMPONENT_SECTIONS.items():
        if k == kind:
            return key, is_list, required, default, reserved
    return None


def _section_line(kind: str) -> str:
    from zsbir.registry import INJECTED

    sec = _section_of(kind)
    parts = []
    if sec is not None:
        key, is_list, required, default, reserved = sec
        header = f"[[{key}]]" if is_list else f"[{key}]"
        need = "required" if required else "optional"
        if default is not None:
            names = [t["name"] for t in (default if isinstance(default, list) else [default])]
            need += f"; default {', '.join(f'`{n}`' for n in names)}"
        parts.append(f"manifest table `{header}` ({need})")
        for rkey, rdefault in reserved.items():
            if rkey == "weight":
                parts.append(f"every table also takes `weight` (float, default {rdefault})")
            elif rkey == "backbone":
                parts.append("an optional `[teacher.backbone]` table names the teacher's "
                             "network (default: the student's `[backbone]` table)")
    parts.append(f"entry-point group `zsbir.{kind}`")
    injected = sorted(INJECTED.get(kind, ()))
    if injected:
        parts.append("supplied by zsbir, never written in a manifest: "
                     + ", ".join(f"`{n}`" for n in injected))
    return "; ".join(parts) + "."


def parameter_rows(comp: Any) -> list[tuple[str, str, str]]:
    """(name, type, default) of the parameters a manifest may set, as `zsbir describe`."""
    from zsbir.manifest import _hints, _type_name

    hints = _hints(comp.obj)
    rows = []
    for p in comp.parameters():
        tp = hints.get(p.name, p.annotation)
        type_text = _type_name(tp) if tp is not inspect.Parameter.empty else "any"
        default = "required" if p.default is inspect.Parameter.empty else repr(p.default)
        rows.append((p.name, type_text, default))
    return rows


def _source(comp: Any) -> str:
    """``package/path.py:line`` relative to the directory holding the top-level package."""
    loc = comp.location
    file, _, line = loc.rpartition(":")
    top = comp.obj.__module__.split(".")[0]
    parts = Path(file).parts
    if top in parts:
        i = len(parts) - 1 - parts[::-1].index(top)
        file = "/".join(parts[i:])
    return f"{file}:{line}" if line else loc


def _documentable(obj: Any) -> str | None:
    """The dotted path mkdocstrings can render for ``obj``, or None."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    try:
        target = __import__(module, fromlist=["_"])
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError):
        return None
    return f"{module}.{qualname}" if target is obj else None


def render_component(comp: Any, *, mkdocstrings: bool = True) -> str:
    """One component's section: origin, needs, parameter table, docstring."""
    obj = comp.obj
    path = _documentable(obj)
    lines = [f"### `{comp.name}` {{ #{_anchor(comp.name)} }}", ""]
    origin = [f"package `{comp.package}`"]
    if path:
        origin.append(f"`{path}`")
    origin.append(f"source `{_source(comp)}`")
    lines += [" · ".join(origin), ""]
    requires = sorted(getattr(obj, "requires", ()) or ())
    if requires:
        lines += ["Needs: " + ", ".join(f"`{r}`" for r in requires)
                  + " (checked by `zsbir validate`).", ""]
    structure = getattr(obj, "structure", None)
    if comp.kind == "samplers" and isinstance(structure, str):
        lines += [f"Batch structure: `{structure}`.", ""]
    rows = parameter_rows(comp)
    if rows:
        lines += ["| parameter | type | default |", "|---|---|---|"]
        lines += [f"| `{n}` | {_cell(t)} | `{_cell(d)}` |" if d != "required"
                  else f"| `{n}` | {_cell(t)} | **required** |" for n, t, d in rows]
    else:
        lines.append("No parameters besides `name`.")
    lines.append("")
    if path and mkdocstrings:
        lines += [f"::: {path}", "    options:", "      show_root_heading: false",
                  "      show_root_toc_entry: false", "      members: false",
                  "      show_bases: false", "      show_signature: false",
                  "      show_source: false", "      heading_level: 4", ""]
    elif comp.doc:
        lines += ["```text", comp.doc, "```", ""]
    return "\n".join(lines)


def render_kind(kind: str, *, mkdocstrings: bool = True) -> str:
    """The reference page of one registry kind: every built-in and installed-plugin name."""
    from zsbir.registry import (
        Component,
        PluginLoadError,
        RegistryError,
        get_registry,
        plugin_failures,
    )

    reg = get_registry(kind)
    builtin, plugins, failed = [], [], []
    for name in reg.names():
        entry = reg.entry(name)
        if isinstance(entry, Component) and entry.package == "zsbir":
            builtin.append(entry)
            continue
        try:
            plugins.append(reg.component(name))
        except PluginLoadError as exc:
            failed.append((name, str(exc)))
        except RegistryError as exc:  # pragma: no cover - any other lookup problem
            failed.append((name, str(exc)))
    shadowed = reg.builtin_shadowed()

    out = [
        f"# {_title(kind)}", "",
        _SECTION_NOTES.get(kind, ""), "",
        _section_line(kind), "",
        "Generated from `zsbir.registry` when this site was built. The same information, "
        f"on your installation: `zsbir list {kind}` and `zsbir describe {kind} NAME`.", "",
        "| name | package | summary |", "|---|---|---|",
    ]
    for comp in builtin + plugins:
        out.append(f"| [`{comp.name}`](#{_anchor(comp.name)}) | `{comp.package}` | "
                   f"{_cell(_plain(comp.summary))} |")
    out += ["", "## Built-in", ""]
    out += [render_component(c, mkdocstrings=mkdocstrings) for c in builtin]
    out += ["## From plugins installed when this site was built", ""]
    if plugins:
        versions = {}
        for c in plugins:
            try:
                versions[c.package] = md.version(c.package)
            except md.PackageNotFoundError:
                versions[c.package] = "?"
        out += ["These names exist only where their distribution is installed "
                "(see [Writing a plugin](../../plugins.md)): "
                + ", ".join(f"`{d}` {v}" for d, v in sorted(versions.items())) + ".", ""]
        out += [render_component(c, mkdocstrings=mkdocstrings) for c in plugins]
    else:
        out += ["None.", ""]
    failures = failed + [(f.name, f"{f.dist} {f.version}: {f.error}")
                         for f in plugin_failures()
                         if f.group == f"zsbir.{kind}" and f.name not in dict(failed)]
    if failures:
        out += ["Plugins that failed to load (as `zsbir plugins` reports them):", ""]
        out += [f"- `{n}`: {_cell(e)}" for n, e in failures]
        out.append("")
    if shadowed:
        out += ["Plugin entry points ignored because a built-in has the name:", ""]
        out += [f"- `{e.name}` from `{e.dist}` {e.version}" for e in shadowed]
        out.append("")
    return "\n".join(out)


def render_index() -> str:
    from zsbir.registry import KINDS, get_registry

    out = [
        "# Components", "",
        "Every name a manifest can use, per registry kind, generated from `zsbir.registry` "
        "when this site was built (built-in components and those of the plugins installed "
        "then). Each page gives the manifest table, the parameters with their types and "
        "defaults as validation reads them from the signatures, and the docstring.", "",
        "| kind | names |", "|---|---|",
    ]
    for kind in KINDS:
        names = get_registry(kind).names()
        out.append(f"| [{_title(kind)}]({kind}.md) | "
                   + ", ".join(f"`{n}`" for n in names) + " |")
    return "\n".join(out) + "\n"


def _plain(text: str) -> str:
    return _ROLE_MD.sub(r"`\2`", text).replace("``", "`")


_ROLE_MD = re.compile(r":(func|mod|class|data|meth|attr|exc|obj):`~?([^`]+)`")


# ------------------------------------------------------------------------- mkdocs events
def on_config(config: Any) -> Any:
    """Replace the nav entry for ``reference/components/index.md`` by one page per kind."""
    from zsbir.registry import KINDS

    pages = [{"Overview": NAV_PLACEHOLDER}]
    pages += [{_title(k): f"{COMPONENTS_DIR}/{k}.md"} for k in KINDS]

    def walk(items: list[Any]) -> bool:
        for i, item in enumerate(items):
            if isinstance(item, dict):
                (title, value), = item.items()
                if value == NAV_PLACEHOLDER:
                    items[i] = {title: pages}
                    return True
                if isinstance(value, list) and walk(value):
                    return True
        return False

    if config.get("nav"):
        walk(config["nav"])
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    from zsbir.registry import KINDS

    files.append(File.generated(config, NAV_PLACEHOLDER, content=render_index()))
    for kind in KINDS:
        files.append(File.generated(config, f"{COMPONENTS_DIR}/{kind}.md",
                                    content=render_kind(kind)))
    return files


# Sphinx roles as mkdocstrings renders them: `:func:<code>zsbir.x.y</code>`.
_ROLE_HTML = re.compile(
    r":(?:func|mod|class|data|meth|attr|exc|obj):<code>~?([A-Za-z_][\w.]*)(\(\))?</code>")


def _role(match: re.Match[str]) -> str:
    ident, call = match.group(1), match.group(2) or ""
    title = f"<code>{ident}{call}</code>"
    if "." in ident:
        return f'<autoref identifier="{ident}" optional>{title}</autoref>'
    return title


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE_HTML.sub(_role, html)
