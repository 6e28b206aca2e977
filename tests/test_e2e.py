"""End to end on the synthetic protocol: a short run writes every output, and a run
killed mid-epoch resumes to the same weights as the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zsbir.engine.checkpoint import load_checkpoint
from zsbir.engine.run import RunDirError, load_resumable, run_experiment
from zsbir.manifest import apply_overrides, load, resolve

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

TINY = [
    "protocol.num_classes=8", "protocol.num_unseen=3", "protocol.photos_per_class=6",
    "protocol.sketches_per_class=6", "protocol.image_size=32", "data.image_size=32",
    "data.workers=0", "model.head.embed_dim=16", "train.epochs=2", "train.batch_size=8",
    "sampler.sketches_per_batch=4", "train.checkpoint_every=3", "train.log_every=1",
    "evaluation.grid_queries=2", "hashers[1].bits=8",
]


def tiny(tmp_path: Path, name: str, extra: list[str] = ()):
    raw = load(EXAMPLES / "quickstart.toml")
    raw = apply_overrides(raw, TINY + [f"run.output_dir={json.dumps(str(tmp_path))}",
                                       f"run.name={name}", *extra])
    return resolve(raw)


@pytest.mark.slow
def test_short_run_writes_everything(tmp_path):
    events = []
    results = run_experiment(tiny(tmp_path, "a", ["evaluation.generalized=true",
                                                  "evaluation.pbir=true"]),
                             progress=events.append)
    run_dir = tmp_path / "a"
    for f in ("manifest.resolved.toml", "metrics.json", "features.npz", "retrievals.png",
              "log.txt", "checkpoints/last.pt", "checkpoints/final.pt"):
        assert (run_dir / f).is_file(), f
    metrics = json.loads((run_dir / "metrics.json").read_text())
    per_hasher = metrics["results"]["synthetic"]
    assert set(per_hasher) == {"real", "itq8"}
    for entry in per_hasher.values():
        assert 0.0 <= entry["map@all"]["value"] <= 1.0 and entry["map@all"]["formula"]
    assert 0 < metrics["chance"]["synthetic"] < 1
    assert set(metrics["results"]) == {"synthetic", "synthetic-generalized", "synthetic-pbir"}
    sizes = metrics["sizes"]
    assert sizes["synthetic-generalized"]["gallery"] > sizes["synthetic"]["gallery"]
    assert sizes["synthetic-pbir"]["queries"] + sizes["synthetic-pbir"]["gallery"] == \
        sizes["synthetic"]["gallery"]
    assert metrics["train"]["epochs_run"] == 2
    assert results["num_queries"] == metrics["num_queries"]
    # checkpoints are plain data
    final = torch.load(run_dir / "checkpoints/final.pt", weights_only=True)
    assert "model" in final and final["hashers"][1]["name"] == "itq"
    assert any("epoch_end" in e for e in events)
    # the run directory is never silently overwritten
    with pytest.raises(RunDirError, match="already holds a run"):
        run_experiment(tiny(tmp_path, "a"))


@pytest.mark.slow
def test_resume_mid_epoch_matches_uninterrupted(tmp_path):
    full = tiny(tmp_path, "full")
    run_experiment(full)
    part = tiny(tmp_path, "part")
    out = run_experiment(part, stop_after_steps=4)  # killed after step 4 (epoch 1 of 2)
    assert out["interrupted"]
    ckpt = load_checkpoint(tmp_path / "part/checkpoints/last.pt")
    assert ckpt["train_state"]["global_step"] == 3  # last checkpoint: step 3, mid-epoch
    assert ckpt["train_state"]["epoch"] == 0 and ckpt["train_state"]["step"] == 3
    run_experiment(load_resumable(tmp_path / "part"), resume=True)
    a = load_checkpoint(tmp_path / "full/checkpoints/last.pt")["model"]
    b = load_checkpoint(tmp_path / "part/checkpoints/last.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = json.loads((tmp_path / "full/metrics.json").read_text())["results"]
    mb = json.loads((tmp_path / "part/metrics.json").read_text())["results"]
    assert ma == mb


class EmaStep:
    """Test-only stateful step: the default step plus an exponential moving average of the
    student's weights (a momentum teacher in miniature, Tarvainen & Valpola, NeurIPS 2017),
    updated after every optimizer step, checkpointed, and the weights the run evaluates."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.5):
        import copy

        from zsbir.engine.step import DefaultStep

        self.inner, self.model, self.decay = DefaultStep(), model, decay
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.updates, self.total_steps, self.epochs_ended = 0, 0, 0

    def __call__(self, s, batch):
        return self.inner(s, batch)

    def on_train_start(self, info) -> None:
        assert info.epochs == 2 and info.total_steps == 2 * info.steps_per_epoch > 0
        assert info.global_step == self.updates  # 0, or where a resumed run continues
        self.total_steps = info.total_steps

    def on_epoch_end(self, epoch: int) -> None:
        assert epoch == self.epochs_ended
        self.epochs_ended += 1

    @torch.no_grad()
    def on_after_optimizer_step(self, global_step: int) -> None:
        time.sleep(float(os.environ.get("ZSBIR_TEST_STEP_SLEEP", "0")))  # to be killed
        student = self.model.state_dict()
        for k, v in self.ema.state_dict().items():
            if v.is_floating_point():
                v.mul_(self.decay).add_(student[k], alpha=1 - self.decay)
            else:
                v.copy_(student[k])
        self.updates += 1
        assert self.updates == global_step

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict(), "updates": self.updates,
                "epochs_ended": self.epochs_ended}

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state["ema"])
        self.updates, self.epochs_ended = state["updates"], state["epochs_ended"]

    def inference_model(self) -> torch.nn.Module:
        return self.ema


