"""``zsbir export`` (issue 27, point 3) and the model cards.

The exported model must give zsbir's own embeddings: images preprocessed as ``model.json``
says (in numpy and PIL, not zsbir's loader) and run under onnxruntime / ``torch.jit.load``
match :meth:`TrainedModel.embed_images` (the photo search's path) to 1e-5, sketches and
photos, at two batch sizes; models that read the domain bit (a conditional CSE-ResNet,
``towers``) take it as an input and match on mixed batches.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from zsbir.cli import main
from zsbir.data.base import PHOTO, SKETCH
from zsbir.data.loading import DomainTransforms, Transform
from zsbir.data.synthetic import render
from zsbir.engine.index import load_trained
from zsbir.export.card import CARD, IMPORT_NOTE, model_card

#: torch 2.14 deprecates TorchScript (torch.jit.save/load) in favour of torch.export
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning"),
              pytest.mark.slow]

BATCH_SIZES = (3, 7)
_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
            "lanczos": Image.LANCZOS}


def invoke(*args: object) -> tuple[int, str, str]:
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def images(domain: int, n: int, size: int = 48) -> list[Image.Image]:
    """Synthetic images at another size than the model's (the resize is tested too)."""
    return [Image.fromarray(render(i % 8, domain, i, 3, size)) for i in range(n)]


