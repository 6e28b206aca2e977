"""Parameter groups: every trainable parameter of a run, named by its owner, grouped for the
optimizer by the manifest's ``[[optimizer.groups]]`` and the modules' own hooks.

Names are dotted and prefixed by owner: ``model.`` (the student), ``losses.<label>.``,
``step.``, ``teacher.`` (steps and teachers that hold trainable parameters, e.g. a
projection or a memory bank), so ``match = "model.*.lora_*"`` picks the LoRA matrices of
the student wherever they sit (patterns are :mod:`fnmatch`'s: a loss label with an index,
``losses.sake[1].``, is matched by ``losses.sake[[]1].*`` or ``losses.sake?1?.*``). A
parameter reachable from two owners (a step holding the
student) is counted once, under its first owner in that order.

Which group a parameter joins (first rule that applies wins):

1. the first ``[[optimizer.groups]]`` entry whose ``match`` (an :mod:`fnmatch` pattern on
   the full name) matches: its ``lr`` / ``weight_decay`` where given;
2. the first entry of a module's ``param_groups()`` hook (``[{"match": ..., "lr": ...}]``,
   patterns relative to that module), searched from the outermost module inwards;
3. the default group: the optimizer's own lr / weight_decay.

Independently, a parameter named by a module's timm-style ``no_weight_decay()`` (names
relative to that module, exact or fnmatch patterns; timm, Wightman 2019,
``timm.optim.create_optimizer_v2``) gets weight_decay 0 unless its group sets
``weight_decay`` explicitly. Each resulting group is a dict ``{"params": [...], "names":
[...], "name": str, ["lr": ..., "weight_decay": ...]}`` as a ``torch.optim.Optimizer``
takes it (keys left out take the optimizer's defaults).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

__all__ = ["GROUP_KEYS", "check_groups", "named_trainable", "param_groups",
           "trainable_owners", "trainable_params"]

#: keys of an ``[[optimizer.groups]]`` entry (``match`` required)
GROUP_KEYS = ("match", "lr", "weight_decay")


def _named_parameters(obj: Any) -> Iterable[tuple[str, nn.Parameter]]:
    """``obj.named_parameters()`` for a module or any object that has it, else nothing."""
    fn = getattr(obj, "named_parameters", None)
    return fn() if callable(fn) else ()


def _named_modules(obj: Any) -> Iterable[tuple[str, Any]]:
    fn = getattr(obj, "named_modules", None)
    return fn() if callable(fn) else [("", obj)]


def named_trainable(owners: Mapping[str, Any]) -> list[tuple[str, nn.Parameter]]:
    """``(prefixed name, parameter)`` of every parameter with ``requires_grad`` among
    ``owners`` (``{"model": model, "losses.sake": loss, "step": step, ...}``), in owner
    order, each parameter once (its first owner's name)."""
    seen: set[int] = set()
    out: list[tuple[str, nn.Parameter]] = []
    for prefix, owner in owners.items():
        if owner is None:
            continue
        for name, p in _named_parameters(owner):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append((f"{prefix}.{name}", p))
    return out


def trainable_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """The parameters an optimizer updates, in group order: the one list the trainer
    clips and synchronizes."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def check_groups(groups: Any, path: str) -> list[tuple[str, str]]:
    """Problems ``(key path, message)`` of an ``[[optimizer.groups]]`` array: each entry a
    table with a string ``match``, optional ``lr`` > 0 and ``weight_decay`` >= 0, no other
    key."""
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        return [(path, "expected an array of tables ([[optimizer.groups]]) with match, lr, "
                       "weight_decay")]
    problems: list[tuple[str, str]] = []
    for i, g in enumerate(groups):
        at = f"{path}[{i}]"
        for key in g:
            if key not in GROUP_KEYS:
                problems.append((f"{at}.{key}", "unknown key of a parameter group (it takes "
                                                "match, lr, weight_decay)"))
        if not isinstance(g.get("match"), str) or not g.get("match"):
            problems.append((f"{at}.match", "required: an fnmatch pattern on the dotted "
                                            "parameter name, e.g. \"model.*.lora_*\""))
        for key, ok, what in (("lr", lambda v: v > 0, "> 0"),
                              ("weight_decay", lambda v: v >= 0, ">= 0")):
            if key not in g:
                continue
            v = g[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
                problems.append((f"{at}.{key}", f"expected a number {what}, got {v!r}"))
    return problems


def _hook_rules(owners: Mapping[str, Any]
                ) -> tuple[list[dict[str, Any]], list[str]]:
    """(``param_groups()`` rules, ``no_weight_decay()`` patterns), both with full names,
    outermost modules first."""
    rules: list[dict[str, Any]] = []
    no_wd: list[str] = []
    for prefix, owner in owners.items():
        if owner is None:
            continue
        for mod_name, mod in _named_modules(owner):
            base = f"{prefix}.{mod_name}." if mod_name else f"{prefix}."
            hook = getattr(mod, "param_groups", None)
            if callable(hook):
                for i, g in enumerate(hook() or ()):
                    bad = check_groups([g], "")
                    if bad:
                        raise ValueError(f"{base}param_groups()[{i}]{bad[0][0]}: {bad[0][1]}")
                    rules.append({**g, "match": base + g["match"], "from": f"{base}param_groups"})
            hook = getattr(mod, "no_weight_decay", None)
            if callable(hook):
                no_wd += [base + n for n in hook() or ()]
    return rules, no_wd


def param_groups(owners: Mapping[str, Any], groups: Sequence[Mapping[str, Any]] = ()
                 ) -> list[dict[str, Any]]:
    """The optimizer's parameter groups for every trainable parameter of ``owners``
    (see the module docstring for the rules). Groups without parameters are left out;
    raises ``ValueError`` when nothing trains."""
    named = named_trainable(owners)
    if not named:
        raise ValueError("nothing to train: no parameter of the model, losses, step or "
                         "teacher requires a gradient")
    rules, no_wd = _hook_rules(owners)
    manifest_rules = [{**g, "from": f"optimizer.groups[{i}]"} for i, g in enumerate(groups)]
    ordered = [*manifest_rules, *rules]
    buckets: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in named:
        idx = next((i for i, r in enumerate(ordered) if fnmatchcase(name, r["match"])), -1)
        rule = ordered[idx] if idx >= 0 else {}
        zero_wd = ("weight_decay" not in rule
                   and any(fnmatchcase(name, pat) for pat in no_wd))
        key = (idx if idx >= 0 else len(ordered), zero_wd)
        group = buckets.get(key)
        if group is None:
            label = rule.get("from", "default") + (" no_weight_decay" if zero_wd else "")
            group = {"params": [], "names": [], "name": label}
            for k in ("lr", "weight_decay"):
                if k in rule:
                    group[k] = float(rule[k])
            if zero_wd:
                group["weight_decay"] = 0.0
            buckets[key] = group
        group["params"].append(p)
        group["names"].append(name)
    return [buckets[k] for k in sorted(buckets)]


def trainable_owners(model: Any, losses: Sequence[tuple[str, float, Any]], step: Any = None,
                     teacher: Any = None) -> dict[str, Any]:
    """The owners of a run's trainable parameters, with their name prefixes: ``model``,
    ``losses.<label>`` for each loss, ``step``, ``teacher``."""
    owners: dict[str, Any] = {"model": model}
    owners.update({f"losses.{label}": loss for label, _, loss in losses})
    owners["step"], owners["teacher"] = step, teacher
    return owners
