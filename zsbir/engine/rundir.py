"""The run directory's lifecycle: create, lock and clean it for a new run; find, check and
note what changed for a resumed one (``zsbir run --resume DIR``).

``RUN_DIR`` (``run.output_dir/run.name``) holds ``manifest.resolved.toml`` (the manifest with
every default filled in), ``checkpoints/`` and the results :mod:`zsbir.engine.run` writes;
a resumed run continues in DIR wherever it was moved, from ``checkpoints/last.pt``, and
may change only the keys marked :class:`~zsbir.constraints.ResumeSafe`
(:func:`resume_safe_keys`).
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zsbir.engine.checkpoint import BASE_SECTIONS, CheckpointError, clean_stale_temporaries
from zsbir.engine.lock import RunLock
from zsbir.manifest import (
    CORE_SECTIONS,
    Manifest,
    ManifestError,
    Problem,
    components,
    resolve,
    resume_safe,
)

log = logging.getLogger("zsbir")

__all__ = ["RESOLVED", "RESUME_SAFE_KEYS", "RunDirError", "check_resumable",
           "load_resumable", "manifest_changes", "resume_safe_keys", "run_dir_of"]

RESOLVED = "manifest.resolved.toml"


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (exists, or has nothing to resume)."""


def _static_safe_keys() -> tuple[str, ...]:
    """The core sections' resume-safe keys, read from their ``ResumeSafe`` markers."""
    keys = [{"data_cfg": "data"}.get(name, name) for name in resume_safe(Manifest)]
    keys += [f"{section}.{name}" for section, cls in CORE_SECTIONS.items()
             for name in resume_safe(cls) if section not in keys]
    return tuple(keys)


#: The keys every resolved manifest's resumed run may change: the core sections' fields
#: (and whole sections) marked :class:`~zsbir.constraints.ResumeSafe` in
#: :mod:`zsbir.manifest.sections` (where the run lives, the device and loader workers,
#: memory layout, logging and checkpoint frequency, what is used only after training).
#: Derived, read-only; components add their own marked parameters:
#: :func:`resume_safe_keys`.
RESUME_SAFE_KEYS: tuple[str, ...] = _static_safe_keys()


def resume_safe_keys(manifest: Manifest) -> tuple[str, ...]:
    """Every key of ``manifest`` a resumed run may change, because it does not touch the
    trained state: :data:`RESUME_SAFE_KEYS` plus, at any depth, each component parameter
    annotated :class:`~zsbir.constraints.ResumeSafe` (a protocol's ``root``, every
    backbone's ``weights`` in the student: its content is checked against the
    checkpoint's ``base``, :func:`zsbir.engine.checkpoint.check_base`). Any other
    difference between the resolved manifest and the one stored in ``last.pt`` makes
    ``--resume`` refuse (exit 2). A key covers everything under it (``evaluation`` covers
    ``evaluation.metrics``)."""
    keys = list(RESUME_SAFE_KEYS)
    for node in components(manifest):
        section = re.split(r"[.\[]", node.path)[0]
        keys += [f"{node.path}.{name}" for name, mark in resume_safe(node.component.obj).items()
                 if not mark.base or section in BASE_SECTIONS]
    return tuple(dict.fromkeys(keys))


def run_dir_of(manifest: Manifest) -> Path:
    """``run.output_dir/run.name`` (a relative output_dir is relative to the working
    directory). ``--resume DIR`` does not use it: a resumed run works in DIR itself."""
    return Path(manifest.run.output_dir).expanduser() / manifest.run.name


def load_resumable(run_dir: str | Path, overrides: Sequence[str] = ()) -> Manifest:
    """The resolved manifest saved in a run directory, for ``--resume`` (``overrides``:
    ``--set`` items; only :func:`resume_safe_keys` may change, checked when resuming).

    Resume it with ``run_experiment(m, resume=True, run_dir=run_dir)``: the run continues
    in ``run_dir`` wherever it was moved, whatever its stored output_dir/name say."""
    from zsbir.manifest import load

    run_dir = Path(run_dir)
    path = run_dir / RESOLVED
    if not run_dir.is_dir():
        raise RunDirError(f"no run directory {str(run_dir)!r} to resume")
    if not path.is_file():
        raise RunDirError(f"{str(run_dir)!r} is not a zsbir run directory (no {RESOLVED})")
    if not (run_dir / "checkpoints" / "last.pt").is_file():
        raise RunDirError(f"{str(run_dir)!r} has no checkpoints/last.pt to resume from")
    return resolve(load(path, overrides), str(path))


