"""One prepared GPU check (issue 26): every figure benchmarks/README.md asks of a GPU, in
one process, one table. Run it through ``benchmarks/gpu_check.sh`` (under 8 minutes on one
H100/H200; installs nothing, downloads nothing: random weights, generated images).

Parts (each row: images/s or seconds, and where the time went; they run in the order
of :func:`plan`, the torch.compile rows last):

1. ``step``: the SAKE recipe (``examples/sake_sketchy.toml``: CSE-ResNet-50 student,
   online teacher, CE + SAKE loss) training step on a batch already on the GPU
   (:func:`zsbir.engine.bench.bench_train` with ``synthetic_data``), at batch 40 and 256,
   in fp32, bf16 autocast + channels_last, and bf16 + channels_last + ``torch.compile``;
2. ``e2e``: the same step fed by the real data path: JPEG files written once to a
   temporary folder (``folder`` protocol, 224 px), decoded and augmented by the loader
   workers, at batch 40 and 256, in the same three variants; the GPU's share is the
   step's fraction of the wall time (1 - data wait);
3. ``eval``: :func:`zsbir.evaluation.evaluate_retrieval` on the GPU with SK-SH-sized
   features (15,229 queries x 17,101 gallery, 512-d random, 25 classes), map@all, p@100,
   map@200, p@200; the second of two calls;
4. ``clip``: the CLIP plugin's step (``plugins/zsbir-clip``, ``clip_triplet``: frozen
   towers but LayerNorms and prompts, triplet + CE against class-name texts) at batch 192
   on a randomly initialized ViT-B/32, bf16.

Weights are random (a random SE-ResNet-50 file as ``backbone.weights``; CLIP
``pretrained = false``), and so is SAKE's WordNet matrix (the same shape): timing needs
the architecture, not the values. ``--dry-run`` runs every part at tiny size on whatever
device there is (the CPU in CI: ``tests/test_gpu_check.py``); ``torch.compile`` then uses
the ``eager`` backend (dynamo traces, nothing is compiled: no C++ toolchain needed).

Anchors (one H100, ../shared/README.md): SAKE's code 251 img/s end to end, 616 step
only at batch 40; the same network in plain timm, bf16 + channels_last: 665 img/s at batch
40, 2,245 at 256, 3,803 with torch.compile at 256 (step only); SAKE's evaluation about
270 s at SK-SH size. Goals: >= 1,500 img/s end to end at batch 40, >= 2,500 at batch 256;
evaluation <= 1 s. The table's last column names each row's anchor or goal (met or not:
:data:`REFERENCE`), and a last line sums up the three goals.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLIP_SRC = ROOT / "plugins" / "zsbir-clip" / "src"

#: (label, train.amp, train.channels_last, train.compile)
VARIANTS = [("fp32", "off", "off", "off"), ("bf16+cl", "auto", "auto", "off"),
            ("bf16+cl+compile", "auto", "auto", "default")]
#: full-size batches: (dry run, full size)
BATCHES = [(2, 40), (4, 256)]
#: (part, config, full-size batch) -> (kind, figure, what): "goal" (images/s at least, or
#: seconds at most for eval) or "anchor" (a reference figure to compare with)
REFERENCE: dict[tuple[str, str, int], tuple[str, float, str]] = {
    ("step", "fp32", 40): ("anchor", 616, "SAKE's code, step only"),
    ("step", "bf16+cl", 40): ("anchor", 665, "plain timm bf16+cl"),
    ("step", "bf16+cl", 256): ("anchor", 2245, "plain timm bf16+cl"),
    ("step", "bf16+cl+compile", 256): ("anchor", 3803, "plain timm bf16+cl+compile"),
    **{("e2e", v[0], 40): ("goal", 1500, "end to end, batch 40") for v in VARIANTS},
    **{("e2e", v[0], 256): ("goal", 2500, "end to end, batch 256") for v in VARIANTS},
    ("eval", "-", 0): ("goal", 1.0, "SK-SH-sized evaluation; SAKE's code about 270 s"),
}


def reference(row: dict[str, Any], dry: bool) -> str:
    """The row's goal or anchor, and how the row compares (not compared in a dry run)."""
    key = (row["part"], "-" if row["part"] == "eval" else row["config"], row.get("full", 0))
    if key not in REFERENCE:
        return "-"
    kind, figure, what = REFERENCE[key]
    if row["part"] == "eval":
        text = f"goal <= {figure:g} s ({what})"
        got, ok = row.get("seconds"), row.get("seconds", 1e9) <= figure
    else:
        text = f"{kind} {'>= ' if kind == 'goal' else ''}{figure:,.0f} img/s ({what})"
        got, ok = row.get("images_per_s"), row.get("images_per_s", 0) >= figure
    if dry or got is None:
        return text + (": dry run, not compared" if dry else "")
    if kind == "goal":
        return f"{text}: {'met' if ok else 'NOT met'}"
    return f"{text}: {got / figure:.2f}x"


