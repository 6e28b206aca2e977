"""LoRA and bottleneck-adapter layers, and the functions that put them into any module.

- :class:`LoRALinear` / :class:`LoRAConv2d`: low-rank adaptation (Hu et al., "LoRA:
  Low-Rank Adaptation of Large Language Models", ICLR 2022, Sec. 4.1, Eq. 3):
  ``h = W x + (alpha / r) B A x`` with ``A`` (r x d_in) Kaiming-uniform and ``B``
  (d_out x r) zero, so that the adapted layer equals the frozen one at initialization. A
  convolution gets the low-rank pair as two convolutions: ``A`` with the base layer's kernel
  size, stride, padding and dilation (r output channels) and ``B`` a 1x1 convolution back to
  the base layer's channels; their composition is one convolution whose kernel is
  ``B A`` (reshaped), which is what :func:`merge_lora` folds into the base weight.
- :class:`AdapterLinear` / :class:`AdapterConv2d`: bottleneck adapters (Houlsby et al.,
  "Parameter-Efficient Transfer Learning for NLP", ICML 2019, Sec. 2.1 and Fig. 2) on the
  output of the wrapped layer: ``y = f(x); y + up(act(down(y)))`` with ``up`` zero (so the
  adapter starts as the identity; the paper uses a near-zero initialization). Placed on a
  transformer block's attention projection and second feed-forward layer (``*.attn.proj``,
  ``*.mlp.fc2``) they sit where the paper puts them, before the residual sum. For a
  convolution, ``down``/``up`` are 1x1 convolutions over channels.

The wrapped layers keep the base layer's ``weight`` and ``bias`` Parameters under the same
names (they subclass ``nn.Linear`` / ``nn.Conv2d``), so a backbone's state dict keeps every
key it had, plus ``lora_A``/``lora_B`` or ``adapter_down.*``/``adapter_up.*``: names an
``[[optimizer.groups]]`` pattern (``"*.lora_*"``, ``"*.adapter_*"``) matches.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AdapterConv2d", "AdapterLinear", "LoRAConv2d", "LoRALinear", "inject",
           "lora_parameters", "merge_lora", "peft_parameter_names"]

#: the name parts of every parameter this module adds (for freezing and group patterns)
PEFT_PREFIXES = ("lora_", "adapter_")


def _check(rank: int, alpha: float, dropout: float) -> None:
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


class LoRALinear(nn.Linear):
    """A frozen ``nn.Linear`` plus a trainable low-rank update (Hu et al., ICLR 2022,
    Eq. 3): ``y = W x + b + (alpha / r) B A dropout(x)``.

    Args:
        base: the layer adapted; its ``weight`` and ``bias`` Parameters are taken over (the
            same objects, under the same names).
        rank: r, the rank of the update.
        alpha: the update's scale numerator: ``scaling = alpha / r`` (Sec. 4.1: "we then
            scale ∆Wx by α/r").
        dropout: dropout on the input of the low-rank path only.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        _check(rank, alpha, dropout)
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=w.dtype,
                                               device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype,
                                               device=w.device))
        # as the reference implementation (microsoft/LoRA loralib) and nn.Linear's default
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) B A``: what :meth:`merged` adds to ``W`` (d_out x d_in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        low = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return out + low * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + (alpha / r) B A`` (the same function, in eval
        mode, up to rounding); its ``weight`` keeps ``W``'s requires_grad."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        return _fill_merged(layer, self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _fill_merged(layer: nn.Module, lora: Any) -> nn.Module:
    """Give the plain ``layer`` the weight ``W + (alpha / r) B A`` and the bias of ``lora``
    (a LoRA layer), each keeping its requires_grad; returns ``layer``."""
    with torch.no_grad():
        layer.weight.copy_(lora.weight + lora.delta_weight().to(lora.weight.dtype))
        if lora.bias is not None:
            layer.bias.copy_(lora.bias)
    layer.weight.requires_grad_(lora.weight.requires_grad)
    if lora.bias is not None:
        layer.bias.requires_grad_(lora.bias.requires_grad)
    return layer


_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
               "groups", "padding_mode", "transposed", "output_padding",
               "_reversed_padding_repeated_twice")


