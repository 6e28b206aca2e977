"""The plugin as users meet it: entry points, `zsbir list`/`describe`, the example
manifests, and real `zsbir run`s of a tiny random ViT + LoRA (+ EMA teacher) killed with
SIGKILL mid-run and resumed bit-exactly.

Two groups of tests wait for work of issue 24 that lands beside this plugin (they are
skipped, with the reason, until it is there):

- ``needs_model_section``: the ``[model]`` section with ``[model.backbone]``, nested
  components read from ``Nested`` markers (the resolver's work; detected by the new module
  ``zsbir.models.inputs``);
- ``needs_lifecycle``: teachers that receive the student (``model``), lifecycle hooks,
  teacher state in checkpoints, ``inference_model()``, ``[[optimizer.groups]]`` (the core's
  work; detected by ``zsbir.engine.lifecycle``).

Everything else runs on today's zsbir with the old ``[backbone]`` shorthand.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from zsbir.cli import main
from zsbir.constraints import paths_unchecked
from zsbir.manifest import dump_toml, load, resolve
from zsbir.testing import assert_core_never_names, assert_registered_by

PLUGIN = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((PLUGIN / "examples").glob("*.toml"))
TINY = PLUGIN / "examples" / "tiny_vit_lora_ema.toml"
DIST = "zsbir-peft"
COMPONENTS = {
    ("backbones", "peft_lora"): "zsbir_peft.backbones:peft_lora",
    ("backbones", "peft_adapter"): "zsbir_peft.backbones:peft_adapter",
    ("teachers", "peft_ema"): "zsbir_peft.teacher:EmaTeacher",
    ("losses", "peft_ema_distill"): "zsbir_peft.losses:EmaDistillLoss",
}

needs_model_section = pytest.mark.skipif(
    importlib.util.find_spec("zsbir.models.inputs") is None,
    reason="needs the [model] section and Nested-marker resolution (issue 24, resolver)")
needs_lifecycle = pytest.mark.skipif(
    importlib.util.find_spec("zsbir.engine.lifecycle") is None,
    reason="needs teachers given the student, lifecycle hooks and teacher state in "
           "checkpoints (issue 24, core)")


def test_registered_only_through_entry_points():
    for comp in assert_registered_by(DIST, COMPONENTS).values():
        assert comp.summary


def test_describe_shows_the_typed_parameters():
    result = CliRunner().invoke(main, ["describe", "backbones", "peft_lora"])
    assert result.exit_code == 0, result.output
    for word in ("rank", "alpha", "dropout", "targets", "trainable", "Hu et al", DIST):
        assert word in result.output
    result = CliRunner().invoke(main, ["describe", "teachers", "peft_ema"])
    assert result.exit_code == 0, result.output
    for word in ("momentum", "evaluate_ema", "Caron et al", "embedding"):
        assert word in result.output


def test_no_file_of_zsbir_names_the_plugin():
    assert_core_never_names(DIST)


def shorthand(raw: dict[str, Any], teacher: bool = False) -> dict[str, Any]:
    """An example in today's form: ``[backbone]`` instead of ``[model.backbone]``; without
    ``teacher``, no EMA teacher, distillation loss or optimizer groups (see the module
    docstring)."""
    raw = copy.deepcopy(raw)
    model = raw.get("model", {})
    raw["backbone"] = model.pop("backbone")
    model.pop("name", None)
    if not teacher:
        raw.pop("teacher", None)
        raw["losses"] = [t for t in raw["losses"] if t["name"] != "peft_ema_distill"]
        raw.get("optimizer", {}).pop("groups", None)
    return raw


def _local(raw: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    raw["run"]["output_dir"] = str(tmp_path)
    return raw


def test_the_tiny_example_builds_and_trains_only_lora_and_the_head(tmp_path):
    from zsbir_peft.backbones import PeftBackbone

    from zsbir.build import build

    m = resolve(_local(shorthand(load(TINY)), tmp_path), str(TINY))
    assert m.backbone["name"] == "peft_lora" and m.backbone["backbone"]["model"] == "test_vit"
    exp = build(m, "train")
    assert isinstance(exp.model.backbone, PeftBackbone)
    trainable = [n for n, p in exp.model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if n.startswith("backbone.")]
    assert lora and all(n.endswith((".lora_A", ".lora_B")) for n in lora)
    assert len(lora) == 2 * 2 * 6  # (qkv, fc1) x (A, B) x 6 blocks
    assert all(n.startswith(("backbone.", "head.")) for n in trainable)
    frozen = sum(p.numel() for p in exp.model.backbone.parameters() if not p.requires_grad)
    assert frozen > 10 * sum(p.numel() for n, p in exp.model.named_parameters()
                             if n in lora)


@needs_model_section
@needs_lifecycle
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_manifests_validate(path):
    raw = load(path)
    if raw["protocol"]["name"] != "synthetic":
        raw["protocol"]["root"] = str(path.parent)  # the datasets are not on this machine
    with paths_unchecked():  # the DINOv2 example's weights file is the user's
        m = resolve(raw, str(path))
    assert m.model["backbone"]["name"] == "peft_lora"
    assert m.teacher["name"] == "peft_ema"
    assert "peft_ema_distill" in [t["name"] for t in m.losses]


def test_validation_requires_the_teacher_for_the_distillation_loss():
    raw = shorthand(load(TINY), teacher=True)
    del raw["teacher"]
    del raw["optimizer"]["groups"]
    with pytest.raises(ValueError, match="needs a teacher signal"):
        resolve(raw)


@needs_model_section
def test_resume_accepts_the_wrapped_backbones_weights_path_and_refuses_its_rank(tmp_path):
    """``[model.backbone.backbone].weights`` is resume-safe through the wrapped backbone's
    own marker (nothing names the path); the LoRA rank is not."""
    from zsbir.engine.run import check_resumable, resume_safe_keys
    from zsbir.manifest import ManifestError

    def manifest(**inner: Any) -> Any:
        raw = load(TINY)
        raw["model"]["backbone"]["backbone"].update(inner.pop("wrapped", {}))
        raw["model"]["backbone"].update(inner)
        with paths_unchecked():  # the weights file need not exist here
            return resolve(raw, str(TINY))

    ckpt = {"model": {}, "optimizer": {}, "train_state": {}, "manifest": manifest().data}
    moved = manifest(wrapped={"weights": "/elsewhere/vit.pt"})
    assert "model.backbone.backbone.weights" in resume_safe_keys(moved)
    check_resumable(ckpt, moved, tmp_path)  # no error
    with pytest.raises(ManifestError) as err:
        check_resumable(ckpt, manifest(rank=8), tmp_path)
    assert [p.path for p in err.value.problems if p.path] == ["model.backbone.rank"]


# -- real runs: killed with SIGKILL after the first checkpoint, then resumed -------------

def _env(cache: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ZSBIR_CACHE": str(cache),
           "HF_HUB_OFFLINE": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _zsbir(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "zsbir", "run", *args, "-q"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(p: subprocess.Popen, what: str) -> None:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, f"{what} failed ({p.returncode}):\n{out[-4000:]}"


def _kill_after_first_checkpoint(p: subprocess.Popen, run_dir: Path) -> None:
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not last.exists():
        if p.poll() is not None:
            pytest.fail(f"the run ended before its first checkpoint:\n{p.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL


def _find_ema_state(obj: Any) -> dict[str, Any] | None:
    """The ``peft_ema`` teacher's state wherever the checkpoint keeps it."""
    if isinstance(obj, dict):
        if {"format", "params", "buffers", "updates", "momentum"} <= set(obj):
            return obj
        for v in obj.values():
            found = _find_ema_state(v)
            if found is not None:
                return found
    return None


