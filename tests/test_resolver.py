"""The manifest resolver (issue 24, points 1 and 6): nested component tables read from
``Nested`` / ``Factory`` signature markers, a table under an injected key and ``weight``
outside losses are errors, the student is a component (``[model]``: ``backbone_head`` with
the ``[backbone]`` shorthand, ``towers``), per-domain input configurations and transforms,
and the resolved manifest's round trip."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
import torch
from torch import nn

from zsbir.build import build_component, transforms_for
from zsbir.context import BuildContext
from zsbir.data.base import PHOTO, SKETCH
from zsbir.data.loading import DomainTransforms, Transform, to_device
from zsbir.manifest import (
    DataConfig,
    ManifestError,
    Marker,
    TrainConfig,
    apply_overrides,
    load,
    markers,
    resolve,
)
from zsbir.models.backbone import Backbone
from zsbir.models.heads import StackedHead
from zsbir.models.inputs import InputConfig
from zsbir.models.net import BackboneHead, ImageNetClassifier, Towers
from zsbir.registry import Factory, Nested, get_registry
from zsbir.teachers.strategies import ClassMeanTeacher, OnlineTeacher

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def quick() -> dict[str, Any]:
    return copy.deepcopy(load(EXAMPLES / "quickstart.toml"))


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ManifestError) as info:
        resolve(raw)
    return [str(p) for p in info.value.problems]


@contextlib.contextmanager
def registered(kind: str, name: str, obj: Any) -> Iterator[None]:
    """``obj`` registered as ``kind`` ``name`` for the duration (then removed, so that the
    live registries stay what zsbir ships)."""
    reg = get_registry(kind)
    reg.add(name, obj)
    try:
        yield
    finally:
        reg._components.pop(name, None)


# ------------------------------------------------------------------ markers
def test_markers_are_read_from_signatures():
    def parent(one: Annotated[nn.Module, Nested("backbones")],
               many: Annotated[list[nn.Module], Nested("losses")],
               maybe: Annotated[nn.Module, Nested("networks")] | None = None,
               make: Annotated[Any, Factory("heads")] = {"name": "stacked"},
               plain: Annotated[int, "not a marker"] = 3, other: dict[str, Any] | None = None):
        """A parent component."""

    assert markers(parent) == {"one": Marker("backbones"), "many": Marker("losses", many=True),
                               "maybe": Marker("networks"),
                               "make": Marker("heads", factory=True)}


def test_an_unresolvable_annotation_does_not_hide_a_marker():
    import types

    module = types.ModuleType("plugin_with_type_checking_imports")
    exec("from __future__ import annotations\n"
         "from typing import TYPE_CHECKING, Annotated\n"
         "from zsbir.registry import Nested\n"
         "if TYPE_CHECKING:\n"
         "    from elsewhere import Thing\n"
         "def comp(net: Annotated[object, Nested('networks')], other: Thing = None): ...\n",
         module.__dict__)
    assert markers(module.comp) == {"net": Marker("networks")}


def test_every_builtin_nested_parameter_is_a_marker():
    assert markers(BackboneHead) == {"backbone": Marker("backbones"),
                                     "head": Marker("heads", factory=True)}
    assert markers(Towers) == {"sketch": Marker("backbones"), "photo": Marker("backbones"),
                               "head": Marker("heads", factory=True)}
    assert markers(ImageNetClassifier) == {"backbone": Marker("backbones")}
    assert markers(OnlineTeacher) == markers(ClassMeanTeacher) == {
        "network": Marker("networks")}
    assert markers(TrainConfig) == {"step": Marker("steps")}
    assert markers(DataConfig) == {}


class Pair(nn.Module):
    """A test model: a list of backbones (only the first one is used) and a head."""

    def __init__(self, towers: Annotated[list[Backbone], Nested("backbones")],
                 head: Annotated[Any, Factory("heads")] = {"name": "stacked", "embed_dim": 4},
                 num_classes: int = 0, ctx: BuildContext | None = None):
        super().__init__()
        self.towers = nn.ModuleList(towers)
        self.head = head(in_features=towers[0].num_features, num_classes=num_classes,
                         classifier=None)


def test_a_new_components_nested_tables_come_from_its_signature():
    """No list of keys names ``towers``: the test model's signature does."""
    raw = quick()
    del raw["backbone"]
    raw["hashers"] = [{"name": "none"}]
    raw["model"] = {"name": "test_pair", "towers": [
        {"name": "resnet18", "pretrained": False}, {"name": "resnet18x"}]}
    with registered("models", "test_pair", Pair):
        text = "\n".join(problems(raw))
        assert "model.towers[1].name: unknown backbone 'resnet18x'" in text
        raw["model"]["towers"][1] = {"name": "resnet18", "pretrained": False}
        m = resolve(raw)
        assert m.model["head"] == {"name": "stacked", "embed_dim": 4, "imagenet_head": "none",
                                   "dropout": 0.0}  # the default table, resolved
        assert [t["download"] for t in m.model["towers"]] == [False, False]
        ctx = BuildContext(seen_classes=["a", "b", "c"])
        model = build_component("models", m.model, ctx, num_classes=3)
    assert len(model.towers) == 2 and isinstance(model.head, StackedHead)
    assert model.head.classifier.out_features == 3 and model.head.embed_dim == 4


