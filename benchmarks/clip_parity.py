"""Parity of zsbir-clip's prompted CLIP image tower with the authors' code (Sketch_LVM).

Sain et al., "CLIP for All Things Zero-Shot Sketch-Based Image Retrieval, Fine-Grained or
Not", CVPR 2023; code: github.com/aneeshan95/Sketch_LVM (``src/model_LN_prompt.py``,
whose ``Model.forward`` calls the prompt-injecting ``VisionTransformer.forward`` of
``src/clip/model.py``). Usage::

    python benchmarks/clip_parity.py --authors /path/to/Sketch_LVM          # ViT-B/32
    python benchmarks/clip_parity.py --authors /path/to/Sketch_LVM --arch small   # seconds

What is compared, on the same inputs for both sides:

1. **weights**: a random CLIP (``--arch ViT-B-32``: the paper's ViT-B/32; ``small``: a
   2-layer tower of the same head width, for quick checks) in OpenAI's state-dict format,
   seeded (``--seed``), LayerNorm scales/shifts and every bias randomized too (a default
   LayerNorm would hide a swapped or skipped one), every value rounded to float16 and
   saved as float16, the dtype of OpenAI's released checkpoints: the authors'
   ``build_model`` converts the convolution/linear/attention weights to fp16 *before*
   loading, so fp32 values would be rounded on their side only. That one file is
   loaded by the authors' ``clip.load`` (``build_model``; ``.float()`` on CPU) and by
   zsbir-clip's backbone ``clip_vit(weights=FILE)`` (``open_clip.load_checkpoint``,
   strict), exactly as a user's weights file is;
2. **prompts**: the same random (N(0, 1), ``n_prompts`` x ``prompt_dim`` from their
   ``experiments/options.py`` defaults: 3 x 768) sketch and photo prompt tensors, copied
   into their ``sk_prompt`` / ``img_prompt`` and into zsbir's ``prompts[1]`` /
   ``prompts[0]`` (zsbir: 0 photo, 1 sketch);
3. **embeddings** (retrieval path, eval mode, no grad): ``--batch`` random sketch and
   photo images (224 px, CLIP-normalized-like N(0, 1) pixels), their
   ``Model.forward(x, dtype='sketch' | 'image')`` against zsbir's ``clip_vit(x, domain)``
   on one mixed batch (so zsbir's per-image prompt choice is exercised); both raw
   (the projected class token, CLIP's ``encode_image``) and L2-normalized (the
   ``clip_text_classifier`` head's ``embedding``);
4. **training step** (train mode, with grad), one triplet (sketch anchor, photo positive,
   photo negative): their ``training_step`` loss (``TripletMarginWithDistanceLoss``, 1 - cos,
   margin 0.2) against zsbir-clip's ``cosine_triplet``, and the gradients of every
   parameter zsbir trains under ``freeze = "all_but_layernorm"`` (the LayerNorm-only
   setup: 52 LayerNorm weights and biases for ViT-B/32, plus the prompts);
5. **trainable sets**: the authors' ``freeze_all_but_bn`` leaves more than LayerNorms
   trainable; the set of trainable image-tower parameters of their model must equal
   zsbir's ``freeze = "released_code"`` set (printed, with the names beyond the LN-only set).

Tolerance (fp32, CPU): relative difference ``max|zsbir - authors| / max|authors|`` (over
the whole tensor) at most **1e-5** for the embeddings and the loss, **1e-4** for the
gradients (sums over every token and image, so more rounding); the exit status is 1 when
any figure is above its tolerance or a set differs, 2 when a side cannot be built. The two
sides differ in floating-point order only: theirs appends the prompts after the patch
tokens and runs the transformer sequence-first, zsbir inserts them after the class token
and runs open_clip's batch-first transformer; without positional embeddings on the prompts
and without an attention mask, the class token's output does not depend on token order.

Environment shims (applied at run time from this script; no file of theirs is edited):

- ``experiments/options.py`` parses ``sys.argv`` when imported: ``sys.argv`` is set to the
  program name alone while their modules are imported, so ``opts`` holds their defaults;
- ``pytorch_lightning`` and ``torchmetrics`` (imported by ``model_LN_prompt.py``) are
  replaced by stand-ins when not installed: ``LightningModule`` is ``nn.Module`` with a
  ``device`` property (CPU) and a ``log`` that does nothing; ``torchmetrics.functional.
  retrieval_average_precision`` raises (used only by their validation epoch end);
- ``clip.load('ViT-B/32', device=...)`` in their ``Model.__init__`` would download
  OpenAI's weights: it is replaced, while ``Model()`` runs, by what their ``clip.load``
  does for a state-dict file on CPU with ``jit=False``: ``torch.load(FILE,
  map_location="cpu")`` (here ``weights_only=True``), their ``build_model``, ``.float()``.
  Their ``clip.load`` itself cannot read a state-dict file with torch >= 2.x: it first
  tries ``torch.jit.load`` on the open file, which leaves it at EOF, and its
  ``torch.load`` fallback then fails with ``EOFError``;
- ``--arch small`` only: their ``opts.prompt_dim`` (768, ViT-B/32's width) is set to the
  small tower's width while ``Model()`` is built;
- ``Model.log`` is replaced on the instance by a no-op (no Lightning trainer is attached);
- their ``src`` and ``experiments`` packages are imported from ``--authors`` and removed
  from ``sys.modules`` afterwards (generic names).

Their randomly drawn initial prompts are overwritten with the shared tensors; torch's
global RNG is seeded before each side is built.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import platform
import re
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: relative tolerances, fp32 on CPU (see the module docstring)
TOL_EMBEDDING = 1e-5
TOL_LOSS = 1e-5
TOL_GRAD = 1e-4

#: a 2-layer CLIP with OpenAI's head width (64: their ``build_model`` derives the number of
#: heads as width // 64), 32 px images, for quick checks
SMALL = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1,
                 "layers": 2},
}

#: Sketch_LVM's ``experiments/options.py`` defaults used here (read from their ``opts``
#: when their code is loaded; these are the values for the zsbir-only functions)
N_PROMPTS = 3
MARGIN = 0.2


def model_config(arch: str) -> dict[str, Any]:
    """open_clip's model config for ``arch`` ("ViT-B-32") or :data:`SMALL` ("small")."""
    if arch == "small":
        return json.loads(json.dumps(SMALL))
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"--arch {arch!r}: not an open_clip model config")
    return cfg


