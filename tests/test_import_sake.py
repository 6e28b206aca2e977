"""``zsbir import sake`` (issue 27, point 1): a checkpoint in the SAKE authors' format,
written here from zsbir's own model with random weights (no authors' code needed; the
parity with their code is benchmarks/sake_import_parity.py), becomes a run directory whose
model computes the same embeddings, with the domain bit mapped; other files are refused in
one line; the run directory serves ``zsbir index build`` and ``zsbir search``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from zsbir.cli import main
from zsbir.data.base import PHOTO, SKETCH
from zsbir.data.classnames import class_split, read_class_list
from zsbir.engine.index import load_trained
from zsbir.importers import ImportFormatError
from zsbir.importers.sake import SakeImporter
from zsbir.models.cse_resnet import cse_resnet50
from zsbir.models.heads import StackedHead
from zsbir.models.net import BackboneHead

BLOCK = re.compile(r"^(backbone\.layer[1-4]\.\d+\.se_module)\.(fc[12])\.(weight|bias)$")


def random_zsbir_sake(seed: int = 0, num_classes: int = 100, dim: int = 64) -> BackboneHead:
    """zsbir's SAKE model (cse_resnet50 + stacked 64-d head with an ImageNet head), every
    parameter and BatchNorm statistic random (the domain columns too, so the bit matters)."""
    torch.manual_seed(seed)
    model = BackboneHead(cse_resnet50(pretrained=False),
                         lambda **kw: StackedHead(**kw, embed_dim=dim, imagenet_head="random"),
                         num_classes=num_classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("fc2_domain"):
                t.copy_(torch.randn(t.shape, generator=g))
            elif name.endswith("running_mean") or (name.endswith(".bias") and ".bn" in name):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith("running_var") or (name.endswith(".weight") and ".bn" in name):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
    return model.eval()


def to_authors_format(model: BackboneHead, seen_authors: list[str], seen_sorted: list[str]
                      ) -> dict[str, torch.Tensor]:
    """The inverse of the importer's mapping: nn.DataParallel(CSEResnetModel_KDHashing)'s
    state_dict keys and layouts, their tag t = 1 - zsbir's bit (fc2's last column w = -w',
    bias b = b' - w)."""
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, t in sd.items():
        m = BLOCK.match(k)
        if k.endswith("fc2_domain"):
            continue
        if m is not None:
            block, fc, what = m.groups()
            inner = block.removeprefix("backbone.")
            if fc == "fc1":
                out[f"module.original_model.{inner}.fc1.{what}"] = (
                    t.flatten(1) if what == "weight" else t)
            else:
                col = -sd[f"{block}.fc2_domain"]
                if what == "weight":
                    out[f"module.original_model.{inner}.fc2.weight"] = torch.cat(
                        [t.flatten(1), col[:, None]], 1)
                else:
                    out[f"module.original_model.{inner}.fc2.bias"] = t - col
        elif k.startswith("backbone."):
            out["module.original_model." + k.removeprefix("backbone.")] = t
        elif k.startswith("head.embed."):
            out["module.original_model.second_last_linear." + k.rsplit(".", 1)[1]] = t
        elif k.startswith("head.imagenet_head."):
            out["module.original_model.last_linear." + k.rsplit(".", 1)[1]] = t
        elif k.startswith("head.classifier."):
            rows = [seen_sorted.index(c) for c in seen_authors]
            out["module.linear." + k.rsplit(".", 1)[1]] = t[rows]
        else:
            raise AssertionError(k)
    return out


@pytest.fixture(scope="module")
def sake_file(tmp_path_factory) -> tuple[Path, BackboneHead]:
    model = random_zsbir_sake()
    seen = list(class_split("sketchy", "sk-sh").seen)
    authors = read_class_list("sketchy_sk-sh_sake_train.txt")
    path = tmp_path_factory.mktemp("sake") / "model_best.pth.tar"
    torch.save({"epoch": 17, "arch": "cse_resnet50",
                "state_dict": to_authors_format(model, authors, seen),
                "best_acc1": torch.tensor(81.5)}, path)
    return path, model