def _take_conv(self: nn.Conv2d, base: nn.Conv2d) -> None:
    """Make ``self`` the convolution ``base`` is: its attributes and Parameters."""
    nn.Module.__init__(self)
    for attr in _CONV_ATTRS:
        setattr(self, attr, getattr(base, attr))
    self.weight = base.weight
    self.register_parameter("bias", base.bias)


class LoRAConv2d(nn.Conv2d):
    """A frozen ``nn.Conv2d`` plus a trainable low-rank update (LoRA, Hu et al., ICLR 2022,
    Eq. 3, for a convolution): ``y = conv(x; W) + (alpha / r) conv1x1(conv(dropout(x); A); B)``
    where ``A`` (r, C_in, kh, kw) has the base layer's kernel, stride, padding and
    dilation, ``B`` (C_out, r, 1, 1) is zero. The composition equals one convolution with
    kernel ``B A`` (``B`` (C_out, r) times ``A`` (r, C_in kh kw), reshaped).

    Grouped (e.g. depthwise) convolutions are refused: their update is not low-rank in
    this sense. Args as :class:`LoRALinear`.
    """

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0):
        _check(rank, alpha, dropout)
        if base.groups != 1:
            raise ValueError(f"LoRA on a grouped convolution (groups = {base.groups}) is not "
                             "supported: leave it out of `targets`")
        _take_conv(self, base)
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        w = base.weight
        kh, kw = self.kernel_size
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_channels, kh, kw, dtype=w.dtype,
                                               device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_channels, rank, 1, 1, dtype=w.dtype,
                                               device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) B A`` reshaped to the base kernel (C_out, C_in, kh, kw)."""
        a = self.lora_A.flatten(1)  # (r, C_in kh kw)
        b = self.lora_B.flatten(1)  # (C_out, r)
        return (b @ a).view_as(self.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(x, self.weight, self.bias)
        low = F.conv2d(self._conv_forward(self.lora_dropout(x), self.lora_A, None), self.lora_B)
        return out + low * self.scaling

    def merged(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with kernel ``W + (alpha / r) B A``."""
        layer = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                          stride=self.stride, padding=self.padding, dilation=self.dilation,
                          bias=self.bias is not None, padding_mode=self.padding_mode,
                          device=self.weight.device, dtype=self.weight.dtype)
        return _fill_merged(layer, self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


#: adapter nonlinearities by manifest name
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


class AdapterLinear(nn.Linear):
    """A frozen ``nn.Linear`` followed by a bottleneck adapter (Houlsby et al., ICML 2019,
    Sec. 2.1): ``y = W x + b; y + up(act(down(dropout(y))))`` with ``down``: d_out -> m,
    ``up``: m -> d_out zero-initialized (the adapter starts as the identity).

    Args:
        base: the layer adapted (``weight``/``bias`` taken over, same names).
        rank: m, the bottleneck width.
        activation: ``"gelu"`` or ``"relu"``.
        dropout: dropout on the adapter's input.
    """

    def __init__(self, base: nn.Linear, rank: int, activation: str = "gelu",
                 dropout: float = 0.0):
        _check(rank, 1.0, dropout)
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.rank = rank
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.adapter_down = nn.Linear(self.out_features, rank, **kw)
        self.adapter_act = ACTIVATIONS[activation]()
        self.adapter_up = nn.Linear(rank, self.out_features, **kw)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.adapter_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + self.adapter_up(self.adapter_act(self.adapter_down(self.adapter_dropout(y))))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adapter={self.rank}"


class AdapterConv2d(nn.Conv2d):
    """A frozen ``nn.Conv2d`` followed by a bottleneck adapter over channels (Houlsby et
    al., ICML 2019, Sec. 2.1, with 1x1 convolutions as ``down``/``up``):
    ``y = conv(x); y + up(act(down(dropout(y))))``, ``up`` zero-initialized."""

    def __init__(self, base: nn.Conv2d, rank: int, activation: str = "gelu",
                 dropout: float = 0.0):
        _check(rank, 1.0, dropout)
        _take_conv(self, base)
        self.rank = rank
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.adapter_down = nn.Conv2d(self.out_channels, rank, 1, **kw)
        self.adapter_act = ACTIVATIONS[activation]()
        self.adapter_up = nn.Conv2d(rank, self.out_channels, 1, **kw)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.adapter_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(x, self.weight, self.bias)
        return y + self.adapter_up(self.adapter_act(self.adapter_down(self.adapter_dropout(y))))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adapter={self.rank}"


_WRAPPED = (LoRALinear, LoRAConv2d, AdapterLinear, AdapterConv2d)


def _is_plain(m: nn.Module, kinds: tuple[type, ...]) -> bool:
    return isinstance(m, kinds) and not isinstance(m, _WRAPPED)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def inject(root: nn.Module, targets: Sequence[str],
           wrap: Callable[[nn.Module], nn.Module],
           kinds: tuple[type, ...] = (nn.Linear, nn.Conv2d)) -> list[str]:
    """Replace every layer of ``kinds`` under ``root`` whose dotted name (as
    ``root.named_modules()`` gives it) matches one of the fnmatch ``targets`` by
    ``wrap(layer)``; returns the names replaced, in module order.

    Every pattern must match at least one such layer (a typo is an error, not a silent
    no-op); :class:`ValueError` names the pattern and shows some layer names that exist.
    """
    if not targets:
        raise ValueError("targets is empty: give fnmatch patterns over layer names, "
                         "e.g. [\"*.qkv\"]")
    layers = [(n, m) for n, m in root.named_modules() if n and _is_plain(m, kinds)]
    hits = {p: [n for n, _ in layers if fnmatch.fnmatchcase(n, p)] for p in targets}
    missing = [p for p, found in hits.items() if not found]
    if missing:
        kinds_s = " or ".join(k.__name__ for k in kinds)
        shown = ", ".join(n for n, _ in layers[:8]) + (", ..." if len(layers) > 8 else "")
        raise ValueError(f"targets {missing} match no {kinds_s} layer of the backbone; its "
                         f"{kinds_s} layers are named like: {shown or '(none)'}")
    names = [n for n, _ in layers if any(n in found for found in hits.values())]
    for n in names:
        _replace(root, n, wrap(root.get_submodule(n)))
    return names


def merge_lora(root: nn.Module) -> list[str]:
    """Fold every LoRA layer under ``root`` into its base weight, in place (each
    :class:`LoRALinear` / :class:`LoRAConv2d` becomes a plain ``nn.Linear`` /
    ``nn.Conv2d`` with ``W + (alpha / r) B A``); returns the names merged. Adapters stay:
    their nonlinearity cannot be folded."""
    names = [n for n, m in root.named_modules() if isinstance(m, (LoRALinear, LoRAConv2d))]
    for n in names:
        layer = root.get_submodule(n)
        merged = layer.merged()
        merged.train(layer.training)
        _replace(root, n, merged)
    return names


def peft_parameter_names(root: nn.Module) -> list[str]:
    """Names of the parameters the LoRA / adapter layers added (``*.lora_A``,
    ``*.lora_B``, ``*.adapter_down.*``, ``*.adapter_up.*``)."""
    return [n for n, _ in root.named_parameters()
            if any(part.startswith(PEFT_PREFIXES) for part in n.split("."))]


def lora_parameters(root: nn.Module) -> list[nn.Parameter]:
    """The LoRA / adapter parameters under ``root``, in module order."""
    named = dict(root.named_parameters())
    return [named[n] for n in peft_parameter_names(root)]
