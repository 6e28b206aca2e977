"""The authors' weight files, read from local paths (nothing is ever downloaded):

- ``vit_weights``: their ImageNet ViT-B/16, ``sam_ViT-B_16.pth`` (model/sa.py loads it with
  ``torch.load`` and keeps the entries whose names are keys of its ``ViTPatch``, minus
  ``mlp_head.*``); a state dict named like ``ViTPatch``: ``embedding.*``, ``cls``,
  ``pos_embedding``, ``transformer.layers.<i>.0.*``, ``transformer.encoder_norm.*``. Entries
  the file lacks (e.g. the scale embedding) keep their random initialization, as in their
  code.
- ``checkpoint``: their released / trained checkpoint (train.py's ``save_checkpoint``):
  ``{'model': Model.state_dict(), 'epoch', 'map_all', 'precision_100'}``, fp16 for the
  released files; every tensor is cast to float32.

Their parameter names map to this plugin's as :data:`KEY_MAP` says; the cross-attention's
``ca.encoder.layers.*`` are clones the released forward never uses and are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zsbir.models.backbone import WeightsFileError

__all__ = ["KEY_MAP", "WeightsError", "from_authors", "load_checkpoint", "load_vit_weights",
           "to_authors"]


class WeightsError(WeightsFileError):
    """A weights file that cannot be read or does not fit (the message names file and key)."""


#: (regex on the authors' ``Model`` key, replacement): this plugin's key
KEY_MAP: list[tuple[str, str]] = [
    (r"^sa\.model\.embedding\.", "encoder.patch_embed."),
    (r"^sa\.model\.scale\.seq\.", "encoder.scale_embed.seq."),
    (r"^sa\.model\.pos_embedding$", "encoder.pos_embed"),
    (r"^sa\.model\.cls$", "encoder.cls_token"),
    (r"^sa\.model\.transformer\.encoder_norm\.", "encoder.norm."),
    (r"^sa\.model\.transformer\.layers\.(\d+)\.0\.layer_norm_input\.", r"encoder.blocks.\1.norm1."),
    (r"^sa\.model\.transformer\.layers\.(\d+)\.0\.layer_norm_out\.", r"encoder.blocks.\1.norm2."),
    (r"^sa\.model\.transformer\.layers\.(\d+)\.0\.attention\.to_qkv\.",
     r"encoder.blocks.\1.attn.qkv."),
    (r"^sa\.model\.transformer\.layers\.(\d+)\.0\.attention\.to_out\.0\.",
     r"encoder.blocks.\1.attn.proj."),
    (r"^sa\.model\.transformer\.layers\.(\d+)\.0\.mlp\.net\.(\d)\.", r"encoder.blocks.\1.mlp.\2."),
    *[(rf"^ca\.encoder\.{side}\.(\d+)\.self_attn\.linears\.{i}\.", rf"cross.{mine}.\1.{p}.")
      for side, mine in (("layer1", "sketch"), ("layer2", "photo"))
      for i, p in enumerate("qkvo")],
    *[(rf"^ca\.encoder\.{side}\.(\d+)\.feed_forward\.w_(\d)\.", rf"cross.{mine}.\1.w\2.")
      for side, mine in (("layer1", "sketch"), ("layer2", "photo"))],
    *[(rf"^ca\.encoder\.{side}\.(\d+)\.sublayer\.{i}\.norm\.", rf"cross.{mine}.\1.norm{i + 1}.")
      for side, mine in (("layer1", "sketch"), ("layer2", "photo"))
      for i in range(2)],
    (r"^conv2d\.", "down."),
    (r"^rn\.rn\.", "relation.mlp."),
]
#: the authors' keys their forward never reads (dropped on import)
UNUSED = re.compile(r"^ca\.encoder\.layers\.")


def _map_key(key: str) -> str | None:
    for pattern, repl in KEY_MAP:
        if re.search(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def from_authors(state: Mapping[str, Any], source: str = "the state dict"
                 ) -> dict[str, torch.Tensor]:
    """The authors' ``Model.state_dict()`` (keys as in their model/model.py, an optional
    ``module.`` prefix of DataParallel) renamed to this plugin's :class:`ZseModel` keys,
    as float32. An unknown key is a :class:`WeightsError` naming it."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if UNUSED.match(key):
            continue
        mine = _map_key(key)
        if mine is None or not isinstance(value, torch.Tensor):
            unknown.append(key)
            continue
        out[mine] = value.float() if value.is_floating_point() else value
    if unknown:
        raise WeightsError(f"{source}: {len(unknown)} entries are not parameters of the "
                           f"authors' ZSE-SBIR model (first: {', '.join(unknown[:5])})")
    return out


