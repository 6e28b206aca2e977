"""Unreadable images met during a run are reported with their path and skipped (counted in
log.txt and metrics.json), or fail the run when data.on_corrupt = "fail"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from zsbir.data.base import PHOTO, SKETCH
from zsbir.data.loading import CorruptImageError
from zsbir.data.synthetic import render
from zsbir.engine.run import run_experiment
from zsbir.manifest import apply_overrides, load, resolve

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CLASSES = ["alpha", "beta", "gamma", "delta", "epsilon"]


def make_tree(root: Path) -> list[Path]:
    for c, name in enumerate(CLASSES):
        for domain, folder in ((PHOTO, "photo"), (SKETCH, "sketch")):
            d = root / folder / name
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(render(c, domain, i, 0, 32)).save(d / f"{i}.png")
    bad = [root / "photo" / "alpha" / "broken.png", root / "photo" / "epsilon" / "trunc.jpg"]
    bad[0].write_bytes(b"this is not an image at all")
    jpeg = root / "photo" / "epsilon" / "0.png"
    Image.open(jpeg).save(bad[1], format="JPEG")
    bad[1].write_bytes(bad[1].read_bytes()[:60])  # truncated
    return bad


def manifest(tmp_path: Path, on_corrupt: str):
    raw = load(EXAMPLES / "quickstart.toml")
    raw["protocol"] = {"name": "folder", "root": str(tmp_path / "data"),
                       "unseen": ["epsilon", "delta"], "val_fraction": 0.0}
    raw = apply_overrides(raw, [
        f"run.output_dir={json.dumps(str(tmp_path / 'runs'))}", f"run.name={on_corrupt}",
        "data.image_size=32", "data.workers=0", "train.epochs=1", "train.batch_size=8",
        "sampler.sketches_per_batch=4", "model.head.embed_dim=8", "hashers[1].bits=8",
        f"data.on_corrupt={json.dumps(on_corrupt)}", "evaluation.grid_queries=0"])
    return resolve(raw)


@pytest.mark.slow
def test_corrupt_images_are_reported_and_skipped(tmp_path):
    bad = make_tree(tmp_path / "data")
    results = run_experiment(manifest(tmp_path, "skip"))
    files = {f["path"] for f in results["skipped_images"]["files"]}
    # every bad file is listed (the training one once per time it was drawn)
    assert {str(p) for p in bad} == files
    metrics = json.loads((tmp_path / "runs/skip/metrics.json").read_text())
    assert metrics["skipped_images"]["count"] >= 2
    log = (tmp_path / "runs/skip/log.txt").read_text()
    assert "broken.png" in log
    # the gallery lost exactly the unreadable photo: 2 classes x 4 photos + 1 bad - 1
    assert metrics["num_gallery"] == 8


def test_corrupt_image_fails_the_run_when_asked(tmp_path):
    make_tree(tmp_path / "data")
    with pytest.raises(CorruptImageError, match="broken.png|trunc.jpg"):
        run_experiment(manifest(tmp_path, "fail"))
