"""``zsbir tune RUN_DIR``: choose the generalized-retrieval rerankers' parameters on the
run's seen-class validation data (:func:`zsbir.engine.tune.tune_run`)."""

from __future__ import annotations

import json

import click

__all__ = ["tune_command"]

set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a key of the run's saved manifest (repeatable).")


@click.command("tune")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--reranker", "families", multiple=True,
              type=click.Choice(["seen_suppress", "seen_gate", "seen_suppress_kr",
                                 "seen_gate_kr"]),
              help="Reranker to tune (repeatable; default: all four).")
@click.option("--folds", type=click.IntRange(min=2), default=None,
              help="Pseudo-unseen groups of seen classes (default: seen classes / unseen "
                   "classes, so a group is about the size of the real unseen set).")
@click.option("--max-unseen-drop", type=click.FloatRange(min=0), default=0.01,
              show_default=True,
              help="Largest loss of pseudo-unseen mAP@all a chosen point may cost.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the pseudo-unseen groups.")
@set_option
@click.option("--dry-run", is_flag=True, help="Print the choice; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the chosen tables as JSON.")
def tune_command(run_dir: str, families: tuple[str, ...], folds: int | None,
                 max_unseen_drop: float, seed: int, overrides: tuple[str, ...],
                 dry_run: bool, as_json: bool) -> None:
    """Choose seen-class suppression / gating parameters on seen classes only.

    Seen classes are held out in turn as pseudo-unseen (their validation images, their
    classifier columns removed); every grid point is scored on pseudo-unseen and
    pseudo-generalized retrieval, the best one that keeps the pseudo-unseen mAP@all within
    --max-unseen-drop is written into RUN_DIR/manifest.resolved.toml [[rerankers]] (and
    the whole search into RUN_DIR/tune.json); `zsbir evaluate RUN_DIR` then scores it."""
    from zsbir.cli import ProgressReporter, console
    from zsbir.engine.tune import FAMILIES, tune_run

    with ProgressReporter(quiet=as_json):
        record = tune_run(run_dir, families or FAMILIES, folds, max_unseen_drop, seed,
                          overrides, write=not dry_run)
    if as_json:
        click.echo(json.dumps(record["chosen"], indent=2))
        return
    for fam, info in record["families"].items():
        c = info["chosen"]
        params = ", ".join(f"{k} = {v:g}" for k, v in c["params"].items())
        console.print(f"{fam}: {params}  (validation: generalized mAP@all "
                      f"{sum(c['generalized']) / len(c['generalized']):.4f}, unseen "
                      f"{c['unseen_mean']:.4f} against {c['baseline_unseen']:.4f} "
                      f"uncorrected; {c['feasible']}/{c['points']} points allowed)",
                      highlight=False, markup=False)
    where = "nothing written (--dry-run)" if dry_run else \
        f"written to {run_dir}/manifest.resolved.toml and {run_dir}/tune.json"
    console.print(f"{len(record['folds'])} folds, {record['seconds']:.0f} s; {where}",
                  highlight=False, markup=False)
