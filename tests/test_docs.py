"""The documentation runs: every command, manifest and snippet shown in docs/ is executed.

Each fenced ``bash``/``sh``/``console``/``shell``, ``toml`` and ``python`` block in
``docs/**/*.md`` must carry a marker comment on the line before it,
``<!-- doctest: KIND [options] -->``; a block without one fails
:func:`test_every_block_is_marked`. The kinds and options are documented for writers in
``docs/contributing-docs.md``; in short:

- ``run``: every line is a ``zsbir`` command, run with click's ``CliRunner`` in the page's
  sandbox; ``zsbir run MANIFEST`` lines are run as ``zsbir validate MANIFEST`` (training
  takes minutes) and ``zsbir run --resume`` lines are not run, unless the marker says
  ``full``.
  ``exit=N`` expects that exit status (default 0).
- ``shell``: the block runs in ``bash -euo pipefail`` in the page's sandbox.
- ``python``: the block is executed; ``setup`` (a hidden multi-line comment,
  ``<!-- doctest: setup`` ... ``-->``) is Python run before the next blocks.
- ``manifest``: resolved by :func:`zsbir.manifest.resolve` (``invalid``: must fail);
  ``fragment``: merged into ``base=`` (default ``examples/quickstart.toml``) first;
  ``pyproject``: zsbir entry points well-formed (``matches=FILE``: and present there);
  ``toml``: parsed. ``file=NAME`` also writes the block into the sandbox.
- ``output``: the block must equal the output of the page's last executed block
  (whitespace-insensitive; ``contains``: each line must occur in it).
- ``skip reason="..."``: shown only (installs, downloads); such blocks may not hold
  ``zsbir`` commands.
- ``requires=a,b``: skip unless these distributions (or ``wordnet``) are available.

Blocks of a page share one sandbox directory (with ``examples``, ``plugins`` and
``benchmarks`` linked from the repository) and run in page order, so a block may use a
file an earlier block wrote. The sandbox path prints as ``/home/me/work``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
HOOK = DOCS / "hooks" / "zsbir_docs.py"
SHOWN_SANDBOX = "/home/me/work"
LINKED = ("examples", "plugins", "benchmarks")

SHELL_LANGS = {"bash", "sh", "console", "shell"}
CHECKED_LANGS = SHELL_LANGS | {"toml", "python", "py"}
KINDS_FOR = {
    "run": SHELL_LANGS, "shell": SHELL_LANGS,
    "python": {"python", "py"},
    "manifest": {"toml"}, "fragment": {"toml"}, "pyproject": {"toml"}, "toml": {"toml"},
    "skip": CHECKED_LANGS,
    "output": None,  # any language (usually text)
    "setup": {"python"},
}
EXECUTED = {"run", "shell", "python", "setup"}

MARKER = re.compile(r"^\s*<!--\s*doctest:\s*(?P<spec>.*?)\s*-->\s*$")
SETUP_START = re.compile(r"^\s*<!--\s*doctest:\s*setup\s*$")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
SNIPPET = re.compile(r'^\s*-+8<-+\s+"(?P<path>[^"]+)"\s*$')  # pymdownx.snippets, base: root


# ------------------------------------------------------------------------------- parsing
@dataclass
class Block:
    page: str
    line: int
    lang: str
    kind: str | None
    options: dict[str, str]
    code: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    parts = shlex.split(spec)
    if not parts:
        return "", {}
    options = {}
    for p in parts[1:]:
        key, eq, value = p.partition("=")
        options[key] = value if eq else "true"
    return parts[0], options


def parse_page(path: Path) -> list[Block]:
    """The checkable blocks of one page, in order (markers attached)."""
    page = path.relative_to(DOCS).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    pending: tuple[str, dict[str, str]] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if SETUP_START.match(line):
            start, body = i + 1, []
            i += 1
            while i < len(lines) and "-->" not in lines[i]:
                body.append(lines[i])
                i += 1
            blocks.append(Block(page, start, "python", "setup", {}, "\n".join(body) + "\n"))
            i += 1
            continue
        m = MARKER.match(line)
        if m:
            pending = _parse_spec(m.group("spec"))
            i += 1
            continue
        f = FENCE.match(line)
        if f:
            indent, fence, lang = f.group("indent"), f.group("fence"), f.group("lang").lower()
            start, body = i + 1, []
            i += 1
            while i < len(lines):
                close = lines[i].strip()
                if close.startswith(fence[0] * len(fence)) and set(close) == {fence[0]}:
                    break
                text = lines[i]
                text = text[len(indent):] if text.startswith(indent) else text.lstrip()
                snippet = SNIPPET.match(text)
                included = ROOT / snippet.group("path") if snippet else None
                if included is not None and included.is_file():  # what the reader sees
                    text = included.read_text("utf-8").rstrip("\n")
                body.append(text)
                i += 1
            i += 1
            if pending is not None or lang in CHECKED_LANGS:
                kind, options = pending if pending is not None else (None, {})
                blocks.append(Block(page, start, lang, kind, options, "\n".join(body) + "\n"))
            pending = None
            continue
        if line.strip():
            pending = None
        i += 1
    return blocks


def doc_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.relative_to(DOCS).parts)


ALL_BLOCKS = [b for p in doc_pages() for b in parse_page(p)]
BY_PAGE: dict[str, list[Block]] = {}
for _b in ALL_BLOCKS:
    BY_PAGE.setdefault(_b.page, []).append(_b)


def _commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped."""
    joined = code.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        args = shlex.split(line, comments=True)
        if args:
            out.append(args)
    return out


