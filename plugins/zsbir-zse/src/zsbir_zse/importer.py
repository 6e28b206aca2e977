"""Importer ``zse``: the ZSE-SBIR authors' checkpoints (Lin et al., CVPR 2023; their
train.py's ``save_checkpoint({'model': model.state_dict(), 'epoch', 'map_all',
'precision_100'}, ...)``, fp16 in the released files) as a zsbir run directory:
``zsbir import zse best_checkpoint.pth --protocol sk-sh --root /data``, then
``zsbir evaluate``, ``zsbir index build``, ``zsbir search --pair-scorer zse_rn``.

Their parameter names are mapped to the ``zse`` model's by :mod:`zsbir_zse.weights`
(their unused ``ca.encoder.layers`` clones dropped); every tensor is cast to float32. The
run's manifest is the paper's setting of the protocol (the plugin's example manifests):
retrieval-token ranking plus top-200 re-scoring by the relation network; add
``exhaustive = true`` to ``[pair_scorer]`` for every pair (their ``valid_cls``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from zsbir.context import BuildContext
from zsbir.data.classnames import class_split
from zsbir.importers import Imported, ImportFormatError
from zsbir.registry import importers

from .weights import WeightsError, from_authors

__all__ = ["ZseImporter"]

#: split -> (zsbir protocol, class-split dataset, metrics of the paper's table)
_SPLITS: dict[str, tuple[str, str, list[str]]] = {
    "sk-sh": ("sketchy_ext", "sketchy", ["map@all", "p@100-zse", "map@200", "p@200-zse"]),
    "sk-ye": ("sketchy_ext", "sketchy", ["map@200", "p@200-zse", "map@all", "p@100-zse"]),
    "tub-sh": ("tuberlin_ext", "tuberlin", ["map@all", "p@100-zse", "map@200", "p@200-zse"]),
    "qd-de": ("quickdraw_ext", "quickdraw", ["map@all", "p@200-zse", "map@200", "p@100-zse"]),
}


@importers.register("zse")
class ZseImporter:
    """The ZSE-SBIR authors' checkpoints (``checkpoint['model']``, fp16 or fp32) as a run
    of the ``zse`` model with the ``zse_rn`` pair scorer.

    Args:
        protocol: the split the checkpoint was trained for: ``sk-sh`` (Sketchy Ext, their
            test_class_sketchy25), ``sk-ye`` (sketchy21), ``tub-sh`` (TU-Berlin Ext),
            ``qd-de`` (QuickDraw Ext).
        root: the dataset folder written into the manifest (``zsbir evaluate --root``
            can give it later).
    """

    expects: ClassVar[str] = ("the ZSE-SBIR authors' checkpoint, a dict with their "
                              "Model.state_dict() under 'model' (train.py's save_checkpoint)")

    def __init__(self, protocol: Literal["sk-sh", "sk-ye", "tub-sh", "qd-de"] = "sk-sh",
                 root: str | None = None, ctx: BuildContext | None = None):
        if protocol not in _SPLITS:
            raise ValueError(f"protocol must be one of {', '.join(_SPLITS)}, got {protocol!r}")
        self.protocol, self.root = protocol, root

    def __call__(self, path: str | Path) -> Imported:
        path = Path(path)
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: what was expected
            raise ImportFormatError(f"{str(path)!r} is not {self.expects} (cannot read it: "
                                    f"{type(exc).__name__})") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
            raise ImportFormatError(f"{str(path)!r} is not {self.expects}")
        try:
            state = from_authors(raw["model"], f"{str(path)!r}['model']")
        except WeightsError as exc:
            raise ImportFormatError(str(exc)) from None
        if "relation.mlp.0.weight" not in state or "encoder.pos_embed" not in state:
            raise ImportFormatError(f"{str(path)!r} is not {self.expects} (no relation "
                                    "network or position embedding in it)")
        proto, dataset, metrics = _SPLITS[self.protocol]
        cs = class_split(dataset, self.protocol)
        meta = {k: raw[k] for k in ("epoch", "map_all", "precision_100")
                if isinstance(raw.get(k), (int, float))}
        dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in raw["model"].values()
                         if isinstance(v, torch.Tensor) and v.is_floating_point()})
        return Imported(manifest=self.manifest(state, proto, metrics), model=state,
                        classes={"seen": list(cs.seen), "unseen": list(cs.unseen)},
                        source={"format": "ZSE-SBIR save_checkpoint ({'model': ...})",
                                "protocol": self.protocol, "stored_dtype": dtypes,
                                "reported_by_checkpoint": meta})

    def manifest(self, state: dict[str, torch.Tensor], proto: str, metrics: list[str]
                 ) -> dict[str, Any]:
        """The paper's setting; the model's sizes read from the weights."""
        dim = int(state["encoder.pos_embed"].shape[-1])
        depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.blocks."))
        anchors = int(state["relation.mlp.3.weight"].shape[0])
        grid = int(round((state["encoder.pos_embed"].shape[1] - 1) ** 0.5))
        return {
            "run": {"name": f"zse_{self.protocol}_import", "seed": 2021},
            "protocol": {"name": proto, "root": self.root or "", "split": self.protocol,
                         "layout": "zse"},
            "data": {"image_size": 224, "augment_prob": 0.0},
            "model": {"name": "zse", "image_size": 16 * grid, "dim": dim, "depth": depth,
                      "heads": 12, "mlp_dim": int(state["encoder.blocks.0.mlp.0.weight"]
                                                  .shape[0]),
                      "ca_ff": int(state["cross.sketch.0.w1.weight"].shape[0]),
                      "conv_dim": int(state["down.weight"].shape[0]) if "down.weight" in state
                      else 512, "anchors": anchors},
            "train": {"epochs": 30, "batch_size": 60, "select": "best_val",
                      "step": {"name": "zse_pairs"}},
            "losses": [{"name": "zse_triplet", "weight": 2.0},
                       {"name": "zse_relation", "weight": 4.0}],
            "sampler": {"name": "zse", "tuples_per_epoch": 10000},
            "optimizer": {"name": "adamw", "lr": 1e-5, "weight_decay": 1e-2, "fused": False},
            "schedule": {"name": "constant"},
            "pair_scorer": {"name": "zse_rn", "top_k": 200, "exhaustive": False},
            "hashers": [{"name": "none"}],
            "evaluation": {"metrics": metrics},
        }
