"""The ``zsbir`` command line: thin shells over the steps of the manifest -> metrics path.

- ``zsbir run MANIFEST`` trains and evaluates (``--resume RUN_DIR`` continues a run);
- ``zsbir validate MANIFEST`` stops after validation (``--show`` prints the resolved form);
- ``zsbir list [KIND] [PATTERN]``, ``zsbir describe KIND NAME``, ``zsbir plugins``;
- ``zsbir evaluate --features FILE.npz`` scores saved embeddings.

Errors a user can fix are printed without a traceback: manifest problems (all of them,
whatever ``zsbir validate`` refuses) and usage errors exit with status 2, other such errors
(data, weights and checkpoint files, run directories, plugins, indexes) with status 1, in
one line naming the file or key; docs/troubleshooting.md ("Exit codes") lists them.
"""

from __future__ import annotations

import errno
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from zsbir import __version__
from zsbir.export.command import export as export_command
from zsbir.manifest import ManifestError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # one-line errors in pipes too


def _user_errors() -> tuple[type[BaseException], ...]:
    from zsbir.build import BuildError
    from zsbir.data.loading import CorruptImageError
    from zsbir.engine.checkpoint import CheckpointError
    from zsbir.engine.lock import RunLockedError
    from zsbir.engine.run import RunDirError
    from zsbir.models.backbone import WeightsFileError, WeightsNotFoundError
    from zsbir.registry import RegistryError

    errors: list[type[BaseException]] = [CorruptImageError, RunDirError, WeightsNotFoundError,
                                         WeightsFileError, RegistryError, FileNotFoundError,
                                         BuildError, CheckpointError, RunLockedError,
                                         FloatingPointError]
    from zsbir.search.errors import SearchError

    errors.append(SearchError)
    from zsbir.engine.distributed import ShardError

    errors.append(ShardError)
    from zsbir.engine.threads import ThreadsError

    errors.append(ThreadsError)
    try:
        from zsbir.data.protocols import ProtocolError

        errors.append(ProtocolError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


#: OSError numbers that are the machine's state, not a bug: reported in one line
_ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM,
                                 errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
                                 errno.ELOOP, errno.ENAMETOOLONG, errno.EMFILE, errno.EIO})


def _os_error_line(exc: OSError) -> str:
    reason = {errno.ENOSPC: "no space left on the device",
              errno.EDQUOT: "disk quota exceeded"}.get(exc.errno or 0, exc.strerror or str(exc))
    return f"{exc.filename}: {reason}" if exc.filename else reason


