"""Reliability under faults and bad input (issue 15): one test per finding at least.

Runs are tiny (the quickstart manifest with test_e2e's TINY overrides). Faults that need a
kill use a subprocess; a full disk is a mocked ``os.write`` that raises ENOSPC for
checkpoint temporaries only. Commands run in-process through click's runner with
``catch_exceptions=False``: a traceback (an exception escaping the CLI) fails the test.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from zsbir.cli import main
from zsbir.engine import checkpoint as ckpt_mod
from zsbir.engine.checkpoint import (
    CheckpointError,
    NonFiniteCheckpointError,
    atomic_save,
    clean_stale_temporaries,
    load_checkpoint,
)
from zsbir.engine.lock import LOCK_NAME, RunLock, RunLockedError, lock_owner
from zsbir.engine.run import (
    RESOLVED,
    RESUME_SAFE_KEYS,
    RunDirError,
    check_resumable,
    manifest_changes,
    run_experiment,
)
from zsbir.manifest import ManifestError, apply_overrides, load, resolve

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _e2e():
    """tests/test_e2e.py (its TINY overrides and ``tiny`` helper), kept in one place."""
    spec = importlib.util.spec_from_file_location("_zsbir_e2e", Path(__file__).with_name(
        "test_e2e.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


E2E = _e2e()


def tiny(tmp_path: Path, name: str, extra: list[str] = ()):
    return E2E.tiny(tmp_path, name, list(extra))


def cli(*args: str, **kw):
    """Run ``zsbir ARGS``; an exception escaping the CLI (a traceback) fails the test."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


def squash(text: str) -> str:
    """Output without whitespace: rich wraps long lines wherever it likes."""
    return "".join(text.split())


def says(res, *parts: str) -> bool:
    out = squash(res.output)
    return all(squash(p) in out for p in parts)


def no_traceback(res) -> None:
    assert "Traceback" not in res.output and "Aborted!" not in res.output, res.output


def write_run_dir(tmp_path: Path, name: str, last: bytes | None) -> Path:
    """A run directory with its resolved manifest and ``last.pt`` bytes, without training."""
    m = tiny(tmp_path, name)
    d = tmp_path / name
    (d / "checkpoints").mkdir(parents=True)
    (d / RESOLVED).write_text(m.to_toml())
    if last is not None:
        (d / "checkpoints/last.pt").write_bytes(last)
    return d


# --------------------------------------------------------------------------- finding 1
@pytest.mark.slow
def test_resume_works_in_the_moved_directory_from_any_working_directory(tmp_path,
                                                                         monkeypatch):
    # the original run uses a relative output_dir, from its own working directory
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(home)
    raw = apply_overrides(load(EXAMPLES / "quickstart.toml"),
                          E2E.TINY + ["run.output_dir=\"runs\"", "run.name=orig",
                                      "train.epochs=1", "evaluation.grid_queries=0"])
    out = run_experiment(resolve(raw), stop_after_steps=4)
    assert out["interrupted"]
    orig = home / "runs/orig"
    orig_last = (orig / "checkpoints/last.pt").read_bytes()
    copy = tmp_path / "elsewhere/copied"
    shutil.copytree(orig, copy)
    # resume the copy, by a relative path, from an unrelated working directory
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(tmp_path)
    res = cli("run", "--resume", "elsewhere/copied", "--quiet", "--set",
              "evaluation.grid_queries=1")  # a key declared safe to change
    assert res.exit_code == 0, res.output
    assert "grid_queries = 1" in (copy / RESOLVED).read_text()  # the file says what ran
    assert "grid_queries = 0" in (orig / RESOLVED).read_text()
    assert (copy / "retrievals.png").is_file() and not (orig / "retrievals.png").exists()
    assert (copy / "metrics.json").is_file() and (copy / "checkpoints/final.pt").is_file()
    # the original is untouched: no results, and its checkpoint is the one it saved
    assert not (orig / "metrics.json").exists() and not (orig / "checkpoints/final.pt").exists()
    assert (orig / "checkpoints/last.pt").read_bytes() == orig_last
    assert not (copy / LOCK_NAME).exists()  # the lock is released at the end
    train = json.loads((copy / "metrics.json").read_text())["train"]
    assert train["epochs_run"] == 1 and train["global_steps"] > 4


