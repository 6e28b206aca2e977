"""The embedding model of a run as one traceable module, written as ONNX or TorchScript
and checked against the torch model before it is kept (:func:`export_run`)."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zsbir.data.base import PHOTO, SKETCH
from zsbir.digest import file_sha256
from zsbir.export import FORMATS, ExportError
from zsbir.export.card import input_spec, write_model_card

__all__ = ["CHECK_BATCH_SIZES", "OPSET", "EmbeddingModule", "Exported", "export_model",
           "export_run", "uses_domain"]

#: the ONNX opset written (onnxruntime >= 1.12 and every current runtime read it)
OPSET = 17
#: batch sizes the exported model is checked at (each: all photos, all sketches, mixed)
CHECK_BATCH_SIZES = (1, 5)
#: largest difference accepted between the exported and the torch model, relative to the
#: largest embedding value (float32 arithmetic in another order: ~1e-6 in practice)
TOLERANCE = 1e-4


class EmbeddingModule(nn.Module):
    """``forward(image[, domain]) -> embedding``: what zsbir embeds,
    ``model(image, domain)["embedding"]`` (optionally L2-normalized), in a form a tracer
    follows for any batch.

    ``towers`` (a backbone per domain) routes rows by a data-dependent branch; here both
    towers run on the batch and each row takes its domain's features (``torch.where``), so
    one graph serves photos, sketches and mixed batches alike. A model that does not read
    the domain gets a zero bit (``domain_input = False``: no such input)."""

    def __init__(self, model: nn.Module, domain_input: bool, normalize: bool = False):
        super().__init__()
        from zsbir.models.net import Towers

        self.model = model
        self.domain_input = bool(domain_input)
        self.normalize = bool(normalize)
        self.towers = isinstance(model, Towers)

    def forward(self, image: torch.Tensor, domain: torch.Tensor | None = None) -> torch.Tensor:
        if domain is None:  # a model that ignores it; zeros_like keeps the batch dynamic
            domain = torch.zeros_like(image[:, 0, 0, 0], dtype=torch.long)
        if self.towers:
            m: Any = self.model
            sketch = m.sketch(image, domain)
            photo = m.photo(image, domain).to(sketch.dtype)
            features = torch.where((domain == SKETCH).unsqueeze(1), sketch, photo)
            emb = m.head(features, domain)["embedding"]
        else:
            emb = self.model(image, domain)["embedding"]
        return F.normalize(emb, dim=-1) if self.normalize else emb


def uses_domain(model: nn.Module, size: int) -> bool:
    """Whether the model reads the domain bit: it says so (``uses_domain``), it is
    ``towers``, a submodule is a conditional backbone (``conditional = True``), or its
    embedding of a random batch changes with the bit."""
    from zsbir.models.net import Towers

    declared = getattr(model, "uses_domain", None)
    if isinstance(declared, bool):
        return declared
    if isinstance(model, Towers) or any(getattr(m, "conditional", False) is True
                                        for m in model.modules()):
        return True
    image = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = model(image, torch.full((2,), PHOTO))["embedding"]
        b = model(image, torch.full((2,), SKETCH))["embedding"]
    return not torch.equal(a, b)


@dataclass
class Exported:
    """What :func:`export_run` wrote: the model file, its JSON and its model card."""

    model: Path
    info_file: Path
    card: Path
    info: dict[str, Any]


def _check_batches(size: int, domain_input: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in CHECK_BATCH_SIZES:
        image = torch.randn(n, 3, size, size, generator=g)
        patterns = [torch.full((n,), PHOTO), torch.full((n,), SKETCH),
                    torch.arange(n) % 2] if domain_input else [torch.full((n,), PHOTO)]
        out += [(image, d.long()) for d in patterns]
    return out


def _require(fmt: str) -> dict[str, str]:
    """The packages a format needs, with their versions (:class:`ExportError` if absent)."""
    if fmt != "onnx":
        return {}
    import importlib.metadata as md

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"`zsbir export --format onnx` needs the export extra (pip install "
                          f"'zsbir[export]'): {exc}") from None
    return {name: md.version(name) for name in ("onnx", "onnxruntime")}


def _trace_onnx(module: EmbeddingModule, example: tuple[torch.Tensor, ...], names: list[str],
                path: Path) -> Any:
    """Write the ONNX graph to ``path``; returns a function running it (onnxruntime)."""
    import onnxruntime as ort

    axes = {n: {0: "batch"} for n in [*names, "embedding"]}
    with warnings.catch_warnings():  # the legacy exporter's deprecation, TracerWarnings:
        warnings.simplefilter("ignore")  # the check against the torch model decides
        # the TorchScript-based exporter: needs no onnxscript and exports these models
        # exactly (the dynamo exporter: torch.onnx.export(..., dynamo=True) + onnxscript)
        torch.onnx.export(module, example, str(path), dynamo=False, input_names=names,
                          output_names=["embedding"], dynamic_axes=axes,
                          opset_version=OPSET, do_constant_folding=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(image: torch.Tensor, domain: torch.Tensor) -> np.ndarray:
        feed = {"image": image.numpy()}
        if "domain" in names:
            feed["domain"] = domain.numpy()
        return session.run(["embedding"], feed)[0]

    return run


def _describe_onnx(path: Path, info: dict[str, Any]) -> None:
    """The description into the ONNX file's ``metadata_props`` (one entry per key: strings
    as they are, anything else as JSON)."""
    import onnx

    proto = onnx.load(str(path))
    proto.doc_string = "zsbir embedding model: see metadata_props, model.json, MODEL_CARD.md"
    del proto.metadata_props[:]
    for key, value in info.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _trace_torchscript(module: EmbeddingModule, example: tuple[torch.Tensor, ...],
                       path: Path) -> tuple[Any, Any]:
    """Trace and save to ``path``; returns (a function running the saved file as
    ``torch.jit.load`` reads it, the traced module)."""
    with warnings.catch_warnings():  # TracerWarnings (the check decides); torch 2.14's
        warnings.simplefilter("ignore")  # deprecation of TorchScript (docs/export.md)
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    domain_input = len(example) == 2

    def run(image: torch.Tensor, domain: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            out = loaded(image, domain) if domain_input else loaded(image)
        return out.numpy()

    return run, traced


def export_model(model: nn.Module, transforms: Any, fmt: str, path: str | Path,
                 normalize: bool = False, extra: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Write ``model``'s embedding (:class:`EmbeddingModule`) to ``path`` in ``fmt`` and
    check it; returns the description written into the file and beside it (``model.json``).

    ``transforms``: the model's eval transforms (a :class:`~zsbir.data.loading.
    DomainTransforms`), whose size, mean, std and interpolation the description gives per
    domain. ``extra``: more keys for the description (the run, the source checkpoint)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    versions = _require(fmt)
    path = Path(path)
    model = model.float().eval().cpu()
    inputs = input_spec(transforms)
    size = int(inputs["photo"]["size"])
    domain_input = uses_domain(model, size)
    module = EmbeddingModule(model, domain_input, normalize).eval()
    names = ["image", "domain"] if domain_input else ["image"]
    with torch.inference_mode():
        dim = int(module(torch.zeros(1, 3, size, size), torch.zeros(1, dtype=torch.long))
                  .shape[1])
    info: dict[str, Any] = {
        "format": fmt, "file": path.name, "embed_dim": dim,
        "inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 3, size, size],
                    "what": "images resized and normalized with their domain's "
                            "input_config (preprocessing)"}]
        + ([{"name": "domain", "dtype": "int64", "shape": ["batch"],
             "what": "each row's domain bit: 0 photo, 1 sketch"}] if domain_input else []),
        "output": {"name": "embedding", "dtype": "float32", "shape": ["batch", dim],
                   "l2_normalized": bool(normalize)},
        "domain_input": domain_input,
        "input_config": inputs,
        "preprocessing": "decode and convert to 8-bit RGB (PIL convert('RGB')); resize to "
                         "size x size pixels with PIL's `interpolation` filter (the aspect "
                         "ratio is not kept); uint8 / 255 as float32; subtract `mean` and "
                         "divide by `std` per channel; NCHW",
        "similarity": "cosine: L2-normalize both embeddings, then the dot product (zsbir's "
                      "evaluation and photo index rank so)",
        **({"opset": OPSET} if fmt == "onnx" else {}),
        **(extra or {}),
    }
    from zsbir.engine.checkpoint import package_versions

    info["versions"] = {**package_versions(), **versions}
    example = (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)),)
    if domain_input:
        example += (torch.tensor([SKETCH, PHOTO]),)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        traced = None
        if fmt == "onnx":
            run = _trace_onnx(module, example, names, tmp)
        else:
            run, traced = _trace_torchscript(module, example, tmp)
        worst = _check(module, run, size, domain_input, fmt)
        info["checked"] = {"batch_sizes": list(CHECK_BATCH_SIZES),
                           "domains": ["photo", "sketch", "mixed"] if domain_input
                           else ["photo"],
                           "max_abs_diff": worst,
                           "against": "the torch model, on random normal images"}
        if fmt == "onnx":
            _describe_onnx(tmp, info)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                torch.jit.save(traced, str(tmp), _extra_files={"zsbir.json": json.dumps(info)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return info


def _check(module: EmbeddingModule, run: Any, size: int, domain_input: bool, fmt: str
           ) -> float:
    worst = 0.0
    for image, domain in _check_batches(size, domain_input):
        with torch.inference_mode():
            ref = module(image, domain).numpy()
        got = run(image, domain)
        if got.shape != ref.shape:
            raise ExportError(f"the {fmt} model gives {got.shape} for a batch of "
                              f"{len(image)}, the torch model {ref.shape}")
        diff = float(np.abs(got - ref).max())
        scale = max(float(np.abs(ref).max()), 1e-6)
        if not np.isfinite(diff) or diff > TOLERANCE * scale:
            raise ExportError(f"the {fmt} model differs from the torch model by {diff:.3g} "
                              f"(largest value {scale:.3g}) on a batch of {len(image)} "
                              f"(domains {domain.tolist()}); nothing written")
        worst = max(worst, diff)
    return worst


def export_run(run_dir: str | Path, fmt: str, output: str | Path | None = None,
               normalize: bool = False) -> Exported:
    """Export a run's (or an imported model's) ``checkpoints/final.pt`` to
    ``output`` (default ``RUN_DIR/export/FORMAT``): ``model.onnx`` / ``model.pt``,
    ``model.json`` and ``MODEL_CARD.md``."""
    from zsbir.engine.index import load_trained

    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    final = run_dir / "checkpoints" / "final.pt"
    if not run_dir.is_dir():
        raise ExportError(f"no run directory {str(run_dir)!r}")
    if not final.is_file():
        raise ExportError(f"{str(run_dir)!r} has no checkpoints/final.pt: only a finished "
                          "`zsbir run` (or an imported model) can be exported")
    _require(fmt)  # before the model is loaded
    out = Path(output) if output is not None else run_dir / "export" / fmt
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot write the export directory {str(out)!r}: "
                          f"{exc.strerror or exc}") from None
    trained = load_trained(run_dir, "cpu")
    extra = {"run": {"dir": str(run_dir.resolve()), "name": trained.manifest.run.name,
                     "checkpoint": "checkpoints/final.pt", "sha256": file_sha256(final)}}
    info = export_model(trained.model, trained.transform, fmt, out / FORMATS[fmt],
                        normalize=normalize, extra=extra)
    info_file = out / "model.json"
    info_file.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    card = write_model_card(run_dir, out / "MODEL_CARD.md", export=info)
    return Exported(out / FORMATS[fmt], info_file, card, info)
