"""CSE-ResNet-50: SE-ResNet-50 with conditional SE modules (SAKE, Liu et al., ICCV 2019).

SAKE (Sec. 3.3, "Semantic-Aware Knowledge Preservation") embeds photos and sketches with
one network ``h(x, input_domain; theta)``: ``f(.; theta_P) = h(., 0)`` for photos and
``g(.; theta_S) = h(., 1)`` for sketches. Every SE module of an SE-ResNet-50 becomes a
Conditional SE (CSE) module (Lu et al. [22]): "a binary code is appended to the output of
the first layer to indicate the domain of the input data". In the authors' code the domain
bit is concatenated to the squeezed and reduced vector, so the second excitation layer
``fc2`` maps ``C/16 + 1 -> C``::

    s = sigmoid(fc2([relu(fc1(avgpool(x))), d]))     x <- x * s

Parameter layout (names and shapes of timm's ``legacy_seresnet50``, Cadene's SE-ResNet-50):
``layer0.{conv1,bn1}``, ``layer{1..4}.{i}.{conv1,bn1,conv2,bn2,conv3,bn3}``,
``layer{1..4}.{i}.downsample.{0,1}``, ``layer{1..4}.{i}.se_module.{fc1,fc2}.{weight,bias}``
(1x1 convolutions, as in timm) and ``last_linear`` (the 1000-way ImageNet classifier).
The extra input column of each conditional ``fc2`` is kept as a separate parameter
``layer{1..4}.{i}.se_module.fc2_domain`` of shape ``(C,)``, so that

    fc2([r, d]) = fc2.weight @ r + fc2.bias + d * fc2_domain

and a ``legacy_seresnet50`` state dict loads with strict name and shape checking; the 16
``fc2_domain`` vectors are the only keys it may lack (they then start at zero, so at
initialization the network equals the pretrained SE-ResNet-50 for either domain bit).
The authors instead widen ``fc2.weight`` with a zero column (``senet.py``,
``initialize_pretrained_model_ext``); the two layouts compute the same function.

Domain bit: ``0`` photo, ``1`` sketch, as in the paper (``h(p_i, 0)``, ``h(s_i, 1)``) and
in ``zsbir.data`` (``PHOTO, SKETCH = 0, 1``). Note that the authors' released training and
test scripts feed the *opposite* tags (``torch.zeros`` for sketches, ``torch.ones`` for
the extended photo set); only checkpoints trained with that code are affected, and
``zsbir import sake`` maps them (:mod:`zsbir.importers.sake` folds their tag into each
conditional ``fc2``'s bias).

``se_resnet50`` is the same network with plain SE modules (``conditional = False``): it
equals timm's ``legacy_seresnet50``; SAKE uses it as the frozen ImageNet teacher.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import replace

import torch
from torch import nn

from zsbir.models.backbone import (
    IMAGENET_CFG,
    Backbone,
    WeightsPath,
    load_state_dict_file,
    resolve_weights,
)
from zsbir.registry import backbones

__all__ = ["CSEModule", "CSEResNet", "CSEResNetBottleneck", "cse_resnet50", "se_resnet50"]

#: timm model whose ImageNet weights (and parameter names) this network uses.
TIMM_NAME = "legacy_seresnet50"
#: key suffix of the extra (domain) input column of a conditional fc2.
DOMAIN_KEY = "se_module.fc2_domain"


class CSEModule(nn.Module):
    """(Conditional) squeeze-and-excitation on a (B, C, H, W) map.

    ``fc1``/``fc2`` are 1x1 convolutions named as in timm's ``SEModule``; with
    ``conditional`` the domain bit is one more input of ``fc2`` (column ``fc2_domain``,
    zero-initialized).
    """

    def __init__(self, channels: int, reduction: int = 16, conditional: bool = True):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1)
        self.sigmoid = nn.Sigmoid()
        self.fc2_domain: nn.Parameter | None
        if conditional:
            self.fc2_domain = nn.Parameter(torch.zeros(channels))
        else:
            self.register_parameter("fc2_domain", None)

    def forward(self, x: torch.Tensor, domain: torch.Tensor | None = None) -> torch.Tensor:
        s = self.fc2(self.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        if self.fc2_domain is not None:
            if domain is None:
                raise ValueError("a conditional SE module needs the domain bits")
            # the extra input column of fc2 applied to the domain bit d: + d * w_d
            s = s + domain.view(-1, 1, 1, 1) * self.fc2_domain.view(1, -1, 1, 1)
        return x * self.sigmoid(s)


class CSEResNetBottleneck(nn.Module):
    """SE-ResNet bottleneck (Caffe style: stride in ``conv1``) with a (C)SE module."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, reduction: int = 16, stride: int = 1,
                 downsample: nn.Module | None = None, conditional: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.se_module = CSEModule(planes * 4, reduction, conditional)
        self.downsample = downsample

    def forward(self, x: torch.Tensor, domain: torch.Tensor | None = None) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.se_module(out, domain) + shortcut)