# ------------------------------------------------------------------------------- checks
def test_docs_have_blocks():
    assert len(ALL_BLOCKS) > 20, "docs/ lost its examples (or the parser broke)"


def test_every_block_is_marked():
    problems = []
    last_executed: dict[str, bool] = {}
    for b in ALL_BLOCKS:
        if b.kind is None:
            problems.append(f"{b.id}: ```{b.lang} block without a <!-- doctest: ... --> marker")
            continue
        if b.kind not in KINDS_FOR:
            problems.append(f"{b.id}: unknown doctest kind {b.kind!r} "
                            f"(known: {', '.join(KINDS_FOR)})")
            continue
        langs = KINDS_FOR[b.kind]
        if langs is not None and b.lang not in langs:
            problems.append(f"{b.id}: doctest kind {b.kind!r} on a ```{b.lang} block")
        if b.kind == "skip":
            if not b.options.get("reason"):
                problems.append(f"{b.id}: skip needs reason=\"...\"")
            if b.lang in SHELL_LANGS and any(c[0] == "zsbir" for c in _commands(b.code)):
                problems.append(f"{b.id}: a skipped block holds a zsbir command; mark it "
                                "`run` (zsbir run lines are validated, not trained)")
        if b.kind == "run":
            for cmd in _commands(b.code):
                if cmd[0] != "zsbir":
                    problems.append(f"{b.id}: `run` blocks hold only zsbir commands, got "
                                    f"{cmd[0]!r} (use `shell`)")
        if b.kind == "output" and not last_executed.get(b.page):
            problems.append(f"{b.id}: an output block must follow an executed block")
        if b.kind in EXECUTED:
            last_executed[b.page] = True
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------- sandbox
@dataclass
class Sandbox:
    path: Path
    done: int = 0
    output: str | None = None
    failed: dict[int, str] = field(default_factory=dict)


@pytest.fixture(scope="session")
def sandboxes(tmp_path_factory) -> dict[str, Sandbox]:
    return {}


