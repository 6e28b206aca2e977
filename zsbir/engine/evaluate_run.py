"""``zsbir evaluate RUN_DIR [--protocol NAME] [--root DATA] [--set KEY=VALUE]``: score a
finished run's (or an imported one's) model on any protocol's test split, without
training (:func:`evaluate_run`).

The model is the run's ``checkpoints/final.pt`` (the evaluated weights and the fitted
hashers), built from the manifest saved in it with ``build(purpose="evaluate")``; the
model keeps the classes it was trained on (its classifier), the protocol supplies the
queries and gallery. ``--protocol`` replaces the run's ``[protocol]`` table (its own
protocol when omitted, with every setting the run used; another protocol starts from its
defaults, ``--set protocol.KEY=...`` for more), ``--root`` sets ``protocol.root``, and
``--set`` changes any other key of the saved manifest: ``evaluation.*`` (metrics,
``generalized``, ``pbir``, ``per_class``, the grid), ``rerankers`` and ``hashers``. After
``zsbir tune RUN_DIR`` (``RUN_DIR/tune.json``), the ``[[rerankers]]`` of the run's
``manifest.resolved.toml``, where it wrote its choice, replace the checkpoint's.
Hashers equal to the run's are used as fitted in training; others are fitted as
``zsbir run`` fits them, on the evaluated protocol's training split.

Everything ``zsbir run`` writes after training goes to ``RUN_DIR/eval/<protocol>/``
(never over the run's own ``metrics.json``): ``metrics.json`` (same keys, plus
``evaluated``: the checkpoint, the protocol trained on and the overrides),
``features.npz``, ``retrievals.png``, ``manifest.resolved.toml`` (the manifest scored).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["EVAL_DIR", "eval_dir_of", "evaluate_run", "tuned_rerankers"]

#: the folder of RUN_DIR holding one subfolder per protocol scored
EVAL_DIR = "eval"


def eval_dir_of(run_dir: str | Path, protocol: str) -> Path:
    return Path(run_dir) / EVAL_DIR / protocol


def tuned_rerankers(run_dir: Path) -> list[dict[str, Any]] | None:
    """The ``[[rerankers]]`` of ``RUN_DIR/manifest.resolved.toml`` when ``zsbir tune`` wrote
    there (``RUN_DIR/tune.json`` exists), else ``None``."""
    from zsbir.engine.rundir import RESOLVED
    from zsbir.engine.tune import TUNE_FILE
    from zsbir.manifest import load

    if not (run_dir / TUNE_FILE).is_file() or not (run_dir / RESOLVED).is_file():
        return None
    return [dict(t) for t in load(run_dir / RESOLVED).get("rerankers", [])]


def _manifest_for(ckpt: dict[str, Any], protocol: str | None, root: str | None,
                  overrides: Sequence[str], source: str) -> Any:
    import copy

    from zsbir.manifest import ManifestError, Problem, apply_overrides, resolve

    raw = copy.deepcopy(ckpt["manifest"])
    if protocol and protocol != raw.get("protocol", {}).get("name"):
        raw["protocol"] = {"name": protocol}
    if root is not None:
        raw.setdefault("protocol", {})["root"] = str(root)
    raw = apply_overrides(raw, list(overrides), source)
    if "root" in raw.get("protocol", {}) and raw["protocol"]["root"] in ("", None):
        raise ManifestError([Problem("protocol.root", "not set (the run was imported "
                                     "without --root): give --root DATA")], source)
    return resolve(raw, source)


def evaluate_run(run_dir: str | Path, protocol: str | None = None, root: str | None = None,
                 overrides: Sequence[str] = (),
                 progress: Callable[[dict[str, Any]], None] | None = None
                 ) -> tuple[dict[str, Any], Path]:
    """Score ``run_dir``'s final model on ``protocol`` (default: the run's own); returns
    ``(results, output directory)`` after writing them (module docstring)."""
    from zsbir.engine import threads as T

    saved = T.snapshot()  # the CPU thread policy, as in `zsbir run`; undone after it
    try:
        return _evaluate_run(Path(run_dir), protocol, root, overrides, progress)
    finally:
        T.restore(saved)


def _evaluate_run(run_dir: Path, protocol: str | None, root: str | None,
                  overrides: Sequence[str], progress: Callable[[dict[str, Any]], None] | None
                  ) -> tuple[dict[str, Any], Path]:
    from zsbir.build import build, resolve_device
    from zsbir.engine.checkpoint import CheckpointError, load_checkpoint, package_versions
    from zsbir.engine.evaluate import evaluate_experiment
    from zsbir.engine.run import _class_lists, skipped_report
    from zsbir.engine.rundir import RESOLVED, RunDirError
    from zsbir.engine.threads import apply_plan, plan_threads, report

    final = run_dir / "checkpoints" / "final.pt"
    if not run_dir.is_dir():
        raise RunDirError(f"no run directory {str(run_dir)!r}")
    if not final.is_file():
        what = "a zsbir run directory" if (run_dir / RESOLVED).is_file() else \
            f"a zsbir run directory (no {RESOLVED})"
        raise RunDirError(f"{str(run_dir)!r} has no checkpoints/final.pt: only a finished "
                          f"`zsbir run` or a `zsbir import` can be evaluated ({what})")
    ckpt = load_checkpoint(final)
    if not isinstance(ckpt.get("manifest"), dict) or "model" not in ckpt:
        raise CheckpointError(f"{str(final)!r} holds no manifest and model: not a final.pt "
                              "written by zsbir run or zsbir import")
    tuned = tuned_rerankers(run_dir)
    if tuned is not None:  # `zsbir tune` chose them: scored in place of the trained run's
        ckpt = {**ckpt, "manifest": {**ckpt["manifest"], "rerankers": tuned}}
    m = _manifest_for(ckpt, protocol, root, overrides, f"{final} (zsbir evaluate)")
    saved_hashers = ckpt["manifest"].get("hashers")
    fitted = bool(ckpt.get("hashers")) and m.hashers == saved_hashers
    if not fitted:
        ckpt = {k: v for k, v in ckpt.items() if k != "hashers"}
    apply_plan(plan_threads(resolve_device(m.run.device), m.run.threads,  # in metrics.json
                            m.data_cfg.workers))
    try:
        exp = build(m, "evaluate", checkpoint=ckpt)
    except RuntimeError as exc:
        if isinstance(exc, CheckpointError):
            raise
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise CheckpointError(f"{str(final)!r} does not fit the model the manifest builds "
                              f"(a --set changed the model?): {first}") from exc
    exp.model.eval()
    out = eval_dir_of(run_dir, m.protocol["name"])
    out.mkdir(parents=True, exist_ok=True)
    results = evaluate_experiment(exp, out, progress, fit_hashers=not fitted)
    results["classes"] = _class_lists(exp.data)
    results["classes"]["model_trained_on"] = {k: len(v) for k, v in ckpt["classes"].items()} \
        if isinstance(ckpt.get("classes"), dict) else None
    results["skipped_images"] = skipped_report(exp.data.skipped, [],
                                               results.pop("_eval_skipped"))
    trained_protocol = ckpt["manifest"].get("protocol", {})
    results["evaluated"] = {
        "run_dir": str(run_dir), "checkpoint": "checkpoints/final.pt",
        "trained_protocol": trained_protocol, "protocol": dict(m.protocol),
        "cross_protocol": {k: v for k, v in trained_protocol.items() if k != "root"}
        != {k: v for k, v in m.protocol.items() if k != "root"},
        "hashers": "as fitted in training" if fitted else "fitted on this protocol's "
                   "training split", "overrides": list(overrides),
        "imported": ckpt.get("imported"),
        "rerankers_from": f"{RESOLVED} (zsbir tune)" if tuned is not None else "checkpoint",
    }
    results["threads"] = report()
    results["versions"] = package_versions()
    results["device"] = str(exp.ctx.device)
    (out / "manifest.resolved.toml").write_text(m.to_toml())
    (out / "metrics.json").write_text(json.dumps(results, indent=2, default=float))
    from zsbir.export.card import write_model_card

    write_model_card(run_dir, transforms=exp.eval_transform)  # the card lists eval/<protocol>/
    return results, out