class ZsbirGroup(click.Group):
    """Prints user errors cleanly; exit 2 for manifests, 1 otherwise.

    User errors (a manifest, data, checkpoint, disk, permission or plugin problem) end in
    one or a few lines naming the file or key, never a traceback; anything else is a bug
    and keeps its traceback. Python's own ``EOFError`` is kept from click, which would
    print only "Aborted!"."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ManifestError as exc:
            _print_manifest_error(exc)
            sys.exit(2)
        except click.UsageError as exc:  # one line, not click's usage + hint + error
            where = exc.ctx.command_path if exc.ctx is not None else "zsbir"
            err_console.print(f"[bold red]error:[/] {escape(exc.format_message())} "
                              f"(see `{escape(where)} --help`)", highlight=False)
            sys.exit(2)
        except click.ClickException as exc:  # a command's own refusal: one line, its status
            err_console.print(f"[bold red]error:[/] {escape(exc.format_message())}",
                              highlight=False)
            sys.exit(exc.exit_code)
        except _user_errors() as exc:
            _print_error(exc)
            sys.exit(1)
        except OSError as exc:
            if exc.errno not in _ENVIRONMENT_ERRNOS:
                raise
            _print_error(exc)
            sys.exit(1)
        except EOFError as exc:  # click turns it into a bare "Aborted!"
            raise RuntimeError(f"unexpected end of input: {exc}") from exc


def _print_error(exc: BaseException) -> None:
    text = _os_error_line(exc) if isinstance(exc, OSError) and exc.errno else str(exc)
    err_console.print(f"[bold red]error:[/] {escape(text)}", highlight=False)


def _print_manifest_error(exc: ManifestError) -> None:
    n = len(exc.problems)
    err_console.print(f"[bold red]{escape(exc.source)}[/]: {n} "
                      f"problem{'s' if n != 1 else ''}", highlight=False)
    for p in exc.problems:
        msg = escape(p.message)
        err_console.print(f"  [red]-[/] [bold]{escape(p.path)}[/]: {msg}" if p.path
                          else f"  [red]-[/] {msg}", highlight=False)


def _emit_table(columns: Sequence[str], rows: Sequence[Sequence[str]],
                title: str | None = None) -> None:
    """A rich table on a terminal; tab-separated plain lines otherwise (for pipes)."""
    if not console.is_terminal:
        from rich.text import Text

        for r in rows:
            click.echo("\t".join(Text.from_markup(c).plain for c in r))
        return
    table = Table(*columns, title=title)
    for r in rows:
        table.add_row(*r)
    console.print(table)


@click.group(cls=ZsbirGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zsbir")
def main() -> None:
    """zsbir: zero-shot sketch-based image retrieval, assembled from TOML manifests."""
    from zsbir.engine.threads import prepare_environment

    prepare_environment()  # OpenMP wait policy: read once, when torch loads (not yet)


def _load_manifest(path: str, overrides: Sequence[str]):  # noqa: ANN202
    from zsbir.manifest import load, resolve

    return resolve(load(path, overrides), path)


set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a manifest key, e.g. --set train.epochs=3 "
                               "(repeatable; values are TOML literals).")


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False), required=False)
@set_option
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False),
              help="Continue the run in RUN_DIR from its last checkpoint.")
@click.option("--quiet", "-q", is_flag=True, help="Only print the final metrics.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Data-parallel training processes on this machine (starts torchrun; "
                   "NCCL on GPUs, gloo on the CPU). train.batch_size stays the global batch.")
def run(manifest: str | None, overrides: tuple[str, ...], resume_dir: str | None,
        quiet: bool, nproc: int) -> None:
    """Train and evaluate the run MANIFEST describes.

    Data-parallel: ``--nproc N``, or ``torchrun --nproc-per-node N -m zsbir run MANIFEST``
    (docs/scaling.md)."""
    from zsbir.engine.run import load_resumable, run_experiment

    if resume_dir:
        if manifest:
            raise click.UsageError("give either MANIFEST or --resume RUN_DIR, not both")
        # the run continues in RUN_DIR itself, wherever it was moved; --set may change only
        # the keys zsbir.engine.run.resume_safe_keys finds (others are refused, exit 2)
        run_dir = Path(resume_dir)
        m = load_resumable(run_dir, overrides)
    elif manifest:
        m = _load_manifest(manifest, overrides)
        run_dir = Path(m.run.output_dir).expanduser() / m.run.name
    else:
        raise click.UsageError("missing MANIFEST (or --resume RUN_DIR)")
    if nproc > 1:  # validated above, once; each process loads it again
        from zsbir.data.samplers import sampler_unit
        from zsbir.engine.distributed import launch_torchrun, shard_batches
        from zsbir.registry import samplers

        # a global batch that cannot be split over the processes: refused before starting
        shard_batches([list(range(m.train.batch_size))], 0, nproc,
                      sampler_unit(samplers.get(m.sampler["name"])))

        args = [*([manifest] if manifest else []), *(a for o in overrides for a in ("--set", o)),
                *(["--resume", resume_dir] if resume_dir else []), *(["-q"] if quiet else [])]
        sys.exit(launch_torchrun(nproc, ["run", *args]))
    import os

    secondary = os.environ.get("RANK", "0") not in ("", "0")  # data-parallel rank > 0
    reporter = ProgressReporter(quiet=quiet or secondary)
    with reporter:
        results = run_experiment(m, resume=bool(resume_dir), progress=reporter,
                                 run_dir=run_dir)
    if not secondary:
        _print_results(results, run_dir)


class ProgressReporter:
    """What ``zsbir run`` shows while it works (:func:`zsbir.progress.console_output`):
    bars with the time left on a terminal, periodic plain lines otherwise; the epoch and
    evaluation lines come from the run's log (:mod:`zsbir.engine.tracking`), so the
    console and ``log.txt`` show the same lines. ``quiet``: warnings and results only."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.live = console.is_terminal and not quiet
        self._output: Any = None

    def __enter__(self) -> ProgressReporter:
        from zsbir.progress import console_output

        self._output = console_output(console, quiet=self.quiet)
        self._output.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._output is not None:
            self._output.__exit__(*exc)

    def __call__(self, info: dict[str, Any]) -> None:
        """The trainer's callback: everything is shown from the log; nothing to add."""


