"""A run's research record: scalars.csv, TensorBoard events, log.txt, class lists in
metrics.json; the progress API (zsbir.progress) in its plain-line and live forms."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from zsbir import progress
from zsbir.engine import tracking
from zsbir.engine.tracking import RunTracker, read_scalars

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = [
    "protocol.num_classes=8", "protocol.num_unseen=3", "protocol.photos_per_class=6",
    "protocol.sketches_per_class=6", "protocol.image_size=32", "data.image_size=32",
    "data.workers=0", "train.epochs=2", "train.batch_size=8",
    "sampler.sketches_per_batch=4", "train.log_every=1", "evaluation.grid_queries=2",
    "hashers[1].bits=8",
]


def _step(epoch: int, step: int, steps: int = 3) -> dict:
    return {"epoch": epoch, "step": step, "steps": steps,
            "loss": {"ce": 1.0 / (epoch * steps + step), "total": 2.0 / (epoch * steps + step)},
            "images_per_s": 10.0 + step, "lr": 0.1 / (epoch + 1)}


def _feed(tracker: RunTracker) -> list[dict]:
    sent = []
    for epoch in range(2):
        for step in range(1, 4):
            sent.append(_step(epoch, step))
        sent.append({"epoch_end": epoch, "epoch": epoch, "loss": {"ce": 0.5 - epoch / 10,
                                                                   "total": 1.0 - epoch / 10},
                     "images_per_s": 12.5, "lr": 0.1 / (epoch + 1),
                     "val_accuracy": 0.25 * (epoch + 1)})
    sent.append({"evaluated": "synthetic itq8", "metrics": {"map@all": 0.4, "p@100": 0.3}})
    for info in sent:
        tracker(info)
    return sent


def test_tracker_records_every_scalar_it_is_given(tmp_path):
    forwarded = []
    with RunTracker(tmp_path, epochs=2, forward=forwarded.append) as tracker:
        sent = _feed(tracker)
    assert forwarded == sent  # the caller's callback still gets every dict
    # reference: the scalars written by hand from the dicts
    want = []
    for info in sent:
        if "epoch_end" in info:
            e, g = info["epoch_end"], (info["epoch_end"] + 1) * 3
            want += [("epoch", e, None, g, f"epoch/loss/{k}", v) for k, v in info["loss"].items()]
            want += [("epoch", e, None, g, "epoch/lr", info["lr"]),
                     ("epoch", e, None, g, "epoch/images_per_s", info["images_per_s"]),
                     ("epoch", e, None, g, "val/accuracy", info["val_accuracy"])]
        elif "evaluated" in info:
            want += [("eval", None, None, 6, f"eval/synthetic/itq8/{k}", v)
                     for k, v in info["metrics"].items()]
        else:
            e, s = info["epoch"], info["step"]
            g = e * 3 + s
            want += [("step", e, s, g, f"train/loss/{k}", v) for k, v in info["loss"].items()]
            want += [("step", e, s, g, "train/lr", info["lr"]),
                     ("step", e, s, g, "train/images_per_s", info["images_per_s"])]
    got = [(r["scope"], r["epoch"], r["step"], r["global_step"], r["tag"], r["value"])
           for r in read_scalars(tmp_path)]
    assert got == want
    with (tmp_path / "scalars.csv").open() as f:
        assert next(csv.reader(f)) == list(tracking.FIELDS)


def test_tensorboard_events_hold_the_same_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunTracker(tmp_path, epochs=2) as tracker:
        _feed(tracker)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss/total", "train/lr", "epoch/loss/ce", "val/accuracy",
            "eval/synthetic/itq8/map@all"} <= tags
    val = [(e.step, round(e.value, 6)) for e in acc.Scalars("val/accuracy")]
    assert val == [(3, 0.25), (6, 0.5)]
    total = [e.value for e in acc.Scalars("train/loss/total")]
    assert total == pytest.approx([2.0 / g for g in range(1, 7)])


def test_without_tensorboard_the_run_goes_on_and_says_so_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setattr(tracking, "_hinted", False)
    with caplog.at_level(logging.WARNING, logger="zsbir"):
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            with RunTracker(tmp_path / name, epochs=2) as tracker:
                _feed(tracker)
    hints = [r for r in caplog.records if "tensorboard" in r.getMessage()]
    assert len(hints) == 1 and "pip install 'zsbir[tensorboard]'" in hints[0].getMessage()
    assert not (tmp_path / "a" / "tensorboard").exists()
    assert len(read_scalars(tmp_path / "b")) == len(read_scalars(tmp_path / "a")) > 0


def test_phase_plain_lines_with_time_left(caplog, monkeypatch):
    console = Console(file=io.StringIO(), force_terminal=False)
    clock = iter(range(100))
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(clock)))
    with caplog.at_level(logging.INFO, logger="zsbir"), \
            progress.display(console, live=False, interval=2):
        with progress.phase("embedding gallery", total=10, unit="images") as advance:
            for _ in range(10):
                advance(1, info="ok")
    lines = [r.getMessage() for r in caplog.records if r.name == "zsbir.progress"]
    assert lines[0] == "embedding gallery ..."
    periodic = [m for m in lines[1:-1]]
    assert periodic and all(re.search(r"\d+/10 images \(\d+%\), .* elapsed, .* left; ok", m)
                            for m in periodic)
    # one advance per clock tick: the rate is 1 image/s, so "k/10" leaves 10 - k seconds
    m = re.search(r"(\d+)/10 images .* (\d+\.\d) s left", periodic[0])
    assert m and float(m.group(2)) == pytest.approx(10 - int(m.group(1)), abs=1)
    assert lines[-1].startswith("embedding gallery: done, 10 images in ")


def test_long_phase_lines_thin_out(caplog, monkeypatch):
    """At most one line per tenth of the elapsed time: ~10 lines per decade of duration."""
    console = Console(file=io.StringIO(), force_terminal=False)
    clock = iter(range(10**6))
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(clock)))
    with caplog.at_level(logging.INFO, logger="zsbir"), \
            progress.display(console, live=False, interval=2):
        with progress.phase("long", total=2000) as advance:
            for _ in range(2000):
                advance()
    times = [int(m.group(1)) for r in caplog.records
             if (m := re.search(r"(\d+)/2000 items", r.getMessage()))]
    gaps = [b - a for a, b in zip(times, times[1:])]
    # reference: a line whenever the gap reaches max(2, elapsed / 10)
    want, last = [], 0
    for t in range(1, 2001):
        if t - last >= max(2, 0.1 * t):
            want.append(t)
            last = t
    assert len(times) == pytest.approx(len(want), abs=2) and 40 < len(times) < 70
    assert gaps[-1] > 100  # an hour-long phase is not one line every 10 s


def test_phase_nested_short_phases_are_quiet_and_failures_are_logged(caplog):
    with caplog.at_level(logging.INFO, logger="zsbir"):
        with progress.phase("outer"):
            with progress.phase("inner"):
                pass
        with pytest.raises(KeyError), progress.phase("broken"):
            raise KeyError("x")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "outer ..." and lines[1].startswith("outer: done in")
    assert not any(m.startswith("inner") for m in lines)
    assert lines[-1].startswith("broken: failed after")


def test_phase_live_bar_on_a_terminal(caplog):
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with caplog.at_level(logging.INFO, logger="zsbir"), progress.console_output(console):
        with progress.phase("indexing files", total=4, unit="files") as advance:
            for _ in range(4):
                advance()
        logging.getLogger("zsbir.test").warning("careful")
    text = out.getvalue()
    assert "indexing files" in text and "warning: careful" in text
    assert progress._DISPLAY.progress is None  # the bar stopped with the phase


def test_format_seconds():
    assert progress.format_seconds(8.04) == "8.0 s"
    assert progress.format_seconds(75.2) == "1 min 15 s"
    assert progress.format_seconds(3725) == "1 h 02 min"
    assert progress.format_seconds(float("nan")) == "?"


@pytest.mark.slow
def test_run_writes_scalars_tensorboard_log_and_class_lists(tmp_path):
    """A tiny `zsbir run`: every console line is in log.txt (timestamped), scalars.csv
    and TensorBoard hold the steps, epochs and results, metrics.json the class split."""
    from zsbir.cli import main
    from zsbir.engine.checkpoint import load_checkpoint

    args = ["run", str(EXAMPLES / "quickstart.toml"),
            "--set", f"run.output_dir={json.dumps(str(tmp_path))}", "--set", "run.name=t"]
    for o in TINY:
        args += ["--set", o]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    run = tmp_path / "t"
    log_lines = (run / "log.txt").read_text().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING|ERROR) ", ln)
               for ln in log_lines)
    logged = {ln.split(" ", 3)[3] for ln in log_lines}
    shown = [ln for ln in res.output.splitlines() if ln.startswith(("epoch ", "evaluated ",
                                                                     "building", "training"))]
    assert any(ln.startswith("epoch 2/2: ") for ln in shown)
    assert any(ln.startswith("evaluated synthetic real: map@all=") for ln in shown)
    assert [ln for ln in shown if ln not in logged] == []  # the console's lines, in the log
    assert any(ln.startswith("result synthetic real: map@all=") for ln in logged)

    rows = read_scalars(run)
    metrics = json.loads((run / "metrics.json").read_text())
    hist = metrics["train"]["history"]
    epoch_ce = [r["value"] for r in rows if r["tag"] == "epoch/loss/total"]
    assert epoch_ce == pytest.approx([h["loss"]["total"] for h in hist])
    steps = [r for r in rows if r["scope"] == "step" and r["tag"] == "train/loss/total"]
    assert len(steps) == metrics["train"]["global_steps"]
    real = metrics["results"]["synthetic"]["real"]["map@all"]["value"]
    assert [r["value"] for r in rows if r["tag"] == "eval/synthetic/real/map@all"] == \
        pytest.approx([real])
    if "tensorboard" in sys.modules or _has("tensorboard"):
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    classes = metrics["classes"]
    ckpt = load_checkpoint(run / "checkpoints" / "final.pt")
    assert classes["seen"] == ckpt["classes"]["seen"]
    assert classes["unseen"] == ckpt["classes"]["unseen"]
    assert classes["counts"] == {"seen": 5, "unseen": 3, "validation": len(classes["validation"]),
                                 "validation_images": classes["counts"]["validation_images"]}
    assert set(classes["validation"]) <= set(classes["seen"]) and classes["validation"]
    assert not set(classes["seen"]) & set(classes["unseen"])


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_training_says_what_runs_before_the_first_step(tmp_path, caplog):
    """The trainer's first event comes before any optimizer step (epochs, steps, batch
    size); the tracker logs it and opens the training bar at the start position, so the
    time left counts every step from there (not from the first logged step)."""
    import zsbir.engine.trainer as trainer_mod
    from zsbir.engine.run import run_experiment
    from zsbir.manifest import apply_overrides, load, resolve

    events: list[dict] = []
    steps_run: list[int] = []
    original = trainer_mod.Trainer.train_step

    def counting(self, batch):
        steps_run.append(len(events))  # how many events came before this step
        return original(self, batch)

    raw = apply_overrides(load(EXAMPLES / "quickstart.toml"),
                          [*TINY, f"run.output_dir={json.dumps(str(tmp_path))}", "run.name=s",
                           "train.log_every=100"])
    mp = pytest.MonkeyPatch()
    mp.setattr(trainer_mod.Trainer, "train_step", counting)
    try:
        with caplog.at_level(logging.INFO, logger="zsbir"):
            run_experiment(resolve(raw), progress=events.append)
    finally:
        mp.undo()
    start = [i for i, e in enumerate(events) if "train_start" in e]
    assert start == [0] and steps_run and steps_run[0] == 1  # first, and before step 1
    e = events[0]
    assert e["epochs"] == 2 and e["batch_size"] == 8 and e["steps"] > 0
    assert (e["epoch"], e["step"]) == (0, 0)
    lines = [r.getMessage() for r in caplog.records]
    want = f"training: 2 epochs x {e['steps']} steps (batch 8; {2 * e['steps']} steps in all)"
    assert want in lines


def test_tracker_time_left_counts_from_the_start_position(tmp_path, caplog, monkeypatch):
    """A resumed run (epoch 1, step 1 of 3) opens its bar at global step 4: the first
    periodic line's rate counts only the steps this process ran."""
    clock = iter(range(0, 1000, 2))
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(clock)))
    console = Console(file=io.StringIO(), force_terminal=False)
    with caplog.at_level(logging.INFO, logger="zsbir"), \
            progress.display(console, live=False, interval=1):
        with RunTracker(tmp_path, epochs=3, tensorboard=False) as tracker:
            tracker({"train_start": True, "epochs": 3, "steps": 3, "batch_size": 8,
                     "epoch": 1, "step": 1, "world_size": 1})
            tracker(_step(1, 2))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("zsbir")]
    assert "training: 3 epochs x 3 steps (batch 8; 9 steps in all, resuming at epoch 2 " \
           "step 1)" in lines
    m = next(filter(None, (re.match(r"training: 5/9 steps \(56%\), (\d+\.\d) s elapsed, "
                                    r"(\d+\.\d) s left", ln) for ln in lines)), None)
    # 5/9 done, 1 of them by this process in E seconds: 4 steps left take 4 E
    assert m and float(m[2]) == pytest.approx(4 * float(m[1])), lines
