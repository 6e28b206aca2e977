"""The training loop: batches from the sampler, the registered step, checkpoints,
validation. What happens to one batch is the step's (:mod:`zsbir.engine.step`); the
trainer keeps the loop, mixed precision, schedules, checkpoints and logging.

Non-finite values: the loss terms are checked at every logging step and before every
checkpoint, and the weights before every checkpoint, so a checkpoint only ever holds
finite weights; a run that diverges stops with :class:`DivergedError` naming the step
and the loss terms, leaving ``last.pt`` at the last finite state.

Resumability: the sampler's batches depend only on (seed, epoch), augmentation seeds
only on (seed, epoch, step, position), and every RNG state, the optimizer, the schedule
and the position in the epoch are saved every ``train.checkpoint_every`` steps. A run
killed mid-epoch and resumed from its last checkpoint therefore ends, on CPU, with the
same weights as the uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zsbir.build import Experiment
from zsbir.data.loading import BatchList, ImageDataset, make_loader, to_device, worker_count
from zsbir.data.samplers import batch_tuples
from zsbir.engine import distributed as D
from zsbir.engine import lifecycle as L
from zsbir.engine import threads as T
from zsbir.engine.checkpoint import (
    atomic_save,
    base_reference,
    capture_rng,
    check_base,
    frozen_names,
    load_trainable_state,
    package_versions,
    restore_rng,
    trainable_state,
)
from zsbir.engine.param_groups import trainable_params
from zsbir.engine.step import StepContext
from zsbir.models.inputs import input_record

log = logging.getLogger(__name__)

__all__ = ["DivergedError", "TrainState", "Trainer", "aug_seed"]


class DivergedError(FloatingPointError):
    """The loss or the weights became non-finite; the message names step and loss terms."""


def speed_settings(train: Any, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, channels_last) from ``[train]`` and the device."""
    cuda = device.type == "cuda"
    amp = train.amp == "bf16" or (train.amp == "auto" and cuda)
    return (torch.bfloat16 if amp else None,
            train.channels_last == "on" or (train.channels_last == "auto" and cuda))


def aug_seed(seed: int, epoch: int, step: int, position: int) -> int:
    """The augmentation seed of one batch position (independent of workers and resumes)."""
    return int(np.random.SeedSequence([seed, epoch, step, position]).generate_state(1)[0])


class TrainState(dict):
    """Plain-data progress: epoch, step (next step to run in that epoch), global_step,
    best_val, best_epoch, bad_epochs, history, skipped."""

    @classmethod
    def fresh(cls) -> TrainState:
        return cls(epoch=0, step=0, global_step=0, best_val=-1.0, best_epoch=-1,
                   bad_epochs=0, history=[], skipped=[], stopped_early=False)