def _print_results(results: dict[str, Any], run_dir: Path) -> None:
    table = Table(title=f"unseen-class retrieval ({results['num_queries']} queries x "
                        f"{results['num_gallery']} gallery)")
    table.add_column("protocol")
    table.add_column("hasher")
    metric_names: list[str] = []
    for per_hasher in results["results"].values():
        for entry in per_hasher.values():
            metric_names += [k for k in entry if k != "per_class" and k not in metric_names]
    for name in metric_names:
        table.add_column(name, justify="right")
    for proto, per_hasher in results["results"].items():
        for tag, entry in per_hasher.items():
            table.add_row(proto, tag, *(f"{entry[n]['value']:.4f}" if n in entry else "-"
                                        for n in metric_names))
    console.print(table)
    for task, chance in results["chance"].items():
        console.print(f"chance level of {task} (gallery positive rate): {chance:.4f}",
                      highlight=False)
    skipped = results.get("skipped_images", {}).get("count", 0)
    if skipped:
        stages = results["skipped_images"].get("by_stage", {})
        detail = f" ({', '.join(f'{k}: {v}' for k, v in stages.items())})" if stages else ""
        console.print(f"[yellow]{skipped} file(s) left out{detail}: empty, unreadable or not "
                      f"images; each listed with its reason in metrics.json and log.txt[/]",
                      highlight=False)
    console.print(f"results in {run_dir}/ (metrics.json, retrievals.png, checkpoints/)",
                  highlight=False)


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@set_option
@click.option("--show", is_flag=True, help="Print the resolved manifest (defaults filled).")
def validate(manifest: str, overrides: tuple[str, ...], show: bool) -> None:
    """Check MANIFEST against the registered components; build nothing."""
    m = _load_manifest(manifest, overrides)
    if show:
        click.echo(m.to_toml(), nl=False)
    else:
        console.print(f"[green]ok[/] {manifest}", highlight=False)


@main.command("list")
@click.argument("kind", required=False)
@click.argument("pattern", required=False, default="*")
@click.option("--weights", is_flag=True,
              help="Mark with [weights] the backbones whose pretrained weights are on this "
                   "machine (imports torch and timm: seconds).")
def list_(kind: str | None, pattern: str, weights: bool) -> None:
    """List registered components (all kinds, or KIND), filtered by a wildcard PATTERN.

    Every name is an entry point (zsbir's own and each plugin's), read from package
    metadata; summaries come from zsbir's generated catalog or the source files: nothing
    is imported.
    """
    import fnmatch

    from zsbir.registry import _BUILTIN_PACKAGE, discover_plugins, get_registry, kinds

    kinds_ = [get_registry(kind).kind] if kind else list(kinds())
    found = discover_plugins()
    rows: list[tuple[str, str, str, str]] = []
    for k in kinds_:
        names = found.get(k, {})
        for name in sorted(n for n in names if fnmatch.fnmatchcase(n, pattern)):
            entries = names[name]
            if entries[0].dist == _BUILTIN_PACKAGE:  # a built-in wins over a plugin
                summary = _builtin_summary(k, name, entries[0].value)
                if k == "backbones" and weights:
                    summary = _weights_note(name) + summary
                rows.append((k, name, _BUILTIN_PACKAGE, summary))
                continue
            for e in entries:
                rows.append((k, name, f"{e.dist} {e.version}",
                             _source_summary(e.value) or "(plugin; `zsbir describe` imports it)"))
    _emit_table(("kind", "name", "package", "summary"),
                [tuple(c.replace("[", "\\[") for c in r) for r in rows])
    _warn_unknown_groups()


