"""mkdocs hook: the component and API references, generated at build time.

``on_config`` fills the "Components" section of the nav with one page per registry kind
(``zsbir.registry.KINDS``) and the "API" section with one page per module or subpackage of
``zsbir``; ``on_files`` adds those pages (``reference/components/*.md``, rendered by
:func:`render_kind` from the registries, and ``reference/api/*.md``, mkdocstrings
directives from :func:`api_modules`), so a component registered in the code or by an
installed plugin, or a new module, appears without editing the docs. ``on_page_content`` turns the
Sphinx roles the docstrings use (``:func:`zsbir.manifest.load```) into code, linked when
mkdocstrings documents the target.

Plain functions, no mkdocs import at module level: ``tests/test_docs.py`` imports this file
and calls :func:`render_kind` directly.
"""

from __future__ import annotations

import importlib.metadata as md
import inspect
import json
import re
from pathlib import Path
from typing import Any

COMPONENTS_DIR = "reference/components"
NAV_PLACEHOLDER = f"{COMPONENTS_DIR}/index.md"
API_DIR = "reference/api"
API_PLACEHOLDER = f"{API_DIR}/index.md"
#: API pages come first in this order, then any other module alphabetically
API_ORDER = ("manifest", "registry", "build", "context", "evaluation", "hashing", "engine",
             "data", "models", "losses", "teachers", "semantics", "report")
#: not API: the CLI has its own reference
API_EXCLUDE = ("cli",)

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
    "heads": "What sits on the backbone's features: the retrieval embedding and classifiers.",
    "networks": "Frozen networks that produce a teacher's signal (logits and/or features).",
    "steps": "What one training step does: forward, teacher signal, weighted losses.",
    "rerankers": "Test-time re-ranking of the gallery, scored beside the plain ranking.",
    "pair_scorers": "Scores of (query, gallery item) pairs from per-item outputs (tokens): "
                    "exhaustive or top-K re-scoring.",
    "importers": "Published checkpoints read into zsbir run directories (`zsbir import`).",
}

_TITLES = {
    "protocols": "Protocols", "backbones": "Backbones", "losses": "Losses",
    "teachers": "Teachers", "samplers": "Samplers", "optimizers": "Optimizers",
    "schedulers": "Schedulers", "hashers": "Hashers", "heads": "Heads",
    "networks": "Networks", "steps": "Steps", "rerankers": "Rerankers",
    "pair_scorers": "Pair scorers", "importers": "Importers",
}


def _title(kind: str) -> str:
    return _TITLES.get(kind, kind.capitalize())


