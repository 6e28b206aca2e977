"""A whole run: train, embed, hash, evaluate, and write the run directory.

``RUN_DIR`` (``run.output_dir/run.name``) holds, all readable without zsbir:

- ``manifest.resolved.toml``: the manifest with every default filled in;
- ``checkpoints/last.pt`` (resumable), ``best.pt`` (best validation epoch),
  ``final.pt`` (evaluated weights + fitted hashers); all ``torch.load(weights_only=True)``;
- ``metrics.json``: results keyed by protocol, hasher and metric, with each formula;
- ``features.npz``: query/gallery embeddings and labels (``zsbir evaluate --features``);
- ``retrievals.png``: top-ranked photos for a few queries;
- ``log.txt`` (every line the console showed, timestamped), ``scalars.csv`` and
  ``tensorboard/`` (per-step and per-epoch scalars: :mod:`zsbir.engine.tracking`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zsbir.build import Experiment, build, resolve_device
from zsbir.engine import distributed as D
from zsbir.engine import threads as T
from zsbir.engine.checkpoint import (
    CheckpointError,
    atomic_save,
    clean_stale_temporaries,
    load_checkpoint,
    package_versions,
)
from zsbir.engine.embed import embed_split
from zsbir.engine.lock import RunLock
from zsbir.engine.trainer import Trainer
from zsbir.manifest import Manifest, ManifestError, Problem, resolve

log = logging.getLogger("zsbir")

__all__ = ["RunDirError", "evaluate_experiment", "run_experiment"]

RESOLVED = "manifest.resolved.toml"


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (exists, or has nothing to resume)."""


#: Keys of the resolved manifest a resumed run may change, because they do not touch the
#: trained state: where the run and its data live (a run moved to another machine), the
#: device and data-loader workers, memory layout, logging and checkpoint frequency, the
#: student's initial weights file (the checkpoint replaces those weights), and everything
#: used only after training (evaluation, hashers, rerankers, which weights are
#: evaluated). Any other difference between the resolved manifest and the one stored in
#: ``last.pt`` makes ``--resume`` refuse (exit 2). A key covers everything under it
#: (``evaluation`` covers ``evaluation.metrics``).
RESUME_SAFE_KEYS: tuple[str, ...] = (
    "run.name", "run.output_dir", "run.device", "run.cache_dir", "run.overwrite", "run.threads",
    "protocol.root", "protocol.cache_dir", "protocol.rebuild_index", "backbone.weights",
    "model.backbone.weights", "model.sketch.weights", "model.photo.weights",
    "data.workers", "data.eval_batch_size", "train.log_every", "train.checkpoint_every",
    "train.compile", "train.channels_last", "train.select", "evaluation", "hashers",
    "rerankers",
)


def run_dir_of(manifest: Manifest) -> Path:
    """``run.output_dir/run.name`` (a relative output_dir is relative to the working
    directory). ``--resume DIR`` does not use it: a resumed run works in DIR itself."""
    return Path(manifest.run.output_dir).expanduser() / manifest.run.name


