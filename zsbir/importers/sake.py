"""The SAKE authors' checkpoints (Liu et al., ICCV 2019; github.com/qliu24/SAKE).

Their released models (``cse_resnet50/checkpoint/.../model_best.pth.tar``, Sketchy Ext and
TU-Berlin Ext, 64-d) are written by their ``save_checkpoint``: a dict
``{'epoch', 'arch', 'state_dict', 'best_acc1'[, 'optimizer']}`` whose ``state_dict`` is
that of ``nn.DataParallel(CSEResnetModel_KDHashing(...))`` (``src/ResnetModel.py``; keys
prefixed ``module.``). Its parts and zsbir's (model ``backbone_head``, backbone
``cse_resnet50``, head ``stacked`` with ``embed_dim`` = their hashing dimension):

========================================================  ======================================
theirs (after ``module.``)                                 zsbir (``BackboneHead``)
========================================================  ======================================
``original_model.layer0.{conv1,bn1}``                      ``backbone.layer0.{conv1,bn1}``
``original_model.layerN.i.{conv*,bn*,downsample.*}``       ``backbone.layerN.i.{...}`` (same)
``original_model.layerN.i.se_module.fc1`` (Linear)         ``...se_module.fc1`` (1x1 conv)
``original_model.layerN.i.se_module.fc2`` (C/16+1 -> C)    ``...se_module.fc2`` + ``fc2_domain``
``original_model.second_last_linear`` (2048 -> 64)         ``head.embed``
``original_model.last_linear`` (64 -> 1000)                ``head.imagenet_head``
``linear`` (64 -> seen classes)                            ``head.classifier`` (rows reordered)
========================================================  ======================================

Their ``get_features`` embeds with ``hashing(features(x, tag))`` (7x7 average pool of the
224-px map, then ``second_last_linear``) and L2-normalizes; zsbir's embedding is the same
before normalization (retrieval is by cosine similarity, as their Euclidean distance of
normalized features ranks).

Domain bit: their test (and training) scripts feed ``tag = 0`` for sketches and ``1`` for
photos, the opposite of the paper and of zsbir (``PHOTO, SKETCH = 0, 1``). The conditional
``fc2`` computes ``W r + b + t w`` (``w``: its last input column, ``t`` their tag); with
zsbir's bit ``d = 1 - t`` that is ``W r + (b + w) - d w``, so the import writes
``fc2.bias = b + w`` and ``fc2_domain = -w``: zsbir's network, fed zsbir's bits, computes
their function exactly (up to the float rounding of ``b + w``).

Classifier rows: their class ids are the line order of ``cname_cid.txt``, which zsbir's
shipped SK-SH / TUB-SH seen lists keep (``zsbir/data/splits/*_train.txt``); zsbir's labels
are the seen classes sorted, so the rows are permuted to that order.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from zsbir.context import BuildContext
from zsbir.data.classnames import class_split, read_class_list
from zsbir.importers import Imported, ImportFormatError
from zsbir.registry import importers

__all__ = ["SakeImporter", "authors_state_dict"]

#: protocol -> dataset, split, the authors' seen-class list in their class-id order, and
#: the values of examples/sake_<dataset>.toml that differ (the authors' training scripts)
_PROTOCOLS: dict[str, dict[str, Any]] = {
    "sketchy_ext": {"dataset": "sketchy", "split": "sk-sh",
                    "seen_file": "sketchy_sk-sh_sake_train.txt",
                    "lambda2": 0.3, "sketches_per_batch": 13},
    "tuberlin_ext": {"dataset": "tuberlin", "split": "tub-sh",
                     "seen_file": "tuberlin_tub-sh_train.txt",
                     "lambda2": 0.3, "sketches_per_batch": 4},
}

_BLOCK = re.compile(r"^original_model\.(layer[1-4]\.\d+)\.se_module\.(fc[12])\.(weight|bias)$")


def _expects(path: Path) -> str:
    return (f"{str(path)!r} is not a SAKE checkpoint: expected the authors' save_checkpoint "
            "dict {'epoch', 'arch', 'state_dict', 'best_acc1'} whose state_dict is "
            "nn.DataParallel(CSEResnetModel_KDHashing)'s ('module.original_model.*', "
            "'module.linear.*')")


@importers.register("sake")
class SakeImporter:
    """The SAKE authors' released CSE-ResNet-50 checkpoints (Liu et al., ICCV 2019,
    ``model_best.pth.tar`` of ``CSEResnetModel_KDHashing``) as a zsbir run.

    The run's model is ``backbone_head``: ``cse_resnet50`` and a ``stacked`` head whose
    ``embed_dim`` is their hashing dimension (64 in the released models); the domain bit
    is mapped from their convention (0 sketch, 1 photo) to zsbir's (0 photo, 1 sketch) by
    folding it into each conditional SE layer's bias (module docstring). The manifest
    records SAKE's training configuration (``ce`` + ``sake`` losses, online teacher) for
    reference; nothing trains.

    Args:
        protocol: the benchmark the checkpoint was trained for (``sketchy_ext``: split
            SK-SH, 100 seen classes; ``tuberlin_ext``: TUB-SH, 220).
        root: the dataset folder written into the manifest (``zsbir evaluate --root``
            can give it later).
    """

    #: what this importer reads (named in the error for any other file)
    expects: ClassVar[str] = ("the SAKE authors' save_checkpoint dict {'epoch', 'arch', "
                              "'state_dict' of nn.DataParallel(CSEResnetModel_KDHashing), "
                              "'best_acc1'}")

    def __init__(self, protocol: Literal["sketchy_ext", "tuberlin_ext"] = "sketchy_ext",
                 root: str | None = None, ctx: BuildContext | None = None):
        if protocol not in _PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(_PROTOCOLS)}, got "
                             f"{protocol!r}")
        self.protocol, self.root = protocol, root

    def __call__(self, path: str | Path) -> Imported:
        path = Path(path)
        state, meta = self.read(path)
        cfg = _PROTOCOLS[self.protocol]
        dim = int(state["original_model.second_last_linear.weight"].shape[0])
        seen_authors = read_class_list(cfg["seen_file"])
        cs = class_split(cfg["dataset"], cfg["split"])
        rows = int(state["linear.weight"].shape[0])
        if rows != len(seen_authors):
            raise ImportFormatError(
                f"{str(path)!r}: its classifier has {rows} classes, protocol "
                f"{self.protocol} ({cfg['split']}) has {len(seen_authors)} seen classes; "
                "is it a checkpoint of the other dataset?")
        order = [seen_authors.index(_spelled(c, seen_authors)) for c in cs.seen]
        model = self.convert(state, order)
        return Imported(manifest=self.manifest(dim), model=model,
                        classes={"seen": list(cs.seen), "unseen": list(cs.unseen)},
                        source={"format": "SAKE save_checkpoint (CSEResnetModel_KDHashing)",
                                "protocol": self.protocol, "split": cfg["split"],
                                "embed_dim": dim, **meta,
                                "domain_bit": "authors' tag 0 sketch / 1 photo folded into "
                                              "fc2 bias and fc2_domain (zsbir: 0 photo, "
                                              "1 sketch)"})

    @staticmethod
    def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The authors' state dict without ``module.`` and its metadata; refuses any
        other file with :class:`ImportFormatError` naming the expected format."""
        from zsbir.engine.checkpoint import load_checkpoint

        try:
            ckpt = load_checkpoint(path, "SAKE checkpoint")
        except ImportFormatError:
            raise
        except Exception as exc:  # noqa: BLE001 - any unreadable file: what was expected
            raise ImportFormatError(f"{_expects(path)}; {exc}") from None
        sd = ckpt.get("state_dict")
        if not isinstance(sd, dict) or not sd:
            raise ImportFormatError(f"{_expects(path)}; it has keys "
                                    f"{', '.join(map(str, list(ckpt)[:6])) or 'none'}")
        state = {str(k).removeprefix("module."): v for k, v in sd.items()}
        needed = ("original_model.layer0.conv1.weight",
                  "original_model.second_last_linear.weight", "linear.weight",
                  "original_model.layer1.0.se_module.fc2.weight")
        lacking = [k for k in needed if k not in state]
        if lacking or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ImportFormatError(f"{_expects(path)}; its state_dict lacks "
                                    f"{', '.join(lacking) or 'tensors'}")
        meta: dict[str, Any] = {}
        for key in ("epoch", "arch", "best_acc1"):
            v = ckpt.get(key)
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, (int, float, str)):
                meta[key] = v
        return state, meta

    @staticmethod
    def convert(state: dict[str, torch.Tensor], order: list[int]) -> dict[str, torch.Tensor]:
        """Their tensors in ``BackboneHead(cse_resnet50, stacked)``'s layout (see the module
        docstring); ``order``: for each zsbir seen label, their classifier row."""
        out: dict[str, torch.Tensor] = {}
        fc2: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in state.items():
            t = t.detach().to("cpu")
            m = _BLOCK.match(key)
            if m is not None:
                block, fc, what = m.groups()
                if fc == "fc1":
                    out[f"backbone.{block}.se_module.fc1.{what}"] = (
                        t.reshape(*t.shape, 1, 1) if what == "weight" else t)
                else:
                    fc2.setdefault(block, {})[what] = t
            elif key.startswith("original_model.second_last_linear."):
                out["head.embed." + key.rsplit(".", 1)[1]] = t
            elif key.startswith("original_model.last_linear."):
                out["head.imagenet_head." + key.rsplit(".", 1)[1]] = t
            elif key.startswith("linear."):
                out["head.classifier." + key.rsplit(".", 1)[1]] = t[order]
            elif key.startswith("original_model."):
                out["backbone." + key.removeprefix("original_model.")] = t
            else:
                raise ImportFormatError(f"unexpected key {key!r} in a SAKE state_dict")
        for block, p in fc2.items():
            w, b = p["weight"], p["bias"]
            col = w[:, -1]  # the extra input: their tag t = 1 - zsbir's bit d
            out[f"backbone.{block}.se_module.fc2.weight"] = w[:, :-1].reshape(
                w.shape[0], w.shape[1] - 1, 1, 1).contiguous()
            out[f"backbone.{block}.se_module.fc2.bias"] = b + col
            out[f"backbone.{block}.se_module.fc2_domain"] = -col
        return out

    def manifest(self, dim: int) -> dict[str, Any]:
        """The run's manifest: zsbir's components, SAKE's training configuration."""
        cfg = _PROTOCOLS[self.protocol]
        return {
            "run": {"name": f"sake_{self.protocol}_import", "seed": 0},
            "protocol": {"name": self.protocol, "root": self.root or "",
                         "split": cfg["split"]},
            "data": {"image_size": 224, "augment_prob": 0.7, "scale": [0.7, 1.3],
                     "rotation": 30.0, "translation": 10.0},
            "model": {"name": "backbone_head",
                      "backbone": {"name": "cse_resnet50", "pretrained": True},
                      "head": {"name": "stacked", "embed_dim": dim,
                               "imagenet_head": "svd"}},
            "teacher": {"name": "online"},
            "losses": [{"name": "ce", "weight": 1.0},
                       {"name": "sake", "weight": 1.0, "lambda1": 1.0,
                        "lambda2": cfg["lambda2"], "photos_only": True}],
            "sampler": {"name": "mixed", "sketches_per_batch": cfg["sketches_per_batch"]},
            "optimizer": {"name": "adam", "lr": 1e-4, "weight_decay": 5e-4},
            "schedule": {"name": "exponential", "final_factor": 1e-3},
            "train": {"epochs": 20, "batch_size": 40, "select": "best_val"},
            "hashers": [{"name": "none"}],
            "evaluation": {"metrics": ["map@all", "p@100", "map@200", "p@200"]},
        }


