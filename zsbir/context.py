"""The build context: what the toolkit hands to components that ask for ``ctx``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class BuildContext:
    """Facts known while a manifest is turned into objects.

    Components receive it by declaring a parameter named ``ctx``; it never appears in
    manifests. Fields are filled in as :func:`zsbir.build.build` goes (the protocol is
    built first, so the class names are known to every later component).
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    cache_dir: Path = field(default_factory=lambda: default_cache_dir())
    run_dir: Path | None = None
    #: seen (training) class names, in label order 0..n_seen-1
    seen_classes: list[str] = field(default_factory=list)
    #: unseen (test) class names, labels n_seen..n_seen+n_unseen-1
    unseen_classes: list[str] = field(default_factory=list)
    image_size: int = 224
    #: what the objects are built for: "train", "evaluate" or "embed" (index / search)
    purpose: str = "train"
    #: whether components load pretrained weights; False when a checkpoint's weights
    #: replace them (``embed``), so nothing is read or initialized twice
    load_pretrained: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seen(self) -> int:
        return len(self.seen_classes)

    @property
    def all_classes(self) -> list[str]:
        return self.seen_classes + self.unseen_classes


def default_cache_dir() -> Path:
    """``$ZSBIR_CACHE`` or ``~/.cache/zsbir``."""
    import os

    root = os.environ.get("ZSBIR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "zsbir"
    )
    return Path(root)
