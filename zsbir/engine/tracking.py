"""A run's scalars, written while it runs: ``scalars.csv``, TensorBoard events, log lines.

:class:`RunTracker` is the ``progress(info)`` callback :func:`zsbir.engine.run.run_experiment`
hands the trainer (wrapping the caller's own callback, which still gets every dict). From
the trainer's plain-data dicts and the evaluation results it writes, in ``RUN_DIR``:

- ``scalars.csv``: one row per scalar, ``wall_s,scope,epoch,step,global_step,tag,value``;
  ``scope`` is ``step`` (every ``train.log_every`` steps: running means of the loss terms,
  lr, images/s), ``epoch`` (the epoch's means, lr, images/s, validation accuracy) or
  ``eval`` (each retrieval metric of each protocol task and hasher). Tags are the same as
  TensorBoard's: ``train/loss/<term>``, ``train/lr``, ``train/images_per_s``,
  ``epoch/loss/<term>``, ``epoch/lr``, ``epoch/images_per_s``, ``val/accuracy``,
  ``eval/<task>/<hasher>/<metric>``. Appended to on ``--resume``.
- ``tensorboard/``: the same scalars as TensorBoard event files
  (``torch.utils.tensorboard.SummaryWriter``; ``pip install 'zsbir[tensorboard]'``). Without
  the ``tensorboard`` package the run goes on and says once how to enable them.
- log lines (``zsbir.run`` logger, so the console and ``log.txt``): one per epoch and one
  per evaluated (task, hasher), and a training progress bar (:func:`zsbir.progress.phase`)
  with the time left.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["CSV_NAME", "TB_DIR", "RunTracker", "epoch_line", "read_scalars"]

CSV_NAME = "scalars.csv"
TB_DIR = "tensorboard"
FIELDS = ("wall_s", "scope", "epoch", "step", "global_step", "tag", "value")
TB_HINT = ("TensorBoard event files are not written: the `tensorboard` package is not "
           "installed (pip install 'zsbir[tensorboard]')")

log = logging.getLogger("zsbir.run")
_hinted = False


def epoch_line(info: dict[str, Any], epochs: int | None = None) -> str:
    """``epoch 3/8: total=1.2345 ce=1.2345 val_acc=0.512 (98 img/s, lr 1.00e-03)``."""
    n = info["epoch_end"] + 1
    loss = " ".join(f"{k}={v:.4f}" for k, v in info["loss"].items())
    val = f" val_acc={info['val_accuracy']:.3f}" if "val_accuracy" in info else ""
    return (f"epoch {n}{f'/{epochs}' if epochs else ''}: {loss}{val} "
            f"({info['images_per_s']:.0f} img/s, lr {info['lr']:.2e})")


def _tensorboard_writer(path: Path) -> Any:
    global _hinted
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _hinted:
            _hinted = True
            log.warning(TB_HINT)
        return None
    return SummaryWriter(log_dir=str(path))


class RunTracker:
    """The trainer's ``progress`` callback that records every scalar it is given.

    Args:
        run_dir: the run directory (``scalars.csv`` and ``tensorboard/`` go there).
        epochs: the number of epochs (for "epoch 3/8" and the training bar's total).
        forward: the caller's own callback, called with every dict after it is recorded.
        tensorboard: write TensorBoard events when the package is installed.
    """

    def __init__(self, run_dir: str | Path, epochs: int | None = None,
                 forward: Callable[[dict[str, Any]], None] | None = None,
                 tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.epochs = epochs
        self.forward = forward
        self.t0 = time.perf_counter()
        path = self.run_dir / CSV_NAME
        new = not path.is_file() or path.stat().st_size == 0
        self._file = path.open("a", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(FIELDS)
        self._tb = _tensorboard_writer(self.run_dir / TB_DIR) if tensorboard else None
        self._bar: contextlib.ExitStack | None = None
        self._advance: Callable[..., None] | None = None
        self._steps_per_epoch = 0
        self._last_epoch = 0

    # ------------------------------------------------------------------ recording
    def scalar(self, scope: str, tag: str, value: float, epoch: int | None = None,
               step: int | None = None, global_step: int = 0) -> None:
        """One scalar, to the CSV and (when available) TensorBoard."""
        value = float(value)
        self._csv.writerow((f"{time.perf_counter() - self.t0:.3f}", scope,
                            "" if epoch is None else epoch, "" if step is None else step,
                            global_step, tag, repr(value)))
        if self._tb is not None and math.isfinite(value):
            self._tb.add_scalar(tag, value, global_step)

    def __call__(self, info: dict[str, Any]) -> None:
        if "train_start" in info:
            self._train_start(info)
        elif "epoch_end" in info:
            self._epoch_end(info)
        elif "evaluated" in info:
            self._evaluated(info)
        elif "step" in info and "steps" in info:
            self._step(info)
        if self.forward is not None:
            self.forward(info)

    def _step(self, info: dict[str, Any]) -> None:
        epoch, step, steps = info["epoch"], info["step"], info["steps"]
        self._steps_per_epoch = steps
        g = epoch * steps + step
        for k, v in info["loss"].items():
            self.scalar("step", f"train/loss/{k}", v, epoch, step, g)
        self.scalar("step", "train/lr", info["lr"], epoch, step, g)
        self.scalar("step", "train/images_per_s", info["images_per_s"], epoch, step, g)
        self._bar_update(epoch, step, steps, info)

    def _train_start(self, info: dict[str, Any]) -> None:
        """Before the first optimizer step: one line saying what runs, and the bar opened
        at the starting position (a resumed run's time left counts only its own steps)."""
        epochs, steps = info["epochs"], info["steps"]
        self.epochs = self.epochs or epochs
        self._steps_per_epoch = steps
        at = info["epoch"] * steps + info["step"]
        world = info.get("world_size", 1)
        batch = f"batch {info['batch_size']}" + (f" over {world} processes" if world > 1 else "")
        resumed = f", resuming at epoch {info['epoch'] + 1} step {info['step']}" if at else ""
        log.info("training: %d epochs x %d steps (%s; %d steps in all%s)", epochs, steps,
                 batch, epochs * steps, resumed)
        self._open_bar(epochs * steps)
        if self._advance is not None:
            self._advance(completed=at, info=f"epoch {info['epoch'] + 1}/{epochs} starting")

    def _epoch_end(self, info: dict[str, Any]) -> None:
        epoch = info["epoch_end"]
        self._last_epoch = epoch + 1
        g = (epoch + 1) * self._steps_per_epoch
        for k, v in info["loss"].items():
            self.scalar("epoch", f"epoch/loss/{k}", v, epoch, None, g)
        self.scalar("epoch", "epoch/lr", info["lr"], epoch, None, g)
        self.scalar("epoch", "epoch/images_per_s", info["images_per_s"], epoch, None, g)
        if "val_accuracy" in info:
            self.scalar("epoch", "val/accuracy", info["val_accuracy"], epoch, None, g)
        self.flush()
        log.info("%s", epoch_line(info, self.epochs))
        if self.epochs is not None and epoch + 1 >= self.epochs:
            self.close_bar()

    def _evaluated(self, info: dict[str, Any]) -> None:
        self.close_bar()
        task = str(info["evaluated"]).replace(" ", "/")
        g = self._last_epoch * self._steps_per_epoch
        for k, v in info["metrics"].items():
            self.scalar("eval", f"eval/{task}/{k}", v, None, None, g)
        self.flush()
        metrics = " ".join(f"{k}={v:.4f}" for k, v in info["metrics"].items())
        log.info("evaluated %s: %s", info["evaluated"], metrics)

    # ------------------------------------------------------------------ progress bar
    def _bar_update(self, epoch: int, step: int, steps: int, info: dict[str, Any]) -> None:
        self._open_bar((self.epochs or 0) * steps)
        if self._advance is None:
            return
        loss = info["loss"].get("total")
        text = f"epoch {epoch + 1}/{self.epochs}"
        if loss is not None:
            text += f" loss={loss:.3f}"
        text += f" {info['images_per_s']:.0f} img/s"
        if step >= steps and (epoch + 1) < (self.epochs or 0):
            text += " (end of epoch: validating, saving)"
        self._advance(completed=epoch * steps + step, info=text)

    def _open_bar(self, total: int) -> None:
        from zsbir.progress import phase

        if self._bar is None and self.epochs and total:
            self._bar = contextlib.ExitStack()
            self._advance = self._bar.enter_context(phase("training", total=total,
                                                          unit="steps"))

    def close_bar(self) -> None:
        """End the training bar (logs how long training took)."""
        if self._bar is not None:
            bar, self._bar, self._advance = self._bar, None, None
            bar.close()

    # ------------------------------------------------------------------ lifetime
    def flush(self) -> None:
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.close_bar()
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_scalars(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``scalars.csv`` (numbers parsed; empty fields None)."""
    path = Path(run_dir) / CSV_NAME
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    with path.open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            rows.append({
                "wall_s": float(r["wall_s"]), "scope": r["scope"],
                "epoch": int(r["epoch"]) if r["epoch"] else None,
                "step": int(r["step"]) if r["step"] else None,
                "global_step": int(r["global_step"]) if r["global_step"] else 0,
                "tag": r["tag"], "value": float(r["value"]),
            })
    return rows