def _builtin_summary(kind: str, name: str, value: str) -> str:
    """A built-in's summary: from ``zsbir/catalog.json`` when its entry is the entry
    point's object, else read from the source (no import)."""
    from zsbir import catalog

    e = catalog.entry(kind, name)
    if e is not None and f"{e['module']}:{e['qualname']}" == value:
        return e["summary"]
    return _source_summary(value)


def _source_summary(value: str) -> str:
    from zsbir.catalog import source_summary

    return source_summary(value)


def _warn_unknown_groups() -> None:
    """One line on stderr per ``zsbir.<group>`` naming no kind (never silently ignored)."""
    from zsbir.registry import kind_problems, unknown_plugin_groups

    groups = sorted({f"{e.group} ({e.dist} {e.version})" for e in unknown_plugin_groups()})
    for g in groups:
        click.echo(f"warning: entry-point group {g} names no kind; its entry points are "
                   "ignored (see `zsbir plugins`)", err=True)
    for f in kind_problems():
        click.echo(f"warning: {f.dist} {f.version}: {f.error} (see `zsbir plugins`)",
                   err=True)


def _weights_note(name: str) -> str:
    """'[weights]' when pretrained weights for a backbone are available offline."""
    try:
        from zsbir.models.weights_available import weights_available
    except ImportError:
        return ""
    return "[weights] " if weights_available(name) else ""


@main.command()
@click.argument("kind")
@click.argument("name")
def describe(kind: str, name: str) -> None:
    """Show a component's parameters, defaults, docstring and where it is defined.

    Built-ins are described from zsbir's generated catalog (nothing imported); a plugin,
    or a built-in the catalog does not hold, is imported.
    """
    from zsbir import catalog
    from zsbir.registry import _BUILTIN_PACKAGE, discover_plugins, get_registry

    reg = get_registry(kind)
    reg.entry(name)  # UnknownComponentError (with suggestions) for a wrong name
    eps = discover_plugins().get(reg.kind, {}).get(name, [])
    entry = None
    if eps and eps[0].dist == _BUILTIN_PACKAGE:
        entry = catalog.entry(reg.kind, name)
        if entry is not None and f"{entry['module']}:{entry['qualname']}" != eps[0].value:
            entry = None  # the catalog is stale for this name: import it instead
    if entry is not None:
        package, location = _BUILTIN_PACKAGE, catalog.source_line(entry)
        rows, doc = entry["params"], entry["doc"]
        declares = entry.get("declares", [])
    else:
        comp = reg.component(name)
        package, location = comp.package, comp.location
        rows, doc = catalog.param_rows(comp), comp.doc
        declares = catalog.declarations(comp)
    console.print(f"[bold]{reg.kind}[/] [bold cyan]{escape(name)}[/]  ({escape(package)})",
                  highlight=False)
    console.print(f"defined at {location}", highlight=False, markup=False)
    table = Table("parameter", "type", "default")
    for row in rows:
        table.add_row(*(escape(c) for c in row))
    console.print(table)
    for line in declares:  # what validation checks against the rest of the manifest
        console.print(line, highlight=False, markup=False)
    if doc:  # the docstring's own line breaks, not re-wrapped
        console.print(doc, highlight=False, markup=False, soft_wrap=True)


