"""The ``zsbir evaluate RUN_DIR`` form of the command (:func:`evaluate_run_command`); the
scoring is :func:`zsbir.engine.evaluate_run.evaluate_run`."""

from __future__ import annotations

import json
from collections.abc import Sequence

import click

__all__ = ["evaluate_run_command"]


def evaluate_run_command(run_dir: str, protocol: str | None, root: str | None,
                         overrides: Sequence[str], metrics: Sequence[str],
                         reranker_specs: Sequence[str], hasher_names: Sequence[str],
                         as_json: bool, device: str | None) -> None:
    """``--metric`` and ``--reranker`` become ``--set`` items (the metrics replace
    ``evaluation.metrics``; the rerankers replace ``[[rerankers]]``); ``--device``
    sets ``run.device``; ``--hasher`` is refused (``--set hashers=[...]`` instead)."""
    from zsbir.cli import ProgressReporter, _print_results
    from zsbir.engine.evaluate_run import evaluate_run
    from zsbir.manifest import ManifestError, apply_overrides

    if hasher_names:
        raise click.UsageError("--hasher goes with --features; with RUN_DIR use "
                               "--set 'hashers=[{name=\"itq\", bits=64}]'")
    extra = list(overrides)
    if metrics:
        extra.append("evaluation.metrics=" + json.dumps(list(metrics)))
    if device:
        extra.append(f"run.device={json.dumps(device)}")
    if reranker_specs:
        tables = []
        for spec in reranker_specs:
            name, _, rest = spec.partition(":")
            try:
                table = apply_overrides({}, [i for i in rest.split(",") if i], name)
            except ManifestError as exc:
                raise click.BadParameter(f"{spec!r}: {exc}", param_hint="--reranker") from None
            tables.append({"name": name, **table})
        extra.append("rerankers=" + _toml_tables(tables))
    with ProgressReporter(quiet=as_json):
        results, out = evaluate_run(run_dir, protocol, root, extra)
    if as_json:
        click.echo(json.dumps(results["results"], indent=2, default=float))
        return
    _print_results(results, out)


def _toml_tables(tables: list[dict]) -> str:
    """An inline TOML array of tables (``--set rerankers=[{name="aqe", k=5}]``)."""
    from zsbir.manifest.tomlio import dump_toml

    items = []
    for t in tables:
        body = dump_toml({"x": t}).strip().splitlines()[1:]  # [x] then key = value lines
        items.append("{" + ", ".join(line.strip() for line in body) + "}")
    return "[" + ", ".join(items) + "]"