def test_a_table_under_an_injected_key_is_an_error():
    raw = quick()
    raw["model"]["head"]["in_features"] = {"name": "resnet18"}
    raw["sampler"]["labels"] = [1, 2]
    text = "\n".join(problems(raw))
    assert ("model.head.in_features: a table under 'in_features', which zsbir supplies to a "
            "head itself (injected)") in text
    assert "sampler.labels: a value under 'labels', which zsbir supplies" in text


def test_build_component_refuses_values_the_injected_table_does_not_list():
    with pytest.raises(TypeError, match=r"INJECTED\['protocols'\] does not list"):
        build_component("protocols", {"name": "synthetic"}, BuildContext(), labels=[1])


class _WatchingTeacher:
    """A test teacher that only asks for the student (no signal, nothing to download)."""

    provides: frozenset[str] = frozenset()

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {}


def test_supply_refuses_a_call_site_that_passes_other_names_than_declared():
    from zsbir.injection import supply

    with pytest.raises(TypeError, match=r"supply\('samplers'\) was given \['labels'\], but "
                       r"zsbir.injection.SUPPLIED\['samplers'\] declares \['batch_size', "
                       r"'domains', 'labels', 'seed'\]"):
        supply("samplers", labels=[1])
    with pytest.raises(TypeError, match=r"given \['model', 'x'\]"):
        supply("steps", model=None, x=1)
    with pytest.raises(TypeError, match="not a built-in kind"):
        supply("augmenters")
    assert supply("steps", model=1) == {"model": 1}


def test_a_training_build_passes_each_kind_exactly_what_injection_declares(
        monkeypatch, tmp_path):
    """Every built-in kind built at a call site (heads by their model) goes through
    ``supply`` with the declared names; the registry's INJECTED is the same table."""
    import zsbir.build as build_mod
    import zsbir.models.net as net
    from zsbir import injection
    from zsbir.registry import INJECTED

    seen: dict[str, set[str]] = {}

    def spy(kind: str, **values: Any) -> dict[str, Any]:
        seen.setdefault(kind, set()).update(values)
        return injection.supply(kind, **values)

    monkeypatch.setattr(build_mod, "supply", spy)
    monkeypatch.setattr(net, "supply", spy)
    raw = apply_overrides(quick(), [
        "protocol.num_classes=4", "protocol.num_unseen=2", "protocol.photos_per_class=2",
        "protocol.sketches_per_class=2", "protocol.image_size=32", "data.image_size=32",
        "model.head.embed_dim=8", "hashers[1].bits=8", "train.batch_size=8",
        "sampler.sketches_per_batch=4", "teacher.name=\"test_watching\"",
        "rerankers=[{name=\"aqe\"}]", "pair_scorer={name=\"maxsim\"}",
        f"run.output_dir={json.dumps(str(tmp_path))}"])
    with registered("teachers", "test_watching", _WatchingTeacher):
        build_mod.build(resolve(raw), "train", tmp_path)
    nested_only = {"backbones", "networks"}  # built inside another: ctx alone
    # built by `zsbir import` (zsbir.import_command) and by `zsbir index build --backend`
    # (zsbir.search.backends.make_backend), not by a run
    elsewhere = {"importers", "index_backends"}
    assert seen == {k: set(v - {"ctx"}) for k, v in injection.SUPPLIED.items()
                    if k not in nested_only | elsewhere}
    assert all(injection.SUPPLIED[k] == {"ctx"} for k in nested_only)
    assert dict(INJECTED) == dict(injection.SUPPLIED)