def test_resume_refuses_a_changed_manifest_listing_the_keys(tmp_path):
    m = tiny(tmp_path, "r")
    saved = {"model": {}, "optimizer": {}, "train_state": {}, "manifest": m.data}
    d = write_run_dir(tmp_path, "r", None)
    torch.save(saved, d / "checkpoints/last.pt")
    # an edited resolved manifest: epochs (lr schedule) and the embedding size changed
    text = (d / RESOLVED).read_text()
    edited = text.replace("epochs = 2", "epochs = 5").replace("embed_dim = 16",
                                                             "embed_dim = 32")
    assert edited.count("= 5") >= 1 and "embed_dim = 32" in edited
    (d / RESOLVED).write_text(edited)
    res = cli("run", "--resume", d)
    assert res.exit_code == 2, res.output
    no_traceback(res)
    assert says(res, "train.epochs", "(2 -> 5)", "embed_dim", "(16 -> 32)")
    # nothing was written: the refusal comes before anything is built
    assert not (d / "log.txt").exists() and not (d / LOCK_NAME).exists()
    # --set of an unsafe key is refused the same way
    (d / RESOLVED).write_text(text)
    res = cli("run", "--resume", d, "--set", "optimizer.lr=0.5")
    assert res.exit_code == 2 and says(res, "optimizer.lr")


def test_resume_accepts_the_declared_safe_keys():
    m = resolve(apply_overrides(load(EXAMPLES / "quickstart.toml"), E2E.TINY))
    saved = m.data
    changed = resolve(apply_overrides(
        load(EXAMPLES / "quickstart.toml"),
        E2E.TINY + ["run.name=moved", "run.output_dir=\"/elsewhere\"", "run.device=\"cpu\"",
                    "data.workers=3", "evaluation.grid_queries=0", "hashers[1].bits=4",
                    "train.log_every=7"]))
    ckpt = {"model": {}, "optimizer": {}, "train_state": {}, "manifest": saved}
    check_resumable(ckpt, changed, Path("/x"))  # no error
    assert {"run.name", "data.workers", "evaluation", "hashers"} <= set(RESUME_SAFE_KEYS)
    unsafe = resolve(apply_overrides(load(EXAMPLES / "quickstart.toml"),
                                     E2E.TINY + ["train.epochs=3", "losses[0].weight=2.0"]))
    with pytest.raises(ManifestError) as err:
        check_resumable(ckpt, unsafe, Path("/x"))
    paths = {p.path for p in err.value.problems}
    assert {"train.epochs", "losses[0].weight"} <= paths


def test_resume_safe_keys_follow_the_parameters_markers(tmp_path):
    """Resume-safety is read from ``ResumeSafe`` markers: a student backbone's ``weights``
    may point elsewhere (the base reference checks its content), in any of the model's
    tables; the same parameter of the teacher's backbone may not, nor an unmarked one."""
    from zsbir.constraints import paths_unchecked
    from zsbir.engine.run import resume_safe_keys

    teacher = ["teacher.name=\"online\"", "teacher.network.name=\"imagenet_classifier\"",
               "teacher.network.backbone.name=\"resnet18\"",
               "teacher.network.backbone.weights=\"/teacher/r18.pt\""]

    def manifest(*extra: str, towers: bool = False):
        raw = load(EXAMPLES / "quickstart.toml")
        if towers:  # a backbone per domain: [model.sketch], [model.photo]
            tower = raw.pop("backbone")
            raw["model"] = {**raw["model"], "name": "towers", "sketch": dict(tower),
                            "photo": dict(tower)}
        raw = apply_overrides(raw, E2E.TINY + [*teacher, *extra])
        with paths_unchecked():  # the weights files named here need not exist
            return resolve(raw)

    saved = manifest()
    ckpt = {"model": {}, "optimizer": {}, "train_state": {}, "manifest": saved.data}
    moved = manifest("backbone.weights=\"/elsewhere/r18.pt\"")
    assert "model.backbone.weights" in resume_safe_keys(moved)
    check_resumable(ckpt, moved, tmp_path)  # no error
    keys = resume_safe_keys(manifest(towers=True))
    assert {"model.sketch.weights", "model.photo.weights"} <= set(keys)
    assert "teacher.network.backbone.weights" not in keys
    assert {"run.name", "data.workers", "evaluation", "hashers"} <= set(RESUME_SAFE_KEYS)
    changed = manifest("teacher.network.backbone.weights=\"/elsewhere/r18.pt\"",
                       "backbone.pretrained=true")
    with pytest.raises(ManifestError) as err:
        check_resumable(ckpt, changed, tmp_path)
    assert {p.path for p in err.value.problems if p.path} == {
        "teacher.network.backbone.weights", "model.backbone.pretrained"}


