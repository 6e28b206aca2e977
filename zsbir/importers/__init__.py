"""Importers (kind ``importers``): published checkpoints read into ordinary zsbir run
directories (``zsbir import NAME CHECKPOINT --protocol P [--root DATA] [--out RUN_DIR]``).

An importer is a registered component (entry point in the group ``zsbir.importers``; a
plugin adds its own published formats the same way). It is built with its parameters
(``protocol``, ``root``, ...; ``ctx`` injected) and called with the checkpoint's path:

- it returns an :class:`Imported`: a manifest naming zsbir's own components (the model
  that computes the published network's function), the model's ``state_dict`` in zsbir's
  layout, the class lists the model was trained on, and notes on the source;
- it raises :class:`ImportFormatError` (one line naming what was expected) for a file that
  is not of its format; ``expects`` (a class attribute) says what that format is.

:func:`write_run` then writes the run directory every other command reads:
``manifest.resolved.toml``, ``checkpoints/final.pt`` (self-contained, as ``zsbir run``
writes it), and ``import.json`` (the source file, its size and sha256, the importer and
what it read), after building the model from the manifest and loading the weights
strictly. ``zsbir evaluate RUN_DIR``, ``zsbir index build``, ``zsbir search`` and
``zsbir serve`` use it like any trained run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zsbir.digest import file_sha256
from zsbir.engine.checkpoint import CheckpointError

__all__ = ["ImportFormatError", "Imported", "write_run"]

#: the file written beside the checkpoints: where the weights came from
IMPORT_NOTE = "import.json"


class ImportFormatError(CheckpointError):
    """A file that is not of the importer's format; the message names the file and the
    format expected (one line, exit status 1)."""


@dataclass
class Imported:
    """What an importer read: ``manifest`` (a raw manifest naming zsbir's components; it is
    resolved by :func:`write_run`), ``model`` (the state dict of the model that manifest
    builds), ``classes`` (``{"seen": [...], "unseen": [...]}``, the seen ones in the
    classifier's row order) and ``source`` (plain-data notes: the format, epoch, ...)."""

    manifest: dict[str, Any]
    model: dict[str, torch.Tensor]
    classes: dict[str, list[str]]
    source: dict[str, Any] = field(default_factory=dict)


def write_run(imported: Imported, source: str | Path, run_dir: str | Path,
              importer: str) -> Path:
    """Write ``run_dir`` from an :class:`Imported` (refuses a directory that is not empty).

    The model is built from the resolved manifest (``build(purpose="embed")``) and the
    weights are loaded into it strictly, so a mapping that misses or invents a key fails
    here, before anything is written."""
    from zsbir.build import build
    from zsbir.constraints import paths_unchecked
    from zsbir.engine.checkpoint import atomic_save, package_versions
    from zsbir.engine.rundir import RESOLVED, RunDirError
    from zsbir.manifest import resolve

    source, run_dir = Path(source), Path(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise RunDirError(f"{str(run_dir)!r} already exists and is not empty; give another "
                          "--out or remove it")
    with paths_unchecked():  # the dataset may not be here (give --root when evaluating)
        manifest = resolve(imported.manifest, f"{importer} import of {source}")
    ckpt: dict[str, Any] = {"model": imported.model, "manifest": manifest.data,
                            "plugins": dict(manifest.plugins),
                            "classes": {k: list(v) for k, v in imported.classes.items()}}
    manifest.run.device = "cpu"
    try:
        exp = build(manifest, "embed", checkpoint=ckpt)
    except RuntimeError as exc:  # load_state_dict: missing / unexpected keys, shapes
        first = str(exc).strip().splitlines()[0][:300]
        raise ImportFormatError(f"{str(source)!r}: the {importer} importer's weights do not "
                                f"fit the model it names ({first})") from exc
    ckpt["hashers"] = [{"name": t["name"], "state": h.state_dict()}
                       for t, h in zip(manifest.hashers, exp.hashers)]
    note = {"importer": importer, "source": str(source.resolve()),
            "size": source.stat().st_size, "sha256": file_sha256(source),
            **imported.source, "versions": package_versions()}
    ckpt["imported"] = {k: v for k, v in note.items() if k != "versions"}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RESOLVED).write_text(manifest.to_toml())
    atomic_save(ckpt, run_dir / "checkpoints" / "final.pt")
    (run_dir / IMPORT_NOTE).write_text(json.dumps(note, indent=2, default=str) + "\n")
    from zsbir.export.card import write_model_card

    write_model_card(run_dir, transforms=exp.eval_transform)  # the run's MODEL_CARD.md
    return run_dir