def _sandbox(sandboxes: dict[str, Sandbox], page: str, tmp_path_factory) -> Sandbox:
    if page not in sandboxes:
        path = tmp_path_factory.mktemp("doc-" + re.sub(r"\W", "-", page))
        for name in LINKED:
            (path / name).symlink_to(ROOT / name, target_is_directory=True)
        sandboxes[page] = Sandbox(path)
    return sandboxes[page]


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _skip_reason(block: Block) -> str | None:
    for req in filter(None, block.options.get("requires", "").split(",")):
        if req == "wordnet":
            try:
                from zsbir.semantics import WordNetNotFoundError, ensure_wordnet

                ensure_wordnet()
            except WordNetNotFoundError:
                return "WordNet is not installed (see docs/weights-and-wordnet.md)"
            continue
        try:
            md.version(req)
        except md.PackageNotFoundError:
            return f"needs {req}, which is not installed"
    return None


def _normalize(text: str, sandbox: Path) -> str:
    for p in {str(sandbox.resolve()), str(sandbox)}:
        text = text.replace(p, SHOWN_SANDBOX)
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return " ".join(text.split())


def _sandbox_roots(args: list[str], sandbox: Path) -> list[str]:
    """``validate`` of a manifest whose dataset root does not exist here: the root becomes
    the sandbox (validation checks that it exists; the datasets are not on this machine)."""
    def missing(root: Any) -> bool:  # relative roots: from the sandbox, where it runs
        return isinstance(root, str) and bool(root) and not (sandbox / root).is_dir()

    out = [f"protocol.root={sandbox}" if a.startswith("protocol.root=")
           and missing(a.split("=", 1)[1]) else a for a in args]
    if len(args) > 1 and not any(a.startswith("protocol.root=") for a in args):
        try:
            data = tomllib.loads((sandbox / args[1]).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            data = {}
        if missing(data.get("protocol", {}).get("root")):
            out += ["--set", f"protocol.root={sandbox}"]
    return out


def _run_cli(block: Block, sb: Sandbox) -> str:
    from click.testing import CliRunner

    import zsbir.cli as cli

    expected = int(block.options.get("exit", "0"))
    outputs = []
    for cmd in _commands(block.code):
        args = cmd[1:]
        if args[:1] == ["run"] and "full" not in block.options:
            if "--resume" in args:
                continue  # needs an interrupted run: not executed by convention
            args = ["validate"] + [a for a in args[1:] if a not in ("-q", "--quiet")]
        if args[:1] == ["validate"]:  # datasets this machine lacks: their roots -> the sandbox
            args = _sandbox_roots(args, sb.path)
        widths = cli.console.width, cli.err_console.width
        cli.console.width = cli.err_console.width = 1000  # no wrapping in the captured text
        try:
            with _chdir(sb.path):
                result = CliRunner().invoke(cli.main, args)
        finally:
            cli.console.width, cli.err_console.width = widths
        shown = " ".join(shlex.quote(a) for a in ["zsbir", *args])
        if result.exit_code != expected:
            exc = result.exception if not isinstance(result.exception, SystemExit) else None
            raise AssertionError(f"{block.id}: `{shown}` exited {result.exit_code}, expected "
                                 f"{expected}\n{result.output}" + (f"\n{exc!r}" if exc else ""))
        outputs.append(result.output)
    return "".join(outputs)


def _run_shell(block: Block, sb: Sandbox) -> str:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["COLUMNS"] = "1000"
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=sb.path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    expected = int(block.options.get("exit", "0"))
    assert proc.returncode == expected, (
        f"{block.id}: shell block exited {proc.returncode}, expected {expected}\n{proc.stdout}")
    return proc.stdout


def _run_python(block: Block, sb: Sandbox) -> str:
    buf = io.StringIO()
    with _chdir(sb.path), contextlib.redirect_stdout(buf):
        exec(compile(block.code, block.id, "exec"), {"__name__": "__doc__"})
    return buf.getvalue()


def _merge(base: dict[str, Any], fragment: dict[str, Any]) -> dict[str, Any]:
    """Core sections and ``[model]`` (whose keys are its backbone and head tables) merge key
    by key; component tables and lists are replaced whole."""
    from zsbir.manifest import CORE_SECTIONS

    out = dict(base)
    for key, value in fragment.items():
        if (key in CORE_SECTIONS or key == "model") and isinstance(value, dict) \
                and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _stand_in_weights(table: Any, sandbox: Path) -> None:
    """A ``weights`` file this machine lacks becomes a small state dict in the sandbox
    (validation reads the file: that it is one; the real weights are not here)."""
    if isinstance(table, list):
        for item in table:
            _stand_in_weights(item, sandbox)
    if not isinstance(table, dict):
        return
    for key, value in table.items():
        if key == "weights" and isinstance(value, str) and value and not Path(value).exists():
            import torch

            stand_in = sandbox / "stand-in-weights.pt"
            if not stand_in.is_file():
                torch.save({"weight": torch.zeros(1)}, stand_in)
            table[key] = str(stand_in)
        else:
            _stand_in_weights(value, sandbox)


def _check_toml(block: Block, sb: Sandbox) -> None:
    from zsbir.manifest import ManifestError, resolve
    from zsbir.registry import KINDS

    data = tomllib.loads(block.code)
    if block.kind in ("manifest", "fragment"):
        if block.kind == "fragment":
            base = tomllib.loads((ROOT / block.options.get(
                "base", "examples/quickstart.toml")).read_text(encoding="utf-8"))
            data = _merge(base, data)
        root = data.get("protocol", {}).get("root")
        if isinstance(root, str) and root and not Path(root).is_dir():
            data["protocol"]["root"] = str(sb.path)  # a dataset this machine lacks
        _stand_in_weights(data, sb.path)
        if "invalid" in block.options:
            with pytest.raises(ManifestError):
                resolve(data, block.id)
        else:
            resolve(data, block.id)
    elif block.kind == "pyproject":
        eps = data.get("project", {}).get("entry-points", {})
        assert eps, f"{block.id}: no [project.entry-points.\"zsbir.<kind>\"] tables"
        for group, entries in eps.items():
            assert group.startswith("zsbir.") and group[6:] in KINDS, \
                f"{block.id}: {group!r} is not a zsbir entry-point group"
            for name, value in entries.items():
                assert re.fullmatch(r"[\w.]+:[\w.]+", value), f"{block.id}: {name} = {value!r}"
        if "matches" in block.options:
            real = tomllib.loads((ROOT / block.options["matches"]).read_text("utf-8"))
            real_eps = real.get("project", {}).get("entry-points", {})
            for group, entries in eps.items():
                for name, value in entries.items():
                    assert real_eps.get(group, {}).get(name) == value, (
                        f"{block.id}: {group} {name} = {value!r} is not in "
                        f"{block.options['matches']}")
    if "file" in block.options:
        target = sb.path / block.options["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.code, encoding="utf-8")


def _execute(block: Block, sb: Sandbox) -> None:
    if block.kind in ("skip", None):
        return
    reason = _skip_reason(block)
    if reason:
        if block.kind in EXECUTED:
            sb.output = None  # an output block after this one has nothing to compare
        pytest.skip(reason)
    if block.kind == "run":
        sb.output = _run_cli(block, sb)
    elif block.kind == "shell":
        sb.output = _run_shell(block, sb)
    elif block.kind in ("python", "setup"):
        out = _run_python(block, sb)
        if block.kind == "python":
            sb.output = out
    elif block.kind in ("manifest", "fragment", "pyproject", "toml"):
        _check_toml(block, sb)
    elif block.kind == "output":
        if sb.output is None:
            pytest.skip("the block whose output this shows was skipped")
        got = _normalize(sb.output, sb.path)
        if "contains" in block.options:
            for line in block.code.splitlines():
                want = " ".join(line.split())
                if want and want != "...":
                    assert want in got, f"{block.id}: {want!r} not in the output:\n{sb.output}"
        else:
            want = " ".join(block.code.split())
            assert got == want, (f"{block.id}: the output differs from the docs.\n"
                                 f"docs:   {want}\nactual: {got}\n\n{sb.output}")


# Shown-only blocks (``skip reason=...``) are checked by test_every_block_is_marked and run
# as no test of their own (a test item that always skips would read as a missing tool).
CHECKED_BLOCKS = [b for b in ALL_BLOCKS if b.kind != "skip"]


@pytest.mark.parametrize("block", CHECKED_BLOCKS, ids=[b.id for b in CHECKED_BLOCKS])
def test_block(block: Block, sandboxes, tmp_path_factory):
    if block.kind is None:
        pytest.fail("unmarked block (see test_every_block_is_marked)")
    sb = _sandbox(sandboxes, block.page, tmp_path_factory)
    blocks = BY_PAGE[block.page]
    index = blocks.index(block)
    while sb.done < index:  # earlier blocks of the page first (when run with -k)
        earlier = blocks[sb.done]
        sb.done += 1
        try:
            _execute(earlier, sb)
        except pytest.skip.Exception:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported on the block that needs it
            sb.failed[sb.done - 1] = f"{earlier.id}: {exc}"
    if sb.failed:
        pytest.fail("an earlier block of this page failed: "
                    + "; ".join(sb.failed.values()))
    sb.done = index + 1
    try:
        _execute(block, sb)
    except pytest.skip.Exception:
        raise
    except BaseException:
        sb.failed[index] = f"{block.id} failed"
        raise


# ------------------------------------------------------------------------ generated pages
def _hook():
    spec = importlib.util.spec_from_file_location("zsbir_docs_hook", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_component_pages_list_every_registered_name():
    from zsbir.registry import KINDS, get_registry

    hook = _hook()
    for kind in KINDS:
        page = hook.render_kind(kind, mkdocstrings=False)
        reg = get_registry(kind)
        for name in reg.names():
            assert f"### `{name}`" in page, f"{kind}/{name} missing from its reference page"
            entry = reg.entry(name)
            if hasattr(entry, "parameters"):
                for p in entry.parameters():
                    assert f"| `{p.name}` |" in page, f"{kind}/{name}: parameter {p.name}"
    assert "| `root` | str | **required** | dataset folder" in hook.render_kind("protocols")
    index = hook.render_index()
    assert all(f"({kind}.md)" in index for kind in KINDS)


def _doc_probe(scale: float = 0.5, mode: Literal["a", "b"] = "a", k: int = 3,
               ctx: Any = None) -> None:
    """A probe component: appears in the docs because it is registered."""


def test_a_new_component_appears_without_editing_docs():
    from zsbir.registry import losses

    doc_probe = _doc_probe
    losses.add("zz_doc_probe", doc_probe)
    try:
        page = _hook().render_kind("losses", mkdocstrings=False)
    finally:
        del losses._components["zz_doc_probe"]
    section = page[page.index("### `zz_doc_probe`"):]
    assert "| `scale` | float | `0.5` |  |" in section
    assert "| `mode` | 'a' \\| 'b' | `\"a\"` |  |" in section
    assert "`ctx`" not in section.split("###")[1]  # injected: not a manifest key
    assert "A probe component" in section


def test_api_pages_cover_every_module():
    hook = _hook()
    documented = {m for mods in hook.api_modules().values() for m in mods}
    package = ROOT / "zsbir"
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or parts[0] in hook.API_EXCLUDE or any(p.startswith("_") for p in parts):
            continue
        assert "zsbir." + ".".join(parts) in documented, f"{path} has no API page"
    assert hook.render_api_page("manifest", ["zsbir.manifest"]).startswith("::: zsbir.manifest")


def test_nav_has_one_page_per_kind():
    from zsbir.registry import KINDS

    hook = _hook()
    config = {"nav": [{"Reference": [{"Components": hook.NAV_PLACEHOLDER},
                                     {"API": hook.API_PLACEHOLDER}]}]}
    hook.on_config(config)
    pages = config["nav"][0]["Reference"][0]["Components"]
    assert [list(p.values())[0] for p in pages[1:]] == \
        [f"reference/components/{k}.md" for k in KINDS]
    api = config["nav"][0]["Reference"][1]["API"]
    assert {"zsbir.manifest": "reference/api/manifest.md"} in api


@pytest.fixture(scope="module")
def built_site(tmp_path_factory) -> Path:
    """The site as `mkdocs build --strict` makes it (once per test module)."""
    missing = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python",
                           "mkdocs_click") if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        pytest.skip(f"docs toolchain not installed ({', '.join(missing)}): "
                    "pip install -e '.[dev]'")
    hook = _hook()
    try:
        hook.katex_dir()
    except hook.MathError as exc:
        pytest.skip(f"cannot render the equations: {exc}")
    site = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d",
                           str(site)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout
    return site


@pytest.mark.slow
def test_mkdocs_build_strict(built_site: Path):
    """`mkdocs build --strict`: broken links, anchors, references or nav entries fail."""
    losses = (built_site / "reference" / "components" / "losses.html").read_text("utf-8")
    assert "domain_quadruplet" in losses and "lambda2" in losses
    cli = (built_site / "reference" / "cli.html").read_text("utf-8")
    assert "--resume" in cli and "validate" in cli


@pytest.mark.slow
def test_site_reads_offline(built_site: Path):
    """No page loads anything from the network; pages are files (file:// navigation), and
    every equation is KaTeX HTML rendered at build time (no raw \\( left)."""
    pages = sorted(built_site.rglob("*.html"))
    assert len(pages) > 20
    remote = re.compile(r"""<(?:script|link|img)\b[^>]*\b(?:src|href)=["']https?://""")
    for page in pages:
        text = page.read_text("utf-8")
        assert not remote.search(text), f"{page} loads something from the network"
        assert "arithmatex\">\\(" not in text and "arithmatex\">\\[" not in text, \
            f"{page} has an equation left unrendered"
    # use_directory_urls = false: page.html, not page/index.html (a folder under file://)
    assert (built_site / "methods" / "sake.html").is_file()
    assert not (built_site / "methods" / "sake").exists()
    sake = (built_site / "methods" / "sake.html").read_text("utf-8")
    assert sake.count('class="katex"') >= 5
    assert (built_site / "assets" / "katex" / "katex.min.css").is_file()
    assert list((built_site / "assets" / "katex" / "fonts").glob("KaTeX_Main-*.woff2"))


def _chromium() -> Any:
    from shutil import which

    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    browser = next(filter(None, map(which, ("chromium", "chromium-browser", "google-chrome"))),
                   None)
    driver = which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium "
                    "chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--allow-file-access-from-files"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(driver))


@pytest.mark.slow
def test_equations_render_in_a_browser_from_file_urls(built_site: Path):
    """Headless Chromium opens two built pages from file:// (no network, no server): the
    equations are KaTeX output styled by the bundled stylesheet, no raw TeX is visible,
    and a link to another page opens that page (not a directory listing)."""
    from selenium.webdriver.common.by import By

    driver = _chromium()
    try:
        for rel in ("methods/sake.html", "protocols-and-metrics.html"):
            driver.get((built_site / rel).as_uri())
            maths = driver.find_elements(By.CSS_SELECTOR, ".arithmatex .katex-html")
            assert maths, f"{rel}: no KaTeX output"
            assert all(m.is_displayed() for m in maths[:5])
            text = driver.find_element(By.TAG_NAME, "article").text
            assert "\\(" not in text and "\\frac" not in text, f"{rel}: raw TeX is shown"
            family = driver.execute_script(
                "return getComputedStyle(document.querySelector('.katex')).fontFamily")
            assert "KaTeX_Main" in family, f"{rel}: KaTeX's stylesheet not applied ({family})"
            hidden = driver.execute_script(
                "return getComputedStyle(document.querySelector('.katex-mathml')).position")
            assert hidden == "absolute", f"{rel}: MathML fallback shown as text"
        link = driver.find_element(By.CSS_SELECTOR, "a[href$='getting-started.html']")
        driver.execute_script("arguments[0].click()", link)  # the nav may be collapsed
        assert driver.current_url.startswith("file://")
        assert driver.current_url.endswith("/getting-started.html")
        assert "Getting started" in driver.find_element(By.TAG_NAME, "h1").text
    finally:
        driver.quit()