def ema_extra(name: str) -> list[str]:
    return [f'train.step={{name = "{name}", decay = 0.5}}', "train.select=last"]


def same_runs(a: Path, b: Path) -> None:
    """Bit-identical last.pt (student and step state) and final.pt, equal metrics."""
    for name in ("last.pt", "final.pt"):
        x, y = (load_checkpoint(d / "checkpoints" / name) for d in (a, b))
        for k in x["model"]:
            assert torch.equal(x["model"][k], y["model"][k]), (name, k)
    x, y = (load_checkpoint(d / "checkpoints" / "last.pt")["components"]["step"]
            for d in (a, b))
    assert x["updates"] == y["updates"] and x["epochs_ended"] == y["epochs_ended"] == 2
    for k in x["ema"]:
        assert torch.equal(x["ema"][k], y["ema"][k]), k
    assert (json.loads((a / "metrics.json").read_text())["results"]
            == json.loads((b / "metrics.json").read_text())["results"])


@pytest.fixture
def ema_step():
    from zsbir.registry import steps

    steps.add("test_ema", EmaStep)
    yield "test_ema"
    steps._components.pop("test_ema", None)


@pytest.mark.slow
def test_resume_with_a_stateful_step_matches_uninterrupted(tmp_path, ema_step):
    """A step with state (an EMA of the student) that chooses the evaluated weights: killed
    mid-epoch and resumed, the run ends bit-identical to the uninterrupted one, student,
    EMA and evaluated weights alike."""
    extra = ema_extra(ema_step)
    run_experiment(tiny(tmp_path, "full", extra))
    out = run_experiment(tiny(tmp_path, "part", extra), stop_after_steps=4)
    assert out["interrupted"]
    ckpt = load_checkpoint(tmp_path / "part/checkpoints/last.pt")
    assert ckpt["components"]["step"]["updates"] == 3  # the step's state is checkpointed
    run_experiment(load_resumable(tmp_path / "part"), resume=True)
    same_runs(tmp_path / "full", tmp_path / "part")
    last = load_checkpoint(tmp_path / "part/checkpoints/last.pt")
    ema = last["components"]["step"]["ema"]
    final = load_checkpoint(tmp_path / "part/checkpoints/final.pt")["model"]
    # the evaluated and exported weights are the EMA copy, not the student
    assert all(torch.equal(final[k], ema[k]) for k in final)
    assert any(not torch.equal(final[k], last["model"][k]) for k in final
               if final[k].is_floating_point())


def test_resume_needs_a_run_dir(tmp_path):
    with pytest.raises(RunDirError, match="not a zsbir run directory"):
        load_resumable(tmp_path)


@pytest.mark.slow
def test_index_and_search_a_photo_folder(tmp_path):
    """A finished run indexes a folder of photos and ranks them for a sketch."""
    from click.testing import CliRunner
    from PIL import Image

    from zsbir.cli import main
    from zsbir.data.synthetic import render

    run_experiment(tiny(tmp_path, "idx"))
    photos = tmp_path / "photos"
    photos.mkdir()
    for c in range(3):
        for i in range(3):
            Image.fromarray(render(c, 0, i, 5, 32)).save(photos / f"c{c}_{i}.png")
    (photos / "bad.png").write_bytes(b"nope")
    Image.fromarray(render(1, 1, 0, 5, 32)).save(tmp_path / "sketch.png")
    runner = CliRunner()
    res = runner.invoke(main, ["index", "build", str(tmp_path / "idx"), str(photos),
                               str(tmp_path / "i.index"), "--hasher", "itq8", "--workers", "0"],
                        catch_exceptions=False)
    assert res.exit_code == 0 and "9 photos embedded" in res.output
    assert "bad.png" in res.output
    res = runner.invoke(main, ["search", str(tmp_path / "i.index"),
                               str(tmp_path / "sketch.png"), "--top", "4", "--json"],
                        catch_exceptions=False)
    assert res.exit_code == 0
    out = json.loads(res.output)
    assert out["score"] == "Hamming distance"
    ranked = out["queries"][0]["results"]
    assert len(ranked) == 4 and all(Path(r["path"]).parent == photos for r in ranked)
    distances = [r["score"] for r in ranked]
    assert distances == sorted(distances)  # Hamming distances, ascending


@pytest.mark.slow
def test_sigkilled_run_with_a_stateful_step_resumes_bit_identically(tmp_path, ema_step):
    """The same run in a process of its own, SIGKILLed once a checkpoint exists (possibly
    while writing the next one), then resumed: bit-identical to the uninterrupted run."""
    run_experiment(tiny(tmp_path, "full", ema_extra(ema_step)))
    worker = [sys.executable, str(Path(__file__).with_name("stateful_worker.py")),
              str(tmp_path)]
    proc = subprocess.Popen([*worker, "part", "fresh"],
                            env={**os.environ, "ZSBIR_TEST_STEP_SLEEP": "0.2"})
    last = tmp_path / "part" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 600
    while not last.exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (tmp_path / "part" / "metrics.json").exists()  # killed mid-training
    subprocess.run([*worker, "part", "resume"], check=True, timeout=600)
    same_runs(tmp_path / "full", tmp_path / "part")
