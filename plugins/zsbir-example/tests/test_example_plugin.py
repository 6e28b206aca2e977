"""The example plugin's loss against a naive loop, and its registration via entry points."""

import importlib.metadata as md

import pytest
import torch
from zsbir_example.losses import CrossDomainTriplet

from zsbir.testing import assert_contract, contract_cases


def naive(emb, labels, domains, margin):
    emb = torch.nn.functional.normalize(emb.double(), dim=1)
    terms = []
    for i in range(len(emb)):
        if domains[i] != 1:
            continue
        pos = [torch.dist(emb[i], emb[j]) for j in range(len(emb))
               if domains[j] == 0 and labels[j] == labels[i]]
        neg = [torch.dist(emb[i], emb[j]) for j in range(len(emb))
               if domains[j] == 0 and labels[j] != labels[i]]
        if pos and neg:
            terms.append(max(max(pos) - min(neg) + margin, torch.tensor(0.0)))
    return torch.stack(terms).mean() if terms else torch.tensor(0.0)


@pytest.mark.parametrize("seed", range(5))
def test_matches_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(24, 8, generator=g)
    labels = torch.randint(0, 4, (24,), generator=g)
    domains = torch.randint(0, 2, (24,), generator=g)
    loss = CrossDomainTriplet(margin=0.3)
    got = loss({"embedding": emb}, {"label": labels, "domain": domains}, None)
    assert torch.allclose(got.double(), naive(emb, labels, domains, 0.3), atol=1e-5)


def test_no_sketches_gives_zero_with_gradient():
    emb = torch.randn(4, 3, requires_grad=True)
    out = CrossDomainTriplet()({"embedding": emb},
                               {"label": torch.tensor([0, 1, 0, 1]),
                                "domain": torch.zeros(4, dtype=torch.long)}, None)
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(emb.grad).all()


def test_registered_through_entry_point():
    eps = md.entry_points(group="zsbir.losses")
    assert "cross_domain_triplet" in {ep.name for ep in eps}
    from zsbir.registry import losses

    comp = losses.component("cross_domain_triplet")
    assert comp.obj is CrossDomainTriplet
    assert comp.package == "zsbir-example"


def test_used_from_a_manifest(tmp_path):
    """A manifest names the plugin's loss beside a built-in one; the run trains with it."""
    import json
    from pathlib import Path

    from zsbir.engine.run import run_experiment
    from zsbir.manifest import apply_overrides, load, resolve

    quickstart = Path(__file__).resolve().parents[3] / "examples" / "quickstart.toml"
    raw = load(quickstart)
    raw["losses"].append({"name": "cross_domain_triplet", "margin": 0.3, "weight": 0.5})
    raw = apply_overrides(raw, [
        f"run.output_dir={json.dumps(str(tmp_path))}", "protocol.num_classes=6",
        "protocol.num_unseen=2", "protocol.photos_per_class=4", "protocol.sketches_per_class=4",
        "protocol.image_size=32", "data.image_size=32", "data.workers=0", "model.head.embed_dim=8",
        "train.epochs=1", "train.batch_size=8", "sampler.sketches_per_batch=4",
        "hashers[1].bits=8", "evaluation.grid_queries=0"])
    m = resolve(raw)
    assert m.losses[1] == {"name": "cross_domain_triplet", "weight": 0.5, "margin": 0.3,
                           "normalize": True}
    results = run_experiment(m)
    loss = results["train"]["history"][0]["loss"]
    assert loss["cross_domain_triplet"] >= 0 and "ce" in loss


# zsbir's contract suite over every component this distribution registers (one test id per
# kind/name): a loss must return a finite scalar with gradients on random outputs, ...
CONTRACT_CASES = contract_cases(dist="zsbir-example")


@pytest.mark.parametrize(("kind", "name"), CONTRACT_CASES)
def test_zsbir_contract(kind, name):
    assert_contract(kind, name)


def test_the_contract_suite_sees_this_plugin():
    assert [p.id for p in CONTRACT_CASES] == ["losses/cross_domain_triplet"]
