"""``peft_lora`` and ``peft_adapter``: any registered backbone, frozen, with LoRA or
bottleneck adapters in the layers the manifest names.

```toml
[model.backbone]                 # (or [backbone] before the [model] form)
name = "peft_lora"
rank = 8
alpha = 16.0
targets = ["*.qkv", "*.mlp.fc1"]  # fnmatch over the wrapped backbone's layer names

[model.backbone.backbone]         # the backbone adapted: any registered one
name = "timm"
model = "vit_small_patch14_dinov2"
weights = "/models/dinov2_vits14.pth"
```

The wrapped backbone keeps the backbone contract (:class:`zsbir.models.backbone.Backbone`):
``num_features``, ``pretrained_cfg``, ``conditional``, ``forward(image, domain)``,
``imagenet_classifier()``, and forwards any other attribute to the backbone inside. Every
parameter of the backbone inside is frozen (``requires_grad = False``) except the LoRA /
adapter parameters (and those ``trainable`` names); with ``freeze_norm_stats`` its
BatchNorm layers stay in eval mode, so that the base is frozen entirely (running
statistics included).
"""

from __future__ import annotations

import fnmatch
from typing import Annotated, Any, Literal

from torch import nn

from zsbir.constraints import Range
from zsbir.models.backbone import Backbone
from zsbir.registry import Nested
from zsbir_peft.layers import (
    AdapterConv2d,
    AdapterLinear,
    LoRAConv2d,
    LoRALinear,
    inject,
    merge_lora,
    peft_parameter_names,
)

__all__ = ["PeftBackbone", "peft_adapter", "peft_lora"]

#: not forwarded to the backbone inside: hooks whose names are relative to the module that
#: defines them (zsbir's parameter groups find the inner module's own hooks, with its prefix)
_NOT_FORWARDED = frozenset({"no_weight_decay", "param_groups", "backbone"})


class PeftBackbone(Backbone):
    """A frozen backbone with parameter-efficient layers in it (see the module docstring).

    Attributes:
        backbone: the backbone inside (its layers replaced in place).
        method: ``"lora"`` or ``"adapter"``.
        adapted: the names (relative to ``backbone``) of the layers adapted.
    """

    def __init__(self, backbone: Backbone, method: str, adapted: list[str],
                 freeze_norm_stats: bool = True):
        super().__init__()
        self.backbone = backbone
        self.method = method
        self.adapted = list(adapted)
        self.freeze_norm_stats = bool(freeze_norm_stats)
        self.num_features = int(backbone.num_features)
        self.conditional = bool(getattr(backbone, "conditional", False))
        self.pretrained = bool(getattr(backbone, "pretrained", False))
        self.pretrained_cfg = backbone.pretrained_cfg

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _NOT_FORWARDED or name.startswith("_"):
                raise
            return getattr(self._modules["backbone"], name)

    def forward(self, x, domain=None):  # noqa: ANN001 - the Backbone signature
        return self.backbone(x, domain)

    def imagenet_classifier(self) -> nn.Linear | None:
        return self.backbone.imagenet_classifier()

    def train(self, mode: bool = True) -> PeftBackbone:
        super().train(mode)
        if mode and self.freeze_norm_stats:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                        p.requires_grad for p in m.parameters(recurse=False)):
                    m.eval()  # a frozen BatchNorm keeps its running statistics
        return self

    def peft_parameter_names(self) -> list[str]:
        """The names of the trainable LoRA / adapter parameters (relative to this module)."""
        return peft_parameter_names(self)

    def merge(self) -> Backbone:
        """Fold every LoRA update into its base weight (Hu et al., ICLR 2022, Sec. 4.1: "we
        can explicitly compute and store W = W0 + BA and perform inference as usual"), in
        place: this module then computes the same function (up to rounding) with plain
        layers and no LoRA parameters. Returns the backbone inside, which can be saved and
        exported on its own. Adapters (``peft_adapter``) cannot be folded and stay."""
        merge_lora(self.backbone)
        self.adapted = [n for n in self.adapted
                        if isinstance(self.backbone.get_submodule(n),
                                      (AdapterLinear, AdapterConv2d))]
        return self.backbone


def _freeze(backbone: nn.Module, trainable: list[str]) -> None:
    """Freeze every parameter except the PEFT ones and those matching ``trainable``."""
    keep = set(peft_parameter_names(backbone))
    matched = {p: False for p in trainable}
    for name, p in backbone.named_parameters():
        extra = [pat for pat in trainable if fnmatch.fnmatchcase(name, pat)]
        for pat in extra:
            matched[pat] = True
        p.requires_grad_(name in keep or bool(extra))
    missing = [p for p, hit in matched.items() if not hit]
    if missing:
        raise ValueError(f"trainable {missing} match no parameter of the backbone")


