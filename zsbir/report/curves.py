"""A run's training curves as one PNG (``zsbir report RUN_DIR`` -> ``RUN_DIR/curves.png``).

Three panels over epochs: every loss term (the epoch means, with the per-step running
means faint behind them when ``scalars.csv`` has them), the learning rate, and the
validation accuracy. Read from ``scalars.csv`` (:mod:`zsbir.engine.tracking`), or from
``metrics.json``'s ``train.history`` for runs made before it existed. Drawn with
matplotlib's Agg backend (no display needed; ``pip install 'zsbir[report]'``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["CurvesError", "curves_data", "plot_curves"]


class CurvesError(RuntimeError):
    """The run has no training history, or matplotlib is missing."""


def curves_data(run_dir: str | Path) -> dict[str, Any]:
    """``{"loss": {term: [(epoch, value)]}, "step_loss": {term: [(x, value)]},
    "lr": [(epoch, lr)], "val": [(epoch, acc)]}``; epochs counted from 1, step positions
    in epochs (``epoch + step / steps``)."""
    from zsbir.engine.tracking import read_scalars

    run_dir = Path(run_dir)
    out: dict[str, Any] = {"loss": defaultdict(list), "step_loss": defaultdict(list),
                           "lr": [], "val": []}
    rows = read_scalars(run_dir)
    if rows:
        steps_per_epoch: dict[int, int] = {}
        for r in rows:
            if r["scope"] == "step" and r["epoch"] is not None and r["step"]:
                steps_per_epoch[r["epoch"]] = max(steps_per_epoch.get(r["epoch"], 0), r["step"])
        for r in rows:
            tag, v = r["tag"], r["value"]
            if r["scope"] == "epoch":
                x = r["epoch"] + 1
                if tag.startswith("epoch/loss/"):
                    out["loss"][tag[len("epoch/loss/"):]].append((x, v))
                elif tag == "epoch/lr":
                    out["lr"].append((x, v))
                elif tag == "val/accuracy":
                    out["val"].append((x, v))
            elif r["scope"] == "step" and tag.startswith("train/loss/"):
                n = steps_per_epoch.get(r["epoch"], 1) or 1
                out["step_loss"][tag[len("train/loss/"):]].append((r["epoch"] + r["step"] / n, v))
    else:
        mfile = run_dir / "metrics.json"
        if not mfile.is_file():
            raise CurvesError(f"{str(run_dir)!r} has neither scalars.csv nor metrics.json")
        hist = json.loads(mfile.read_text(encoding="utf-8")).get("train", {}).get("history", [])
        for h in hist:
            x = h["epoch"] + 1
            for k, v in h.get("loss", {}).items():
                out["loss"][k].append((x, v))
            if "lr" in h:
                out["lr"].append((x, h["lr"]))
            if "val_accuracy" in h:
                out["val"].append((x, h["val_accuracy"]))
    if not out["loss"]:
        raise CurvesError(f"{str(run_dir)!r} has no training history to plot")
    out["loss"], out["step_loss"] = dict(out["loss"]), dict(out["step_loss"])
    return out


def plot_curves(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Draw the curves of RUN_DIR into ``path`` (default ``RUN_DIR/curves.png``)."""
    try:
        import matplotlib
    except ImportError:
        raise CurvesError("curves need matplotlib: pip install 'zsbir[report]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    data = curves_data(run_dir)
    path = Path(path) if path is not None else Path(run_dir) / "curves.png"
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    ax_loss, ax_lr, ax_val = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (term, pts) in enumerate(sorted(data["loss"].items())):
        color = colors[i % len(colors)]
        steps = data["step_loss"].get(term)
        if steps:
            ax_loss.plot(*zip(*steps), color=color, alpha=0.25, linewidth=0.8)
        ax_loss.plot(*zip(*pts), color=color, marker="o", markersize=3, label=term)
    ax_loss.set(title="loss terms (epoch means; steps faint)", xlabel="epoch")
    ax_loss.legend(fontsize="small")
    if data["lr"]:
        ax_lr.plot(*zip(*data["lr"]), marker="o", markersize=3)
    ax_lr.set(title="learning rate", xlabel="epoch")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if data["val"]:
        ax_val.plot(*zip(*data["val"]), marker="o", markersize=3, color="tab:green")
    else:
        ax_val.text(0.5, 0.5, "no validation", ha="center", va="center",
                    transform=ax_val.transAxes)
    ax_val.set(title="validation accuracy (seen classes)", xlabel="epoch")
    fig.suptitle(Path(run_dir).name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
