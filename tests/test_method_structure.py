"""Issue 14: one recursive resolver, heads / networks / steps as registered kinds,
per-iteration schedules, weights that carry their transforms, one build for every
purpose, dynamic requirements, plugin versions recorded."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated

import pytest
import torch

from zsbir.build import build, build_component
from zsbir.constraints import Range
from zsbir.context import BuildContext
from zsbir.engine.step import DefaultStep, StepContext, loss_labels, weighted_losses
from zsbir.manifest import ManifestError, check_type, components, load, resolve
from zsbir.registry import KINDS, declared, get_registry

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def quick() -> dict:
    raw = load(EXAMPLES / "quickstart.toml")
    raw["data"]["workers"] = 0
    return raw


def problems(raw: dict) -> list[str]:
    with pytest.raises(ManifestError) as info:
        resolve(raw, "t.toml")
    return [str(p) for p in info.value.problems]


def test_new_kinds_are_registries_with_builtins():
    for kind in ("heads", "networks", "steps", "rerankers"):
        assert kind in KINDS
    assert {"stacked", "parallel"} <= set(get_registry("heads").names())
    assert "imagenet_classifier" in get_registry("networks").names()
    assert "default" in get_registry("steps").names()
    assert {"warmup_cosine", "one_cycle"} <= set(get_registry("schedulers").names())


def test_nested_component_tables_resolve_with_full_paths():
    raw = quick()
    raw["backbone"] = {"name": "resnet18", "pretrained": True}
    raw["teacher"] = {"name": "online", "network": {
        "name": "imagenet_classifier", "backbone": {"name": "resnet18x", "depth": 3}}}
    raw["model"]["head"]["embed_dim"] = 0
    raw["train"]["step"] = {"name": "defualt"}
    text = "\n".join(problems(raw))
    assert "teacher.network.backbone.name: unknown backbone 'resnet18x'" in text
    assert "model.head.embed_dim: must be >= 1, got 0" in text
    assert "train.step.name: unknown step 'defualt'; did you mean 'default'?" in text


def test_nested_tables_resolved_and_default_teacher_network():
    raw = quick()
    raw["backbone"] = {"name": "resnet18", "pretrained": True}
    raw["model"]["head"] = {"name": "stacked", "embed_dim": 64, "imagenet_head": "svd"}
    raw["teacher"] = {"name": "online"}
    m = resolve(raw)
    assert m.teacher["network"]["name"] == "imagenet_classifier"
    assert m.teacher["network"]["backbone"]["name"] == "resnet18"
    assert m.train.step == {"name": "default"}
    paths = {n.path for n in components(m)}
    assert {"teacher.network.backbone", "teacher.network", "model.head", "train.step"} <= paths
    again = resolve(m.data)  # the resolved form resolves to itself
    assert again.data == m.data


def test_reserved_keys_checked_even_when_the_name_is_unknown():
    raw = quick()
    raw["losses"] = [{"name": "no_such_loss", "weight": "heavy"}]
    text = "\n".join(problems(raw))
    assert "losses[0].weight: expected float, got str 'heavy'" in text
    assert "losses[0].name: unknown loss 'no_such_loss'" in text


def test_constraints_declared_next_to_parameters():
    raw = quick()
    raw["hashers"][1]["bits"] = -7
    raw["train"]["log_every"] = 0
    raw["data"]["scale"] = [0.85]
    raw["run"]["name"] = "../../x"
    raw["run"]["device"] = "banana"
    raw["train"]["seed"] = 1
    text = "\n".join(problems(raw))
    assert "hashers[1].bits: must be >= 1, got -7" in text
    assert "train.log_every: must be >= 1, got 0" in text
    assert "data.scale: must have exactly 2 item(s), got 1" in text
    assert "run.name: must be a plain name" in text
    assert "run.device: must be" in text


def test_check_type_annotated_reports_type_before_range():
    probs: list = []
    check_type("a", Annotated[int, Range(ge=1)], "x", probs)
    assert [str(p) for p in probs] == ["x: expected int, got str 'a'"]
    probs.clear()
    check_type(2**70, int, "y", probs)
    assert "64-bit" in str(probs[0])


def test_requirements_depend_on_resolved_parameters():
    raw = quick()
    raw["backbone"] = {"name": "resnet18", "pretrained": True}
    raw["model"]["head"] = {"name": "stacked", "embed_dim": 32, "imagenet_head": "svd"}
    raw["losses"].append({"name": "sake", "lambda1": 0.0, "lambda2": 0.3})
    resolve(raw)  # WordNet-only SAKE: no teacher needed
    raw["losses"][-1]["lambda1"] = 1.0
    assert any("needs a teacher signal" in p for p in problems(raw))
    raw["losses"][-1]["lambda1"] = 0.0
    raw["model"]["head"]["imagenet_head"] = "none"
    assert any("reads the model output(s) imagenet_logits" in p for p in problems(raw))


def test_component_cross_key_hook():
    raw = quick()
    raw["model"]["head"] = {"name": "stacked", "embed_dim": 32, "imagenet_head": "svd"}
    text = "\n".join(problems(raw))  # quickstart's resnet18 has pretrained = false
    assert "model.head: imagenet_head = 'svd' initializes from the backbone's pretrained" in text


def test_loss_labels_keep_duplicates_apart():
    assert loss_labels(["ce", "sake", "ce"]) == ["ce[0]", "sake", "ce[2]"]


def test_default_step_equals_a_plain_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    ref = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 1])

    class CE(torch.nn.Module):
        def forward(self, out, batch, teacher):
            return torch.nn.functional.cross_entropy(out["logits"], batch["label"])

    batch = {"image": x, "label": y, "domain": torch.zeros(4, dtype=torch.long)}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = StepContext(model=model, forward=lambda im, d: {"logits": model(im)}, teacher=None,
                    losses=[("ce", 0.5, CE()), ("ce2", 2.0, CE())], optimizer=opt,
                    params=list(model.parameters()), device=torch.device("cpu"),
                    grad_clip=0.1)
    terms = DefaultStep()(s, batch)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    loss = 2.5 * torch.nn.functional.cross_entropy(ref(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    ref_opt.step()
    assert torch.allclose(terms["total"], loss.detach())
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    total, t2 = weighted_losses(s.losses, {"logits": model(x)}, batch, None)
    assert set(t2) == {"ce", "ce2"}


@pytest.mark.parametrize("name,params", [("warmup_cosine", {"warmup_steps": 3}),
                                         ("one_cycle", {"pct_start": 0.25})])
def test_per_iteration_schedules(name, params):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_component("schedulers", {"name": name, **params}, BuildContext(),
                            optimizer=opt, epochs=2, steps_per_epoch=5)
    lrs = []
    for t in range(1, 11):
        sched.step_update(t)
        lrs.append(opt.param_groups[0]["lr"])
    if name == "one_cycle":  # torch's OneCycleLR (cosine) as the reference
        q = torch.nn.Parameter(torch.zeros(1))
        ref_opt = torch.optim.SGD([q], lr=1.0)
        ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=1.0, total_steps=11,
                                                  pct_start=0.25)
        ref_lrs = []
        for _ in range(10):
            ref_opt.step()
            ref.step()
            ref_lrs.append(ref_opt.param_groups[0]["lr"])
        assert max(lrs) == pytest.approx(1.0, rel=0.05) and lrs[-1] < 1e-3
        assert lrs.index(max(lrs)) in (1, 2) and ref_lrs.index(max(ref_lrs)) in (1, 2)
    else:
        assert lrs[0] < lrs[1] < lrs[2] and lrs[2] == pytest.approx(1.0)
        assert lrs[-1] == pytest.approx(0.0, abs=1e-9)
    state = sched.state_dict()
    sched.step_update(1)
    sched.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs[-1])


def test_weights_carry_their_transform():
    from zsbir.models.efficientnet_lite import create_efficientnet_lite

    lite = create_efficientnet_lite(0, pretrained=False)
    assert lite.pretrained_cfg.source == "random init"
    reg = get_registry("backbones").get("efficientnet_lite0")
    assert reg.pretrained_cfg.mean == (0.5, 0.5, 0.5)  # registration metadata
    raw = quick()
    m = resolve(raw)
    exp = build(m, "evaluate")
    assert tuple(exp.eval_transform.mean) == tuple(exp.model.backbone.pretrained_cfg.mean)
    assert exp.optimizer is None and exp.teacher is None and exp.losses == []


def test_one_build_for_every_purpose(tmp_path):
    m = resolve(quick())
    train = build(m, "train")
    assert train.step is not None and train.optimizer is not None
    ckpt = {"model": train.model.state_dict(),
            "classes": {"seen": train.data.seen_classes, "unseen": train.data.unseen_classes},
            "hashers": []}
    emb = build(m, "embed", checkpoint=ckpt)
    assert emb.data is None and emb.ctx.load_pretrained is False
    x = torch.rand(2, 3, 64, 64)
    d = torch.zeros(2, dtype=torch.long)
    train.model.eval()
    emb.model.eval()
    assert torch.allclose(train.model(x, d)["embedding"], emb.model(x, d)["embedding"])
    with pytest.raises(ValueError, match="checkpoint"):
        build(m, "embed")


def test_declared_accepts_sets_and_functions():
    class A:
        requires = frozenset({"teacher"})

    class B:
        requires = staticmethod(lambda p: {"teacher"} if p.get("x") else set())

    assert declared(A, "requires") == {"teacher"}
    assert declared(B, "requires", {"x": 1}) == {"teacher"}
    assert declared(B, "requires", {}) == frozenset()
    assert declared(object(), "requires") == frozenset()


def test_plugin_versions_recorded_in_resolved_manifest():
    pytest.importorskip("zsbir_example")
    raw = quick()
    raw["losses"].append({"name": "cross_domain_triplet"})
    m = resolve(raw)
    assert "zsbir-example" in m.plugins
    assert "plugins" in m.data and m.to_toml().count("[plugins]") == 1
    assert resolve(m.data).plugins == m.plugins


def test_checkpoints_record_plugin_versions(tmp_path):
    pytest.importorskip("zsbir_example")
    from zsbir.engine.checkpoint import load_checkpoint
    from zsbir.engine.run import run_experiment
    from zsbir.manifest import apply_overrides

    raw = apply_overrides(quick(), [
        f"run.output_dir=\"{tmp_path}\"", "protocol.image_size=32", "data.image_size=32",
        "model.head.embed_dim=8", "hashers[1].bits=8", "train.epochs=1",
        "train.max_steps_per_epoch=2", "train.batch_size=8", "evaluation.grid_queries=0",
        "sampler.sketches_per_batch=4"])
    raw["losses"].append({"name": "cross_domain_triplet", "weight": 0.5})
    m = resolve(raw)
    run_experiment(m)
    run_dir = tmp_path / m.run.name
    for name in ("last.pt", "final.pt"):
        ckpt = load_checkpoint(run_dir / "checkpoints" / name)
        assert ckpt["plugins"] == m.plugins and "zsbir-example" in ckpt["plugins"]
    assert "[plugins]" in (run_dir / "manifest.resolved.toml").read_text()


def test_saved_manifest_resolves_for_embedding_without_its_files(tmp_path):
    """build(purpose="embed") reads neither the data nor the pretrained weights, so a
    saved manifest naming files this machine lacks still resolves for it."""
    from zsbir.constraints import paths_unchecked

    raw = quick()
    raw["protocol"] = {"name": "folder", "root": str(tmp_path / "gone"), "num_unseen": 2}
    assert any("protocol.root: no such dir" in p for p in problems(raw))
    with paths_unchecked():
        m = resolve(raw)
    assert m.protocol["root"].endswith("gone")
    assert any("protocol.root: no such dir" in p for p in problems(raw))  # back on after
