"""``zsbir import NAME CHECKPOINT --protocol P [--root DATA] [--out RUN_DIR]``: a published
checkpoint, read by the importer ``NAME`` (``zsbir list importers``), written as a zsbir run
directory (:func:`zsbir.importers.write_run`)."""

from __future__ import annotations

import inspect
from pathlib import Path

import click

__all__ = ["import_"]


@click.command("import")
@click.argument("importer")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--protocol", required=True,
              help="The benchmark the checkpoint was trained for (the importer lists those "
                   "it knows: `zsbir describe importers NAME`).")
@click.option("--root", type=click.Path(file_okay=False),
              help="The dataset folder, written into the run's manifest (`zsbir evaluate "
                   "--root` can give it later).")
@click.option("--out", "out", type=click.Path(file_okay=False),
              help="The run directory to write (default runs/<importer>_<protocol>); it must "
                   "not exist or be empty.")
def import_(importer: str, checkpoint: str, protocol: str, root: str | None,
            out: str | None) -> None:
    """Import a published CHECKPOINT with IMPORTER (e.g. `sake`) as a zsbir run directory
    that `zsbir evaluate`, `zsbir index build`, `zsbir search` and `zsbir serve` use like a
    trained run."""
    from rich.console import Console

    from zsbir.build import build_component
    from zsbir.context import BuildContext
    from zsbir.importers import write_run
    from zsbir.injection import supply
    from zsbir.manifest import resolve_component
    from zsbir.registry import importers

    obj = importers.get(importer)  # unknown name: one line with suggestions (exit 1)
    accepted = inspect.signature(obj).parameters
    table = {"name": importer, "protocol": protocol,
             **({"root": str(root)} if root is not None and "root" in accepted else {})}
    table = resolve_component("importers", table, "import", f"zsbir import {importer}")
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {str(path)!r}")
    imported = build_component("importers", table, BuildContext(), **supply("importers"))(path)
    run_dir = Path(out) if out else Path("runs") / f"{importer}_{protocol}"
    write_run(imported, path, run_dir, importer)
    Console().print(f"imported {path} ({importer}) -> {run_dir}/ (manifest.resolved.toml, "
                    "checkpoints/final.pt, import.json)", highlight=False, markup=False)