@main.command()
def plugins() -> None:
    """Import every installed plugin and report which load and which fail.

    zsbir's own entry points are loaded too: a built-in that fails to import is reported
    the same way (package zsbir).
    """
    import difflib

    from zsbir.registry import (
        _BUILTIN_PACKAGE,
        KINDS,
        discover_plugins,
        get_registry,
        kind_declarations,
        kind_problems,
        kinds,
        load_all,
        unknown_plugin_groups,
    )

    failures = {(f.group, f.name): f for f in load_all()}
    found = discover_plugins()
    rows: list[tuple[str, ...]] = []
    for kind, entries in sorted(kind_declarations().items()):  # kinds plugins add
        for e in entries:
            f = failures.get(("zsbir.kinds", kind))
            status = ("[red]conflict: several plugins declare this kind[/]" if len(entries) > 1
                      else "[red]failed:[/] " + f.error.replace("[", "\\[") if f is not None
                      else f"[green]ok[/] (adds kind {kind})")
            rows.append((e.dist, e.version, e.group, kind, status))
    for f in kind_problems():
        rows.append((f.dist, f.version, f.group, f.name, f"[red]ignored: {f.error}[/]"))
    broken_builtins = 0
    for kind, names in found.items():
        shadowed = {e.name for e in get_registry(kind).builtin_shadowed()}
        for name, entries in sorted(names.items()):
            for e in entries:
                f = failures.get((e.group, name))
                if e.dist == _BUILTIN_PACKAGE:
                    if f is not None:  # a built-in that does not import: say so
                        broken_builtins += 1
                        rows.append((e.dist, e.version, e.group, name,
                                     "[red]failed:[/] " + f.error.replace("[", "\\[")))
                    continue
                if name in shadowed:
                    status = "[yellow]ignored: a built-in has this name[/]"
                elif len(entries) > 1:
                    status = "[red]conflict: several plugins give this name[/]"
                elif f is not None:
                    status = "[red]failed:[/] " + f.error.replace("[", "\\[")
                else:
                    status = "[green]ok[/]"
                rows.append((e.dist, e.version, e.group, name, status))
    unknown = unknown_plugin_groups()
    all_kinds = kinds()
    for e in unknown:  # a group that names no kind: never loaded
        close = difflib.get_close_matches(e.kind, all_kinds, n=1)
        hint = f"; did you mean zsbir.{close[0]}?" if close else ""
        rows.append((e.dist, e.version, e.group, e.name,
                     f"[red]ignored: unknown group {e.group} (kinds: {', '.join(all_kinds)})"
                     f"{hint}[/]"))
    if not rows:
        console.print("no zsbir plugins installed (entry-point groups zsbir.<kind>, "
                      f"kinds: {', '.join(KINDS)}; new kinds: zsbir.kinds)")
        return
    _emit_table(("package", "version", "group", "name", "status"), rows)
    if failures or unknown or kind_problems() or broken_builtins:
        sys.exit(1)


@main.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--features", "features", type=click.Path(dir_okay=False),
              help=".npz with query_features, query_labels, gallery_features, gallery_labels "
                   "(optionally query_codes/gallery_codes: packed uint8 binary codes).")
@click.option("--protocol", help="With RUN_DIR: the protocol to score on (default the run's).")
@click.option("--root", type=click.Path(file_okay=False),
              help="With RUN_DIR: the dataset folder (protocol.root).")
@set_option
@click.option("--metric", "metrics", multiple=True,
              help="Metric name (repeatable); default map@all and p@100 (with RUN_DIR: "
                   "the run's [evaluation] metrics).")
@click.option("--hasher", "hasher_names", multiple=True,
              help="none (cosine), sign, or itq[:BITS] fitted on the gallery; "
                   "default: none, plus codes if the file has them.")
@click.option("--reranker", "reranker_specs", multiple=True, metavar="NAME[:KEY=VALUE,...]",
              help="Also score each real-valued ranking re-ranked (repeatable), e.g. "
                   "alpha_qe:k=10,alpha=3 or k_reciprocal; see `zsbir list rerankers`.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--device", help="cpu (the default with --features), cuda, auto; with RUN_DIR "
                                "the default is the run's run.device.")