def preprocess(ims: list[Image.Image], cfg: dict) -> np.ndarray:
    """What model.json's ``preprocessing`` says, without zsbir."""
    s = cfg["size"]
    arr = np.stack([np.asarray(im.convert("RGB").resize((s, s), _FILTERS[cfg["interpolation"]]),
                               dtype=np.uint8) for im in ims])
    x = arr.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(cfg["mean"], np.float32)) / np.asarray(cfg["std"], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


@pytest.fixture(scope="module")
def tiny_copy(tiny_run, tmp_path_factory) -> Path:
    """The session's tiny run, copied (exports write into it)."""
    dst = tmp_path_factory.mktemp("export-run") / "run"
    shutil.copytree(tiny_run, dst)
    return dst


@pytest.fixture(scope="module")
def reference(tiny_run):
    """zsbir's embeddings of decoded images (the photo search's path)."""
    trained = load_trained(tiny_run, "cpu")
    return lambda ims, domain: trained.embed_images(ims, domain)


def test_onnx_export_matches_zsbir_embeddings(tiny_copy, reference):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import onnx

    code, out, err = invoke("export", tiny_copy, "--format", "onnx")
    assert code == 0, err
    folder = tiny_copy / "export" / "onnx"
    assert sorted(p.name for p in folder.iterdir()) == [CARD, "model.json", "model.onnx"]
    info = json.loads((folder / "model.json").read_text())
    assert info["embed_dim"] == 16 and info["output"]["shape"] == ["batch", 16]
    assert not info["domain_input"] and [i["name"] for i in info["inputs"]] == ["image"]
    assert set(info["input_config"]) == {"sketch", "photo"}
    assert info["input_config"]["sketch"]["size"] == 32
    meta = {p.key: p.value for p in onnx.load(str(folder / "model.onnx")).metadata_props}
    assert json.loads(meta["input_config"]) == info["input_config"]
    assert json.loads(meta["embed_dim"]) == 16 and meta["format"] == "onnx"
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    assert inp.name == "image" and isinstance(inp.shape[0], str)  # dynamic batch
    for domain, name in ((SKETCH, "sketch"), (PHOTO, "photo")):
        for n in BATCH_SIZES:
            ims = images(domain, n)
            got = session.run(["embedding"],
                              {"image": preprocess(ims, info["input_config"][name])})[0]
            assert got.shape == (n, 16)
            np.testing.assert_allclose(got, reference(ims, domain),
                                       rtol=1e-5, atol=1e-5)
    card = (folder / CARD).read_text()
    for section in ("## Method and components", "## Data and split", "## Training settings",
                    "## Metrics", "## Source checkpoint", "## Export", "## Versions",
                    "## Intended use", "## Limitations"):
        assert section in card
    assert "onnxruntime" in card and "model.onnx" in card


def test_torchscript_export_matches_zsbir_embeddings(tiny_copy, reference, tmp_path):
    code, _, err = invoke("export", tiny_copy, "--format", "torchscript", "-o", tmp_path / "ts")
    assert code == 0, err
    info = json.loads((tmp_path / "ts" / "model.json").read_text())
    extra = {"zsbir.json": ""}
    module = torch.jit.load(str(tmp_path / "ts" / "model.pt"), _extra_files=extra)
    assert json.loads(extra["zsbir.json"])["input_config"] == info["input_config"]
    for domain, name in ((SKETCH, "sketch"), (PHOTO, "photo")):
        for n in BATCH_SIZES:
            ims = images(domain, n)
            with torch.inference_mode():
                got = module(torch.from_numpy(preprocess(ims, info["input_config"][name])))
            np.testing.assert_allclose(got.numpy(), reference(ims, domain),
                                       rtol=1e-5, atol=1e-5)
    # --normalize: the same ranking, unit rows
    code, _, err = invoke("export", tiny_copy, "--format", "torchscript", "--normalize",
                          "-o", tmp_path / "norm")
    assert code == 0, err
    module = torch.jit.load(str(tmp_path / "norm" / "model.pt"))
    ims = images(SKETCH, 3)
    with torch.inference_mode():
        got = module(torch.from_numpy(preprocess(ims, info["input_config"]["sketch"])))
    ref = reference(ims, SKETCH)
    np.testing.assert_allclose(got.numpy(), ref / np.linalg.norm(ref, axis=1, keepdims=True),
                               rtol=1e-5, atol=1e-5)


def _cse_model() -> torch.nn.Module:
    from zsbir.models.cse_resnet import CSEResNet
    from zsbir.models.heads import StackedHead
    from zsbir.models.net import BackboneHead

    torch.manual_seed(0)
    backbone = CSEResNet(conditional=True, layers=(1, 1, 1, 1))
    for name, p in backbone.named_parameters():  # zero at init: make the bit matter
        if name.endswith("fc2_domain"):
            torch.nn.init.normal_(p, std=2.0)
    return BackboneHead(backbone, StackedHead(backbone.num_features, 3, embed_dim=8))


def _towers_model() -> torch.nn.Module:
    from zsbir.models.cse_resnet import CSEResNet
    from zsbir.models.heads import StackedHead
    from zsbir.models.net import Towers

    torch.manual_seed(0)
    sketch = CSEResNet(conditional=False, layers=(1, 1, 1, 1))
    photo = CSEResNet(conditional=False, layers=(1, 1, 1, 1))
    return Towers(sketch, photo, StackedHead(photo.num_features, 3, embed_dim=8))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("build", [_cse_model, _towers_model], ids=["cse", "towers"])
def test_models_that_read_the_domain_take_it_as_an_input(build, fmt, tmp_path):
    from zsbir.export.embedding import export_model

    if fmt == "onnx":
        pytest.importorskip("onnx")
        ort = pytest.importorskip("onnxruntime")
    model = build().eval()
    # the towers' domains normalized differently: model.json gives each its own
    transforms = DomainTransforms(photo=Transform(size=32),
                                  sketch=Transform(size=32, mean=(0.5,) * 3, std=(0.25,) * 3))
    path = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt")
    info = export_model(model, transforms, fmt, path)
    assert info["domain_input"] and [i["name"] for i in info["inputs"]] == ["image", "domain"]
    assert info["input_config"]["sketch"]["mean"] == [0.5] * 3
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(x, d):
            return session.run(["embedding"], {"image": x.numpy(), "domain": d.numpy()})[0]
    else:
        loaded = torch.jit.load(str(path))

        def run(x, d):
            with torch.inference_mode():
                return loaded(x, d).numpy()
    g = torch.Generator().manual_seed(5)
    for n in BATCH_SIZES:
        x = torch.randn(n, 3, 32, 32, generator=g)
        for d in (torch.full((n,), SKETCH), torch.full((n,), PHOTO), torch.arange(n) % 2):
            with torch.inference_mode():
                ref = model(x, d)["embedding"].numpy()
            np.testing.assert_allclose(run(x, d.long()), ref, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # the bit changes the embedding: it is really read
        x = torch.randn(2, 3, 32, 32, generator=g)
        assert not np.allclose(run(x, torch.zeros(2, dtype=torch.long)),
                               run(x, torch.ones(2, dtype=torch.long)))


# ------------------------------------------------------------------------------ errors
def one_error_line(stderr: str, *parts: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert all(p in lines[0] for p in parts), stderr


def test_errors_are_one_line_with_the_documented_status(tiny_copy, tmp_path, monkeypatch):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    code, _, err = invoke("export", empty, "--format", "torchscript")
    assert code == 1
    one_error_line(err, "has no checkpoints/final.pt")
    code, _, err = invoke("export", tiny_copy, "--format", "tflite")
    assert code == 2
    one_error_line(err, "tflite", "export --help")
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)  # not installed
    code, _, err = invoke("export", tiny_copy, "--format", "onnx", "-o", tmp_path / "x")
    assert code == 1
    one_error_line(err, "pip install 'zsbir[export]'")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------- model cards
def test_every_run_directory_has_a_model_card(tiny_run):
    card = (tiny_run / CARD).read_text()
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert "backbone `resnet18` (random init)" in card and "`model.head` | `stacked`" in card
    assert "5 seen (trained on), 3 unseen" in card
    for name, entry in metrics["results"]["synthetic"]["real"].items():
        assert f"| synthetic | real | {name} | {entry['value']:.4f} |" in card
        assert f"- `{name}`: {entry['formula']}" in card
    assert f"torch {metrics['versions']['torch']}" in card
    assert "| sketch | 1 | 32 |" in card  # the input configuration per domain
    assert "Trained by zsbir in this run" in card and "`synthetic` shapes" in card


def test_an_imported_models_card_names_its_source(tiny_run, tmp_path):
    """The importers' hook: ``import.json`` (what ``zsbir import`` writes: any JSON object)
    in the run directory; scores from ``zsbir evaluate RUN_DIR`` (``eval/*/metrics.json``)."""
    (tmp_path / "manifest.resolved.toml").write_text(
        (tiny_run / "manifest.resolved.toml").read_text())
    note = {"importer": "sake", "source": "/models/model_best.pth.tar", "size": 1234,
            "sha256": "ab" * 32, "epoch": 12, "versions": {"torch": "9.9"}}
    (tmp_path / IMPORT_NOTE).write_text(json.dumps(note))
    card = model_card(tmp_path)
    assert "- importer: sake" in card and f"- sha256: {'ab' * 32}" in card
    assert "- source: /models/model_best.pth.tar" in card and "- import: torch 9.9" in card
    assert "Trained elsewhere" in card and "Not scored yet" in card
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    metrics["evaluated"] = {"protocol": {"name": "synthetic"}, "cross_protocol": False,
                            "hashers": "as fitted in training", "overrides": []}
    (tmp_path / "eval" / "synthetic").mkdir(parents=True)
    (tmp_path / "eval" / "synthetic" / "metrics.json").write_text(json.dumps(metrics))
    card = model_card(tmp_path)
    assert "### Scored by `zsbir evaluate` on synthetic" in card
    value = metrics["results"]["synthetic"]["real"]["map@all"]["value"]
    assert f"| synthetic | real | map@all | {value:.4f} |" in card
    assert "5 seen (trained on), 3 unseen" in card and "Not scored yet" not in card