def _killed_and_resumed_equals_uninterrupted(raw: dict[str, Any], tmp_path: Path,
                                             ema: bool) -> None:
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(dump_toml(raw))
    env = _env(tmp_path / "cache")

    def start(name: str) -> subprocess.Popen:
        return _zsbir([str(manifest), "--set", f"run.output_dir={json.dumps(str(tmp_path))}",
                       "--set", f"run.name={name}"], env)

    full = start("full")
    _finish(full, "the uninterrupted run")
    part = tmp_path / "part"
    _kill_after_first_checkpoint(start("part"), part)
    ckpt = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < ckpt["train_state"]["global_step"] < 8
    assert not (part / "metrics.json").exists()
    if ema:
        state = _find_ema_state(ckpt)
        assert state is not None, "the EMA teacher's state is not in last.pt"
        assert state["updates"] == ckpt["train_state"]["global_step"]
        assert state["total_steps"] == 8
    _finish(_zsbir(["--resume", str(part)], env), "the resumed run")

    a = torch.load(tmp_path / "full" / "checkpoints" / "final.pt", weights_only=True)["model"]
    b = torch.load(part / "checkpoints" / "final.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and any(k.endswith(".lora_B") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(k.endswith(".lora_B") and a[k].abs().sum() > 0 for k in a)  # it trained
    ma = json.loads((tmp_path / "full" / "metrics.json").read_text())["results"]
    mb = json.loads((part / "metrics.json").read_text())["results"]
    assert ma == mb
    if ema:
        sa = _find_ema_state(torch.load(tmp_path / "full" / "checkpoints" / "last.pt",
                                        weights_only=True))
        last = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
        sb = _find_ema_state(last)
        assert sa is not None and sb is not None and sa["updates"] == sb["updates"] == 8
        for group in ("params", "buffers"):
            assert sa[group].keys() == sb[group].keys()
            for k in sa[group]:
                assert torch.equal(sa[group][k], sb[group][k]), (group, k)
        # evaluate_ema (and no validation, so no best epoch): the evaluated and exported
        # weights are the EMA copy at the end, not the student
        assert all(torch.equal(b[k], v) for k, v in sb["params"].items())
        student = last["model"]
        assert any(not torch.equal(student[k], v) for k, v in sb["params"].items()
                   if k in student)


@pytest.mark.slow
def test_lora_run_killed_mid_run_resumes_bit_exactly(tmp_path):
    """Today's zsbir: a tiny random ViT with LoRA, no teacher."""
    _killed_and_resumed_equals_uninterrupted(shorthand(load(TINY)), tmp_path, ema=False)


@pytest.mark.slow
@needs_lifecycle
def test_lora_ema_run_killed_mid_run_resumes_bit_exactly(tmp_path):
    """The tiny example (in the ``[backbone]`` shorthand, which zsbir moves to
    ``[model.backbone]``): LoRA, the EMA teacher (its state in every checkpoint; the EMA
    copy evaluated and exported), the distillation loss, a LoRA parameter group."""
    raw = shorthand(load(TINY), teacher=True)
    raw["train"]["val_every"] = 0  # final.pt: the weights at the end (no best epoch)
    _killed_and_resumed_equals_uninterrupted(raw, tmp_path, ema=True)


@pytest.mark.skipif(importlib.util.find_spec("zsbir.testing") is None,
                    reason="needs zsbir's contract suite, zsbir.testing (issue 24, discovery)")
@pytest.mark.parametrize(("kind", "name"), [(k, n) for k, n in COMPONENTS],
                         ids=[f"{k}/{n}" for k, n in COMPONENTS])
def test_contract(kind, name):
    """zsbir's contract for each kind (as every plugin author runs it)."""
    from zsbir.testing import assert_contract

    assert_contract(kind, name)
