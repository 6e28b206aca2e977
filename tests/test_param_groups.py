"""Parameter groups (``[[optimizer.groups]]``, ``no_weight_decay()``, ``param_groups()``)
against a naive per-parameter reference, and the trainer's single parameter source."""

from __future__ import annotations

from fnmatch import fnmatchcase

import pytest
import torch
from torch import nn

from zsbir.engine.param_groups import check_groups, named_trainable, param_groups


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.lora_a = nn.Parameter(torch.zeros(2, 4))

    def no_weight_decay(self) -> set[str]:
        return {"norm.*"}


class Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.pos_embed = nn.Parameter(torch.zeros(1, 4))
        self.frozen = nn.Linear(4, 4).requires_grad_(False)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def param_groups(self) -> list[dict]:
        return [{"match": "blocks.*.proj.*", "lr": 0.5}]


class Step:
    """A non-module step holding a trainable parameter and (again) the student."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.temperature = nn.Parameter(torch.ones(()))

    def named_parameters(self):
        yield "temperature", self.temperature
        yield from (("model." + n, p) for n, p in self.model.named_parameters())


def naive(owners, groups):
    """Per parameter: (lr, weight_decay) by the documented rules, one at a time."""
    hooks, no_wd = [], []
    for prefix, owner in owners.items():
        if not isinstance(owner, nn.Module):
            continue
        for mname, mod in owner.named_modules():
            base = f"{prefix}.{mname}." if mname else f"{prefix}."
            if hasattr(mod, "param_groups"):
                hooks += [{**g, "match": base + g["match"]} for g in mod.param_groups()]
            if hasattr(mod, "no_weight_decay"):
                no_wd += [base + n for n in mod.no_weight_decay()]
    out = {}
    for name, _p in named_trainable(owners):
        rule = next((g for g in [*groups, *hooks] if fnmatchcase(name, g["match"])), {})
        wd = rule.get("weight_decay", 0.0 if any(fnmatchcase(name, q) for q in no_wd)
                      else "default")
        out[name] = (rule.get("lr", "default"), wd)
    return out


def test_groups_match_the_naive_reference():
    torch.manual_seed(0)
    model = Student()
    loss = nn.Linear(2, 2)
    owners = {"model": model, "losses.ce": loss, "step": Step(model), "teacher": None}
    manifest = [{"match": "model.*.lora_*", "lr": 0.01, "weight_decay": 0.0},
                {"match": "losses.*", "lr": 0.1}]
    groups = param_groups(owners, manifest)
    got = {}
    for g in groups:
        assert len(g["params"]) == len(g["names"]) > 0
        for name in g["names"]:
            got[name] = (g.get("lr", "default"), g.get("weight_decay", "default"))
    assert got == naive(owners, manifest)
    # every trainable parameter once (the step's copy of the student is not counted twice),
    # the frozen one never
    names = [n for g in groups for n in g["names"]]
    assert len(names) == len(set(names)) == sum(
        p.requires_grad for p in [*model.parameters(), *loss.parameters()]) + 1
    assert "step.temperature" in names and not any("frozen" in n for n in names)
    assert got["model.blocks.0.lora_a"] == (0.01, 0.0)  # manifest first
    assert got["model.blocks.1.proj.weight"] == (0.5, "default")  # the module's hook
    assert got["model.blocks.0.norm.bias"] == ("default", 0.0)  # no_weight_decay of a block
    assert got["model.pos_embed"] == ("default", 0.0)
    # torch takes the groups as they are; keys left out are the optimizer's
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.05)
    lr = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert lr[id(model.pos_embed)] == (1e-3, 0.0) and lr[id(loss.weight)] == (0.1, 0.05)


def test_check_groups_names_the_key():
    probs = dict(check_groups([{"match": "model.*", "lr": 0},
                               {"lr": 1e-3, "weight_decay": -1, "momentum": 0.9}],
                              "optimizer.groups"))
    assert set(probs) == {"optimizer.groups[0].lr", "optimizer.groups[1].match",
                          "optimizer.groups[1].weight_decay", "optimizer.groups[1].momentum"}
    assert check_groups([{"match": "x", "lr": 1, "weight_decay": 0}], "g") == []
    with pytest.raises(ValueError, match="nothing to train"):
        param_groups({"model": nn.Linear(2, 2).requires_grad_(False)})


def test_manifest_groups_reach_the_optimizer(tmp_path):
    """Through build(): groups from the manifest, the trainer's parameters = the
    optimizer's."""
    from zsbir.build import build
    from zsbir.manifest import apply_overrides, load, resolve

    raw = load("examples/quickstart.toml")
    raw["optimizer"] = {"name": "adam", "lr": 1e-3,
                        "groups": [{"match": "model.head.*", "lr": 1e-2}]}
    raw = apply_overrides(raw, ["run.device=cpu", f"run.output_dir={str(tmp_path)!r}"])
    exp = build(resolve(raw), "train", tmp_path)
    head = [g for g in exp.optimizer.param_groups if g["lr"] == 1e-2]
    assert head and all(n.startswith("model.head.") for n in head[0]["names"])
    n_train = sum(p.requires_grad for p in exp.model.parameters())
    n_train += sum(p.requires_grad for _, _, loss in exp.losses for p in loss.parameters())
    assert sum(len(g["params"]) for g in exp.optimizer.param_groups) == n_train