class CSEResNet(Backbone):
    """(C)SE-ResNet: images (B, 3, H, W) and domain bits (B,) -> pooled features (B, 2048).

    Args:
        conditional: CSE modules (SAKE's CSE-ResNet-50) or plain SE (SE-ResNet-50).
        layers: bottleneck blocks per stage ((3, 4, 6, 3) for 50 layers).
        reduction: SE reduction ratio (16).

    ``last_linear`` (the ImageNet classifier) exists only once pretrained weights are
    loaded (:meth:`load_imagenet_state_dict`); :meth:`imagenet_classifier` returns it.
    """

    def __init__(self, conditional: bool = True, layers: tuple[int, ...] = (3, 4, 6, 3),
                 reduction: int = 16):
        super().__init__()
        self.conditional = conditional
        self.pretrained = False
        self.num_features = 512 * CSEResNetBottleneck.expansion
        self.layer0 = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)),
            ("bn1", nn.BatchNorm2d(64)),
            ("relu1", nn.ReLU(inplace=True)),
        ]))
        # ceil_mode=True instead of padding=1, for the Caffe-trained weights (as in timm)
        self.pool0 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * 4:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * 4, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes * 4),
                )
            stage = [CSEResNetBottleneck(inplanes, planes, reduction, stride, downsample,
                                         conditional)]
            inplanes = planes * 4
            stage += [CSEResNetBottleneck(inplanes, planes, reduction, conditional=conditional)
                      for _ in range(1, blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.last_linear: nn.Linear | None = None
        for m in self.modules():  # timm's SENet initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _domain(self, x: torch.Tensor, domain: torch.Tensor | float | None) -> torch.Tensor | None:
        if not self.conditional:
            return None
        if domain is None:
            raise ValueError("cse_resnet50 is conditional: forward(x, domain) needs the domain "
                             "bits, shape (B,), 0 photo / 1 sketch")
        d = torch.as_tensor(domain, device=x.device).to(x.dtype).reshape(-1)
        if d.numel() == 1:
            d = d.expand(x.shape[0])
        if d.numel() != x.shape[0]:
            raise ValueError(f"domain bits have {d.numel()} entries for a batch of {x.shape[0]}")
        return d

    def forward_features(self, x: torch.Tensor,
                         domain: torch.Tensor | float | None = None) -> torch.Tensor:
        """The (B, 2048, H/32, W/32) map before global pooling."""
        d = self._domain(x, domain)
        x = self.pool0(self.layer0(x))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x, d)
        return x

    def forward(self, x: torch.Tensor, domain: torch.Tensor | float | None = None) -> torch.Tensor:
        """Globally average-pooled features ``x_i = h(image, domain)``, (B, 2048)."""
        return self.forward_features(x, domain).mean((2, 3))

    def imagenet_classifier(self) -> nn.Linear | None:
        if self.pretrained and self.last_linear is not None:
            return self.last_linear
        return None

    def domain_parameters(self) -> Iterator[nn.Parameter]:
        """The extra fc2 columns of the CSE modules (empty for plain SE)."""
        for name, p in self.named_parameters():
            if name.endswith(DOMAIN_KEY):
                yield p

    def load_imagenet_state_dict(self, state: Mapping[str, torch.Tensor],
                                 source: str = "state dict") -> None:
        """Load SE-ResNet-50 ImageNet weights (timm ``legacy_seresnet50`` names) strictly.

        Every parameter and buffer must be present with its exact shape, except the
        ``*.se_module.fc2_domain`` columns (kept at zero when absent, i.e. the pretrained
        network for both domains) and BatchNorm ``num_batches_tracked`` counters. Raises
        ``ValueError`` naming every mismatched, missing or unexpected key.
        """
        state = {k.removeprefix("module."): v for k, v in state.items()}
        if self.last_linear is None:
            self.last_linear = nn.Linear(self.num_features, 1000)
        own = self.state_dict()
        problems = [f"{k}: shape {tuple(v.shape)} in the file, {tuple(own[k].shape)} expected"
                    for k, v in state.items() if k in own and tuple(v.shape) != own[k].shape]
        if any(k.endswith("se_module.fc2.weight") and k in own and v.ndim >= 2
               and v.shape[1] == own[k].shape[1] + 1 for k, v in state.items()):
            problems.append("(fc2 weights with one extra input column are the SAKE authors' "
                            f"layout: move that column to '<block>.{DOMAIN_KEY}')")
        optional = (DOMAIN_KEY, "num_batches_tracked")
        missing = [k for k in own if k not in state and not k.endswith(optional)]
        unexpected = [k for k in state if k not in own]
        if missing:
            problems.append(f"missing {_short(missing)}")
        if unexpected:
            problems.append(f"unexpected {_short(unexpected)}")
        if problems:
            self.last_linear = None
            kind = "CSE-ResNet-50" if self.conditional else "SE-ResNet-50"
            raise ValueError(f"{source} does not match {kind} ({TIMM_NAME} layout): "
                             + "; ".join(problems))
        self.load_state_dict(state, strict=False)
        self.pretrained = True


def _short(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def _create(name: str, conditional: bool, pretrained: bool, weights: str | None,
            download: bool) -> CSEResNet:
    model = CSEResNet(conditional=conditional)
    source = resolve_weights(name, TIMM_NAME, pretrained, weights, download)
    if source is not None:
        model.load_imagenet_state_dict(load_state_dict_file(source), source=str(source))
    elif pretrained and download:  # nothing cached and downloads allowed: timm fetches
        import timm

        ref = timm.create_model(TIMM_NAME, pretrained=True)
        model.load_imagenet_state_dict(ref.state_dict(), source=f"timm {TIMM_NAME}")
    if model.pretrained:  # legacy SE-ResNet-50 weights: ImageNet mean/std, bilinear
        model.pretrained_cfg = replace(IMAGENET_CFG, source=str(source or f"timm {TIMM_NAME}"))
    return model


@backbones.register("cse_resnet50")
def cse_resnet50(pretrained: bool = True, weights: WeightsPath = None,
                 download: bool = False) -> Backbone:
    """CSE-ResNet-50 (SAKE, Liu et al., ICCV 2019, Sec. 3.3), 2048-d pooled features.

    SE-ResNet-50 whose SE modules take the domain bit (0 photo, 1 sketch) as an extra
    input of their last FC layer; initialized from ImageNet SE-ResNet-50 weights (timm
    ``legacy_seresnet50``: local ``weights`` file, else timm's caches) with the domain
    columns at zero. ``forward(x, domain)`` requires the domain bits.
    """
    return _create("cse_resnet50", True, pretrained, weights, download)


@backbones.register("se_resnet50")
def se_resnet50(pretrained: bool = True, weights: WeightsPath = None,
                download: bool = False) -> Backbone:
    """SE-ResNet-50 (Hu et al., CVPR 2018), 2048-d pooled features: timm's
    ``legacy_seresnet50``, SAKE's ImageNet initialization and frozen teacher."""
    return _create("se_resnet50", False, pretrained, weights, download)