def test_manifest_changes_reference():
    a = {"run": {"name": "x"}, "losses": [{"name": "ce", "weight": 1.0}],
         "optimizer": {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.999]}}
    b = {"run": {"name": "y"}, "losses": [{"name": "ce", "weight": 1}],
         "optimizer": {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.99], "new": 1},
         "teacher": {"name": "online"}}
    assert manifest_changes(a, b) == [("run.name", "x", "y"),
                                      ("optimizer.betas", [0.9, 0.999], [0.9, 0.99]),
                                      ("teacher", None, {"name": "online"})]
    c = dict(a, losses=[*a["losses"], {"name": "sake"}])
    assert manifest_changes(a, c) == [("losses", a["losses"], c["losses"])]


# --------------------------------------------------------------------------- finding 2
def test_atomic_save_refuses_non_finite_tensors_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "ck/last.pt"
    atomic_save({"model": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    for bad, kind in ((float("nan"), "NaN"), (float("inf"), "inf")):
        w = torch.ones(3)
        w[1] = bad
        with pytest.raises(NonFiniteCheckpointError, match=rf"model\.layer\.w holds {kind}"):
            atomic_save({"model": {"layer.w": w}, "step": 3}, path)
    assert path.read_bytes() == before
    assert list(path.parent.iterdir()) == [path]  # no temporary left
    # integer tensors (RNG states) and empty tensors are never refused
    atomic_save({"rng": torch.zeros(5, dtype=torch.uint8), "e": torch.empty(0)}, path)
    assert issubclass(NonFiniteCheckpointError, FloatingPointError)


def _nan_from_step(monkeypatch, bad_step: int, factor: float = float("nan")):
    """The ``ce`` loss times ``factor`` from its ``bad_step``-th call on (1-based)."""
    from zsbir.losses.classification import CrossEntropy

    calls = {"n": 0}
    forward = CrossEntropy.forward

    def poisoned(self, out, batch, teacher):
        calls["n"] += 1
        value = forward(self, out, batch, teacher)
        return value * factor if calls["n"] >= bad_step else value

    monkeypatch.setattr(CrossEntropy, "forward", poisoned)
    return calls


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_with_one_message(tmp_path, monkeypatch):
    # log_every = 10 > checkpoint_every = 3: the loss is non-finite at step 2, between
    # logging steps; the step-3 checkpoint must not be written with NaN weights
    _nan_from_step(monkeypatch, 2)
    m = tiny(tmp_path, "diverged", ["train.log_every=10"])
    manifest = tmp_path / "diverged.toml"
    manifest.write_text(m.to_toml())
    res = cli("run", manifest, "--quiet")
    assert res.exit_code == 1, res.output
    no_traceback(res)
    run_dir = tmp_path / "diverged"
    log_text = (run_dir / "log.txt").read_text()
    # one clear message naming the step and the loss terms, also in log.txt
    assert says(res, "step", "ce=nan")
    assert "non-finite" in log_text.lower() or "nan" in log_text.lower()
    # every checkpoint on disk is finite (the last finite state, or none at all)
    for p in (run_dir / "checkpoints").glob("*.pt"):
        assert ckpt_mod.first_non_finite(load_checkpoint(p)) is None, p
    last = run_dir / "checkpoints/last.pt"
    if last.exists():
        assert load_checkpoint(last)["train_state"]["global_step"] < 2


@pytest.mark.slow
def test_a_loss_exploding_by_orders_of_magnitude_warns(tmp_path, monkeypatch, caplog):
    _nan_from_step(monkeypatch, 6, factor=1e6)
    m = tiny(tmp_path, "boom", ["train.epochs=1"])
    with caplog.at_level("WARNING", logger="zsbir"):
        run_experiment(m)
    warned = [r for r in caplog.records if r.levelname == "WARNING"
              and "loss" in r.getMessage().lower() and "grew" in r.getMessage().lower()]
    assert warned, [r.getMessage() for r in caplog.records]


# --------------------------------------------------------------------------- finding 3
def test_second_writer_is_refused_and_lock_names_the_owner(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    with RunLock(d, "run"):
        owner = lock_owner(d)
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()}"):
            RunLock(d, "resume").acquire()
    assert not (d / LOCK_NAME).exists()
    assert sorted(p.name for p in d.iterdir()) == []  # no temporaries either


def _hold_lock(d: Path, then: str) -> subprocess.Popen:
    code = ("import os, signal, sys, time\n"
            "from zsbir.engine.lock import RunLock\n"
            f"RunLock({str(d)!r}).acquire()\n"
            "print('locked', flush=True)\n"
            + ("os.kill(os.getpid(), signal.SIGKILL)\n" if then == "die" else "time.sleep(60)\n"))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_run_while_another_process_writes_the_directory_is_refused(tmp_path):
    m = tiny(tmp_path, "busy", ["run.overwrite=true"])
    d = tmp_path / "busy"
    d.mkdir()
    proc = _hold_lock(d, "sleep")
    try:
        manifest = tmp_path / "busy.toml"
        manifest.write_text(m.to_toml())
        res = cli("run", manifest)
        assert res.exit_code == 1, res.output
        no_traceback(res)
        assert says(res, "in use by another zsbir process", f"pid {proc.pid}")
        assert not (d / RESOLVED).exists()  # the refused run wrote nothing
        # a resume is refused the same way
        with pytest.raises(RunLockedError):
            run_experiment(m, resume=True, run_dir=d)
    finally:
        proc.kill()
        proc.wait()


def test_stale_locks_are_taken_over(tmp_path, caplog):
    d = tmp_path / "run"
    d.mkdir()
    proc = _hold_lock(d, "die")  # killed while holding the lock
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and (d / LOCK_NAME).exists()
    with caplog.at_level("WARNING"), RunLock(d):
        assert lock_owner(d)["pid"] == os.getpid()
    assert any("stale lock" in r.getMessage() for r in caplog.records)
    # a pid reused by a process that started later (here: this one, with another start time)
    (d / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                           "start": 1}))
    with RunLock(d):
        pass
    # a lock from another host cannot be checked: refused, saying how to clear it
    (d / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(RunLockedError, match="another host"):
        RunLock(d).acquire()


# --------------------------------------------------------------------------- finding 4
def _png(path: Path, value: int, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    arr = np.clip(rng.normal(value, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


def _bad_tree(root: Path, classes=("a", "b", "c", "d", "e", "f"), per_class: int = 4
              ) -> dict[str, str]:
    """A folder tree with one of every kind of bad entry; returns path -> expected reason."""
    for i, c in enumerate(classes):
        for j in range(per_class):
            _png(root / "sketch" / c / f"{j}.png", 40 * i + j)
            _png(root / "photo" / c / f"{j}.png", 200 - 30 * i + j)
    bad = {}
    (root / "photo/a/empty.png").write_bytes(b"")
    bad["photo/a/empty.png"] = "zero-byte file"
    os.symlink(root / "nowhere.png", root / "photo/a/dangling.png")
    bad["photo/a/dangling.png"] = "broken symbolic link"
    os.symlink("loop.png", root / "photo/b/loop.png")
    bad["photo/b/loop.png"] = "symbolic link loop"
    os.mkfifo(root / "photo/c/fifo.png")
    bad["photo/c/fifo.png"] = "a FIFO"
    (root / "sketch/d/notes.txt").write_text("not an image")
    bad["sketch/d/notes.txt"] = "not an image file name"
    os.symlink("x2", root / "sketch/x1")  # class-folder-level loop
    os.symlink("x1", root / "sketch/x2")
    bad["sketch/x1"] = "symbolic link loop"
    bad["sketch/x2"] = "symbolic link loop"
    (root / "sketch/stray.png").write_bytes(b"x")
    bad["sketch/stray.png"] = "not a class folder"
    (root / "sketch/e/garbage.png").write_bytes(b"this is not a png")
    return bad


def test_every_file_left_out_while_indexing_is_listed_with_its_reason(tmp_path):
    from zsbir.data.protocols import folder

    root = tmp_path / "ds"
    bad = _bad_tree(root)
    d = folder(str(root), unseen=["f"], val_fraction=0.0, cache_dir=str(tmp_path / "c"))
    got = dict(d.skipped)
    for rel, reason in bad.items():
        assert reason in got[str(root / rel)], (rel, got.get(str(root / rel)))
    everything = {*d.train.sources, *d.query.sources, *d.gallery.sources}
    assert not any(str(root / rel) in everything for rel in bad)
    # with verify_images, the undecodable file is listed too (and nothing else is new)
    v = folder(str(root), unseen=["f"], val_fraction=0.0, verify_images=True,
               cache_dir=str(tmp_path / "c"))
    vgot = dict(v.skipped)
    assert vgot[str(root / "sketch/e/garbage.png")].startswith("cannot decode")
    assert set(vgot) - set(got) == {str(root / "sketch/e/garbage.png")}


@pytest.mark.slow
def test_left_out_files_reach_metrics_log_and_console(tmp_path):
    root = tmp_path / "ds"
    bad = _bad_tree(root)
    raw = load(EXAMPLES / "quickstart.toml")
    raw["protocol"] = {"name": "folder", "root": str(root), "num_unseen": 2,
                       "val_fraction": 0.0, "verify_images": True}
    raw = apply_overrides(raw, [o for o in E2E.TINY if not o.startswith("protocol.")]
                          + [f"run.output_dir={json.dumps(str(tmp_path))}", "run.name=bad",
                             "train.epochs=1"])
    manifest = tmp_path / "bad.toml"
    manifest.write_text(resolve(raw).to_toml())
    res = cli("run", manifest, "--quiet")
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "bad/metrics.json").read_text())
    listed = {f["path"]: f for f in metrics["skipped_images"]["files"]}
    expected = {str(root / rel) for rel in bad} | {str(root / "sketch/e/garbage.png")}
    assert expected <= set(listed)
    assert all(listed[p]["stage"] == "index" and listed[p]["error"] for p in expected)
    assert metrics["skipped_images"]["count"] == len(listed)
    log_text = (tmp_path / "bad/log.txt").read_text()
    assert all(p in log_text for p in expected)
    assert says(res, f"{len(listed)} file(s) left out")


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    from zsbir.data.base import read_image_file

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    got = np.asarray(read_image_file(str(tmp_path / "g16.png")))
    assert got.shape == (64, 64, 3) and got.dtype == np.uint8
    want = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.abs(got[..., 0].astype(int) - want).max() <= 1
    assert abs(got.mean() - 127.5) < 1  # clipping gave a mean near 255
    # mode "I" holding 16-bit values, and float images in [0, 1]
    from zsbir.data.base import to_rgb8

    as_i = Image.fromarray(ramp.astype(np.int32))
    assert as_i.mode == "I"
    assert np.abs(np.asarray(to_rgb8(as_i))[..., 0].astype(int) - want).max() <= 1
    as_f = Image.fromarray((ramp / 65535.0).astype(np.float32))
    assert np.abs(np.asarray(to_rgb8(as_f))[..., 0].astype(int) - want).max() <= 1
    # 8-bit images are unchanged
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert (np.asarray(to_rgb8(Image.fromarray(rgb))) == rgb).all()


def test_on_corrupt_fail_from_a_worker_is_one_line(tmp_path):
    from zsbir.data.base import Split, read_image_file
    from zsbir.data.loading import CorruptImageError, ImageDataset, Transform, make_loader

    good, broken = tmp_path / "good.png", tmp_path / "broken.png"
    _png(good, 100)
    broken.write_bytes(b"\x89PNG not really")
    split = Split([str(good), str(broken)], np.zeros(2), np.zeros(2))
    ds = ImageDataset(split, read_image_file, Transform(16), "fail")
    loader = make_loader(ds, [[0, 1]], workers=1)
    with pytest.raises(CorruptImageError) as err:
        list(loader)
    text = str(err.value)
    assert "\n" not in text and str(broken) in text and "Traceback" not in text
    assert text.startswith("cannot decode image")


# --------------------------------------------------------------------------- finding 5
BAD_VALUES = [
    # (--set item, key path the error must name); component parameters (this files)
    ("protocol.num_unseen=0", "protocol.num_unseen"),
    ("protocol.num_unseen=23", "protocol"),
    ("hashers[1].bits=-7", "hashers[1].bits"),
    ("hashers[1].bits=0", "hashers[1].bits"),
    ("optimizer.lr=-1", "optimizer.lr"),
    ("optimizer.betas=[0.9]", "optimizer.betas"),
    ("sampler.sketches_per_batch=65", "sampler"),
    ("schedule.min_factor=-0.5", "schedule.min_factor"),
    # core sections (zsbir/manifest.py)
    ("train.log_every=0", "train.log_every"),
    ("data.scale=[0.85]", "data.scale"),
    ("data.eval_batch_size=0", "data.eval_batch_size"),
    ("evaluation.grid_top=-3", "evaluation.grid_top"),
    ("evaluation.chunk_size=-5", "evaluation.chunk_size"),
    ("run.device=\"banana\"", "run.device"),
    ("model.head.dropout=1.5", "model.head.dropout"),
    ("model.head.embed_dim=4000000000", "model.head.embed_dim"),
    ("data.augment_prob=5.0", "data.augment_prob"),
    ("data.workers=-5", "data.workers"),
    ("run.name=\"\"", "run.name"),
    ("run.name=\"../../x\"", "run.name"),
    ("run.seed=99999999999999999999", "run.seed"),
]


@pytest.mark.parametrize(("item", "key"), BAD_VALUES)
def test_validate_refuses_every_bad_value_with_its_key(item, key):
    res = cli("validate", EXAMPLES / "quickstart.toml", "--set", item)
    assert res.exit_code == 2, (item, res.output)
    no_traceback(res)
    assert squash(f"{key}:") in squash(res.output), res.output


def test_validate_refuses_cuda_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("by design: CUDA is available here")
    res = cli("validate", EXAMPLES / "quickstart.toml", "--set", "run.device=\"cuda\"")
    assert res.exit_code == 2 and says(res, "run.device:")


def test_validate_checks_folder_protocol_paths_and_choices(tmp_path):
    manifest = tmp_path / "f.toml"
    raw = load(EXAMPLES / "quickstart.toml")
    raw["protocol"] = {"name": "folder", "root": str(tmp_path / "absent"), "num_unseen": 2,
                       "unseen": ["cat"], "unseen_file": str(tmp_path / "nope.txt")}
    from zsbir.manifest import dump_toml

    manifest.write_text(dump_toml(raw))
    res = cli("validate", manifest)
    assert res.exit_code == 2
    assert says(res, "protocol.root:", "no such dir", "protocol.unseen_file:",
                "protocol:", "give exactly one of unseen, unseen_file, num_unseen")


# --------------------------------------------------------------------------- finding 6
@pytest.mark.parametrize("content", [b"[run]\nname = \"caf\xe9\"\n", b"\x89PNG\r\n\x1a\n\x00\x00"],
                         ids=["latin1", "binary"])
def test_non_utf8_or_binary_manifest_is_one_error(tmp_path, content):
    path = tmp_path / "m.toml"
    path.write_bytes(content)
    for cmd in (("validate", path), ("run", path)):
        res = cli(*cmd)
        assert res.exit_code == 2, res.output
        no_traceback(res)
        assert says(res, str(path)) and ("UTF-8" in res.output or "binary" in res.output)


def _zip_prefix() -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"model": {"w": torch.ones(1000)}}, buf)
    return buf.getvalue()[:2000]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(("label", "content", "expect"), [
    ("empty", b"", "empty (0 bytes)"),
    ("garbage", b"not a checkpoint at all" * 10, "truncated or not a checkpoint"),
    ("truncated", _zip_prefix(), "truncated or not a checkpoint"),
    ("malicious", pickle.dumps({"model": _Evil()}), "objects other than plain data"),
], ids=["empty", "garbage", "truncated", "malicious"])
def test_broken_checkpoint_on_resume_is_one_line(tmp_path, label, content, expect):
    d = write_run_dir(tmp_path, label, content)
    res = cli("run", "--resume", d)
    assert res.exit_code == 1, res.output
    no_traceback(res)
    assert says(res, str(d / "checkpoints/last.pt"), expect)
    assert len(res.output.strip().splitlines()) <= 3
    with pytest.raises(CheckpointError, match=r"weights file '[^']*last\.pt'"):
        load_checkpoint(d / "checkpoints/last.pt", what="weights file")