def manifest_changes(saved: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(key path, saved value, current value)`` for every key whose value differs.

    Tables are compared key by key (a key missing on one side inside a component table is
    a default added or dropped by another zsbir version, and is not a change; a whole
    section present on one side only is); arrays of tables of the same length item by item.
    """
    if isinstance(saved, dict) and isinstance(current, dict):
        out: list[tuple[str, Any, Any]] = []
        for key in [*saved, *(k for k in current if k not in saved)]:
            path = f"{prefix}.{key}" if prefix else str(key)
            if key in saved and key in current:
                out += manifest_changes(saved[key], current[key], path)
            elif not prefix:  # a top-level section added or removed
                out.append((path, saved.get(key), current.get(key)))
        return out
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current) \
            and all(isinstance(x, dict) for x in [*saved, *current]):
        return [c for i, (a, b) in enumerate(zip(saved, current))
                for c in manifest_changes(a, b, f"{prefix}[{i}]")]
    if type(saved) is not type(current) and not (
            isinstance(saved, (int, float)) and isinstance(current, (int, float))
            and not isinstance(saved, bool) and not isinstance(current, bool)):
        return [(prefix, saved, current)]
    return [] if saved == current else [(prefix, saved, current)]


def _resume_safe(path: str, safe: Sequence[str]) -> bool:
    return any(path == k or path.startswith((k + ".", k + "[")) for k in safe)


def check_resumable(ckpt: dict[str, Any], manifest: Manifest, run_dir: Path) -> None:
    """Refuse a checkpoint that cannot continue ``manifest``: not a resumable checkpoint
    (:class:`CheckpointError`), or a manifest changed since it was written in a key not in
    :func:`resume_safe_keys` (:class:`ManifestError` listing every such key path)."""
    last = run_dir / "checkpoints" / "last.pt"
    missing = [k for k in ("model", "optimizer", "train_state", "manifest") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{str(last)!r} is not a resumable zsbir checkpoint (it lacks "
                              f"{', '.join(missing)})")
    safe = resume_safe_keys(manifest)
    changes = [c for c in manifest_changes(ckpt["manifest"], manifest.data)
               if not _resume_safe(c[0], safe)]
    if changes:
        def show(v: Any) -> str:
            return "(absent)" if v is None else repr(v)
        raise ManifestError(
            [Problem(path, f"changed since the checkpoint was written ({show(a)} -> {show(b)});"
                           " a resumed run cannot change it")
             for path, a, b in changes]
            + [Problem("", f"restore these keys in {RESOLVED} or start a new run; only "
                           f"{', '.join(safe)} may change on resume")],
            str(run_dir / RESOLVED))


def _note_resume_changes(ckpt: dict[str, Any], manifest: Manifest, run_dir: Path) -> None:
    """Log the (safe) keys a resume changed, and keep manifest.resolved.toml describing
    the run as it now continues (``--set run.device=cpu``, new evaluation settings)."""
    changed = [path for path, _, _ in manifest_changes(ckpt["manifest"], manifest.data)]
    if changed:
        log.info("resuming with changed settings: %s", ", ".join(changed))
    path = run_dir / RESOLVED
    text = manifest.to_toml()
    if path.read_text(encoding="utf-8") != text:
        tmp = path.with_name(f".{RESOLVED}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)


#: what a run writes in its directory besides checkpoints/ (removed by run.overwrite)
_OUTPUTS = ("metrics.json", "features.npz", "retrievals.png", "log.txt", "scalars.csv")


def _prepare_dir(run_dir: Path, manifest: Manifest, resume: bool) -> RunLock:
    """Create and lock the run directory; returns the held lock (release it when done).

    A new run refuses a directory that holds a run (unless ``run.overwrite``, which removes
    the old run's checkpoints and results first, so nothing of it can be mistaken for the
    new run's); a second writer is refused by the lock. Temporary files a killed save left
    behind are removed."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir, "resume" if resume else "run").acquire()
    except OSError as exc:
        raise RunDirError(f"cannot write the run directory {str(run_dir)!r}: "
                          f"{exc.strerror or exc}") from exc
    try:
        ckpt_dir = run_dir / "checkpoints"
        if not resume:
            # a directory whose run never saved a checkpoint (it failed while building)
            # holds nothing to protect: it is reused; one with checkpoints or results is not
            started = ckpt_dir.is_dir() or (run_dir / "metrics.json").exists()
            if started and not manifest.run.overwrite:
                raise RunDirError(
                    f"run directory {str(run_dir)!r} already holds a run; resume it with "
                    f"`zsbir run --resume {run_dir}`, choose another run.name, or set "
                    "run.overwrite = true")
            if started:
                for p in [*ckpt_dir.glob("*.pt"), *(run_dir / n for n in _OUTPUTS)]:
                    p.unlink(missing_ok=True)
                shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
            (run_dir / RESOLVED).write_text(manifest.to_toml(), encoding="utf-8")
        removed = clean_stale_temporaries(ckpt_dir)
        if removed:
            log.warning("removed %d temporary file(s) a killed save left in %s",
                        len(removed), ckpt_dir)
    except OSError as exc:
        lock.release()
        raise RunDirError(f"cannot write the run directory {str(run_dir)!r}: "
                          f"{exc.strerror or exc}") from exc
    except BaseException:
        lock.release()
        raise
    return lock


def _file_logging(run_dir: Path) -> logging.Handler:
    """``log.txt``: every ``zsbir`` log record (what the console shows: phases, epochs,
    evaluation, warnings) and Python warnings, timestamped; appended to on resume."""
    handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                           "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("zsbir")
    root.addHandler(handler)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addHandler(handler)
    return handler