def _anchor(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


#: where the nested component kinds' tables usually sit (core API, issue 14)
_NESTED_HOME = {"backbones": "model.backbone", "heads": "model.head", "networks": "teacher.network",
                "steps": "train.step"}


def _section_of(kind: str) -> tuple[str, bool, bool, Any, dict[str, Any]] | None:
    """(key, is a list, required, default table, reserved keys) of a top-level section."""
    import zsbir.manifest as zm

    sections = zm.COMPONENT_SECTIONS
    keys = getattr(zm, "COMPONENT_KEYS", None)
    reserved_all = getattr(zm, "RESERVED", {})
    for key, spec in sections.items():
        if len(spec) == 5:  # (kind, is_list, required, default, reserved)
            k, is_list, required, default, reserved = spec
        else:  # (is_list, required, default); kind from COMPONENT_KEYS
            k = (keys or {}).get(key)
            is_list, required, default = spec
            reserved = reserved_all.get(key, {})
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
        if default:
            names = [t["name"] for t in (default if isinstance(default, list) else [default])]
            need += f"; default {', '.join(f'`{n}`' for n in names)}"
        parts.append(f"manifest table `{header}` ({need})")
        for rkey, rdefault in reserved.items():
            if rkey == "weight":
                parts.append(f"every table also takes `weight` (float, default {rdefault})")
            elif rkey == "backbone":
                parts.append("an optional `[teacher.backbone]` table names the teacher's "
                             "network (default: the student's `[backbone]` table)")
    elif kind in _NESTED_HOME:
        parts.append(f"manifest table `[{_NESTED_HOME[kind]}]` (a component nested in "
                     "another one's table)")
    parts.append(f"entry-point group `zsbir.{kind}`")
    injected = sorted(INJECTED.get(kind, ()))
    if injected:
        parts.append("supplied by zsbir, never written in a manifest: "
                     + ", ".join(f"`{n}`" for n in injected))
    return "; ".join(parts) + "."


def toml_literal(value: Any) -> str:
    """A default as a manifest spells it (``true``, ``"photo"``, ``[0.9, 0.999]``);
    ``None`` (nothing set) as ``(unset)``."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return repr(value)


def parameter_docs(doc: str) -> dict[str, str]:
    """Parameter descriptions from a Google-style ``Args:`` section (empty without griffe)."""
    try:
        from griffe import Docstring, DocstringSectionKind, parse_google
    except ImportError:  # pragma: no cover - griffe ships with mkdocstrings-python
        return {}
    out: dict[str, str] = {}
    for section in parse_google(Docstring(doc), warnings=False):
        if section.kind is DocstringSectionKind.parameters:
            out.update((p.name, " ".join(p.description.split())) for p in section.value)
    return out


def parameter_rows(comp: Any) -> list[tuple[str, str, str, str]]:
    """(name, type, default, description) of the parameters a manifest may set, as
    `zsbir describe` shows them; defaults spelled as in TOML."""
    from zsbir.manifest import _hints, _type_name

    hints = _hints(comp.obj)
    described = parameter_docs(comp.doc)
    rows = []
    for p in comp.parameters():
        tp = hints.get(p.name, p.annotation)
        type_text = _type_name(tp) if tp is not inspect.Parameter.empty else "any"
        default = ("required" if p.default is inspect.Parameter.empty
                   else toml_literal(p.default))
        rows.append((p.name, type_text, default, described.get(p.name, "")))
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
    raw_requires = getattr(obj, "requires", ()) or ()
    if callable(raw_requires) and not isinstance(raw_requires, (set, frozenset)):
        # depends on the component's parameters (zsbir.registry.declared)
        lines += ["Needs: depends on its parameters (checked by `zsbir validate`).", ""]
    elif raw_requires:
        lines += ["Needs: " + ", ".join(f"`{r}`" for r in sorted(raw_requires))
                  + " (checked by `zsbir validate`).", ""]
    roles = getattr(obj, "roles", None)
    if comp.kind in ("samplers", "losses") and isinstance(roles, (tuple, frozenset)) and roles:
        shown = roles if isinstance(roles, tuple) else sorted(roles)
        lines += [("Tuples: " if comp.kind == "samplers" else "Needs tuples with the roles ")
                  + ", ".join(f"`{r}`" for r in shown) + ".", ""]
    rows = parameter_rows(comp)
    if rows:
        lines += ["| parameter | type | default | description |", "|---|---|---|---|"]
        lines += [f"| `{n}` | {_cell(t)} | "
                  + ("**required**" if d == "required" else f"`{_cell(d)}`")
                  + f" | {_cell(_plain(text))} |" for n, t, d, text in rows]
    else:
        lines.append("No parameters besides `name`.")
    lines.append("")
    if path and mkdocstrings:
        lines += [f"::: {path}", "    options:", "      show_root_heading: false",
                  "      show_root_toc_entry: false", "      members: false",
                  "      show_bases: false", "      show_signature: false",
                  "      show_source: false", "      show_docstring_parameters: false",
                  "      heading_level: 4", ""]
    elif comp.doc:
        lines += ["```text", comp.doc, "```", ""]
    return "\n".join(lines)


def render_kind(kind: str, *, mkdocstrings: bool = True) -> str:
    """The reference page of one registry kind: every built-in and installed-plugin name."""
    from zsbir.registry import (
        PluginLoadError,
        RegistryError,
        get_registry,
        plugin_failures,
    )

    reg = get_registry(kind)
    builtin, plugins, failed = [], [], []
    for name in reg.names():  # built-ins and plugins are entry points alike: load each
        try:
            comp = reg.component(name)
            (builtin if comp.package == "zsbir" else plugins).append(comp)
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


# ------------------------------------------------------------------------- API pages
def api_modules() -> dict[str, list[str]]:
    """Top-level module or subpackage of ``zsbir`` -> the modules its API page documents."""
    import pkgutil

    import zsbir

    out: dict[str, list[str]] = {}
    for info in pkgutil.iter_modules(zsbir.__path__):
        if info.name in API_EXCLUDE or info.name.startswith("_"):
            continue
        name = f"zsbir.{info.name}"
        if info.ispkg:
            package = __import__(name, fromlist=["_"])
            subs = sorted(m.name for m in pkgutil.walk_packages(package.__path__, f"{name}.")
                          if not any(p.startswith("_") for p in m.name.split(".")))
            out[info.name] = [name, *subs]
        else:
            out[info.name] = [name]
    rank = {n: i for i, n in enumerate(API_ORDER)}
    return dict(sorted(out.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def _module_summary(name: str) -> str:
    import importlib

    doc = inspect.getdoc(importlib.import_module(name)) or ""
    return _plain(doc.strip().split("\n\n")[0].replace("\n", " ")) if doc else ""


def render_api_page(top: str, modules: list[str]) -> str:
    """``::: module`` directives for one top-level module, or a package and its modules."""
    if len(modules) == 1:
        return f"::: {modules[0]}\n    options:\n      heading_level: 1\n"
    package, subs = modules[0], modules[1:]
    out = [f"# `{package}`", "", f"::: {package}", "    options:", "      members: false",
           "      show_root_heading: false", "      show_root_toc_entry: false", ""]
    for sub in subs:
        out += [f"::: {sub}", ""]
    return "\n".join(out)


def render_api_index() -> str:
    out = ["# API", "", "Generated from the docstrings of the `zsbir` package when this site "
           "was built, one page per module or subpackage.", "",
           "| module | summary |", "|---|---|"]
    for top, modules in api_modules().items():
        for name in modules:
            out.append(f"| [`{name}`]({top}.md) | {_cell(_module_summary(name))} |")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------- mkdocs events
def _replace_nav(items: list[Any], placeholder: str, pages: list[Any]) -> bool:
    for i, item in enumerate(items):
        if isinstance(item, dict):
            (title, value), = item.items()
            if value == placeholder:
                items[i] = {title: pages}
                return True
            if isinstance(value, list) and _replace_nav(value, placeholder, pages):
                return True
    return False


def on_config(config: Any) -> Any:
    """Replace the nav entries of the two generated sections by their pages."""
    from zsbir.registry import KINDS

    components = [{"Overview": NAV_PLACEHOLDER}]
    components += [{_title(k): f"{COMPONENTS_DIR}/{k}.md"} for k in KINDS]
    api = [{"Overview": API_PLACEHOLDER}]
    api += [{f"zsbir.{top}": f"{API_DIR}/{top}.md"} for top in api_modules()]
    if config.get("nav"):
        _replace_nav(config["nav"], NAV_PLACEHOLDER, components)
        _replace_nav(config["nav"], API_PLACEHOLDER, api)
    css = f"{KATEX_CSS_DIR}/katex.min.css"
    extra_css = config.get("extra_css")
    if extra_css is not None and css not in extra_css:
        extra_css.append(css)
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    from zsbir.registry import KINDS

    files.append(File.generated(config, NAV_PLACEHOLDER, content=render_index()))
    for kind in KINDS:
        files.append(File.generated(config, f"{COMPONENTS_DIR}/{kind}.md",
                                    content=render_kind(kind)))
    files.append(File.generated(config, API_PLACEHOLDER, content=render_api_index()))
    for top, modules in api_modules().items():
        files.append(File.generated(config, f"{API_DIR}/{top}.md",
                                    content=render_api_page(top, modules)))
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
    # mkdocs-click prints click >= 8.2's "no default" sentinel as a default value
    html = html.replace("<code>Sentinel.UNSET</code>", "")
    html = render_math(html, where=getattr(kwargs.get("page"), "file", None))
    return _ROLE_HTML.sub(_role, html)


# ------------------------------------------------------------------- equations (KaTeX)
# Equations are rendered to HTML when the site is built (KaTeX run by node), so a page
# shows them without JavaScript or network, from a file:// path too. The KaTeX npm
# package is installed once into .cache/docs (npm; `.ci/run` does it before building).
KATEX_VERSION = "0.16.22"
ROOT = Path(__file__).resolve().parents[2]
KATEX_PREFIX = ROOT / ".cache" / "docs"
KATEX_CSS_DIR = "assets/katex"
# pymdownx.arithmatex (generic): <span class="arithmatex">\(...\)</span>, and
# <div class="arithmatex">\[...\]</div> for display equations
_MATH = re.compile(r'<(span|div) class="arithmatex">\s*\\([(\[])(.*?)\\[)\]]\s*</\1>', re.S)
_NODE_RENDER = r"""
const katex = require(process.argv[1]);
let input = "";
process.stdin.on("data", (d) => { input += d; });
process.stdin.on("end", () => {
  const out = JSON.parse(input).map(([tex, display]) => {
    try {
      return [katex.renderToString(tex, {displayMode: display, throwOnError: true,
                                         output: "htmlAndMathml", strict: "ignore"}), null];
    } catch (e) { return [null, String(e.message || e)]; }
  });
  process.stdout.write(JSON.stringify(out));
});
"""


class MathError(RuntimeError):
    """KaTeX is missing, or an equation does not parse."""


def katex_dir() -> Path:
    """The KaTeX npm package (``$ZSBIR_KATEX_DIR``, or installed into .cache/docs with
    npm on first use)."""
    import os
    import shutil
    import subprocess

    env = os.environ.get("ZSBIR_KATEX_DIR")
    path = Path(env) if env else KATEX_PREFIX / "node_modules" / "katex"
    if (path / "dist" / "katex.min.css").is_file():
        return path
    npm = shutil.which("npm")
    if env is None and npm and shutil.which("node"):
        KATEX_PREFIX.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix",
                               str(KATEX_PREFIX), f"katex@{KATEX_VERSION}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode == 0 and (path / "dist" / "katex.min.css").is_file():
            return path
        raise MathError(f"npm could not install katex@{KATEX_VERSION}: {proc.stdout[-500:]}")
    raise MathError(
        f"KaTeX not found at {path}: the docs render equations at build time with node and "
        f"the katex npm package; install them (apt-get install nodejs npm; npm install "
        f"--prefix {KATEX_PREFIX} katex@{KATEX_VERSION}) or set ZSBIR_KATEX_DIR")


def katex_render(items: list[tuple[str, bool]]) -> list[str]:
    """HTML of each ``(tex, display)``, rendered by KaTeX in one node process."""
    import shutil
    import subprocess

    if not items:
        return []
    node = shutil.which("node")
    if node is None:
        raise MathError("node is not installed: the docs render equations with KaTeX "
                        "(apt-get install nodejs)")
    proc = subprocess.run([node, "-e", _NODE_RENDER, str(katex_dir())],
                          input=json.dumps(items), capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        raise MathError(f"KaTeX failed: {proc.stderr[-500:]}")
    out = []
    for (tex, _), (html, err) in zip(items, json.loads(proc.stdout)):
        if err is not None:
            raise MathError(f"equation {tex!r}: {err}")
        out.append(html)
    return out


def render_math(html: str, where: Any = None) -> str:
    """Every arithmatex equation of a page replaced by KaTeX's HTML."""
    import html as html_lib

    matches = list(_MATH.finditer(html))
    if not matches:
        return html
    items = [(html_lib.unescape(m.group(3)).strip(), m.group(2) == "[") for m in matches]
    try:
        rendered = iter(katex_render(items))
    except MathError as exc:
        raise MathError(f"{where or 'a page'}: {exc}") from None
    return _MATH.sub(lambda m: (f'<{m.group(1)} class="arithmatex">{next(rendered)}'
                                f"</{m.group(1)}>"), html)


def on_post_build(config: Any) -> None:
    """KaTeX's stylesheet and fonts into the site (``assets/katex``)."""
    import shutil

    src = katex_dir() / "dist"
    dst = Path(config["site_dir"]) / KATEX_CSS_DIR
    (dst / "fonts").mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "katex.min.css", dst / "katex.min.css")
    for font in (src / "fonts").glob("*.woff2"):
        shutil.copy2(font, dst / "fonts" / font.name)