def peft_lora(
    backbone: Annotated[Backbone, Nested("backbones")],
    rank: Annotated[int, Range(ge=1)] = 8,
    alpha: float = 16.0,
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0,
    targets: list[str] = ["*.qkv"],
    trainable: list[str] = [],
    freeze_norm_stats: bool = True,
) -> PeftBackbone:
    """LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022,
    Eq. 3) in the linear and 2-d convolution layers of any registered backbone, which is
    frozen: each targeted layer computes ``W x + (alpha / r) B A x`` with ``A``
    Kaiming-uniform and ``B`` zero (the wrapped backbone equals the backbone at
    initialization); only ``A`` and ``B`` (parameters ``*.lora_A``, ``*.lora_B``) train.

    Args:
        backbone: the backbone adapted (``[...backbone.backbone]``, any registered one; its
            ``weights`` load before the layers are wrapped).
        rank: r, the rank of each update.
        alpha: the scale numerator, ``scaling = alpha / r``.
        dropout: dropout on the low-rank path's input.
        targets: fnmatch patterns over the backbone's layer names (``named_modules()``,
            e.g. ``"*.qkv"``, ``"*.mlp.fc1"`` for a timm ViT, ``"*.conv2"`` for a ResNet);
            each must match at least one ``nn.Linear`` or ``nn.Conv2d`` layer.
        trainable: fnmatch patterns over the backbone's parameter names kept trainable
            besides the LoRA ones (e.g. ``"*norm*"``); empty: the whole base is frozen.
        freeze_norm_stats: keep the frozen BatchNorm layers' running statistics fixed.
    """
    adapted = inject(backbone, targets,
                     lambda m: (LoRALinear if isinstance(m, nn.Linear) else LoRAConv2d)(
                         m, rank=rank, alpha=alpha, dropout=dropout))
    _freeze(backbone, trainable)
    return PeftBackbone(backbone, "lora", adapted, freeze_norm_stats)


def peft_adapter(
    backbone: Annotated[Backbone, Nested("backbones")],
    rank: Annotated[int, Range(ge=1)] = 64,
    activation: Literal["gelu", "relu"] = "gelu",
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0,
    targets: list[str] = ["*.attn.proj", "*.mlp.fc2"],
    trainable: list[str] = [],
    freeze_norm_stats: bool = True,
) -> PeftBackbone:
    """Bottleneck adapters (Houlsby et al., "Parameter-Efficient Transfer Learning for
    NLP", ICML 2019, Sec. 2.1, Fig. 2) after the targeted layers of any registered
    backbone, which is frozen: ``y = f(x); y + up(act(down(y)))`` with ``up`` zero (the
    adapter starts as the identity). The default targets put them where the paper does in
    a timm ViT block: after the attention projection and after the feed-forward output,
    before each residual sum. Only the adapters (``*.adapter_down.*``, ``*.adapter_up.*``)
    train.

    Args:
        backbone: the backbone adapted (any registered one).
        rank: m, the bottleneck width.
        activation: the adapter's nonlinearity.
        dropout: dropout on the adapter's input.
        targets: fnmatch patterns over layer names (``nn.Linear``; ``nn.Conv2d`` get 1x1
            convolution adapters); each must match at least one layer.
        trainable: fnmatch patterns over parameter names kept trainable besides the
            adapters (Houlsby et al. also train the layer norms: ``"*norm*"``).
        freeze_norm_stats: keep the frozen BatchNorm layers' running statistics fixed.
    """
    adapted = inject(backbone, targets,
                     lambda m: (AdapterLinear if isinstance(m, nn.Linear) else AdapterConv2d)(
                         m, rank=rank, activation=activation, dropout=dropout))
    _freeze(backbone, trainable)
    return PeftBackbone(backbone, "adapter", adapted, freeze_norm_stats)


#: tiny examples for zsbir's contract suite (``zsbir.testing``): the backbone to wrap is
#: required, and the default targets name ViT layers
peft_lora.example = {"backbone": {"name": "resnet18"}, "rank": 2,  # type: ignore[attr-defined]
                     "targets": ["model.conv1", "*.conv2"]}
peft_adapter.example = {"backbone": {"name": "resnet18"}, "rank": 4,  # type: ignore[attr-defined]
                        "targets": ["*.conv2"]}