def goals_line(rows: list[dict[str, Any]]) -> str:
    """The three goals, from the best row of each."""
    def best(batch: int) -> float:
        return max((r.get("images_per_s", 0) for r in rows
                    if r["part"] == "e2e" and r.get("full") == batch), default=0)

    ev = next((r.get("seconds") for r in rows if r["part"] == "eval"), None)
    parts = [f"end to end b40 {best(40):,.0f} img/s (>= 1,500: "
             f"{'met' if best(40) >= 1500 else 'NOT met'})",
             f"b256 {best(256):,.0f} img/s (>= 2,500: {'met' if best(256) >= 2500 else 'NOT met'})",
             "evaluation " + (f"{ev:.2f} s (<= 1 s: {'met' if ev <= 1 else 'NOT met'})"
                              if ev is not None else "not run")]
    return "# goals: " + "; ".join(parts)


def random_weights(path: Path) -> Path:
    """Random SE-ResNet-50 weights in timm's ``legacy_seresnet50`` names: the file the
    recipe's student and online teacher start from (timing needs no trained values)."""
    import timm
    import torch

    if not path.is_file():
        torch.save(timm.create_model("legacy_seresnet50", pretrained=False).state_dict(), path)
    return path


def sake_manifest(size: int, batch: int, variant: tuple[str, str, str, str],
                  data: Path | None, cache: Path, device: str) -> Any:
    from zsbir.manifest import apply_overrides, load, resolve

    raw = load(ROOT / "examples" / "sake_sketchy.toml")
    if data is None:  # step only: any protocol with the right shapes; data never read
        raw["protocol"] = {"name": "synthetic", "num_classes": 24, "num_unseen": 4,
                           "photos_per_class": 12, "sketches_per_class": 12,
                           "image_size": 32, "seed": 0}
    else:
        raw["protocol"] = {"name": "folder", "root": str(data), "num_unseen": 10, "seed": 0}
    _, amp, cl, compile_ = variant
    return resolve(apply_overrides(raw, [
        f"run.device={json.dumps(device)}", f"run.cache_dir={json.dumps(str(cache))}",
        f"backbone.weights={json.dumps(str(random_weights(cache / 'seresnet50.pth')))}",
        f"data.image_size={size}", f"train.batch_size={batch}",
        f"sampler.sketches_per_batch={max(1, batch // 3)}", f'train.amp="{amp}"',
        f'train.channels_last="{cl}"', f'train.compile="{compile_}"']))


def clip_manifest(size: int, batch: int, cache: Path, device: str, tiny: bool) -> Any:
    from zsbir.manifest import apply_overrides, load, resolve

    raw = load(ROOT / "plugins" / "zsbir-clip" / "examples" / "clip_sketchy_ye.toml")
    raw["protocol"] = {"name": "synthetic", "num_classes": 24, "num_unseen": 4,
                       "photos_per_class": 12, "sketches_per_class": 12, "image_size": 32,
                       "seed": 0}
    student = raw["backbone"] if "backbone" in raw else raw["model"]["backbone"]
    for table in (student, raw["model"]["head"]["network"]):
        table.update(weights="", pretrained=False)
        if tiny:  # a 2-layer width-64 CLIP, the plugin tests' configuration
            table.pop("arch")
            table["config"] = str(ROOT / "plugins" / "zsbir-clip" / "tests" / "tiny_clip.json")
    return resolve(apply_overrides(raw, [
        f"run.device={json.dumps(device)}", f"run.cache_dir={json.dumps(str(cache))}",
        f"data.image_size={size}", f"train.batch_size={batch}"]))