class Trainer:
    """Runs the loop of an :class:`Experiment` and writes ``RUN_DIR/checkpoints``."""

    def __init__(self, exp: Experiment, run_dir: Path,
                 progress: Callable[[dict[str, Any]], None] | None = None,
                 stop_after_steps: int | None = None):
        self.exp = exp
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.progress = progress or (lambda info: None)
        #: testing hook: stop (as if killed) after this many global steps
        self.stop_after_steps = stop_after_steps
        self.state = TrainState.fresh()
        m = exp.manifest
        self.device = exp.ctx.device
        self.workers = worker_count(m.data_cfg.workers, exp.ctx.device)
        self.train_set = ImageDataset(exp.data.train, exp.data.reader, exp.train_transform,
                                      m.data_cfg.on_corrupt)
        self.batches = BatchList()
        self.loader = make_loader(self.train_set, self.batches, self.workers,
                                  pin_memory=self.device.type == "cuda")
        self.amp_dtype, self.channels_last = speed_settings(m.train, self.device)
        if self.channels_last:
            exp.model.to(memory_format=torch.channels_last)
        self.forward = exp.model
        if m.train.compile != "off":
            self.forward = torch.compile(exp.model, mode=m.train.compile)
            net = getattr(exp.teacher, "network", None)
            if isinstance(net, torch.nn.Module):  # the teacher calls network(image, domain)
                exp.teacher.network = torch.compile(net, mode=m.train.compile)
        #: every trained parameter (model, losses, step, teacher): the optimizer's, one source
        self.params = trainable_params(exp.optimizer)
        #: the student's frozen parameters: not in last.pt / best.pt, which reference them
        #: (``base``: weights files and a digest) instead; None when everything trains
        self.frozen = frozen_names(exp.model)
        self.base = (base_reference(exp.model, m.data, self.frozen) if self.frozen
                     else None)
        # data parallelism (zsbir.engine.distributed): each process trains on its slice of
        # every global batch; DDP averages the model's gradients, hooks the others' (losses,
        # step, teacher)
        from zsbir.data.samplers import sampler_roles, sampler_unit

        self.rank, self.world = D.rank(), D.world_size()
        #: the sampler's tuple roles and size (1: independent items)
        self.roles, self.unit = sampler_roles(exp.sampler), sampler_unit(exp.sampler)
        self.ddp_weight = None
        if self.world > 1:
            # a batch that cannot be split is refused now, not epochs into the run
            D.shard_batches(self.epoch_batches(0), 0, self.world, self.unit,
                            m.train.batch_size)
            ddp, self.ddp_weight = D.wrap_ddp(exp.model, self.device)
            in_model = {id(p) for p in exp.model.parameters()}
            D.sync_extra_params([p for p in self.params if id(p) not in in_model],
                                self.ddp_weight)
            self.forward = ddp if m.train.compile == "off" else torch.compile(
                ddp, mode=m.train.compile)
        self.step_ctx = StepContext(
            model=exp.model, forward=self.forward, teacher=exp.teacher, losses=exp.losses,
            optimizer=exp.optimizer, params=self.params, device=self.device,
            amp_dtype=self.amp_dtype, grad_clip=m.train.grad_clip)
        self.first_loss: float | None = None
        self.warned_growth = False

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        exp = self.exp
        return {
            "format": "zsbir.checkpoint/2",  # 2: model = what trains, + base, components
            "model": trainable_state(exp.model.state_dict(), self.frozen),
            "base": self.base,
            "losses": [loss.state_dict() for _, _, loss in exp.losses],
            "optimizer": exp.optimizer.state_dict(),
            "scheduler": exp.scheduler.state_dict(),
            "components": L.component_state(exp),  # the step's and teacher's state
            "rng": capture_rng(),
            "train_state": dict(self.state),
            "manifest": exp.manifest.data,
            "versions": package_versions(),
            "plugins": dict(exp.manifest.plugins),
            "classes": {"seen": exp.data.seen_classes, "unseen": exp.data.unseen_classes},
            "inputs": input_record(exp.model),  # the transform it was trained with
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        exp = self.exp
        where = self.ckpt_dir / "last.pt"
        check_base(ckpt.get("base"), self.base or {}, where)  # the frozen weights, first
        load_trainable_state(exp.model, ckpt["model"], self.frozen, where)
        for (_, _, loss), sd in zip(exp.losses, ckpt.get("losses", [])):
            loss.load_state_dict(sd)
        exp.optimizer.load_state_dict(ckpt["optimizer"])
        exp.scheduler.load_state_dict(ckpt["scheduler"])
        L.load_component_state(exp, ckpt.get("components") or (
            {"step": ckpt["step"]} if ckpt.get("step") else {}))  # older: the step's only
        restore_rng(ckpt["rng"])
        self.state = TrainState(ckpt["train_state"])

    def save(self, name: str = "last.pt") -> Path:
        self._check_weights()
        if self.rank != 0:  # data-parallel: rank 0 alone writes (the weights are equal)
            return self.ckpt_dir / name
        return atomic_save(self.state_dict(), self.ckpt_dir / name)

    def _check_weights(self) -> None:
        """Refuse to checkpoint non-finite weights (one host sync per checkpoint)."""
        bad = [n for n, t in self.exp.model.state_dict().items()
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            st = self.state
            raise DivergedError(
                f"the weights became non-finite by epoch {st['epoch']}, step {st['step']} "
                f"(global step {st['global_step']}; {len(bad)} tensors, e.g. {bad[0]}): "
                "training diverged; checkpoints/last.pt keeps the last finite state. Lower "
                "the learning rate, set train.grad_clip, or check the inputs")

    # ------------------------------------------------------------------ loop
    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        batches = self.exp.sampler.epoch(epoch)
        cap = self.exp.manifest.train.max_steps_per_epoch
        return batches[:cap] if cap else batches

    def fit(self) -> TrainState:
        """Train until the last epoch (or early stop); returns the final state."""
        exp, cfg, st = self.exp, self.exp.manifest.train, self.state
        if exp.teacher is not None:
            self._prepare_teacher()  # on resume, class_mean reloads its table from cache
        if st["epoch"] < cfg.epochs and not st["stopped_early"]:
            # before the first optimizer step (the loader's workers start and the first
            # steps run before anything else is logged): what is about to run, and the
            # position the progress and its time left count from
            steps = len(self.epoch_batches(st["epoch"]))
            L.call_hook(exp, "on_train_start", L.TrainInfo(
                total_steps=steps * cfg.epochs, steps_per_epoch=steps, epochs=cfg.epochs,
                global_step=st["global_step"]))
            self.progress({"train_start": True, "epochs": cfg.epochs, "steps": steps,
                           "batch_size": cfg.batch_size, "epoch": st["epoch"],
                           "step": st["step"], "world_size": self.world})
        while st["epoch"] < cfg.epochs and not st["stopped_early"]:
            if not self._run_epoch():
                return st  # stopped by the testing hook, as if killed
        return st

    def _prepare_teacher(self) -> None:
        from zsbir.engine.embed import teacher_outputs
        from zsbir.progress import phase

        exp = self.exp
        prepare = getattr(exp.teacher, "prepare", None)  # optional (an EMA teacher has none)
        if callable(prepare):
            D.barrier()  # data-parallel: every rank finds the teacher cache in the same state
            with phase("preparing the teacher"):
                prepare(data=exp.data,
                        embed=lambda net, split: teacher_outputs(net, split, exp),
                        fingerprint=exp.fingerprint)
        to = getattr(exp.teacher, "to", None)
        if callable(to):
            to(self.device)

    def _run_epoch(self) -> bool:
        exp, cfg, st = self.exp, self.exp.manifest.train, self.state
        epoch, start = st["epoch"], st["step"]
        skips_before = len(st["skipped"])
        batches = self.epoch_batches(epoch)
        seed = exp.manifest.run.seed
        # data-parallel: this process's contiguous slice of every global batch; the
        # augmentation seeds keep the global positions, so N processes see what one sees
        local, offsets = batches, [0] * len(batches)
        if self.world > 1:
            local = D.shard_batches(batches, self.rank, self.world, self.unit,
                                    cfg.batch_size)
            offsets = [D.shard_bounds(len(b), self.rank, self.world, self.unit)[0]
                       for b in batches]
        self.batches.batches = [
            [(int(i), aug_seed(seed, epoch, step, off + pos)) for pos, i in enumerate(b)]
            for step, (b, off) in enumerate(zip(local, offsets))
        ][start:]
        exp.model.train()
        sums: dict[str, torch.Tensor] = {}
        n_sum, t0, images = 0, time.perf_counter(), 0
        for step, batch in enumerate(self.loader, start=start):
            expected = local[step]
            if batch["skipped"]:
                st["skipped"].extend([list(s) for s in batch["skipped"]])
                for source, err in batch["skipped"]:
                    log.warning("skipped unreadable image %s (%s)", source, err)
                batch = self._drop_incomplete(batch, expected)
            has_images = "image" in batch
            if self.world > 1:  # every process steps (DDP all-reduces), or none does
                has_images = D.all_ranks(has_images)
                self.ddp_weight.weight = D.slice_weight(len(batches[step]), len(expected),
                                                        self.world)
            if has_images:
                terms = self.train_step(batch)
                if self.world > 1 and self.ddp_weight.weight != 1.0:  # the global mean
                    terms = {k: v * self.ddp_weight.weight for k, v in terms.items()}
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_sum += 1
                images += len(batch["image"]) * self.world
            st["step"], st["global_step"] = step + 1, st["global_step"] + 1
            if has_images:  # an optimizer step was taken (EMA updates, ...)
                L.call_hook(exp, "on_after_optimizer_step", st["global_step"])
            update = getattr(exp.scheduler, "step_update", None)
            if callable(update):  # per-iteration schedules (warm-up, one-cycle)
                update(st["global_step"])
            saving = bool(cfg.checkpoint_every and st["global_step"] % cfg.checkpoint_every == 0)
            if n_sum and (saving or st["global_step"] % cfg.log_every == 0
                          or step + 1 == len(batches)):
                logged = D.mean_across_ranks(sums)  # the global batch's (one all-reduce)
                self._check_finite(logged, n_sum)  # host syncs: at log steps and checkpoints
                elapsed = time.perf_counter() - t0
                self.progress({"epoch": epoch, "step": step + 1, "steps": len(batches),
                               "loss": {k: float(v) / n_sum for k, v in logged.items()},
                               "images_per_s": images / max(elapsed, 1e-9),
                               "lr": exp.optimizer.param_groups[0]["lr"]})
            if saving:
                self.save()
            if self.stop_after_steps is not None and st["global_step"] >= self.stop_after_steps:
                return False
        sums = D.mean_across_ranks(sums)
        if self.world > 1:  # every process's unreadable files of this epoch, on every rank
            mine = st["skipped"][skips_before:]
            st["skipped"][skips_before:] = [s for part in D.gather_objects(mine) for s in part]
        record = {"epoch": epoch, "loss": {k: float(v) / max(n_sum, 1) for k, v in sums.items()},
                  "images_per_s": images / max(time.perf_counter() - t0, 1e-9),
                  "lr": exp.optimizer.param_groups[0]["lr"]}
        exp.scheduler.step()
        self._end_epoch(epoch, record)
        return True

    def train_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Run the manifest's step on one loader batch (moved and normalized here)."""
        T.refresh()  # threads follow the zsbir processes computing beside this one
        self.step_ctx.global_step = self.state["global_step"]
        b = to_device(batch, self.device, self.exp.train_transform, self.channels_last)
        if self.roles:  # the tuples, explicitly: losses read rows by role, not by position
            tuples = batch_tuples(len(b["label"]), self.roles)
            b["tuples"], b["roles"] = tuples["tuples"].to(self.device), tuples["roles"]
        return self.exp.step(self.step_ctx, b)

    def _end_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        exp, cfg, st = self.exp, self.exp.manifest.train, self.state
        L.call_hook(exp, "on_epoch_end", epoch)
        self._check_weights()  # before best.pt can be written from them
        if cfg.val_every and len(exp.data.val) and (epoch + 1) % cfg.val_every == 0:
            from zsbir.engine.embed import validation_accuracy

            acc = validation_accuracy(exp)
            record["val_accuracy"] = acc
            if acc > st["best_val"]:
                st["best_val"], st["best_epoch"], st["bad_epochs"] = acc, epoch, 0
                if self.rank == 0:  # data-parallel: rank 0 alone writes
                    atomic_save({"model": trainable_state(L.inference_model(exp).state_dict(),
                                                          self.frozen),
                                 "base": self.base, "components": L.component_state(exp),
                                 "epoch": epoch,
                                 "val_accuracy": acc, "manifest": exp.manifest.data,
                                 "plugins": dict(exp.manifest.plugins)},
                                self.ckpt_dir / "best.pt")
            else:
                st["bad_epochs"] += 1
                if cfg.early_stopping and st["bad_epochs"] >= cfg.early_stopping:
                    st["stopped_early"] = True
            exp.model.train()
        st["history"].append(record)
        self.progress({"epoch_end": epoch, **record})
        st["epoch"], st["step"] = epoch + 1, 0
        self.save()

    def _check_finite(self, sums: dict[str, torch.Tensor], n: int) -> None:
        """Stop on a non-finite loss term; warn once when the mean loss has grown by three
        orders of magnitude since the first logged value (divergence on its way)."""
        st = self.state
        values = {k: float(v) / max(n, 1) for k, v in sums.items()}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise DivergedError(
                f"the loss became non-finite by epoch {st['epoch']}, step {st['step']} "
                f"(global step {st['global_step']}; non-finite: {', '.join(bad)}; terms: "
                + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                + "); checkpoints/last.pt keeps the last finite state. Lower the learning "
                "rate, set train.grad_clip, or check the inputs")
        total = abs(values.get("total", 0.0))
        if self.first_loss is None:
            self.first_loss = max(total, 1e-12)
        elif total > 1e3 * self.first_loss and not self.warned_growth:
            self.warned_growth = True
            log.warning("the loss grew from %.4g to %.4g (x%.0f) by epoch %d step %d: "
                        "training may be diverging (learning rate too high?)",
                        self.first_loss, total, total / self.first_loss, st["epoch"],
                        st["step"])

    def _drop_incomplete(self, batch: dict[str, Any], expected: np.ndarray) -> dict[str, Any]:
        """Tuple batches (the sampler's ``roles``): drop every tuple that lost an item to a
        bad file, so the batch stays whole tuples in role order."""
        k = self.unit
        if k == 1 or "image" not in batch:
            return batch
        bad = {s for s, _ in batch["skipped"]}
        sources = self.exp.data.train.sources
        good_pos = np.array([sources[i] not in bad for i in expected])
        rows = np.cumsum(good_pos) - 1
        keep = [rows[g * k + j] for g in range(len(expected) // k)
                if good_pos[g * k:g * k + k].all() for j in range(k)]
        if not keep:
            return {"skipped": batch["skipped"]}
        idx = torch.as_tensor(keep)
        return {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