@pytest.fixture(scope="module")
def imported(sake_file, tmp_path_factory) -> Path:
    path, _ = sake_file
    out = tmp_path_factory.mktemp("runs") / "sake_sketchy"
    res = CliRunner().invoke(main, ["import", "sake", str(path), "--protocol", "sketchy_ext",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_import_writes_an_ordinary_run_directory(imported, sake_file):
    path, _ = sake_file
    for f in ("manifest.resolved.toml", "checkpoints/final.pt", "import.json"):
        assert (imported / f).is_file(), f
    note = json.loads((imported / "import.json").read_text())
    import hashlib

    assert note["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert note["importer"] == "sake" and note["epoch"] == 17 and note["embed_dim"] == 64
    assert note["best_acc1"] == pytest.approx(81.5)
    card = (imported / "MODEL_CARD.md").read_text()  # the run's model card names its source
    assert note["sha256"] in card and "sake" in card
    text = (imported / "manifest.resolved.toml").read_text()
    for part in ('name = "backbone_head"', 'name = "cse_resnet50"', 'name = "stacked"',
                 "embed_dim = 64", 'name = "sketchy_ext"', 'split = "sk-sh"'):
        assert part in text, part
    final = torch.load(imported / "checkpoints/final.pt", weights_only=True)
    assert final["classes"]["seen"] == list(class_split("sketchy", "sk-sh").seen)
    assert final["imported"]["sha256"] == note["sha256"]


def test_imported_model_equals_the_source_in_both_domains(imported, sake_file):
    _, model = sake_file
    trained = load_trained(imported, device="cpu")
    torch.manual_seed(1)
    x = torch.randn(4, 3, 64, 64)
    for domain in (SKETCH, PHOTO):
        d = torch.full((4,), domain)
        with torch.no_grad():
            want = model(x, d)
            got = trained.model(x, d)
        for key in ("embedding", "logits", "imagenet_logits"):
            err = ((got[key] - want[key]).norm() / want[key].norm()).item()
            assert err < 1e-5, (key, domain, err)
    # the domain bit matters (else the mapping would go untested)
    with torch.no_grad():
        s = model(x, torch.full((4,), SKETCH))["embedding"]
        p = model(x, torch.full((4,), PHOTO))["embedding"]
    assert ((s - p).norm() / s.norm()).item() > 1e-2


def test_domain_bit_folding_matches_the_authors_convention():
    """Their fc2 on [r, t] with t = 0 for sketches equals zsbir's fc2 with d = 1."""
    w = torch.randn(8, 3)  # C=8, C/16+1 = 3 (two reduced inputs + the tag)
    b = torch.randn(8)
    state = {"original_model.layer1.0.se_module.fc2.weight": w,
             "original_model.layer1.0.se_module.fc2.bias": b}
    conv = SakeImporter.convert(state, [])
    r = torch.randn(2)
    for t, d in ((0.0, SKETCH), (1.0, PHOTO)):
        theirs = w @ torch.cat([r, torch.tensor([t])]) + b
        ours = (conv["backbone.layer1.0.se_module.fc2.weight"].flatten(1) @ r
                + conv["backbone.layer1.0.se_module.fc2.bias"]
                + d * conv["backbone.layer1.0.se_module.fc2_domain"])
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_a_file_of_another_format_is_refused_in_one_line(tmp_path, imported):
    bad = tmp_path / "other.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, bad)
    res = CliRunner().invoke(main, ["import", "sake", str(bad), "--protocol", "sketchy_ext",
                                    "--out", str(tmp_path / "x")])
    assert res.exit_code == 1
    assert "is not a SAKE checkpoint: expected the authors' save_checkpoint dict" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ImportFormatError, match="not a SAKE checkpoint"):
        SakeImporter()(junk)
    # the other dataset's checkpoint (100 classes) for TU-Berlin (220): named
    with pytest.raises(ImportFormatError, match="other dataset"):
        SakeImporter(protocol="tuberlin_ext")(Path(json.loads(
            (imported / "import.json").read_text())["source"]))
    # as a subprocess: exit status 1, one line, no traceback
    proc = subprocess.run([sys.executable, "-m", "zsbir", "import", "sake", str(bad),
                           "--protocol", "sketchy_ext", "--out", str(tmp_path / "y")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "y").exists()


def test_importers_are_a_registered_kind():
    res = CliRunner().invoke(main, ["list", "importers"])
    assert res.exit_code == 0 and "sake" in res.output
    from zsbir.registry import KINDS, get_registry

    assert "importers" in KINDS and get_registry("importers").get("sake") is SakeImporter


def test_imported_run_serves_index_build_and_search(imported, tmp_path):
    photos = tmp_path / "photos"
    for c, cls in enumerate(("cat", "dog")):
        (photos / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (24, 24), (100 * c, 60 * i, 90)).save(photos / cls / f"{i}.png")
    sketch = tmp_path / "s.png"
    Image.new("RGB", (24, 24), (255, 255, 255)).save(sketch)
    r = CliRunner()
    res = r.invoke(main, ["index", "build", str(imported), str(photos), str(tmp_path / "idx"),
                          "--device", "cpu", "--workers", "0"])
    assert res.exit_code == 0, res.output
    res = r.invoke(main, ["search", str(tmp_path / "idx"), str(sketch), "--json",
                          "--device", "cpu", "--top", "3"])
    assert res.exit_code == 0, res.output
    json.loads(res.output)
    assert "cat" in res.output or "dog" in res.output


def test_imported_run_is_scored_by_evaluate_on_any_protocol(imported):
    """Cross-dataset: the Sketchy-trained import scored on a synthetic class split; its
    own protocol needs the dataset root it was imported without."""
    res = CliRunner().invoke(main, ["evaluate", str(imported)])
    assert res.exit_code == 2 and "give --root DATA" in res.output
    res = CliRunner().invoke(main, [
        "evaluate", str(imported), "--protocol", "synthetic", "--set", "run.device=\"cpu\"",
        "--set", "protocol.num_classes=6", "--set", "protocol.num_unseen=2",
        "--set", "protocol.photos_per_class=2", "--set", "protocol.sketches_per_class=2",
        "--set", "protocol.image_size=32", "--set", "data.workers=0",
        "--set", "evaluation.grid_queries=1"])
    assert res.exit_code == 0, res.output
    ev = json.loads((imported / "eval" / "synthetic" / "metrics.json").read_text())
    assert ev["evaluated"]["cross_protocol"] is True
    assert ev["evaluated"]["imported"]["importer"] == "sake"
    assert ev["classes"]["model_trained_on"] == {"seen": 100, "unseen": 25}
    assert 0 <= ev["results"]["synthetic"]["real"]["map@all"]["value"] <= 1
    assert (imported / "eval" / "synthetic" / "retrievals.png").is_file()