class Weighted:
    """A test hasher whose own parameter is called ``weight``."""

    def __init__(self, weight: float = 1.0):
        self.weight = weight


def test_weight_is_reserved_for_losses_only():
    raw = quick()
    raw["optimizer"]["weight"] = 2.0
    assert any(p.startswith("optimizer.weight: unknown parameter") for p in problems(raw))
    with registered("hashers", "test_weighted", Weighted):
        raw = quick()
        raw["hashers"] = [{"name": "test_weighted", "weight": 0.25}]
        m = resolve(raw)
        assert m.hashers == [{"name": "test_weighted", "weight": 0.25}]
        built = build_component("hashers", m.hashers[0], BuildContext())
    assert built.weight == 0.25  # passed on: not dropped as a loss's weight would be
    loss = resolve(quick()).losses[0]
    assert loss["weight"] == 1.0  # the toolkit's, not ce's: building must not pass it
    build_component("losses", {**loss, "weight": 3.0}, BuildContext())


# ------------------------------------------------------------------ [model]
def test_backbone_shorthand_is_model_backbone():
    short = quick()
    long = quick()
    long["model"]["backbone"] = long.pop("backbone")
    a, b = resolve(short), resolve(long)
    assert a.data == b.data and "backbone" not in a.data
    assert a.model["name"] == "backbone_head" and a.backbone == a.model["backbone"]
    assert a.head == a.model["head"] and a.head["name"] == "stacked"
    # problems inside the shorthand keep the path the manifest wrote
    short["backbone"]["pretrianed"] = True
    long["model"]["backbone"]["pretrianed"] = True
    assert "backbone.pretrianed: unknown parameter; did you mean 'pretrained'?" in problems(short)
    assert ("model.backbone.pretrianed: unknown parameter; did you mean 'pretrained'?"
            in problems(long))


def test_backbone_given_twice_is_an_error():
    raw = quick()
    raw["model"]["backbone"] = {"name": "resnet18", "pretrained": False}
    assert any(p.startswith("backbone: given twice: [backbone] is shorthand for "
                            "[model.backbone]") for p in problems(raw))


def towers_manifest() -> dict[str, Any]:
    raw = quick()
    bb = raw.pop("backbone")
    raw["model"] = {"name": "towers", "sketch": dict(bb), "photo": dict(bb),
                    "head": raw["model"]["head"]}
    return raw


def test_towers_manifest_resolves_and_round_trips():
    raw = towers_manifest()
    raw["teacher"] = {"name": "online"}
    raw["model"]["photo"]["pretrained"] = True
    m = resolve(raw)
    assert set(m.model) == {"name", "sketch", "photo", "head"}
    # the teacher network's default backbone is (a copy of) the photo tower's table
    assert m.teacher["network"]["backbone"] == m.model["photo"] == m.backbone
    again = resolve(tomllib.loads(m.to_toml()))
    assert again.data == m.data and "[model.sketch]" in m.to_toml()
    raw = towers_manifest()
    raw["backbone"] = {"name": "resnet18"}
    assert any(p.startswith("backbone: [backbone] is shorthand for [model.backbone], but "
                            "model 'towers' takes no backbone table") for p in problems(raw))
    raw = towers_manifest()
    del raw["model"]["sketch"]
    raw["model"]["photo"]["depth"] = 3
    text = "\n".join(problems(raw))
    assert "model.sketch: required: a [model.sketch] table" in text
    assert "model.photo.depth: unknown parameter" in text


def test_old_model_table_without_a_name_is_backbone_head():
    raw = quick()
    assert "name" not in raw["model"]
    assert resolve(raw).model["name"] == "backbone_head"


# ------------------------------------------------------------------ towers
class Tiny(Backbone):
    """A 2x2-pixel test backbone: flatten + linear, with an input configuration."""

    def __init__(self, mean: float = 0.5, feat: int = 6):
        super().__init__()
        self.num_features = feat
        self.body = nn.Linear(12, feat)
        from zsbir.models.backbone import PretrainedCfg

        self.pretrained_cfg = PretrainedCfg(mean=(mean,) * 3, std=(0.25,) * 3,
                                            interpolation="bicubic")

    def forward(self, x: torch.Tensor, domain: torch.Tensor | None = None) -> torch.Tensor:
        return self.body(x.flatten(1))