def ensure_clip_plugin() -> None:
    """Register zsbir-clip's components from its pyproject when it is not installed (the
    tree travels to the GPU machine; nothing is installed there)."""
    from zsbir.registry import get_registry

    try:
        get_registry("backbones").get("clip_vit")
        return
    except Exception:  # noqa: BLE001 - not installed: register from the source tree
        pass
    import importlib

    import tomllib

    sys.path.insert(0, str(CLIP_SRC))
    meta = tomllib.loads((ROOT / "plugins" / "zsbir-clip" / "pyproject.toml").read_text())
    for group, entries in meta["project"]["entry-points"].items():
        kind = group.removeprefix("zsbir.")
        for name, target in entries.items():
            module, attr = target.split(":")
            get_registry(kind).add(name, getattr(importlib.import_module(module), attr))


def write_jpegs(root: Path, classes: int, per_class: int, size: int) -> Path:
    """A ``folder``-protocol tree of JPEGs (``sketch/`` and ``photo/``, per class)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for domain in ("photo", "sketch"):
        for c in range(classes):
            d = root / domain / f"class{c:03d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = rng.integers(0, 255, (1, 1, 3), dtype=np.uint8)
                noise = rng.integers(0, 64, (size, size, 3), dtype=np.uint8)
                Image.fromarray(base + noise).save(d / f"{i:03d}.jpg", quality=90)
    return root


def bench_row(part: str, label: str, manifest: Any, steps: int, warmup: int,
              synthetic: bool, full: int = 0) -> dict[str, Any]:
    import torch

    from zsbir.engine.bench import bench_train

    r = bench_train(manifest, steps=steps, warmup=warmup, synthetic_data=synthetic)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"part": part, "config": label, "batch": r["batch_size"], "full": full,
            "value": f"{r['images_per_s']:.0f} img/s",
            "detail": f"step p50 {r['step_ms']['p50']:.1f} ms, device share "
                      f"{1 - r['data_wait_fraction']:.0%}, {r['workers']} workers, peak "
                      f"{r['peak_gpu_memory_gb'] or 0:.1f} GB",
            "images_per_s": r["images_per_s"], "raw": r}


def eval_row(device: str, queries: int, gallery: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from zsbir.evaluation import evaluate_retrieval

    rng = np.random.default_rng(0)
    q = rng.standard_normal((queries, 512), dtype=np.float32)
    g = rng.standard_normal((gallery, 512), dtype=np.float32)
    ql, gl = rng.integers(0, 25, queries), rng.integers(0, 25, gallery)
    dev = torch.device(device)
    qt, gt = torch.from_numpy(q).to(dev), torch.from_numpy(g).to(dev)
    times = []
    for _ in range(2):  # the first call warms up kernels and the allocator
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = evaluate_retrieval(qt, ql, gt, gl, ["map@all", "p@100", "map@200", "p@200"],
                                 device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"part": "eval", "config": f"{queries} x {gallery} x 512", "batch": "-",
            "value": f"{times[-1]:.2f} s",
            "detail": f"first call {times[0]:.2f} s, map@all {res.metrics['map@all']:.4f}",
            "seconds": times[-1]}


def plan(args: argparse.Namespace, work: Path) -> list[tuple[str, Any]]:
    """(name, thunk) of every row, in the order they run: evaluation and CLIP first, then
    step only and end to end without compile, the torch.compile rows last (their compile
    time is the unknown: if the time budget runs out, it is those that are skipped)."""
    dry, dev = args.dry_run, args.device
    size = 32 if dry else 224
    batches = [(small if dry else full, full) for small, full in BATCHES]
    steps, warmup = (1, 1) if dry else (args.steps, args.warmup)
    cache = work / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    data = work / "jpegs"
    rows: list[tuple[str, Any]] = [
        ("eval", lambda: eval_row(dev, *((300, 400) if dry else (15229, 17101)))),
        ("clip", lambda: bench_row(
            "clip", "ViT-B/32 random, bf16" if not dry else "tiny CLIP", clip_manifest(
                32 if dry else 224, 9 if dry else 192, cache, dev, dry), steps, warmup,
            True))]
    for variants in (VARIANTS[:2], VARIANTS[2:]):
        for part, root in (("step", None), ("e2e", data)):
            for batch, full in batches:
                for v in variants:
                    rows.append((f"{part} {v[0]} b{batch}",
                                 lambda p=part, r=root, b=batch, f=full, v=v: bench_row(
                                     p, v[0], sake_manifest(size, b, v, r, cache, dev), steps,
                                     warmup, r is None, f)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every part at tiny size (CPU)")
    p.add_argument("--device", default="auto", help="run.device of every part")
    p.add_argument("--steps", type=int, default=20, help="timed steps per training row")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="rows not started by then are reported as skipped")
    p.add_argument("--only", nargs="+", help="rows whose name starts with one of these")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from zsbir.engine.threads import prepare_environment

    prepare_environment()
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (use --dry-run on the CPU)")
    if not args.dry_run and not args.device.startswith("cuda"):
        sys.exit("gpu_check: full size needs a GPU; --dry-run runs every part at tiny size")
    if args.dry_run:  # dynamo traces, nothing is compiled (no C++ toolchain needed)
        real_compile = torch.compile
        torch.compile = lambda model, **kw: real_compile(model, backend="eager")
    ensure_clip_plugin()
    import zsbir.semantics

    # SAKE's WordNet matrix A (n_seen, 1000): random values, the same shapes and compute
    # (no WordNet on the GPU machine, and generated class names are not WordNet words)
    zsbir.semantics.semantic_matrix = lambda names, **kw: torch.rand(len(names), 1000)
    t_start = time.perf_counter()
    name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
            else f"CPU ({os.cpu_count()} cores)")
    print(f"# gpu_check {'(dry run) ' if args.dry_run else ''}{time.strftime('%Y-%m-%d %H:%M')}"
          f", {name}, torch {torch.__version__}", flush=True)
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        if args.dry_run:
            write_jpegs(work / "jpegs", 12, 4, 48)
        else:
            write_jpegs(work / "jpegs", 30, 60, 256)  # 3,600 JPEGs, 256 px like Sketchy
        print(f"# wrote the JPEG folder in {time.perf_counter() - t0:.1f} s", flush=True)
        print("| part | config | batch | result | detail | goal / anchor (one H100) |\n"
              "|---|---|---|---|---|---|", flush=True)
        for row_name, thunk in plan(args, work):
            if args.only and not any(row_name.startswith(o) for o in args.only):
                continue
            if time.perf_counter() - t_start > args.budget_s:
                row = {"part": row_name, "config": "-", "batch": "-", "value": "skipped",
                       "detail": f"time budget {args.budget_s:.0f} s spent"}
            else:
                try:
                    row = thunk()
                except Exception as exc:  # noqa: BLE001 - one failed row; the table goes on
                    traceback.print_exc(file=sys.stderr)
                    row = {"part": row_name, "config": "-", "batch": "-", "value": "error",
                           "detail": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                                     if str(exc) else type(exc).__name__}
            row.pop("raw", None) if not args.json else None
            row["reference"] = reference(row, args.dry_run)
            out.append(row)
            print(f"| {row['part']} | {row['config']} | {row['batch']} | {row['value']} | "
                  f"{row['detail']} | {row['reference']} |", flush=True)
            if args.json:  # after every row: a run cut off by the time limit keeps its rows
                args.json.write_text(json.dumps(out, indent=2, default=str))
    print(goals_line(out) + (" (dry run: tiny sizes on the CPU, not comparable)"
                             if args.dry_run else ""), flush=True)
    print(f"# total {time.perf_counter() - t_start:.0f} s", flush=True)
    return 1 if any(r["value"] == "error" for r in out) else 0


if __name__ == "__main__":
    sys.exit(main())