def load_resumable(run_dir: str | Path, overrides: Sequence[str] = ()) -> Manifest:
    """The resolved manifest saved in a run directory, for ``--resume`` (``overrides``:
    ``--set`` items; only :data:`RESUME_SAFE_KEYS` may change, checked when resuming).

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


def _resume_safe(path: str) -> bool:
    return any(path == k or path.startswith((k + ".", k + "[")) for k in RESUME_SAFE_KEYS)


def check_resumable(ckpt: dict[str, Any], manifest: Manifest, run_dir: Path) -> None:
    """Refuse a checkpoint that cannot continue ``manifest``: not a resumable checkpoint
    (:class:`CheckpointError`), or a manifest changed since it was written in a key not in
    :data:`RESUME_SAFE_KEYS` (:class:`ManifestError` listing every such key)."""
    last = run_dir / "checkpoints" / "last.pt"
    missing = [k for k in ("model", "optimizer", "train_state", "manifest") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{str(last)!r} is not a resumable zsbir checkpoint (it lacks "
                              f"{', '.join(missing)})")
    changes = [c for c in manifest_changes(ckpt["manifest"], manifest.data)
               if not _resume_safe(c[0])]
    if changes:
        def show(v: Any) -> str:
            return "(absent)" if v is None else repr(v)
        raise ManifestError(
            [Problem(path, f"changed since the checkpoint was written ({show(a)} -> {show(b)});"
                           " a resumed run cannot change it")
             for path, a, b in changes]
            + [Problem("", f"restore these keys in {RESOLVED} or start a new run; only "
                           f"{', '.join(RESUME_SAFE_KEYS)} may change on resume")],
            str(run_dir / RESOLVED))


def _file_only(handler: logging.Handler, level: int, msg: str, *args: Any) -> None:
    """A record for ``log.txt`` alone (not the console): per-file detail, and the error
    the CLI prints itself."""
    handler.handle(log.makeRecord(log.name, level, __file__, 0, msg, args, None))


def skipped_report(indexed: Any, trained: Any, evaluated: Any) -> dict[str, Any]:
    """``metrics.json``'s ``skipped_images``: every file left out, once, with its path, the
    reason and the stage that left it out (``index``: while listing the data tree, e.g.
    zero-byte files, broken links, FIFOs, undecodable files with ``verify_images``;
    ``train`` / ``evaluate``: failed to decode when loaded)."""
    files: list[dict[str, str]] = []
    done: set[str] = set()
    counts: dict[str, int] = {}
    for stage, items in (("index", indexed), ("train", trained), ("evaluate", evaluated)):
        for path, reason in items:
            if path in done:
                continue
            done.add(path)
            files.append({"path": str(path), "error": str(reason), "stage": stage})
            counts[stage] = counts.get(stage, 0) + 1
    return {"count": len(files), "by_stage": counts, "files": files}


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


def _class_lists(data: Any) -> dict[str, Any]:
    """The class split a run used (names and counts), for ``metrics.json``."""
    val_labels = sorted({int(v) for v in np.unique(data.val.labels)}) if len(data.val) else []
    seen, unseen = list(data.seen_classes), list(data.unseen_classes)
    validation = [data.classes[i] for i in val_labels]
    return {"seen": seen, "unseen": unseen, "validation": validation,
            "counts": {"seen": len(seen), "unseen": len(unseen),
                       "validation": len(validation), "validation_images": len(data.val)},
            "note": "validation: held-out images of these seen classes (model selection)"}


def _log_results(results: dict[str, Any], run_dir: Path) -> None:
    """The final results, as the console's table shows them, into ``log.txt`` only."""
    file_only = {"console": False}
    for task, per_hasher in results["results"].items():
        for tag, entry in per_hasher.items():
            values = " ".join(f"{k}={v['value']:.4f}" for k, v in entry.items()
                              if k != "per_class" and isinstance(v, dict))
            log.info("result %s %s: %s", task, tag, values, extra=file_only)
    for task, chance in results["chance"].items():
        log.info("chance level of %s (gallery positive rate): %.4f", task, chance,
                 extra=file_only)
    log.info("results in %s/ (metrics.json, scalars.csv, log.txt)", run_dir, extra=file_only)