def test_resume_of_a_directory_that_is_not_a_run(tmp_path):
    res = cli("run", "--resume", tmp_path / "nothing")
    assert res.exit_code == 1 and says(res, "no run directory")
    res = cli("run", "--resume", tmp_path)
    assert res.exit_code == 1 and says(res, "not a zsbir run directory")


def test_unwritable_output_directory_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    m = tiny(tmp_path, "x", [f"run.output_dir={json.dumps(str(blocker / 'runs'))}"])
    manifest = tmp_path / "m.toml"
    manifest.write_text(m.to_toml())
    res = cli("run", manifest)
    assert res.exit_code == 1, res.output
    no_traceback(res)
    assert says(res, "cannot write the run directory", str(blocker / "runs" / "x"))
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        m = tiny(tmp_path, "y", [f"run.output_dir={json.dumps(str(ro))}"])
        manifest.write_text(m.to_toml())
        res = cli("run", manifest)
        assert res.exit_code == 1 and says(res, "permission denied")


def _enospc_for_checkpoints(monkeypatch):
    """``os.write`` raising ENOSPC for checkpoint temporaries (``.NAME.*.tmp``) only."""
    real = os.write

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if os.path.basename(target).startswith(".") and target.endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_full_disk_when_saving_names_the_file_and_cleans_up(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc")
    path = tmp_path / "ck/last.pt"
    atomic_save({"w": torch.ones(2)}, path)
    before = path.read_bytes()
    _enospc_for_checkpoints(monkeypatch)
    with pytest.raises(CheckpointError, match="no space left on the device") as err:
        atomic_save({"w": torch.zeros(2)}, path)
    assert str(path) in str(err.value)
    assert path.read_bytes() == before and list(path.parent.iterdir()) == [path]


@pytest.mark.slow
def test_full_disk_during_a_run_is_one_line(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc")
    m = tiny(tmp_path, "full")
    manifest = tmp_path / "full.toml"
    manifest.write_text(m.to_toml())
    _enospc_for_checkpoints(monkeypatch)
    res = cli("run", manifest, "--quiet")
    assert res.exit_code == 1, res.output
    no_traceback(res)
    assert says(res, "no space left on the device", str(tmp_path / "full/checkpoints"))
    assert not list((tmp_path / "full/checkpoints").glob(".*.tmp"))
    assert "no space left" in (tmp_path / "full/log.txt").read_text()


def test_stale_temporaries_of_a_killed_save_are_cleaned_at_the_next_start(tmp_path):
    # a save killed mid-write (a subprocess whose os.write stalls after one chunk)
    ck = tmp_path / "run/checkpoints"
    ck.mkdir(parents=True)
    atomic_save({"w": torch.ones(4)}, ck / "last.pt")
    before = (ck / "last.pt").read_bytes()
    code = ("import os, sys, time, torch\n"
            "from zsbir.engine.checkpoint import atomic_save\n"
            "real = os.write\n"
            "def stall(fd, data):\n"
            "    real(fd, bytes(data[:100])); print('writing', flush=True); time.sleep(60)\n"
            "os.write = stall\n"
            f"atomic_save({{'w': torch.zeros(100000)}}, {str(ck / 'last.pt')!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()
        proc.wait()
    stale = list(ck.glob(".last.pt.*.tmp"))
    assert len(stale) == 1 and (ck / "last.pt").read_bytes() == before  # old file intact
    # the next start (a resume) removes it, under the lock
    from zsbir.engine.run import _prepare_dir

    m = tiny(tmp_path, "run")
    lock = _prepare_dir(tmp_path / "run", m, resume=True)
    lock.release()
    assert not list(ck.glob("*.tmp")) and (ck / "last.pt").read_bytes() == before
    assert clean_stale_temporaries(ck) == []


def test_overwrite_removes_the_old_runs_outputs(tmp_path):
    from zsbir.engine.run import _prepare_dir

    d = tmp_path / "ow"
    (d / "checkpoints").mkdir(parents=True)
    for name in ("checkpoints/best.pt", "checkpoints/last.pt", "metrics.json"):
        (d / name).write_text("old run")
    with pytest.raises(RunDirError, match="already holds a run"):
        _prepare_dir(d, tiny(tmp_path, "ow"), resume=False)
    lock = _prepare_dir(d, tiny(tmp_path, "ow", ["run.overwrite=true"]), resume=False)
    lock.release()
    assert not (d / "checkpoints/best.pt").exists() and not (d / "metrics.json").exists()
    assert (d / RESOLVED).is_file()


# plugins: sys.exit at import, malformed entry point values, unknown groups
def test_plugin_calling_sys_exit_is_a_reported_failure(fake_plugins, tmp_path):
    fake_plugins("fakeplug-exit", {"zsbir.losses": {"exiting": "fakeplug_exit:Loss"}},
                 {"fakeplug_exit": "import sys\nsys.exit(3)\n"})
    res = cli("plugins")
    assert res.exit_code == 1
    no_traceback(res)
    assert says(res, "fakeplug-exit", "exiting", "sys.exit(3)")
    raw = load(EXAMPLES / "quickstart.toml")
    raw["losses"] = [{"name": "exiting"}]
    from zsbir.manifest import dump_toml

    manifest = tmp_path / "m.toml"
    manifest.write_text(dump_toml(raw))
    res = cli("validate", manifest)
    assert res.exit_code == 2 and says(res, "losses[0]", "sys.exit(3)")


def test_malformed_entry_point_and_unknown_group_are_reported(fake_plugins):
    fake_plugins("fakeplug-bad", {"zsbir.losses": {"badvalue": "fakeplug_bad:"},
                                  "zsbir.lossez": {"typo": "fakeplug_bad:Loss"}},
                 {"fakeplug_bad": "class Loss:\n    pass\n"})
    res = cli("plugins")
    assert res.exit_code == 1
    no_traceback(res)
    assert "NoneType" not in res.output
    assert says(res, "badvalue", "malformed entry point value")
    assert says(res, "zsbir.lossez", "typo", "unknown group", "did you mean zsbir.losses")


def test_checkpoints_stay_plain_data_after_a_run_sized_save(tmp_path):
    """atomic_save's in-memory serialization writes a file torch.load(weights_only) reads."""
    state = {"model": {f"l{i}.w": torch.randn(64, 64) for i in range(8)}, "step": 7,
             "names": ["a", "b"], "rng": torch.zeros(10, dtype=torch.uint8)}
    path = atomic_save(state, tmp_path / "x.pt")
    back = torch.load(path, weights_only=True)
    assert back["step"] == 7 and all(torch.equal(back["model"][k], v)
                                     for k, v in state["model"].items())


def test_bugs_keep_their_traceback(tmp_path, monkeypatch):
    """Only user errors are shortened: anything else escapes the CLI with its traceback."""
    import zsbir.engine.run as run_mod

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(run_mod, "run_experiment", bug)
    with pytest.raises(ZeroDivisionError):
        cli("run", EXAMPLES / "quickstart.toml")

    def odd_os_error(*args, **kwargs):
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    monkeypatch.setattr(run_mod, "run_experiment", odd_os_error)
    with pytest.raises(OSError):
        cli("run", EXAMPLES / "quickstart.toml")
