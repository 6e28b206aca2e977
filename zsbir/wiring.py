"""Can the parts of a resolved manifest feed each other? Checks that span components,
called by the manifest's cross-checks (:func:`zsbir.manifest.resolve`).

Each loss declares what it needs (:mod:`zsbir.losses.base`): a teacher signal
(``requires = {"teacher"}`` and the signal's ``teacher_keys``), model outputs
(``output_keys``), tuple roles (``roles``, e.g. ``{"anchor", "positive", "negative"}``).
Those are checked against what the other components declare they give:

- the head's ``provides`` (model outputs; ``features`` always);
- the teacher's ``provides`` and the step's ``provides`` (signal keys: a step that computes
  its own signal, e.g. a momentum teacher inside the step, serves a loss that reads it
  without a ``[teacher]`` table);
- the sampler's ``roles`` (the positions of each tuple of its batches).

Also here: the ``[[optimizer.groups]]`` entries (:func:`zsbir.engine.param_groups.check_groups`)
and the batch size against the sampler's tuple size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["check_wiring"]

#: the older spelling of a loss's need of quadruplet batches, as roles
QUADRUPLET_ROLES = frozenset({"anchor", "positive", "negative", "negative_sketch"})


def check_wiring(core: dict[str, Any], nodes: Sequence[Any],
                 problem: Callable[[str, str], None]) -> None:
    """Report through ``problem(path, message)`` every loss whose needs the head, teacher,
    step and sampler cannot meet, every malformed ``[[optimizer.groups]]`` entry, and a
    batch size that is not a whole number of the sampler's tuples."""
    from zsbir.data.samplers import sampler_roles
    from zsbir.engine.param_groups import check_groups
    from zsbir.registry import declared

    by_path = {n.path: n for n in nodes}
    head = by_path.get("model.head")
    outputs = {"features"} | (set(declared(head.component.obj, "provides", head.params))
                              if head else {"embedding", "logits"})
    teacher = by_path.get("teacher")
    t_provides = (declared(teacher.component.obj, "provides", teacher.params)
                  if teacher else None)
    step = by_path.get("train.step")
    s_provides = declared(step.component.obj, "provides", step.params) if step else frozenset()
    sampler = by_path.get("sampler")
    roles = sampler_roles(sampler.component.obj) if sampler else ()
    sampler_name = sampler.params["name"] if sampler else "random"
    for node in nodes:
        if node.kind == "optimizers" and "groups" in node.params:
            for path, msg in check_groups(node.params["groups"], f"{node.path}.groups"):
                problem(path, msg)
        if node.kind != "losses":
            continue
        name, params = node.params["name"], node.params
        needs = declared(node.component.obj, "requires", params)
        keys = declared(node.component.obj, "teacher_keys", params)
        out_keys = set(declared(node.component.obj, "output_keys", params))
        need_roles = set(declared(node.component.obj, "roles", params))
        if "quadruplet" in needs:  # older spelling of roles = the quadruplet's four
            need_roles |= QUADRUPLET_ROLES
        if "imagenet_head" in needs:  # older spelling of output_keys = {"imagenet_logits"}
            out_keys.add("imagenet_logits")
        signal = (t_provides or frozenset()) | s_provides
        if "teacher" in needs and teacher is None and not (s_provides and keys <= s_provides):
            problem(node.path, f"loss {name!r} needs a teacher signal: add a [teacher] "
                    "table (e.g. name = \"online\")"
                    + (f" (step {step.params['name']!r} provides "
                       f"{', '.join(sorted(s_provides))})" if s_provides else ""))
        elif "teacher" in needs and t_provides is not None and not keys <= signal:
            problem(node.path, f"loss {name!r} reads the teacher signal's "
                    f"{', '.join(sorted(keys - signal))}, which teacher "
                    f"{teacher.params['name']!r} does not provide "
                    f"(it provides {', '.join(sorted(t_provides))}"
                    + (f"; the step provides {', '.join(sorted(s_provides))}"
                       if s_provides else "") + ")")
        missing = out_keys - outputs
        if head is not None and missing:
            problem(node.path, f"loss {name!r} reads the model output(s) "
                    f"{', '.join(sorted(missing))}, which head {head.params['name']!r} "
                    f"does not produce with these parameters (it produces "
                    f"{', '.join(sorted(outputs))}); see `zsbir describe heads "
                    f"{head.params['name']}`")
        lacking = need_roles - set(roles)
        if lacking:
            what, fix = (("quadruplet", '"quadruplet"') if "negative_sketch" in lacking
                         else ("triplet", '"triplet" or "quadruplet"'))
            problem(node.path, f"loss {name!r} needs {what} batches (tuples with the roles "
                    f"{', '.join(sorted(need_roles))}; sampler {sampler_name!r} gives "
                    + (", ".join(roles) if roles else "independent items")
                    + f"): set [sampler] name = {fix}")
    unit = len(roles) or 1
    batch = core["train"].batch_size
    if unit > 1 and isinstance(batch, int) and batch % unit:
        problem("train.batch_size", f"the {sampler_name} sampler needs a multiple of {unit} "
                f"images ({', '.join(roles)}), got {batch}")
