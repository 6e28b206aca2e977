"""The ``zsbir`` command line: thin shells over the steps of the manifest -> metrics path.

- ``zsbir run MANIFEST`` trains and evaluates (``--resume RUN_DIR`` continues a run);
- ``zsbir validate MANIFEST`` stops after validation (``--show`` prints the resolved form);
- ``zsbir list [KIND] [PATTERN]``, ``zsbir describe KIND NAME``, ``zsbir plugins``;
- ``zsbir evaluate --features FILE.npz`` scores saved embeddings.

Errors a user can fix are printed without a traceback: manifest problems (all of them)
exit with status 2, other such errors with status 1.
"""

from __future__ import annotations

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
from zsbir.manifest import ManifestError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # one-line errors in pipes too


def _user_errors() -> tuple[type[BaseException], ...]:
    from zsbir.build import BuildError
    from zsbir.data.loading import CorruptImageError
    from zsbir.engine.run import RunDirError
    from zsbir.models.backbone import WeightsNotFoundError
    from zsbir.registry import RegistryError

    errors: list[type[BaseException]] = [CorruptImageError, RunDirError, WeightsNotFoundError,
                                         RegistryError, FileNotFoundError, BuildError]
    from zsbir.search.errors import SearchError

    errors.append(SearchError)
    try:
        from zsbir.data.protocols import ProtocolError

        errors.append(ProtocolError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


class ZsbirGroup(click.Group):
    """Prints user errors cleanly; exit 2 for manifests, 1 otherwise."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ManifestError as exc:
            _print_manifest_error(exc)
            sys.exit(2)
        except _user_errors() as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            sys.exit(1)


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
def run(manifest: str | None, overrides: tuple[str, ...], resume_dir: str | None,
        quiet: bool) -> None:
    """Train and evaluate the run MANIFEST describes."""
    from zsbir.engine.run import load_resumable, run_experiment

    if resume_dir:
        if manifest:
            raise click.UsageError("give either MANIFEST or --resume RUN_DIR, not both")
        m = load_resumable(Path(resume_dir))
        if overrides:
            raise click.UsageError("--set cannot change a run being resumed")
    elif manifest:
        m = _load_manifest(manifest, overrides)
    else:
        raise click.UsageError("missing MANIFEST (or --resume RUN_DIR)")
    reporter = ProgressReporter(quiet=quiet)
    with reporter:
        results = run_experiment(m, resume=bool(resume_dir), progress=reporter)
    _print_results(results, Path(m.run.output_dir) / m.run.name)


class ProgressReporter:
    """Rich progress bars on a terminal; one line per epoch otherwise."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.live = console.is_terminal and not quiet
        self.progress = None
        self.task = None

    def __enter__(self) -> ProgressReporter:
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                     TimeElapsedColumn(), console=console)
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, info: dict[str, Any]) -> None:
        if self.quiet:
            return
        if "epoch_end" in info:
            loss = " ".join(f"{k}={v:.4f}" for k, v in info["loss"].items())
            val = f" val_acc={info['val_accuracy']:.3f}" if "val_accuracy" in info else ""
            console.print(f"epoch {info['epoch_end'] + 1}: {loss}{val} "
                          f"({info['images_per_s']:.0f} img/s, lr {info['lr']:.2e})",
                          highlight=False)
        elif "evaluated" in info:
            metrics = " ".join(f"{k}={v:.4f}" for k, v in info["metrics"].items())
            console.print(f"evaluated {info['evaluated']}: {metrics}", highlight=False)
        elif self.progress is not None:
            desc = f"epoch {info['epoch'] + 1}"
            text = " ".join(f"{k}={v:.3f}" for k, v in info["loss"].items())
            text += f" {info['images_per_s']:.0f} img/s"
            if self.task is None or self.progress.tasks[self.task].description != desc:
                if self.task is not None:
                    self.progress.remove_task(self.task)
                self.task = self.progress.add_task(desc, total=info["steps"], info=text)
            self.progress.update(self.task, completed=info["step"], info=text)


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
        console.print(f"[yellow]{skipped} unreadable image(s) skipped; listed in "
                      f"metrics.json[/]")
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
def list_(kind: str | None, pattern: str) -> None:
    """List registered components (all kinds, or KIND), filtered by a wildcard PATTERN.

    Plugins are listed from their metadata without being imported.
    """
    from zsbir.registry import KINDS, Component, get_registry

    kinds = [get_registry(kind).kind] if kind else list(KINDS)
    rows: list[tuple[str, str, str, str]] = []
    for k in kinds:
        reg = get_registry(k)
        for name in reg.names(pattern):
            entry = reg.entry(name)
            if isinstance(entry, Component):
                summary = entry.summary
                if k == "backbones":
                    summary = _weights_note(name) + summary
                rows.append((k, name, entry.package, summary))
            else:
                rows.append((k, name, f"{entry.dist} {entry.version}",
                             "(plugin; `zsbir describe` imports it)"))
    _emit_table(("kind", "name", "package", "summary"),
                [tuple(c.replace("[", "\\[") for c in r) for r in rows])


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
    """Show a component's parameters, defaults, docstring and where it is defined."""
    import inspect

    from zsbir.registry import get_registry

    comp = get_registry(kind).component(name)
    console.print(f"[bold]{comp.kind}[/] [bold cyan]{comp.name}[/]  ({comp.package})",
                  highlight=False)
    console.print(f"defined at {comp.location}", highlight=False)
    table = Table("parameter", "type", "default")
    from zsbir.manifest import _hints

    hints = _hints(comp.obj)
    for p in comp.parameters():
        tp = hints.get(p.name, p.annotation)
        from zsbir.manifest import _type_name

        type_text = _type_name(tp) if tp is not inspect.Parameter.empty else "any"
        default = "(required)" if p.default is inspect.Parameter.empty else repr(p.default)
        table.add_row(p.name, type_text, default)
    console.print(table)
    if comp.doc:
        console.print(comp.doc, highlight=False, markup=False)


