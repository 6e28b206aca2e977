"""The ``clip_triplet`` training step: the paper's triplets from quadruplet batches."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ClipTripletStep", "triplet_rows"]


def triplet_rows(n: int, device: torch.device | None = None) -> torch.Tensor:
    """Row indices of the triplets in a batch of ``n`` quadruplet rows: positions 0, 1, 2
    of every 4 (anchor sketch, positive photo, negative photo)."""
    if n % 4:
        raise ValueError(f"clip_triplet step: expected quadruplet batches (a multiple of 4 "
                         f"images, [sketch, photo+, photo-, sketch-] * N), got {n} images; "
                         "use [sampler] name = \"quadruplet\"")
    rows = torch.arange(n, device=device)
    return rows[rows % 4 != 3]


class ClipTripletStep:
    """One optimization step on the triplets of a quadruplet batch (Sain et al., CVPR 2023).

    The paper trains on triplets (sketch anchor, photo positive, photo negative): its
    training step encodes exactly those three images (Sketch_LVM's ``training_step``).
    zsbir's ``quadruplet`` sampler gives ``[anchor sketch, positive photo, negative
    photo, negative sketch] * N`` (and the trainer drops any quadruplet that lost an image
    to an unreadable file); this step keeps rows 0, 1, 2 of each quadruplet, then runs the
    core ``default`` step (one forward, the teacher signal, the manifest-weighted losses,
    backward, gradient clipping, optimizer step) on the ``[sketch, photo+, photo-] * N``
    batch. So the losses see the paper's batch, and the unused negative sketch costs no
    forward or backward pass (a quarter of the compute of the default step on the same
    batches). The images of the dropped rows are still decoded by the loader.
    """

    def __init__(self) -> None:
        from zsbir.registry import steps

        self.inner = steps.get("default")()

    def __call__(self, s: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        n = len(batch["label"])
        keep: dict[torch.device, torch.Tensor] = {}
        out: dict[str, Any] = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n:
                idx = keep.get(v.device)
                if idx is None:
                    idx = keep[v.device] = triplet_rows(n, v.device)
                out[k] = v[idx]
            else:
                out[k] = v
        return self.inner(s, out)

    def state_dict(self) -> dict[str, Any]:
        sd = getattr(self.inner, "state_dict", None)
        return sd() if callable(sd) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load = getattr(self.inner, "load_state_dict", None)
        if callable(load):
            load(state)

    @staticmethod
    def check_manifest(params: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
        sampler = (manifest.get("sampler") or {}).get("name")
        if sampler != "quadruplet":
            return [f"the clip_triplet step takes its triplets from quadruplet batches: set "
                    f"[sampler] name = \"quadruplet\" (got {sampler!r})"]
        return []