def run_experiment(
    manifest: Manifest, *, resume: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    stop_after_steps: int | None = None,
    run_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train and evaluate; returns what ``metrics.json`` holds (or, when the testing hook
    ``stop_after_steps`` interrupts training, ``{"interrupted": True}``).

    ``run_dir`` (default :func:`run_dir_of`) is where the run is written; ``--resume DIR``
    passes DIR. The directory is locked for the whole run (:class:`RunLock`)."""
    run_dir = Path(run_dir) if run_dir is not None else run_dir_of(manifest)
    joined = not D.is_distributed()
    D.init_distributed(manifest.run.device)  # torchrun's processes join their group
    clean = False
    try:
        # data-parallel: rank 0 alone prepares, locks and writes the directory
        lock = _prepare_dir(run_dir, manifest, resume) if D.is_main() else None
        D.barrier()
        try:
            results = _run_locked(manifest, run_dir, resume, progress, stop_after_steps)
            clean = True
            return results
        finally:
            if lock is not None:
                lock.release()
    finally:
        if joined:
            D.shutdown(clean)


def _run_locked(manifest: Manifest, run_dir: Path, resume: bool,
                progress: Callable[[dict[str, Any]], None] | None,
                stop_after_steps: int | None) -> dict[str, Any]:
    from zsbir.engine.tracking import RunTracker
    from zsbir.progress import phase

    ckpt = None
    if resume:  # checked before anything is built: a refused resume changes nothing
        ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
        check_resumable(ckpt, manifest, run_dir)
    handler = _file_logging(run_dir) if D.is_main() else logging.NullHandler()
    tracker = None
    threads_before = T.snapshot()
    try:
        if ckpt is not None:
            _note_resume_changes(ckpt, manifest, run_dir)
        t0 = time.perf_counter()
        log.info("run %s -> %s", manifest.run.name, run_dir)
        plan = T.apply_plan(T.plan_threads(resolve_device(manifest.run.device),
                                           manifest.run.threads, manifest.data_cfg.workers))
        log.info("%s", plan.describe(), extra={"console": False})
        with phase("building data and model"):
            if not D.is_main():
                D.barrier()  # data-parallel: rank 0 builds first (caches: WordNet, weights)
            exp = build(manifest, "train", run_dir)
            if D.is_main():
                D.barrier()
        log.info("built %s: %s", manifest.run.name,
                 ", ".join(f"{k} {v}" for k, v in exp.data.summary().items()))
        for path, reason in exp.data.skipped:  # one line each in log.txt; the console
            _file_only(handler, logging.WARNING,  # has the protocol's count and first one
                       "left out while indexing: %s (%s)", path, reason)
        tracker = RunTracker(run_dir, manifest.train.epochs, progress) if D.is_main() else None
        progress = tracker
        trainer = Trainer(exp, run_dir, progress, stop_after_steps)
        if ckpt is not None:
            try:
                trainer.load_state_dict(ckpt)
            except (RuntimeError, KeyError, ValueError, TypeError) as exc:
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                raise CheckpointError(
                    f"{str(run_dir / 'checkpoints' / 'last.pt')!r} does not fit the run's "
                    f"model and optimizer ({type(exc).__name__}: {first})") from exc
            del ckpt
            log.info("resumed %s at epoch %d step %d", run_dir, trainer.state["epoch"],
                     trainer.state["step"])
        state = trainer.fit()
        if stop_after_steps is not None and state["epoch"] < manifest.train.epochs \
                and not state["stopped_early"]:
            return {"interrupted": True, "global_step": state["global_step"]}
        train_time = time.perf_counter() - t0
        D.barrier()  # rank 0 has written best.pt
        best = run_dir / "checkpoints" / "best.pt"
        if manifest.train.select == "best_val" and best.is_file():
            exp.model.load_state_dict(load_checkpoint(best)["model"])
        if tracker is not None:
            tracker.close_bar()
        with phase("evaluating"):
            results = evaluate_experiment(exp, run_dir, progress)
        if not D.is_main():  # it helped embed; rank 0 scores and writes
            return results
        results["classes"] = _class_lists(exp.data)
        results["train"] = {
            "epochs_run": state["epoch"], "global_steps": state["global_step"],
            "best_epoch": state["best_epoch"], "best_val_accuracy": state["best_val"],
            "selected": manifest.train.select, "stopped_early": state["stopped_early"],
            "history": state["history"], "seconds": train_time,
        }
        results["skipped_images"] = skipped_report(exp.data.skipped, state["skipped"],
                                                   results.pop("_eval_skipped"))
        for f in results["skipped_images"]["files"]:
            if f["stage"] == "evaluate":
                _file_only(handler, logging.WARNING, "skipped unreadable image %s (%s)",
                           f["path"], f["error"])
        if results["skipped_images"]["count"]:  # the CLI prints this count on the console
            _file_only(handler, logging.WARNING, "%d file(s) left out (%s); listed in "
                       "metrics.json", results["skipped_images"]["count"],
                       ", ".join(f"{k}: {v}" for k, v in
                                 results["skipped_images"]["by_stage"].items()))
        results["threads"] = plan.to_dict()
        results["versions"] = package_versions()
        results["device"] = str(exp.ctx.device)
        results["files"] = {"scalars": "scalars.csv", "tensorboard": "tensorboard/",
                            "log": "log.txt"}
        (run_dir / "metrics.json").write_text(json.dumps(results, indent=2, default=float))
        _log_results(results, run_dir)
        atomic_save({"model": exp.model.state_dict(),
                     "hashers": [{"name": t["name"], "state": h.state_dict()}
                                 for t, h in zip(manifest.hashers, exp.hashers)],
                     "manifest": manifest.data,
                     "plugins": dict(manifest.plugins),
                     "classes": {"seen": exp.data.seen_classes,
                                 "unseen": exp.data.unseen_classes}},
                    run_dir / "checkpoints" / "final.pt")
        return results
    except Exception as exc:
        # why the run ended goes to log.txt too (only there: the console shows the error)
        _file_only(handler, logging.ERROR, "run stopped: %s: %s", type(exc).__name__,
                   str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        raise
    finally:
        T.restore(threads_before)
        if tracker is not None:
            tracker.close()
        logging.getLogger("zsbir").removeHandler(handler)
        logging.getLogger("py.warnings").removeHandler(handler)
        logging.captureWarnings(False)
        handler.close()


def evaluate_experiment(exp: Experiment, run_dir: Path | None = None,
                        progress: Callable[[dict[str, Any]], None] | None = None
                        ) -> dict[str, Any]:
    """Embed the unseen queries and gallery, index them with every hasher, score.

    Besides the protocol's own task (unseen sketches -> unseen photos), two more can be
    asked for in ``[evaluation]``: ``generalized`` (GZS-SBIR: the gallery also holds the
    seen classes' photos, SBTKNet Table 3) and ``pbir`` (ZS-PBIR, SAKE Table 4: the
    unseen photos of each class are split in two by position; odd ones query even ones).
    """
    from zsbir.data.base import PHOTO, Split
    from zsbir.progress import phase

    m, data, ev = exp.manifest, exp.data, exp.manifest.evaluation
    t0 = time.perf_counter()
    stacked = _stack_views(exp)  # rerankers that need the model: also embed image views
    try:
        q_emb, q_kept, skipped = embed_split(exp, data.query,
                                             f"embedding {len(data.query)} queries")
        g_emb, g_kept, g_skip = embed_split(exp, data.gallery,
                                            f"embedding {len(data.gallery)} gallery images")
        skipped += g_skip
        q_lab, g_lab = data.query.labels[q_kept], data.gallery.labels[g_kept]
        name = m.protocol["name"]
        tasks = {name: (q_emb, q_lab, g_emb, g_lab)}
        if ev.generalized and not data.generalized:
            seen = Split.concat(data.train.of_domain(PHOTO), data.val.of_domain(PHOTO))
            s_emb, s_kept, s_skip = embed_split(
                exp, seen, f"embedding {len(seen)} seen-class photos (generalized)")
            skipped += s_skip
            tasks[f"{name}-generalized"] = (q_emb, q_lab, np.concatenate([g_emb, s_emb]),
                                            np.concatenate([g_lab, seen.labels[s_kept]]))
        if ev.pbir:
            unseen = np.flatnonzero(g_lab >= len(data.seen_classes))
            rank_in_class = np.zeros(len(unseen), dtype=np.int64)
            for lab in np.unique(g_lab[unseen]):
                members = g_lab[unseen] == lab
                rank_in_class[members] = np.arange(members.sum())
            qi, gi = unseen[rank_in_class % 2 == 1], unseen[rank_in_class % 2 == 0]
            tasks[f"{name}-pbir"] = (g_emb[qi], g_lab[qi], g_emb[gi], g_lab[gi])
    except BaseException:
        if stacked:  # never leave the model wrapped for the extra views
            exp.model = exp.model.model
        raise
    embed_time = time.perf_counter() - t0
    if stacked:  # plain embeddings from here on; tasks keep every view for the rerankers
        exp.model = exp.model.model
        d = q_emb.shape[1] // len(stacked)
        q_emb, g_emb = q_emb[:, :d], g_emb[:, :d]

    fit_on = g_emb
    if any(t["name"] != "none" for t in m.hashers):
        fit_on, _, _ = embed_split(  # SAKE: ITQ on training embeddings
            exp, data.train, f"embedding {len(data.train)} training images (to fit the hashers)")
    if not D.is_main():  # data-parallel: the others only helped embed; rank 0 scores
        return {"rank": D.rank(), "_eval_skipped": []}
    with phase("fitting hashers", total=len(exp.hashers), unit="hashers") as advance:
        for hasher in exp.hashers:
            hasher.fit(fit_on, seed=m.run.seed)
            advance()

    results: dict[str, Any] = {"protocol": dict(m.protocol), "results": {}, "chance": {},
                               "sizes": {}}
    rerank_seconds: dict[str, float] = {}
    for task, (qe, ql, ge, gl) in tasks.items():
        per_hasher = {}
        views, (qe, ge) = (qe, ge), (qe[:, :q_emb.shape[1]], ge[:, :q_emb.shape[1]])
        for hasher in exp.hashers:
            with phase(f"scoring {task} {hasher.tag}"):
                per_hasher[hasher.tag] = _score(exp, hasher, qe, ql, ge, gl)
            if progress:
                progress({"evaluated": f"{task} {hasher.tag}",
                          "metrics": {k: v["value"] for k, v in per_hasher[hasher.tag].items()
                                      if k != "per_class"}})
        per_hasher.update(_score_rerankers(exp, task, *views, ql, gl, stacked, progress,
                                           rerank_seconds, results))
        results["results"][task] = per_hasher
        results["chance"][task] = positive_rate(ql, gl)
        results["sizes"][task] = {"queries": int(len(ql)), "gallery": int(len(gl))}
    results["chance_note"] = ("gallery positive rate: the expected mAP@all and P@K of a "
                              "random ranking")
    results["num_queries"], results["num_gallery"] = int(len(q_lab)), int(len(g_lab))
    results["seconds"] = {"embed": embed_time, "evaluate_total": time.perf_counter() - t0}
    if rerank_seconds:
        results["seconds"]["rerankers"] = rerank_seconds
    results["_eval_skipped"] = [list(s) for s in skipped]
    if run_dir is not None:
        np.savez(run_dir / "features.npz", query_features=q_emb, query_labels=q_lab,
                 gallery_features=g_emb, gallery_labels=g_lab)
        if ev.grid_queries > 0:
            results["grid"] = str(_grid(exp, q_emb, q_kept, g_emb, g_kept, run_dir))
    return results


def positive_rate(query_labels: np.ndarray, gallery_labels: np.ndarray) -> float:
    """Mean over queries of (#same-class gallery items / gallery size): chance level."""
    labels, counts = np.unique(gallery_labels, return_counts=True)
    per_label = dict(zip(labels.tolist(), counts.tolist()))
    return float(np.mean([per_label.get(int(q), 0) for q in query_labels])
                 / max(len(gallery_labels), 1))


@T.phase("evaluate")  # nothing decodes beside scoring: the process's whole CPU share
def _score(exp: Experiment, hasher: Any, qe: np.ndarray, ql: np.ndarray, ge: np.ndarray,
           gl: np.ndarray) -> dict[str, Any]:
    from zsbir.evaluation import evaluate_retrieval

    ev = exp.manifest.evaluation
    res = evaluate_retrieval(
        hasher.encode(qe), ql, hasher.encode(ge), gl, ev.metrics,
        distance="hamming" if hasher.binary else "cosine",
        chunk_size=ev.chunk_size or None, device=exp.ctx.device, per_class=ev.per_class)
    entry: dict[str, Any] = {name: {"value": float(v), "formula": res.formulas.get(name, "")}
                             for name, v in res.metrics.items()}
    if ev.per_class:
        entry["per_class"] = {name: {exp.data.classes[int(k)]: float(v) for k, v in pc.items()}
                              for name, pc in res.per_class.items()}
    return entry


class _ViewStack(torch.nn.Module):
    """The model, its embedding concatenated with the embeddings of image views
    (:data:`zsbir.rerankers.VIEWS`): (B, (1 + V) d), the plain embedding first."""

    def __init__(self, model: torch.nn.Module, views: list[str]):
        super().__init__()
        self.model, self.views = model, views

    def forward(self, image: torch.Tensor, domain: torch.Tensor) -> dict[str, torch.Tensor]:
        from zsbir.rerankers import VIEWS

        out = [self.model(image, domain)["embedding"]]
        out += [self.model(VIEWS[v](image), domain)["embedding"] for v in self.views]
        return {"embedding": torch.cat(out, dim=1)}


def _stack_views(exp: Experiment) -> list[str]:
    """If a reranker ``needs_model``, wrap ``exp.model`` so the embedding passes also embed
    every view any reranker asks for; returns the column blocks' names (``"plain"`` first),
    or ``[]`` when nothing was wrapped."""
    views: list[str] = []
    for r in getattr(exp, "rerankers", []):
        if getattr(r, "needs_model", False):
            views += [v for v in r.views if v not in views]
    if not views:
        return []
    exp.model = _ViewStack(exp.model, views)
    return ["plain", *views]


@T.phase("evaluate")
def _score_rerankers(exp: Experiment, task: str, qe: np.ndarray, ge: np.ndarray,
                     ql: np.ndarray, gl: np.ndarray, stacked: list[str],
                     progress: Callable[[dict[str, Any]], None] | None,
                     seconds: dict[str, float], results: dict[str, Any]) -> dict[str, Any]:
    """Every reranker on every real-valued hasher's codes: ``"<hasher>+<reranker>"``
    entries (binary hashers are skipped, with a note). ``qe``/``ge`` hold all the views
    (blocks of columns named by ``stacked``, the plain embedding first) when some
    reranker needs the model. Fitting sees the unlabeled gallery (and queries), never a label."""
    from zsbir.evaluation import evaluate_score_fn

    rerankers, ev = getattr(exp, "rerankers", []), exp.manifest.evaluation
    out: dict[str, Any] = {}
    if not rerankers:
        return out
    d = qe.shape[1] // max(len(stacked), 1)
    for hasher in exp.hashers:
        if hasher.binary:
            note = (f"rerankers skipped on binary hasher {hasher.tag}: they re-rank "
                    "real-valued embeddings")
            if note not in results.setdefault("notes", []):
                results["notes"].append(note)
            continue
        for r in rerankers:
            key = f"{hasher.tag}+{r.tag}"
            t0 = time.perf_counter()
            if r.needs_model:  # (N, views, d): the plain view, then r.views in order
                cols = [0] + [stacked.index(v) for v in r.views]
                q = np.stack([hasher.encode(qe[:, c * d:(c + 1) * d]) for c in cols], 1)
                g = np.stack([hasher.encode(ge[:, c * d:(c + 1) * d]) for c in cols], 1)
            else:
                q, g = hasher.encode(qe[:, :d]), hasher.encode(ge[:, :d])
            r.fit(g, queries=q if r.uses_queries else None)
            res = evaluate_score_fn(r.score_rows(q, g), ql, gl, ev.metrics,
                                    chunk_size=ev.chunk_size or None,
                                    device=exp.ctx.device, per_class=ev.per_class)
            seconds[f"{task} {key}"] = time.perf_counter() - t0
            entry: dict[str, Any] = {n: {"value": float(v), "formula": res.formulas.get(n, "")}
                                     for n, v in res.metrics.items()}
            if ev.per_class:
                entry["per_class"] = {n: {exp.data.classes[int(k)]: float(v)
                                          for k, v in pc.items()}
                                      for n, pc in res.per_class.items()}
            out[key] = entry
            if progress:
                progress({"evaluated": f"{task} {key}",
                          "metrics": {k: v["value"] for k, v in entry.items()
                                      if k != "per_class"}})
    return out


def _grid(exp: Experiment, q_emb: np.ndarray, q_kept: np.ndarray, g_emb: np.ndarray,
          g_kept: np.ndarray, run_dir: Path) -> Path:
    from zsbir.report.grid import pick_queries, retrieval_grid

    data, ev = exp.data, exp.manifest.evaluation
    q_lab = data.query.labels[q_kept]
    picks = pick_queries(q_lab, ev.grid_queries)
    q = torch.nn.functional.normalize(torch.from_numpy(q_emb[picks]), dim=1)
    g = torch.nn.functional.normalize(torch.from_numpy(g_emb), dim=1)
    top = torch.topk(q @ g.T, k=min(ev.grid_top, len(g)), dim=1).indices.numpy()
    return retrieval_grid(
        [data.query.sources[q_kept[i]] for i in picks], q_lab[picks],
        [[data.gallery.sources[g_kept[j]] for j in row] for row in top],
        [data.gallery.labels[g_kept[row]] for row in top],
        data.reader, run_dir / "retrievals.png", class_names=data.classes,
    )

