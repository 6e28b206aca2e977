"""Model cards: ``MODEL_CARD.md`` in every run directory (written at the end of
``zsbir run``) and every export directory (``zsbir export``).

A card is read from the run directory's own files, nothing is built: the resolved
manifest (method and components, data and split settings, training settings),
``metrics.json`` (class counts, test sizes, every metric with its formula, the training
record, versions), the scores of ``zsbir evaluate RUN_DIR`` (``eval/<protocol>/
metrics.json``) and, for a model imported from a published checkpoint, the importer's
note of its source: a JSON object in ``RUN_DIR/import.json`` (``zsbir import`` writes the
source file, its size and sha256, the importer, what it read and the versions; any keys
are shown, in the card's "Source checkpoint" section), or under the key ``source`` of
``metrics.json``. A card with such a note says the manifest's training settings are not
how the source was trained.

Whatever writes or scores a run directory calls :func:`write_model_card` (``RUN_DIR``
alone) when it is done; ``zsbir run`` does at its end, ``zsbir export`` writes a card
with an "Export" section into each export.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["CARD", "IMPORT_NOTE", "input_spec", "model_card", "write_model_card"]

CARD = "MODEL_CARD.md"
#: where an importer notes the published checkpoint a run directory was made from
IMPORT_NOTE = "import.json"
#: the manifest sections that are components (in the card's order)
_COMPONENTS = ("model", "teacher", "losses", "train.step", "sampler", "optimizer", "schedule",
               "hashers", "rerankers")


def input_spec(transforms: Any) -> dict[str, dict[str, Any]]:
    """Each domain's input configuration as the eval transform applies it: ``bit``,
    ``size``, ``mean``, ``std`` (0 and 1 where the manifest normalizes nothing),
    ``interpolation``."""
    out = {}
    for domain, bit in (("sketch", 1), ("photo", 0)):
        t = transforms.for_domain(domain)
        out[domain] = {"bit": bit, "size": int(t.size),
                       "mean": [float(v) for v in t.mean] if t.mean is not None else [0.0] * 3,
                       "std": [float(v) for v in t.std] if t.std is not None else [1.0] * 3,
                       "interpolation": str(t.interpolation)}
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, default=str)
    return str(v)


def _cell(v: Any) -> str:
    return _fmt(v).replace("|", "\\|").replace("\n", " ")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_manifest(run_dir: Path) -> dict[str, Any]:
    try:
        with open(run_dir / "manifest.resolved.toml", "rb") as fh:
            return tomllib.load(fh)
    except (OSError, ValueError):
        return {}


def _get(table: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(table, dict):
            return None
        table = table.get(part)  # type: ignore[assignment]
    return table


def _component_rows(key: str, table: Any) -> Iterator[tuple[str, str, str]]:
    """(key, name, settings) of a component table and of the components nested in it."""
    if isinstance(table, list):
        for i, item in enumerate(table):
            yield from _component_rows(f"{key}[{i}]", item)
        return
    if not isinstance(table, dict):
        return
    settings, nested = [], []
    for k, v in table.items():
        if k == "name":
            continue
        if isinstance(v, dict) and "name" in v:
            nested.append((f"{key}.{k}", v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) and "name" in x for x in v):
            nested.append((f"{key}.{k}", v))
        else:
            settings.append(f"{k} = {_fmt(v)}")
    yield key, str(table.get("name", "")), ", ".join(settings)
    for k, v in nested:
        yield from _component_rows(k, v)


def _method_line(m: dict[str, Any]) -> str:
    model = m.get("model") or {}
    parts = [f"model `{model.get('name', '?')}`"]
    for k, v in model.items():
        if isinstance(v, dict) and "name" in v:
            extra = ""
            if "pretrained" in v:
                extra = " (ImageNet weights)" if v.get("pretrained") or v.get("weights") \
                    else " (random init)"
            if "embed_dim" in v:
                extra = f" ({v['embed_dim']}-d embedding)"
            parts.append(f"{k} `{v['name']}`{extra}")
    losses = m.get("losses") or []
    if losses:
        parts.append("losses " + ", ".join(f"`{x.get('name')}` x {_fmt(x.get('weight', 1.0))}"
                                           for x in losses))
    teacher = m.get("teacher")
    parts.append(f"teacher `{teacher['name']}`" if isinstance(teacher, dict) and
                 teacher.get("name") else "no teacher")
    return "; ".join(parts)


def _section_inputs(inputs: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| domain | bit | size | mean | std | interpolation |", "|---|---|---|---|---|---|"]
    for domain, c in inputs.items():
        lines.append(f"| {domain} | {c['bit']} | {c['size']} | {_cell(c['mean'])} | "
                     f"{_cell(c['std'])} | {c['interpolation']} |")
    return lines


def _metrics_lines(metrics: dict[str, Any]) -> list[str]:
    results = metrics.get("results") or {}
    rows, formulas = [], {}
    for task, per_hasher in results.items():
        for tag, entry in (per_hasher or {}).items():
            for name, v in (entry or {}).items():
                if not isinstance(v, dict) or "value" not in v:
                    continue
                rows.append(f"| {task} | {tag} | {name} | {float(v['value']):.4f} |")
                if v.get("formula"):
                    formulas.setdefault(name, v["formula"])
    if not rows:
        return ["No metrics recorded."]
    lines = ["| task | index | metric | value |", "|---|---|---|---|", *rows, ""]
    sizes = metrics.get("sizes") or {}
    chance = metrics.get("chance") or {}
    for task in results:
        s = sizes.get(task) or {}
        bits = [f"{s['queries']} queries x {s['gallery']} gallery"] if s else []
        if task in chance:
            bits.append(f"chance level {float(chance[task]):.4f} (gallery positive rate)")
        if bits:
            lines.append(f"- {task}: " + ", ".join(bits))
    lines += ["", "Formulas (metrics.json holds each with its value):", ""]
    lines += [f"- `{name}`: {formula}" for name, formula in formulas.items()]
    lines += ["", "Index `real`: the real-valued embeddings ranked by cosine similarity; "
              "other indexes: binary codes of a fitted hasher (e.g. `itq64`), ranked by "
              "Hamming distance."]
    return lines


def _eval_metrics(run_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(protocol, metrics)`` of each ``zsbir evaluate RUN_DIR`` (``eval/*/metrics.json``)."""
    out = []
    for path in sorted((run_dir / "eval").glob("*/metrics.json")):
        data = _read_json(path)
        if data is not None:
            out.append((path.parent.name, data))
    return out