def test_towers_route_each_image_by_its_domain_bit():
    torch.manual_seed(0)
    sketch, photo = Tiny(0.1), Tiny(0.9)
    model = Towers(sketch, photo, functools.partial(StackedHead, embed_dim=4), num_classes=3)
    x = torch.randn(5, 3, 2, 2)
    domain = torch.tensor([SKETCH, PHOTO, PHOTO, SKETCH, PHOTO])
    out = model(x, domain)
    expect = torch.stack([(sketch if d == SKETCH else photo)(x[i:i + 1])[0]
                          for i, d in enumerate(domain.tolist())])
    torch.testing.assert_close(out["features"], expect)
    torch.testing.assert_close(out["embedding"], model.head(expect)["embedding"])
    out["embedding"].sum().backward()  # both towers learn from a mixed batch
    assert sketch.body.weight.grad.abs().sum() > 0 and photo.body.weight.grad.abs().sum() > 0
    one = model(x[:2], torch.tensor([PHOTO, PHOTO]))  # one domain: one tower runs
    torch.testing.assert_close(one["features"], photo(x[:2]))
    assert model.input_config("sketch").mean == (0.1,) * 3
    assert model.input_config("photo") == InputConfig(None, (0.9,) * 3, (0.25,) * 3, "bicubic")
    with pytest.raises(ValueError, match="same width"):
        Towers(Tiny(feat=6), Tiny(feat=7), functools.partial(StackedHead, embed_dim=4))


def test_transforms_are_built_and_applied_per_domain():
    model = Towers(Tiny(0.1), Tiny(0.9), functools.partial(StackedHead, embed_dim=4),
                   num_classes=3)
    m = resolve(quick())
    train, ev = transforms_for(m, model)
    assert isinstance(train, DomainTransforms) and train.sketch.train and not ev.photo.train
    assert ev.for_domain("sketch").mean == (0.1,) * 3 and ev.for_domain(PHOTO).mean == (0.9,) * 3
    assert ev.sketch.size == ev.photo.size == m.data_cfg.image_size
    assert ev.describe() == {"photo": ev.photo.describe(), "sketch": ev.sketch.describe()}
    images = torch.randint(0, 256, (4, 3, 2, 2), dtype=torch.uint8)
    domain = torch.tensor([SKETCH, PHOTO, SKETCH, PHOTO])
    batch = {"image": images, "domain": domain, "index": torch.arange(4),
             "label": torch.zeros(4, dtype=torch.int64)}
    out = to_device(batch, torch.device("cpu"), ev)["image"]
    for i, d in enumerate(domain.tolist()):  # the naive reference, row by row
        ref = to_device({k: v[i:i + 1] for k, v in batch.items()}, torch.device("cpu"),
                        ev.for_domain(d))["image"][0]
        torch.testing.assert_close(out[i], ref)
    # both domains alike (backbone_head): one transform, as before (same cache keys)
    same = transforms_for(m, BackboneHead(Tiny(0.3), functools.partial(
        StackedHead, embed_dim=4), num_classes=3))[1]
    assert same.same and same.describe() == same.photo.describe()
    assert isinstance(same.for_domain(SKETCH), Transform)
    torch.testing.assert_close(to_device(batch, torch.device("cpu"), same)["image"],
                               to_device(batch, torch.device("cpu"), same.photo)["image"])


def test_a_towers_run_trains_and_evaluates(tmp_path):
    from zsbir.engine.run import run_experiment
    from zsbir.manifest import apply_overrides

    raw = apply_overrides(towers_manifest(), [
        f"run.output_dir=\"{tmp_path}\"", "data.image_size=32", "data.workers=0",
        "model.head.embed_dim=8", "hashers[1].bits=8", "train.epochs=1",
        "train.max_steps_per_epoch=2", "evaluation.grid_queries=0"])
    results = run_experiment(resolve(raw))
    assert results["train"]["global_steps"] == 2
    saved = torch.load(tmp_path / "quickstart/checkpoints/final.pt", weights_only=True)
    assert any(k.startswith("sketch.") for k in saved["model"])
    assert any(k.startswith("photo.") for k in saved["model"])
