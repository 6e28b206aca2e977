"""A worker process for tests/test_distributed.py (not a test module itself).

``python tests/ddp_worker.py primitives OUT_DIR`` under RANK/WORLD_SIZE/MASTER_* checks
the collective helpers of zsbir.engine.distributed against single-process references and
exits non-zero (with the assertion) on any mismatch.

``python tests/ddp_worker.py extra_params OUT_DIR`` trains a few steps of a tiny run whose
step and loss each hold a trainable parameter (registered here, as a plugin would) and
writes this rank's values of them to ``OUT_DIR/rank{R}.pt``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn


def primitives(out: Path) -> None:
    from zsbir.engine import distributed as D

    env = D.init_distributed("cpu")
    r, w = env.rank, env.world
    assert env.backend == "gloo" and D.world_size() == w and D.is_main() == (r == 0)

    # variable-length gather, in rank order, numpy and tensors
    parts = [np.arange((k + 1) * 6, dtype=np.float32).reshape(-1, 2) + 100 * k
             for k in range(w)]
    got = D.gather_concat(parts[r])
    np.testing.assert_array_equal(got, np.concatenate(parts))
    got_t = D.gather_concat(torch.from_numpy(parts[r]).long())
    assert torch.equal(got_t, torch.from_numpy(np.concatenate(parts)).long())
    empty = D.gather_concat(np.zeros((0 if r == 0 else 2, 3), np.int64))
    assert empty.shape == (2 * (w - 1), 3)
    assert D.broadcast_object({"from": r, "list": [r] * 3}) == {"from": 0, "list": [0, 0, 0]}
    means = D.mean_across_ranks({"a": torch.tensor(float(r)), "b": torch.tensor(2.0)})
    assert abs(float(means["a"]) - (w - 1) / 2) < 1e-6 and float(means["b"]) == 2.0

    assert D.all_ranks(True) and not D.all_ranks(r != 0)
    assert D.gather_objects(("x", r)) == [("x", k) for k in range(w)]
    rows = D.gather_rows(None if r == 0 else torch.full((2, 3), float(r)))
    assert rows.shape == (2 * (w - 1), 3) and float(rows[0, 0]) == 1.0
    assert D.gather_rows(None) is None

    # CpuSyncBatchNorm on a slice == BatchNorm on the global batch (values and gradients)
    g = torch.Generator().manual_seed(0)
    x_all = torch.randn(8, 3, 4, 4, generator=g) * 3 + 1
    upstream = torch.randn(8, 3, 4, 4, generator=g)
    ref = nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=g)
        ref.bias.uniform_(-1, 1, generator=g)
    bn = D.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), torch.device("cpu"))[0]
    assert isinstance(bn, D.CpuSyncBatchNorm)
    bn.load_state_dict(ref.state_dict())
    x_ref = x_all.clone().requires_grad_(True)
    y_ref = ref(x_ref)  # one training-mode call: one running-statistics update
    (y_ref * upstream).sum().backward()
    sl = D.shard_range(8, r, w)
    x = x_all[sl.start:sl.stop].clone().requires_grad_(True)
    y = bn(x)
    (y * upstream[sl.start:sl.stop]).sum().backward()
    np.testing.assert_allclose(y.detach(), y_ref[sl.start:sl.stop].detach(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x.grad, x_ref.grad[sl.start:sl.stop], rtol=1e-4, atol=1e-5)
    gw = D.gather_concat(bn.weight.grad[None]).sum(0)  # each rank holds its share
    np.testing.assert_allclose(gw, ref.weight.grad, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var, ref.running_var, rtol=1e-5, atol=1e-6)

    # timm's BatchNormAct2d (EfficientNet-Lite's): synchronized, activation kept
    from timm.layers.norm_act import BatchNormAct2d

    ref_act = BatchNormAct2d(3, act_layer=nn.ReLU)
    ref_act.load_state_dict(ref.state_dict())
    ref_act.running_mean.zero_()
    ref_act.running_var.fill_(1)
    act = D.convert_sync_batchnorm(nn.Sequential(BatchNormAct2d(3, act_layer=nn.ReLU)),
                                   torch.device("cpu"))[0]
    act.load_state_dict(ref_act.state_dict())
    assert isinstance(act, BatchNormAct2d) and type(act) is not BatchNormAct2d
    y_act_ref = ref_act(x_all)
    y_act = act(x_all[sl.start:sl.stop])
    assert (y_act >= 0).all() and (y_act == 0).any()  # the ReLU is applied
    np.testing.assert_allclose(y_act.detach(), y_act_ref[sl.start:sl.stop].detach(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(act.running_var, ref_act.running_var, rtol=1e-5, atol=1e-6)

    # DDP with the slice-weighting hook: an uneven trailing batch (5 items over 2 ranks)
    # gives every rank the gradient of the whole batch's mean loss
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    single = nn.Linear(4, 2)
    single.load_state_dict(model.state_dict())
    xb, yb = torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)
    nn.functional.mse_loss(single(xb), yb).backward()
    ddp, state = D.wrap_ddp(model, torch.device("cpu"))
    idx = D.shard_batch(np.arange(5), r, w)
    state.weight = D.slice_weight(5, len(idx), w)
    nn.functional.mse_loss(ddp(xb[idx]), yb[idx]).backward()
    for p, q in zip(model.parameters(), single.parameters()):
        np.testing.assert_allclose(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    # a trained parameter outside the model (a loss's): averaged by its own hook
    scale = nn.Parameter(torch.tensor(2.0))
    D.sync_extra_params([scale], state)
    (scale * xb[idx].sum() / 5 * w / state.weight).backward()  # local share of the sum
    np.testing.assert_allclose(float(scale.grad), float(xb.sum() / 5), rtol=1e-5)
    (out / f"rank{r}.json").write_text(json.dumps({"ok": True, "rank": r}))
    del ddp, state
    D.shutdown()


def extra_params(out: Path) -> None:
    """A few training steps with a trainable scale held by the step and a temperature held
    by a loss, both initialized differently on each rank (as a component seeding itself
    per process might); each rank saves their final values."""
    from zsbir.build import build
    from zsbir.engine import distributed as D
    from zsbir.engine.step import DefaultStep, StepContext
    from zsbir.engine.trainer import Trainer
    from zsbir.losses.classification import CrossEntropy
    from zsbir.manifest import apply_overrides, load, resolve
    from zsbir.registry import get_registry

    env = D.init_distributed("cpu")

    class ScaledStep(nn.Module):
        """The default step on logits times a trainable scale (``step.scale``)."""

        provides = DefaultStep.provides

        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1.0 + env.rank))

        def forward(self, s: StepContext, batch: dict) -> dict:
            forward = s.forward

            def scaled(image: torch.Tensor, domain: torch.Tensor) -> dict:
                o = forward(image, domain)
                return {**o, "logits": o["logits"] * self.scale}

            return DefaultStep()(StepContext(**{**vars(s), "forward": scaled}), batch)

    class TemperedCE(CrossEntropy):
        """Cross-entropy of logits times exp(a trainable ``log_t``)."""

        def __init__(self) -> None:
            super().__init__()
            self.log_t = nn.Parameter(torch.tensor(0.5 * env.rank))

        def forward(self, out: dict, batch: dict, teacher: dict | None) -> torch.Tensor:
            return super().forward({**out, "logits": out["logits"] * self.log_t.exp()},
                                   batch, teacher)

    get_registry("steps").add("test_scaled", ScaledStep, package="zsbir-tests")
    get_registry("losses").add("test_tempered_ce", TemperedCE, package="zsbir-tests")
    root = Path(__file__).resolve().parents[1]
    raw = apply_overrides(load(root / "examples" / "quickstart.toml"), [
        "protocol.num_classes=6", "protocol.num_unseen=2", "protocol.photos_per_class=6",
        "protocol.sketches_per_class=6", "protocol.image_size=32", "data.image_size=32",
        "data.workers=0", "model.head.embed_dim=16", "sampler.sketches_per_batch=4",
        "train.batch_size=8", "train.epochs=1", "train.max_steps_per_epoch=3",
        "train.val_every=0", "train.checkpoint_every=0", "train.step.name=\"test_scaled\"",
        "hashers=[{name=\"none\"}]",
        "losses=[{name=\"test_tempered_ce\"}]", "optimizer={name=\"sgd\", lr=0.05}",
        f"run.output_dir={json.dumps(str(out))}", "run.name=run", "run.device=\"cpu\""])
    exp = build(resolve(raw), "train", out / "run")
    Trainer(exp, out / "run").fit()
    torch.save({"step.scale": exp.step.scale.detach().clone(),
                "losses.log_t": exp.losses[0][2].log_t.detach().clone()},
               out / f"rank{env.rank}.pt")
    D.shutdown()


if __name__ == "__main__":
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    if mode == "primitives":
        primitives(out_dir)
    elif mode == "extra_params":
        extra_params(out_dir)
    else:
        raise SystemExit(f"unknown mode {mode!r} (rank {os.environ.get('RANK')})")
