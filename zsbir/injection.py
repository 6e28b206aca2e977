"""What zsbir supplies to a component besides its manifest table, per built-in kind.

Each set is the contract of one call site: :func:`zsbir.build.build` (samplers get the
training labels, schedulers the optimizer, ...) or, for heads, the model that builds its
head (:mod:`zsbir.models.net`). That call passes its values through :func:`supply`, which
refuses a call that passes other names than the ones declared here, so the declaration
cannot drift from what is built. Validation reads the same sets
(:data:`zsbir.registry.INJECTED`, which adds a plugin kind's ``KindSpec.injected``): an
injected name is never a manifest key. ``ctx`` (the
:class:`~zsbir.context.BuildContext`) is offered to every component that asks for it.

Torch-free and importing nothing of zsbir, so that the manifest resolver and the registry
read it without importing the build.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["SUPPLIED", "supply"]

#: built-in kind -> the names its call site passes (``ctx`` included: offered to all)
SUPPLIED: Mapping[str, frozenset[str]] = {
    "protocols": frozenset({"ctx"}),
    "backbones": frozenset({"ctx"}),
    "losses": frozenset({"ctx"}),
    "teachers": frozenset({"ctx", "model"}),
    "samplers": frozenset({"ctx", "labels", "domains", "batch_size", "seed"}),
    "optimizers": frozenset({"ctx", "params"}),
    "schedulers": frozenset({"ctx", "optimizer", "epochs", "steps_per_epoch"}),
    "hashers": frozenset({"ctx"}),
    "heads": frozenset({"ctx", "in_features", "num_classes", "classifier"}),
    "models": frozenset({"ctx", "num_classes"}),
    "networks": frozenset({"ctx"}),
    "steps": frozenset({"ctx", "model"}),
    "rerankers": frozenset({"ctx"}),
    "pair_scorers": frozenset({"ctx", "model"}),
    "importers": frozenset({"ctx"}),
}


def supply(kind: str, **values: Any) -> dict[str, Any]:
    """``values``, checked to be exactly what :data:`SUPPLIED` declares for built-in
    ``kind`` (``ctx`` aside): the keyword arguments a call site hands to
    ``build_component`` or a ``Factory`` builder. A missing or an extra name is a
    ``TypeError`` naming both sides (a bug in zsbir, not in a manifest)."""
    if kind not in SUPPLIED:
        raise TypeError(f"supply({kind!r}): not a built-in kind (a plugin kind declares its "
                        "injected names in its KindSpec)")
    declared = SUPPLIED[kind] - {"ctx"}
    if set(values) != declared:
        raise TypeError(f"supply({kind!r}) was given {sorted(values)}, but "
                        f"zsbir.injection.SUPPLIED[{kind!r}] declares {sorted(declared)}")
    return values