def _evaluated_line(metrics: dict[str, Any]) -> str:
    ev = metrics.get("evaluated") or {}
    proto = ev.get("protocol") or metrics.get("protocol") or {}
    bits = [f"protocol `{proto.get('name', '?')}`"]
    if ev.get("cross_protocol"):
        trained = (ev.get("trained_protocol") or {}).get("name", "?")
        bits.append(f"cross-protocol (the model was trained on `{trained}`)")
    if ev.get("hashers"):
        bits.append(f"hashers {ev['hashers']}")
    if ev.get("overrides"):
        bits.append("--set " + " ".join(map(str, ev["overrides"])))
    return ", ".join(bits)


def _source_note(run_dir: Path, metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    note = _read_json(run_dir / IMPORT_NOTE)
    if note is None and metrics and isinstance(metrics.get("source"), dict):
        note = metrics["source"]
    return note


def _flatten(d: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            yield from _flatten(v, key)
        else:
            yield key, v


def model_card(run_dir: str | Path, export: dict[str, Any] | None = None,
               inputs: dict[str, dict[str, Any]] | None = None) -> str:
    """The Markdown card of a run directory (``export``: the description of an exported
    model, :func:`zsbir.export.embedding.export_model`; ``inputs``: the input
    configuration per domain, :func:`input_spec`, taken from ``export`` when given)."""
    from zsbir import __version__

    run_dir = Path(run_dir)
    m = _read_manifest(run_dir)
    metrics = _read_json(run_dir / "metrics.json")
    evaluations = _eval_metrics(run_dir)
    source = _source_note(run_dir, metrics)
    scored = metrics or (evaluations[0][1] if evaluations else None)  # data and split
    name = _get(m, "run.name") or run_dir.name
    inputs = (export or {}).get("input_config") or inputs
    proto = m.get("protocol") or {}
    out: list[str] = [f"# Model card: {name}", ""]
    kind = "an imported published checkpoint" if source else "a zsbir run"
    out += [f"A zero-shot sketch-based image retrieval (ZS-SBIR) model from {kind} "
            f"(`{run_dir.name}`): it embeds sketches and photos in one space, where a sketch's "
            "nearest photos (cosine similarity) are photos of the class it depicts, for "
            "classes it was not trained on too.", ""]
    if export:
        out += ["This directory holds it exported: see [Export](#export).", ""]

    out += ["## Method and components", "", f"Method: {_method_line(m)}.", "",
            "| key | component | settings |", "|---|---|---|"]
    for key in _COMPONENTS:
        for k, comp, settings in _component_rows(key, _get(m, key)):
            out.append(f"| `{k}` | `{comp}` | {_cell(settings) or '-'} |")
    out += ["", "The weights are those in `checkpoints/final.pt`: the ones the run evaluated "
            f"(`train.select = {_fmt(_get(m, 'train.select') or 'last')}`; a teacher or step "
            "that defines `inference_model()`, e.g. an EMA copy, chooses them).", ""]
    embed_dim = (export or {}).get("embed_dim") or _get(m, "model.head.embed_dim")
    if embed_dim:
        out += [f"Embedding: {embed_dim}-d float32, not L2-normalized"
                + (" (the export appends the L2 normalization)"
                   if (export or {}).get("output", {}).get("l2_normalized") else "")
                + "; compare embeddings by cosine similarity.", ""]
    if inputs:
        out += ["Input configuration (each image is resized to size x size with the filter "
                "and normalized with its domain's mean and std):", "",
                *_section_inputs(inputs), ""]

    out += ["## Data and split", ""]
    if scored is not metrics and scored is not None:
        out += [f"As scored by `zsbir evaluate` ({_evaluated_line(scored)}); the model's "
                "own training data is described under "
                "[Source checkpoint](#source-checkpoint).", ""]
        proto = (scored.get("evaluated") or {}).get("protocol") or proto
    classes = (scored or {}).get("classes") or {}
    counts = classes.get("counts") or {}
    out.append(f"- protocol: `{proto.get('name', '?')}` ("
               + ", ".join(f"{k} = {_fmt(v)}" for k, v in proto.items() if k != "name") + ")")
    if counts:
        out.append(f"- classes: {counts.get('seen', '?')} seen (trained on), "
                   f"{counts.get('unseen', '?')} unseen (the zero-shot test), "
                   f"{counts.get('validation_images', '?')} held-out validation images of "
                   "seen classes")
    if classes.get("unseen"):
        out.append("- unseen classes: " + ", ".join(map(str, classes["unseen"])))
    if scored and scored.get("num_queries") is not None:
        out.append(f"- test: {scored['num_queries']} unseen-class sketches query "
                   f"{scored['num_gallery']} unseen-class photos")
    if not scored:
        out.append("- no metrics.json: the model has not been scored here yet")
    out.append("")

    out += ["## Training settings", ""]
    if source and not (metrics or {}).get("train"):
        out += ["Trained elsewhere (see [Source checkpoint](#source-checkpoint)); the "
                "settings below are the resolved manifest's, not how the source was trained.",
                ""]
    d = m.get("data") or {}
    t = m.get("train") or {}
    out.append(f"- seed {_fmt(_get(m, 'run.seed'))}; image size {_fmt(d.get('image_size'))}; "
               "augmentation: " + ", ".join(f"{k} = {_fmt(d[k])}" for k in
                                            ("augment_prob", "flip", "scale", "rotation",
                                             "translation") if k in d))
    out.append("- " + ", ".join(f"{k} = {_fmt(v)}" for k, v in t.items()
                                if not isinstance(v, dict)))
    record = (metrics or {}).get("train") or {}
    if record:
        val = record.get("best_val_accuracy")
        out.append(f"- ran {record.get('epochs_run')} epochs, {record.get('global_steps')} "
                   f"steps in {float(record.get('seconds') or 0):.0f} s on "
                   f"{(metrics or {}).get('device', '?')}; best validation accuracy "
                   + (f"{float(val):.4f}" if val is not None else "-")
                   + f" at epoch {record.get('best_epoch')}; selected: {record.get('selected')}"
                   + ("; stopped early" if record.get("stopped_early") else ""))
    out.append("")

    out += ["## Metrics", ""]
    if metrics:
        out += _metrics_lines(metrics) + [""]
    for protocol, ev in evaluations:
        out += [f"### Scored by `zsbir evaluate` on {protocol}", "",
                f"{_evaluated_line(ev)} (`eval/{protocol}/metrics.json`).", "",
                *_metrics_lines(ev), ""]
    if not metrics and not evaluations:
        out += ["Not scored yet (no metrics.json; `zsbir evaluate RUN_DIR` scores it).", ""]

    out += ["## Source checkpoint", ""]
    if source:
        out += [f"- {k}: {_fmt(v)}" for k, v in _flatten(source) if k.split(".")[0]
                != "versions"]
    else:
        out.append(f"Trained by zsbir in this run (no {IMPORT_NOTE}: not imported).")
    out.append("")

    if export:
        out += ["## Export", ""]
        out.append(f"- file: `{export.get('file')}` ({export.get('format')}"
                   + (f", opset {export['opset']}" if export.get("opset") else "") + "); "
                   "description: `model.json` (also inside the model file)")
        ins = ", ".join(f"`{i['name']}` {i['dtype']} {i['shape']}" for i in export["inputs"])
        o = export["output"]
        out.append(f"- inputs: {ins}; output: `{o['name']}` {o['dtype']} {o['shape']}"
                   + (", L2-normalized" if o.get("l2_normalized") else ", not normalized"))
        if export.get("domain_input"):
            out.append("- `domain`: 0 for photos, 1 for sketches (the model reads it)")
        out.append(f"- preprocessing: {export.get('preprocessing')}")
        chk = export.get("checked") or {}
        if chk:
            out.append(f"- checked against the torch model at batch sizes "
                       f"{chk.get('batch_sizes')} ({', '.join(chk.get('domains', []))}): "
                       f"largest difference {float(chk.get('max_abs_diff', 0)):.2g}")
        run = export.get("run") or {}
        if run.get("sha256"):
            out.append(f"- exported from `{run.get('checkpoint')}` (sha256 {run['sha256']})")
        out.append("")

    out += ["## Versions", ""]
    versions = dict((metrics or {}).get("versions") or {})
    if versions:
        out.append("- run: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if source and isinstance(source.get("versions"), dict):
        out.append("- import: " + ", ".join(f"{k} {v}" for k, v in source["versions"].items()))
    for protocol, ev in evaluations:
        if isinstance(ev.get("versions"), dict):
            out.append(f"- evaluate on {protocol}: "
                       + ", ".join(f"{k} {v}" for k, v in ev["versions"].items()))
    if export and export.get("versions"):
        out.append("- export: " + ", ".join(f"{k} {v}" for k, v in export["versions"].items()))
    out += [f"- card written by zsbir {__version__}", ""]

    out += ["## Intended use", "",
            "Research on zero-shot sketch-based image retrieval: ranking photos by a "
            "free-hand sketch, and comparing methods under the protocol above. Embed the "
            "sketch with the sketch input configuration, the photos with the photo one, "
            "and rank the photos by cosine similarity (`zsbir index build` / `zsbir search` "
            "do this for a folder of photos).", "", "## Limitations", ""]
    lims = [f"Measured only on the unseen classes of `{proto.get('name', '?')}` listed "
            "above; retrieval quality on other classes, other sketch styles or other photo "
            "collections is unknown until measured (`zsbir evaluate`).",
            "Sketch datasets are drawn by crowd workers from a few class lists; the "
            "model inherits their biases (object-centred photos, drawing styles).",
            "Binary codes (hashed indexes) need the hasher fitted in `checkpoints/final.pt`; "
            "an exported model gives the real-valued embedding only.",
            "Not meant for identifying people or for any decision about individuals."]
    if proto.get("name") == "synthetic":
        lims.insert(0, "Trained and scored on zsbir's generated `synthetic` shapes: a "
                       "demonstration and test model, not for real sketches or photos.")
    out += [f"- {x}" for x in lims]
    return "\n".join(out) + "\n"


def write_model_card(run_dir: str | Path, path: str | Path | None = None,
                     export: dict[str, Any] | None = None, transforms: Any = None) -> Path:
    """Write :func:`model_card` to ``path`` (default ``RUN_DIR/MODEL_CARD.md``);
    ``transforms``: the model's eval transforms, for the input configuration."""
    run_dir = Path(run_dir)
    path = Path(path) if path is not None else run_dir / CARD
    text = model_card(run_dir, export, input_spec(transforms) if transforms is not None
                      else None)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