@main.command()
def plugins() -> None:
    """Import every installed plugin and report which load and which fail."""
    from zsbir.registry import discover_plugins, get_registry, load_all_plugins

    failures = {(f.group, f.name): f for f in load_all_plugins()}
    found = discover_plugins()
    rows: list[tuple[str, ...]] = []
    for kind, names in found.items():
        shadowed = {e.name for e in get_registry(kind).builtin_shadowed()}
        for name, entries in sorted(names.items()):
            for e in entries:
                f = failures.get((e.group, name))
                if name in shadowed:
                    status = "[yellow]ignored: a built-in has this name[/]"
                elif len(entries) > 1:
                    status = "[red]conflict: several plugins give this name[/]"
                elif f is not None:
                    status = "[red]failed:[/] " + f.error.replace("[", "\\[")
                else:
                    status = "[green]ok[/]"
                rows.append((e.dist, e.version, e.group, name, status))
    if not rows:
        console.print("no zsbir plugins installed (entry-point groups zsbir.<kind>)")
        return
    _emit_table(("package", "version", "group", "name", "status"), rows)
    if failures:
        sys.exit(1)


@main.command()
@click.option("--features", "features", required=True, type=click.Path(dir_okay=False),
              help=".npz with query_features, query_labels, gallery_features, gallery_labels "
                   "(optionally query_codes/gallery_codes: packed uint8 binary codes).")
@click.option("--metric", "metrics", multiple=True,
              help="Metric name (repeatable); default map@all and p@100.")
@click.option("--hasher", "hasher_names", multiple=True,
              help="none (cosine), sign, or itq[:BITS] fitted on the gallery; "
                   "default: none, plus codes if the file has them.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--device", default="cpu", show_default=True)
def evaluate(features: str, metrics: tuple[str, ...], hasher_names: tuple[str, ...],
             as_json: bool, device: str) -> None:
    """Score saved embeddings with any metric (no model needed)."""
    import numpy as np

    from zsbir.evaluation import evaluate_retrieval, parse_metric

    metrics = metrics or ("map@all", "p@100")
    for m in metrics:
        try:
            parse_metric(m)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--metric") from exc
    path = Path(features)
    if not path.is_file():
        raise FileNotFoundError(f"no features file {str(path)!r}")
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
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
        res = evaluate_retrieval(q, arrays["query_labels"], g, arrays["gallery_labels"],
                                 list(metrics), distance=distance, device=device)
        out[tag] = res.to_dict()
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    table = Table("index", *metrics, title=str(path))
    for tag, res in out.items():
        table.add_row(tag, *(f"{res['metrics'][m]:.4f}" for m in metrics))
    console.print(table)


def _add_search_commands() -> None:
    """``zsbir index build|update``, ``zsbir search``, ``zsbir serve``
    (:mod:`zsbir.search.commands`)."""
    from zsbir.search.commands import index, search, serve

    for cmd in (index, search, serve):
        main.add_command(cmd)


_add_search_commands()


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


def _hash_features(spec: str, q: Any, g: Any) -> tuple[str, Any, Any, str]:
    from zsbir.registry import hashers

    name, _, bits = spec.partition(":")
    kwargs = {"bits": int(bits)} if bits else {}
    h = hashers.get(name)(**kwargs)
    h.fit(g, seed=0)
    return h.tag, h.encode(q), h.encode(g), "hamming" if h.binary else "cosine"


if __name__ == "__main__":  # pragma: no cover
    main()