def evaluate(features: str | None, metrics: tuple[str, ...], hasher_names: tuple[str, ...],
             as_json: bool, device: str, reranker_specs: tuple[str, ...] = (),
             run_dir: str | None = None, protocol: str | None = None, root: str | None = None,
             overrides: tuple[str, ...] = ()) -> None:
    """Score a model on a protocol's test split, or saved embeddings.

    `zsbir evaluate RUN_DIR [--protocol NAME] [--root DATA] [--set KEY=VALUE]` scores a
    finished or imported run's model (no training; any protocol, cross-dataset too) and
    writes RUN_DIR/eval/<protocol>/ (metrics.json, retrievals.png); `--metric` and
    `--reranker` replace the run's [evaluation] metrics and [[rerankers]].
    `zsbir evaluate --features FILE.npz` scores saved embeddings (no model needed)."""
    if run_dir is not None:
        from zsbir.engine.evaluate_cli import evaluate_run_command

        if features:
            raise click.UsageError("give either RUN_DIR or --features FILE, not both")
        evaluate_run_command(run_dir, protocol, root, overrides, metrics, reranker_specs,
                             hasher_names, as_json, device)
        return
    if features is None:
        raise click.UsageError("missing RUN_DIR (or --features FILE.npz)")
    if protocol or root or overrides:
        raise click.UsageError("--protocol, --root and --set go with RUN_DIR, not --features")
    device = device or "cpu"
    import numpy as np

    from zsbir.engine.threads import use_threads
    from zsbir.evaluation import evaluate_retrieval, parse_metric

    use_threads("evaluate", device)  # the CPU thread policy (zsbir.engine.threads)

    metrics = metrics or ("map@all", "p@100")
    for m in metrics:
        try:
            parse_metric(m)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--metric") from exc
    path = Path(features)
    if not path.is_file():
        raise FileNotFoundError(f"no features file {str(path)!r}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise click.BadParameter(f"{path} is not a readable .npz file "
                                 f"({type(exc).__name__}: {exc})",
                                 param_hint="--features") from None
    if not isinstance(arrays, dict):  # a plain .npy array
        raise click.BadParameter(f"{path} is a .npy array, not an .npz archive",
                                 param_hint="--features")
    missing = [k for k in ("query_labels", "gallery_labels") if k not in arrays]
    if missing:
        raise click.BadParameter(f"{path} lacks {', '.join(missing)}", param_hint="--features")
    runs: list[tuple[str, Any, Any, str]] = []
    if "query_features" in arrays and "gallery_features" in arrays:
        q, g = arrays["query_features"].astype("float32"), arrays["gallery_features"]
        for spec in hasher_names or ("none",):
            runs.append(_hash_features(spec, q, g.astype("float32")))
    if "query_codes" in arrays and "gallery_codes" in arrays and not hasher_names:
        runs.append(("codes", arrays["query_codes"], arrays["gallery_codes"], "hamming"))
    if not runs:
        raise click.BadParameter(f"{path} holds neither features nor codes",
                                 param_hint="--features")
    out = {}
    for tag, q, g, distance in runs:
        try:
            res = evaluate_retrieval(q, arrays["query_labels"], g, arrays["gallery_labels"],
                                     list(metrics), distance=distance, device=device)
        except (ValueError, TypeError, IndexError, RuntimeError) as exc:
            raise click.ClickException(f"{path} ({tag}): cannot be scored: {exc}") from None
        out[tag] = res.to_dict()
        if distance == "cosine":
            out.update(_rerank_features(reranker_specs, tag, q, g, arrays, metrics, device,
                                        path))
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    table = Table("index", *metrics, title=str(path))
    for tag, res in out.items():
        table.add_row(tag, *(f"{res['metrics'][m]:.4f}" for m in metrics))
    console.print(table)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--no-plot", is_flag=True, help="Print the summary only (no curves.png).")
def report(run_dir: str, no_plot: bool) -> None:
    """Summarize a finished run and draw RUN_DIR/curves.png (loss terms, lr, validation
    accuracy per epoch)."""
    from zsbir.report.compare import CompareError, load_run, run_summary
    from zsbir.report.curves import CurvesError, plot_curves

    try:
        run = load_run(run_dir)
        lines = run_summary(run)
        png = None if no_plot else plot_curves(run_dir)
    except (CompareError, CurvesError) as exc:
        raise click.ClickException(str(exc)) from None
    _emit_table(("field", "value"), [(escape(k), escape(v)) for k, v in lines],
                title=f"run {run.name}")
    if png is not None:
        console.print(f"curves: {png}", highlight=False, markup=False)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--metric", "metrics", multiple=True,
              help="Metric column (repeatable; default: every metric the runs have).")