def authors_state_dict(state: dict[str, torch.Tensor], seen: list[str],
                       protocol: str = "sketchy_ext") -> dict[str, torch.Tensor]:
    """The inverse of :meth:`SakeImporter.convert`: a zsbir ``BackboneHead(cse_resnet50,
    stacked)`` state dict (with an ImageNet head; ``seen``: its classifier's class order)
    in the authors' layout, ``module.`` keys included; for the docs and tests, which
    write checkpoints in their format without their code."""
    authors = read_class_list(_PROTOCOLS[protocol]["seen_file"])
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key.endswith(".fc2_domain"):
            continue
        if ".se_module.fc" in key:
            block, rest = key.removeprefix("backbone.").split(".se_module.")
            name = f"module.original_model.{block}.se_module.{rest}"
            if rest == "fc1.weight":
                t = t.flatten(1)
            elif rest.startswith("fc2."):
                col = -state[f"backbone.{block}.se_module.fc2_domain"]
                t = torch.cat([t.flatten(1), col[:, None]], 1) if rest == "fc2.weight" \
                    else t - col
            out[name] = t
        elif key.startswith("backbone."):
            out["module.original_model." + key.removeprefix("backbone.")] = t
        elif key.startswith("head.embed."):
            out["module.original_model.second_last_linear." + key.rsplit(".", 1)[1]] = t
        elif key.startswith("head.imagenet_head."):
            out["module.original_model.last_linear." + key.rsplit(".", 1)[1]] = t
        elif key.startswith("head.classifier."):
            rows = [seen.index(_spelled(c, seen)) for c in authors]
            out["module.linear." + key.rsplit(".", 1)[1]] = t[rows]
    return out


def _spelled(name: str, names: list[str]) -> str:
    from zsbir.data.classnames import normalize

    key = normalize(name)
    return next(n for n in names if normalize(n) == key)