def _reverse(pattern: str, repl: str) -> tuple[str, str]:
    """A :data:`KEY_MAP` entry run backwards: (regex on this plugin's key, replacement
    giving the authors' key)."""
    groups = re.findall(r"\(\\d\+?\)", pattern)  # the capture groups, in order
    rx = re.escape(repl)
    theirs = pattern.strip("^$")
    for i, g in enumerate(groups, 1):
        rx = rx.replace(re.escape(f"\\{i}"), g)
        theirs = theirs.replace(g, f"\\{i}", 1)
    return "^" + rx + ("$" if pattern.endswith("$") else ""), theirs.replace("\\.", ".")


REVERSE = [_reverse(p, r) for p, r in KEY_MAP]


def to_authors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`from_authors` (without the unused clones): a ``zse`` state
    dict under the authors' names, e.g. to write a checkpoint in their format (tests,
    docs) without their code."""
    out = {}
    for key, value in state.items():
        rx, theirs = next(((rx, t) for rx, t in REVERSE if re.match(rx, key)), (None, None))
        if rx is None:
            raise KeyError(f"{key!r} has no name in the authors' model")
        out[re.sub(rx, theirs, key)] = value
    return out


def _read(path: str | Path, what: str) -> Any:
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"{what}: no such file: {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise WeightsError(f"{what}: cannot read {p} as a plain torch file of tensors "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _assign(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
            required: bool) -> list[str]:
    """Copy ``state`` into ``model`` (shapes checked, key named on a mismatch); returns the
    model's keys the state lacked (a :class:`WeightsError` if ``required``)."""
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            raise WeightsError(f"{source}: {key!r} does not exist in this model "
                               "configuration (e.g. more layers than the manifest's)")
        if tuple(value.shape) != tuple(own[key].shape):
            raise WeightsError(f"{source}: {key!r} has shape {tuple(value.shape)}, the model's "
                               f"is {tuple(own[key].shape)} (check the manifest's model sizes)")
    missing = [k for k in own if k not in state]
    if required and missing:
        raise WeightsError(f"{source}: {len(missing)} parameters of the model are missing "
                           f"(first: {', '.join(missing[:5])})")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)
    return missing


def load_vit_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load the authors' ``sam_ViT-B_16.pth`` into ``model.encoder`` (keys of the file
    that are not ``ViTPatch`` parameters, e.g. ``mlp_head.*``, are ignored, as their code
    does); returns the encoder keys left at their initialization."""
    what = f"model.vit_weights ({path})"
    raw = _read(path, what)
    if isinstance(raw, Mapping) and "state_dict" in raw and isinstance(raw["state_dict"],
                                                                       Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        raise WeightsError(f"{what}: expected a state dict, got {type(raw).__name__}")
    prefixed = {f"sa.model.{k}": v for k, v in raw.items()
                if isinstance(v, torch.Tensor) and not k.startswith("mlp_head")}
    mapped = {}
    for key, value in prefixed.items():
        mine = _map_key(key)
        if mine is not None and mine.startswith("encoder."):
            mapped[mine] = value.float()
    if not mapped:
        raise WeightsError(f"{what}: none of its {len(raw)} entries is a ViTPatch parameter "
                           "(expected keys like 'embedding.weight', 'transformer.layers.0.0."
                           "attention.to_qkv.weight')")
    missing = _assign(model, mapped, what, required=False)
    return [k for k in missing if k.startswith("encoder.")]


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load the authors' checkpoint (``checkpoint['model']``, any float dtype) into
    ``model``; every parameter must be there."""
    what = f"model.checkpoint ({path})"
    raw = _read(path, what)
    if not isinstance(raw, Mapping) or not isinstance(raw.get("model"), Mapping):
        keys = ", ".join(map(str, list(raw)[:5])) if isinstance(raw, Mapping) else ""
        raise WeightsError(f"{what}: expected the authors' checkpoint, a dict with the "
                           f"model's state dict under 'model' (found keys: {keys or 'none'})")
    _assign(model, from_authors(raw["model"], f"{what}['model']"), f"{what}['model']",
            required=True)
