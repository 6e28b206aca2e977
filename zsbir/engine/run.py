"""A whole run: train, embed, hash, evaluate, and write the run directory (the
orchestration; the run directory's lifecycle and resume are :mod:`zsbir.engine.rundir`,
evaluation :mod:`zsbir.engine.evaluate`, both re-exported here).

``RUN_DIR`` (``run.output_dir/run.name``) holds, all readable without zsbir:

- ``manifest.resolved.toml``: the manifest with every default filled in;
- ``checkpoints/last.pt`` (resumable), ``best.pt`` (best validation epoch): what trains
  and a reference to the frozen base weights; ``final.pt`` (evaluated weights, whole, +
  fitted hashers); all ``torch.load(weights_only=True)``;
- ``metrics.json``: results keyed by protocol, hasher and metric, with each formula;
- ``features.npz``: query/gallery embeddings and labels (``zsbir evaluate --features``);
- ``retrievals.png``: top-ranked photos for a few queries;
- ``MODEL_CARD.md``: method, data and split, training, metrics, versions, intended use
  (:mod:`zsbir.export.card`);
- ``log.txt`` (every line the console showed, timestamped), ``scalars.csv`` and
  ``tensorboard/`` (per-step and per-epoch scalars: :mod:`zsbir.engine.tracking`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from zsbir.build import build, resolve_device
from zsbir.engine import distributed as D
from zsbir.engine import threads as T
from zsbir.engine.checkpoint import (
    CheckpointError,
    atomic_save,
    check_base,
    load_checkpoint,
    load_trainable_state,
    package_versions,
)
from zsbir.engine.evaluate import (  # noqa: F401  (re-exported: zsbir.engine.run.X)
    _grid,
    _score,
    _score_rerankers,
    _stack_views,
    _ViewStack,
    evaluate_experiment,
    positive_rate,
)
from zsbir.engine.lifecycle import inference_model
from zsbir.engine.rundir import (  # noqa: F401  (re-exported: zsbir.engine.run.X)
    _OUTPUTS,
    RESOLVED,
    RESUME_SAFE_KEYS,
    RunDirError,
    _file_logging,
    _note_resume_changes,
    _prepare_dir,
    _resume_safe,
    check_resumable,
    load_resumable,
    manifest_changes,
    resume_safe_keys,
    run_dir_of,
)
from zsbir.engine.trainer import Trainer
from zsbir.export.card import write_model_card
from zsbir.manifest import Manifest
from zsbir.models.inputs import input_record

log = logging.getLogger("zsbir")

__all__ = ["RESOLVED", "RESUME_SAFE_KEYS", "RunDirError", "check_resumable",
           "evaluate_experiment", "load_resumable", "manifest_changes", "resume_safe_keys",
           "run_dir_of", "run_experiment", "skipped_report"]

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
            except CheckpointError:
                raise  # already one line naming the file (base weights changed, ...)
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
        # from here on the model is the weights a component chose for inference (an EMA
        # copy, ...; the student by default): evaluated and saved to final.pt
        exp.model = inference_model(exp)
        best = run_dir / "checkpoints" / "best.pt"
        if manifest.train.select == "best_val" and best.is_file():
            # best.pt holds what trains: over the (verified) frozen base weights
            best_ckpt = load_checkpoint(best)
            check_base(best_ckpt.get("base"), trainer.base or {}, best)
            load_trainable_state(exp.model, best_ckpt["model"], trainer.frozen, best)
            del best_ckpt
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
        results["threads"] = T.report()
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
                                 "unseen": exp.data.unseen_classes},
                     "inputs": input_record(exp.model)},  # the transform it was trained with
                    run_dir / "checkpoints" / "final.pt")
        write_model_card(run_dir, transforms=exp.eval_transform)  # MODEL_CARD.md
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