@click.option("--hasher", "hashers", multiple=True,
              help="Only these hasher tags (repeatable), e.g. real, itq64.")
@click.option("--task", "tasks", multiple=True,
              help="Only these protocol tasks (repeatable), e.g. sketchy_ext-generalized.")
@click.option("--extra", "extras", multiple=True,
              type=click.Choice(["chance", "seconds", "images_per_s", "best_val"]),
              help="Extra columns (repeatable).")
@click.option("--format", "fmt", default="table", show_default=True,
              type=click.Choice(["table", "markdown", "latex", "csv"]))
def compare(run_dirs: tuple[str, ...], metrics: tuple[str, ...], hashers: tuple[str, ...],
            tasks: tuple[str, ...], extras: tuple[str, ...], fmt: str) -> None:
    """Put runs side by side: rows runs, columns protocol x hasher x metric.

    Runs whose resolved manifests differ only in run.seed / run.name / run.output_dir
    are one row: mean ± standard deviation over their seeds.
    """
    from zsbir.report.compare import CompareError, build_table, group_runs, load_run, render

    try:
        table = build_table(group_runs([load_run(p) for p in run_dirs]), metrics or None,
                            hashers or None, tasks or None, extras)
    except CompareError as exc:
        raise click.ClickException(str(exc)) from None
    if fmt == "table" and console.is_terminal:
        t = Table("run", "seeds", *table.headers())
        for label, n, cells in table.rows:
            t.add_row(escape(label), str(n), *(c.text() for c in cells))
        console.print(t)
    else:
        click.echo(render(table, fmt))


def _add_search_commands() -> None:
    """``zsbir index build|update``, ``zsbir search``, ``zsbir serve``
    (:mod:`zsbir.search.commands`)."""
    from zsbir.search.commands import index, search, serve

    for cmd in (index, search, serve):
        main.add_command(cmd)


_add_search_commands()
from zsbir.data.check import data_group  # noqa: E402 - `zsbir data check`
from zsbir.engine.tune_cli import tune_command  # noqa: E402 - `zsbir tune`
from zsbir.import_command import import_  # noqa: E402 - `zsbir import`

for _cmd in (export_command, data_group, import_, tune_command):
    main.add_command(_cmd)


@main.group()
def bench() -> None:
    """Measure speed (figures are printed and written as JSON)."""


@bench.command("train")
@click.argument("manifest", type=click.Path(dir_okay=False))
@set_option
@click.option("--steps", default=50, show_default=True, help="Timed steps (after warm-up).")
@click.option("--warmup", default=5, show_default=True, help="Untimed steps first.")
@click.option("--batch-size", type=int, help="Override train.batch_size.")
@click.option("--synthetic-data", is_flag=True,
              help="Feed one batch already on the device: compute only, no input pipeline.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Also write the result to this JSON file.")