def random_openai_state_dict(cfg: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """A random CLIP state dict in OpenAI's format (the keys of OpenAI's released
    checkpoints, which open_clip's ``CLIP`` uses too), float16 like those checkpoints.

    Drawn from ``open_clip.CLIP``'s initialization under ``seed``, then every LayerNorm
    scale set to 1 + 0.1 N(0, 1) and every bias and LayerNorm shift to 0.02 N(0, 1), so
    that LayerNorms and biases are not the identity / zero."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg, quick_gelu=True)
    gen = torch.Generator().manual_seed(seed + 1)
    sd: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach().clone().float()
        module = name.rsplit(".", 1)[0]
        is_ln = any(module.endswith(s) for s in ("ln_1", "ln_2", "ln_pre", "ln_post",
                                                 "ln_final"))
        if is_ln and name.endswith(".weight"):
            t = 1.0 + 0.1 * torch.randn(t.shape, generator=gen)
        elif name.endswith("bias"):
            t = 0.02 * torch.randn(t.shape, generator=gen)
        sd[name] = t.half()
    return sd


def random_prompts(width: int, seed: int, n_prompts: int = N_PROMPTS
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sketch prompts, photo prompts), each (n_prompts, width) N(0, 1), as the authors
    initialize ``sk_prompt`` / ``img_prompt``."""
    gen = torch.Generator().manual_seed(seed + 2)
    return (torch.randn(n_prompts, width, generator=gen),
            torch.randn(n_prompts, width, generator=gen))


def random_images(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n sketches, 2n photos), N(0, 1) pixels of size x size (already normalized)."""
    gen = torch.Generator().manual_seed(seed + 3)
    return (torch.randn(n, 3, size, size, generator=gen),
            torch.randn(2 * n, 3, size, size, generator=gen))


# ---------------------------------------------------------------------------------------
# The zsbir side: backbone clip_vit (zsbir_clip/towers.py) and loss cosine_triplet
# (zsbir_clip/losses.py). Everything the comparison assumes about the plugin is here.
# ---------------------------------------------------------------------------------------

PHOTO, SKETCH = 0, 1  #: zsbir's domain codes (zsbir_clip.towers.ClipVisionBackbone)


def zsbir_tower(weights: Path, config: Path, sketch_prompts: torch.Tensor,
                photo_prompts: torch.Tensor, freeze: str = "all_but_layernorm") -> nn.Module:
    """zsbir-clip's prompted image tower from the weights file, as a manifest builds it
    (``[model.backbone] name = "clip_vit"``), with the given prompt tensors."""
    from zsbir_clip.towers import clip_vit

    tower = clip_vit(config=str(config), weights=str(weights), prompts=len(sketch_prompts),
                     freeze=freeze, quick_gelu=True)
    with torch.no_grad():
        tower.prompts.copy_(torch.stack([photo_prompts, sketch_prompts]))
    return tower


def zsbir_embed(tower: nn.Module, sketch: torch.Tensor, photo: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sketch features, photo features) from one mixed batch."""
    x = torch.cat([sketch, photo])
    domain = torch.tensor([SKETCH] * len(sketch) + [PHOTO] * len(photo))
    f = tower(x, domain)
    return f[:len(sketch)], f[len(sketch):]


def zsbir_triplet_loss(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    from zsbir_clip.losses import cosine_triplet

    return cosine_triplet(a, p, n, MARGIN)


def zsbir_trainable(tower: nn.Module, freeze: str) -> set[str]:
    """Names (``visual.``-relative) of the image-tower parameters ``freeze`` trains."""
    from zsbir_clip.towers import freeze_clip

    freeze_clip(tower.visual, freeze)
    return {n for n, p in tower.visual.named_parameters() if p.requires_grad}


def appended_prompt_forward(visual: nn.Module, x: torch.Tensor, prompts: torch.Tensor
                            ) -> torch.Tensor:
    """An open_clip image tower's projected class token with ``prompts`` (B, K, width)
    appended *after* the patch tokens, the token order of the authors' code: a
    reference for zsbir's order (prompts right after the class token), which must give
    the same output (no positional embedding on prompts, no attention mask)."""
    t = visual.conv1(x).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(t.shape[0], 1, -1)
    t = torch.cat([cls, t], dim=1) + visual.positional_embedding
    t = visual.ln_pre(torch.cat([t, prompts], dim=1))
    t = visual.transformer(t)
    return visual.ln_post(t[:, 0]) @ visual.proj


# ---------------------------------------------------------------------------------------
# The authors' side: Sketch_LVM's src/model_LN_prompt.py Model, with runtime shims
# ---------------------------------------------------------------------------------------

def _stub_lightning() -> types.ModuleType:
    mod = types.ModuleType("pytorch_lightning")

    class LightningModule(nn.Module):
        """Stand-in: an ``nn.Module`` whose ``device`` is its parameters' (CPU)."""

        @property
        def device(self) -> torch.device:
            p = next(self.parameters(), None)
            return p.device if p is not None else torch.device("cpu")

        def log(self, *args: Any, **kwargs: Any) -> None:
            return None

    mod.LightningModule = LightningModule  # type: ignore[attr-defined]
    return mod


def _stub_torchmetrics() -> tuple[types.ModuleType, types.ModuleType]:
    mod, fn = types.ModuleType("torchmetrics"), types.ModuleType("torchmetrics.functional")

    def retrieval_average_precision(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError("clip_parity stand-in: torchmetrics is not installed")

    fn.retrieval_average_precision = retrieval_average_precision  # type: ignore[attr-defined]
    mod.functional = fn  # type: ignore[attr-defined]
    return mod, fn


@contextlib.contextmanager
def authors_modules(checkout: Path) -> Iterator[types.ModuleType]:
    """Their ``src.model_LN_prompt`` imported from ``checkout`` with the shims of the
    module docstring; ``sys.path``, ``sys.argv`` and ``sys.modules`` restored afterwards."""
    checkout = checkout.resolve()
    if not (checkout / "src" / "model_LN_prompt.py").is_file():
        raise FileNotFoundError(f"--authors {str(checkout)!r}: no src/model_LN_prompt.py "
                                "(a checkout of github.com/aneeshan95/Sketch_LVM)")
    names = ("src", "experiments", "pytorch_lightning", "torchmetrics",
             "torchmetrics.functional")
    saved = {k: v for k, v in sys.modules.items()
             if k.split(".")[0] in {n.split(".")[0] for n in names}}
    for k in saved:
        del sys.modules[k]
    argv, path = sys.argv, list(sys.path)
    try:
        sys.argv = [sys.argv[0] if sys.argv else "clip_parity"]
        sys.path.insert(0, str(checkout))
        if importlib.util.find_spec("pytorch_lightning") is None:
            sys.modules["pytorch_lightning"] = _stub_lightning()
        if importlib.util.find_spec("torchmetrics") is None:
            tm, tmf = _stub_torchmetrics()
            sys.modules["torchmetrics"], sys.modules["torchmetrics.functional"] = tm, tmf
        yield importlib.import_module("src.model_LN_prompt")
    finally:
        sys.argv = argv
        sys.path[:] = path
        for k in [k for k in sys.modules if k.split(".")[0] in
                  {n.split(".")[0] for n in names}]:
            del sys.modules[k]
        sys.modules.update(saved)


def authors_model(module: types.ModuleType, weights: Path, sketch_prompts: torch.Tensor,
                  photo_prompts: torch.Tensor) -> nn.Module:
    """Their ``Model()`` (``clip.load`` replaced by its CPU state-dict path on the local
    file: ``build_model``, ``.float()``), with the given prompts and a no-op ``log``."""
    clip_mod = module.clip  # src.clip.clip, as model_LN_prompt imports it
    original_load: Callable[..., Any] = clip_mod.load

    def local_load(name: str, device: Any = "cpu", jit: bool = False,
                   download_root: str | None = None) -> tuple[nn.Module, None]:
        # their load()'s state-dict path on CPU (jit=False): build_model, then .float()
        state_dict = torch.load(weights, map_location="cpu", weights_only=True)
        return clip_mod.build_model(state_dict).to("cpu").float(), None

    opts = module.opts
    if opts.n_prompts != len(sketch_prompts):
        raise ValueError(f"their opts give {opts.n_prompts} prompts, the shared prompts "
                         f"are {tuple(sketch_prompts.shape)}")
    default_dim = opts.prompt_dim
    opts.prompt_dim = sketch_prompts.shape[1]  # 768 (their default) for ViT-B/32
    clip_mod.load = local_load
    try:
        model = module.Model()
    finally:
        clip_mod.load = original_load
        opts.prompt_dim = default_dim
    with torch.no_grad():
        model.sk_prompt.copy_(sketch_prompts)
        model.img_prompt.copy_(photo_prompts)
    model.log = lambda *args, **kwargs: None  # no Lightning trainer attached
    return model


# ---------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------

@dataclass
class Diff:
    """max |a - b| and that over max |b| (b: the authors' value)."""

    name: str
    max_abs: float
    rel: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.rel <= self.tol


def diff(name: str, ours: torch.Tensor, theirs: torch.Tensor, tol: float) -> Diff:
    if ours.shape != theirs.shape:
        raise ValueError(f"{name}: shapes differ, zsbir {tuple(ours.shape)} vs authors "
                         f"{tuple(theirs.shape)}")
    a, b = ours.detach().double(), theirs.detach().double()
    max_abs = float((a - b).abs().max())
    scale = float(b.abs().max())
    return Diff(name, max_abs, max_abs / scale if scale > 0 else max_abs, tol)


@dataclass
class Report:
    diffs: list[Diff] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(d.ok for d in self.diffs)


def compare(checkout: Path, arch: str = "ViT-B-32", seed: int = 0, batch: int = 2,
            workdir: Path | None = None) -> Report:
    """Build both sides from one random weights file and the same prompts, and compare
    embeddings, the triplet loss, the LN-only gradients and the trainable sets."""
    cfg = model_config(arch)
    size = cfg["vision_cfg"]["image_size"]
    width = cfg["vision_cfg"]["width"]
    report = Report()
    with contextlib.ExitStack() as stack:
        tmp = Path(workdir) if workdir else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="clip_parity_")))
        weights, config = tmp / "openai_format.pt", tmp / "open_clip_config.json"
        torch.save(random_openai_state_dict(cfg, seed), weights)
        config.write_text(json.dumps(cfg))
        sk_p, ph_p = random_prompts(width, seed)
        sketch, photo = random_images(batch, size, seed)

        torch.manual_seed(seed)
        ours = zsbir_tower(weights, config, sk_p, ph_p)
        module = stack.enter_context(authors_modules(checkout))
        torch.manual_seed(seed)
        theirs = authors_model(module, weights, sk_p, ph_p)

        # 3. embeddings, retrieval path
        ours.eval()
        theirs.eval()
        with torch.no_grad():
            o_sk, o_ph = zsbir_embed(ours, sketch, photo)
            t_sk = theirs(sketch, dtype="sketch")
            t_ph = theirs(photo, dtype="image")
        report.diffs += [
            diff("sketch embedding (raw)", o_sk, t_sk, TOL_EMBEDDING),
            diff("photo embedding (raw)", o_ph, t_ph, TOL_EMBEDDING),
            diff("sketch embedding (L2-normalized)", F.normalize(o_sk, dim=-1),
                 F.normalize(t_sk, dim=-1), TOL_EMBEDDING),
            diff("photo embedding (L2-normalized)", F.normalize(o_ph, dim=-1),
                 F.normalize(t_ph, dim=-1), TOL_EMBEDDING),
        ]
        swapped = diff("", o_sk, theirs(sketch, dtype="image").detach(), 0.0)
        report.notes.append(f"sanity: the authors' model on the sketches with the photo "
                            f"prompts differs from zsbir's sketch embedding by "
                            f"{swapped.rel:.2e} (relative): the prompts matter at this scale")

        # 4. one training step's loss and the LN-only gradients
        ours.train()
        theirs.train()
        a, p, n = sketch[:1], photo[:1], photo[1:2]
        o_a, o_pn = zsbir_embed(ours, a, torch.cat([p, n]))
        o_loss = zsbir_triplet_loss(o_a, o_pn[:1], o_pn[1:])
        o_loss.backward()
        t_loss = theirs.training_step((a, p, n, ["class"]), 0)
        t_loss.backward()
        report.diffs.append(diff("triplet loss", o_loss, t_loss, TOL_LOSS))
        if t_loss.item() <= 0:
            report.problems.append("the triplet loss is 0 (no gradient to compare): "
                                   "choose another --seed")
        t_params = dict(theirs.clip.visual.named_parameters())
        for name, param in ours.visual.named_parameters():
            if not param.requires_grad:
                continue
            t = t_params.get(name)
            if t is None or t.grad is None or param.grad is None:
                report.problems.append(f"visual.{name}: trained by zsbir, no gradient on "
                                       "the authors' side")
                continue
            report.diffs.append(diff(f"grad visual.{name}", param.grad, t.grad, TOL_GRAD))
        report.diffs += [
            diff("grad sketch prompts", ours.prompts.grad[SKETCH], theirs.sk_prompt.grad,
                 TOL_GRAD),
            diff("grad photo prompts", ours.prompts.grad[PHOTO], theirs.img_prompt.grad,
                 TOL_GRAD),
        ]

        # 5. trainable sets
        t_train = {n for n, p in t_params.items() if p.requires_grad}
        ln_only = zsbir_trainable(ours, "all_but_layernorm")
        released = zsbir_trainable(ours, "released_code")
        if released != t_train:
            report.problems.append(
                f"trainable image-tower parameters: zsbir freeze='released_code' trains "
                f"{sorted(released - t_train)} that the authors' code freezes, and freezes "
                f"{sorted(t_train - released)} that it trains")
        extra = sorted({re.sub(r"\.resblocks\.\d+\.", ".resblocks.*.", n)
                        for n in t_train - ln_only})
        report.notes.append(
            f"trainable image-tower tensors: authors {len(t_train)} "
            f"= zsbir 'released_code' {len(released)}; LN-only ('all_but_layernorm') "
            f"{len(ln_only)}; the authors' freeze_all_but_bn also trains: {', '.join(extra)}")
        report.notes.append(f"loss: zsbir {o_loss.item():.6f}, authors {t_loss.item():.6f}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authors", type=Path, required=True,
                        help="a local checkout of github.com/aneeshan95/Sketch_LVM")
    parser.add_argument("--arch", default="ViT-B-32", choices=["ViT-B-32", "small"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=2,
                        help="sketches per side (and twice as many photos)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        report = compare(args.authors, args.arch, args.seed, args.batch)
    except (FileNotFoundError, ImportError, ValueError, RuntimeError) as exc:
        print(f"clip_parity: cannot compare: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(f"CLIP prompt learning, zsbir-clip vs Sketch_LVM: arch {args.arch}, seed "
          f"{args.seed}, {args.batch} sketches + {2 * args.batch} photos, fp32 CPU, "
          f"torch {torch.__version__}, {args.threads} thread(s), {platform.machine()}")
    print(f"{'':<44} {'max abs':>10} {'relative':>10} {'tol':>8}")
    grads = [d for d in report.diffs if d.name.startswith("grad ")]
    for d in report.diffs:
        if d.name.startswith("grad visual."):
            continue
        print(f"{d.name:<44} {d.max_abs:10.2e} {d.rel:10.2e} {d.tol:8.0e}"
              f"{'' if d.ok else '  ABOVE TOLERANCE'}")
    ln = [d for d in grads if d.name.startswith("grad visual.")]
    if ln:
        worst = max(ln, key=lambda d: d.rel)
        print(f"{f'grad of {len(ln)} LayerNorm tensors (worst)':<44} {worst.max_abs:10.2e} "
              f"{worst.rel:10.2e} {worst.tol:8.0e}  ({worst.name[5:]})"
              f"{'' if all(d.ok for d in ln) else '  ABOVE TOLERANCE'}")
    for note in report.notes:
        print(f"- {note}")
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    print(f"{'PASS' if report.ok else 'FAIL'} ({time.perf_counter() - start:.1f} s)")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
