"""Plugin test fixtures: every test gets its own zsbir cache; nothing is downloaded; tiny
CPU models run on one thread."""

from __future__ import annotations

import os

import pytest
import torch

from zsbir.testing_fixtures import isolated_cache, one_thread  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_vit(depth: int = 2, img_size: int = 32):
    """A random timm ViT-Tiny/16 at 32 px with 2 blocks, behind zsbir's timm backbone class
    (the same object zsbir's ``timm`` backbone returns)."""
    import timm

    from zsbir.models.backbone import TimmBackbone

    torch.manual_seed(0)
    return TimmBackbone(timm.create_model("vit_tiny_patch16_224", img_size=img_size,
                                          depth=depth), pretrained=False)


def resnet18():
    """A random ResNet-18 through zsbir's registered ``resnet18`` backbone."""
    from zsbir.models.timm_backbones import resnet18 as make

    torch.manual_seed(0)
    backbone = make(pretrained=False)
    with torch.no_grad():  # timm zero-initializes each block's last BatchNorm scale, which
        for m in backbone.modules():  # would cut every gradient through the blocks' convs
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(1.0)
    return backbone


@pytest.fixture
def factories():
    """Tiny random backbones by name: ``factories["vit"]()``, ``factories["resnet18"]()``."""
    return {"vit": tiny_vit, "resnet18": resnet18}
