"""Checkpoints that hold what trains: trainable parameters and buffers plus ``base``, the
frozen weights' reference, checked before loading (zsbir/engine/checkpoint.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zsbir.engine.checkpoint import (
    CheckpointError,
    base_reference,
    frozen_names,
    load_model_checkpoint,
    trainable_state,
)


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    m[0].requires_grad_(False)  # the frozen base
    return m


def test_partial_state_round_trip_and_base_checks(tmp_path):
    weights = tmp_path / "base.pt"
    torch.save(model(0)[0].state_dict(), weights)
    manifest = {"backbone": {"name": "x", "weights": str(weights)}, "losses": []}
    trained = model(0)
    trained[2].weight.data += 1
    trained[1].running_mean += 3  # a buffer: saved
    frozen = frozen_names(trained)
    assert frozen == {"0.weight", "0.bias"}
    state = trainable_state(trained.state_dict(), frozen)
    assert set(state) == set(trained.state_dict()) - frozen
    ckpt = {"model": state, "base": base_reference(trained, manifest, frozen)}
    assert ckpt["base"]["files"][0]["key"] == "backbone.weights"
    assert ckpt["base"]["files"][0]["size"] == weights.stat().st_size

    fresh = model(0)  # built again from the same base
    load_model_checkpoint(fresh, ckpt, manifest, "last.pt")
    for k, v in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k

    other = model(1)  # other frozen weights in memory: refused by the digest
    with pytest.raises(CheckpointError, match="frozen base weights"):
        load_model_checkpoint(other, ckpt, manifest, "last.pt")
    torch.save(model(1)[0].state_dict(), weights)  # the file changed
    with pytest.raises(CheckpointError, match=r"'last.pt'.*base.pt.*changed"):
        load_model_checkpoint(model(0), ckpt, manifest, "last.pt")
    weights.unlink()  # the file is gone
    with pytest.raises(CheckpointError, match=r"base.pt.*is gone"):
        load_model_checkpoint(model(0), ckpt, manifest, "last.pt")
    # a self-contained checkpoint (final.pt) loads whole, without a base
    whole = model(2)
    load_model_checkpoint(whole, {"model": trained.state_dict()}, manifest)
    assert torch.equal(whole[0].weight, trained[0].weight)