def bench_train_cmd(manifest: str, overrides: tuple[str, ...], steps: int, warmup: int,
                    batch_size: int | None, synthetic_data: bool, json_path: str | None) -> None:
    """Time MANIFEST's real training step: images/s, step-time percentiles, data wait,
    peak GPU memory, bottleneck."""
    from zsbir.engine.bench import bench_train

    extra = [f"train.batch_size={batch_size}"] if batch_size else []
    m = _load_manifest(manifest, (*overrides, *extra))
    result = bench_train(m, steps=steps, warmup=warmup, synthetic_data=synthetic_data)
    rows = [("images/s", f"{result['images_per_s']:.1f}"),
            ("step ms p50 / p90 / p99", "{p50:.1f} / {p90:.1f} / {p99:.1f}".format(
                **result["step_ms"])),
            ("data-wait fraction", f"{result['data_wait_fraction']:.2f}"),
            ("peak GPU memory (GB)", "-" if result["peak_gpu_memory_gb"] is None
             else f"{result['peak_gpu_memory_gb']:.2f}"),
            ("bottleneck", result["bottleneck"]),
            ("device", f"{result['device']} ({result['device_name']})"),
            ("batch / image size", f"{result['batch_size']} / {result['image_size']}"),
            ("amp / channels_last / compile",
             f"{result['amp']} / {result['channels_last']} / {result['compile']}"),
            ("workers", str(result["workers"]))]
    _emit_table(("figure", "value"), rows, title=f"bench train: {manifest}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))


def _rerank_features(specs: tuple[str, ...], tag: str, q: Any, g: Any,
                     arrays: dict[str, Any], metrics: tuple[str, ...], device: str,
                     path: Path) -> dict[str, Any]:
    """``zsbir evaluate --reranker``: each reranker on one real-valued ranking."""
    import inspect

    import torch

    from zsbir.context import BuildContext
    from zsbir.evaluation import evaluate_score_fn
    from zsbir.manifest import ManifestError, Problem, apply_overrides, validate_params
    from zsbir.registry import RegistryError, rerankers

    out: dict[str, Any] = {}
    for spec in specs:
        name, _, rest = spec.partition(":")
        try:  # KEY=VALUE items read as --set values (TOML literals; a bare word a string)
            table = apply_overrides({}, [i for i in rest.split(",") if i], name)
        except ManifestError as exc:
            raise click.BadParameter(f"{spec!r}: {exc}", param_hint="--reranker") from None
        try:
            obj = rerankers.get(name)
        except RegistryError as exc:
            raise click.BadParameter(str(exc), param_hint="--reranker") from None
        problems: list[Problem] = []
        params = validate_params(obj, "rerankers", table, name, problems)
        if problems:
            raise click.BadParameter("; ".join(str(p) for p in problems),
                                     param_hint="--reranker")
        if "ctx" in inspect.signature(obj).parameters:
            params["ctx"] = BuildContext(device=torch.device(device))
        r = obj(**params)
        if r.needs_model:
            raise click.BadParameter(f"{name!r} needs the model (image views); use it in a "
                                     "manifest's [[rerankers]]", param_hint="--reranker")
        try:
            r.fit(g, queries=q if r.uses_queries else None)
            res = evaluate_score_fn(r.score_rows(q, g), arrays["query_labels"],
                                    arrays["gallery_labels"], list(metrics), device=device)
        except (ValueError, TypeError, IndexError, RuntimeError) as exc:
            raise click.ClickException(f"{path} ({tag}+{r.tag}): cannot be scored: "
                                       f"{exc}") from None
        out[f"{tag}+{r.tag}"] = res.to_dict()
    return out


def _hash_features(spec: str, q: Any, g: Any) -> tuple[str, Any, Any, str]:
    """``none``, ``sign``, ``itq`` or ``NAME:BITS``: the hasher fitted on the gallery."""
    from zsbir.registry import hashers

    name, sep, bits = spec.partition(":")
    kwargs: dict[str, Any] = {}
    if sep:
        if not bits.isdigit() or int(bits) < 1:
            raise click.BadParameter(f"{spec!r}: BITS must be a positive integer "
                                     "(e.g. itq:64)", param_hint="--hasher")
        kwargs["bits"] = int(bits)
    if name not in hashers:
        close = hashers.suggest(name)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise click.BadParameter(f"unknown hasher {name!r} (known: "
                                 f"{', '.join(hashers.names())}){hint}", param_hint="--hasher")
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1] or not len(g):
        raise click.BadParameter(f"query_features {q.shape} and gallery_features {g.shape} "
                                 "must be non-empty (N, d) arrays of one d",
                                 param_hint="--features")
    from zsbir.build import build_component
    from zsbir.context import BuildContext
    from zsbir.manifest import resolve_component

    table = resolve_component("hashers", {"name": name, **kwargs}, "--hasher", spec)
    try:
        h = build_component("hashers", table, BuildContext())
        h.fit(g, seed=0)
        return h.tag, h.encode(q), h.encode(g), "hamming" if h.binary else "cosine"
    except (TypeError, ValueError, RuntimeError) as exc:  # LinAlgError is a ValueError
        raise click.BadParameter(f"{spec!r}: {exc}", param_hint="--hasher") from None


if __name__ == "__main__":  # pragma: no cover
    main()
