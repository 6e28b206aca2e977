"""Several runs side by side: the paper-style table (``zsbir compare``).

Rows are runs, or groups of runs of one manifest under several seeds; columns are
(protocol task, hasher, metric), read from each run's ``metrics.json``. Runs whose resolved
manifests (``manifest.resolved.toml``) differ only in ``run.seed``, ``run.name`` or
``run.output_dir`` form one row, shown as mean ± sample standard deviation (n - 1) over
the seeds, with n in the ``seeds`` column. Formats: a rich table, Markdown, LaTeX
(``booktabs``) or CSV.

``zsbir report RUN_DIR`` prints one run's summary (:func:`run_summary`) and draws its
curves (:mod:`zsbir.report.curves`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["EXTRAS", "FORMATS", "CompareError", "Run", "Table", "build_table", "compare",
           "group_key", "group_runs", "load_run", "render", "run_summary"]

FORMATS = ("table", "markdown", "latex", "csv")
#: manifest keys that do not make two runs different experiments
IGNORED_KEYS = (("run", "seed"), ("run", "name"), ("run", "output_dir"), ("run", "overwrite"))


class CompareError(ValueError):
    """A run directory cannot be read, or the table asked for is empty."""


@dataclass
class Run:
    """One run directory: its name, resolved manifest (plain data) and ``metrics.json``."""

    path: Path
    name: str
    manifest: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def seed(self) -> Any:
        return self.manifest.get("run", {}).get("seed")


def load_run(path: str | Path) -> Run:
    """Read RUN_DIR's ``metrics.json`` (required) and ``manifest.resolved.toml``."""
    import tomllib

    path = Path(path)
    mfile = path / "metrics.json"
    if not path.is_dir():
        raise CompareError(f"{str(path)!r} is not a directory")
    if not mfile.is_file():
        raise CompareError(f"{str(path)!r} has no metrics.json (not a finished zsbir run)")
    try:
        metrics = json.loads(mfile.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CompareError(f"{mfile}: unreadable ({exc})") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("results"), dict):
        raise CompareError(f"{mfile}: no 'results' table (not a zsbir metrics.json)")
    manifest: dict[str, Any] = {}
    tfile = path / "manifest.resolved.toml"
    if tfile.is_file():
        try:
            manifest = tomllib.loads(tfile.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CompareError(f"{tfile}: unreadable ({exc})") from None
    name = manifest.get("run", {}).get("name") or path.name
    return Run(path, str(name), manifest, metrics)


def group_key(manifest: dict[str, Any]) -> str:
    """The manifest as canonical JSON, without the keys seeds of one experiment differ in."""
    data = json.loads(json.dumps(manifest, default=str))
    for section, key in IGNORED_KEYS:
        if isinstance(data.get(section), dict):
            data[section].pop(key, None)
    return json.dumps(data, sort_keys=True)


def _label(names: Sequence[str]) -> str:
    """``["lb_seed0", "lb_seed1"]`` -> ``"lb"``; one name is kept as it is."""
    if len(names) == 1:
        return names[0]
    stems = {re.sub(r"[_\-.]?(seed|s)?\d+$", "", n) or n for n in names}
    return stems.pop() if len(stems) == 1 else ", ".join(names)


def group_runs(runs: Iterable[Run]) -> dict[str, list[Run]]:
    """Runs grouped by :func:`group_key` (first appearance order), labelled by their
    names' common stem (``sake_seed0``, ``sake_seed1`` -> ``sake``)."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        # a run without a saved manifest is its own group
        key = group_key(r.manifest) if r.manifest else f"path:{r.path}"
        groups.setdefault(key, []).append(r)
    out: dict[str, list[Run]] = {}
    for members in groups.values():
        label = _label([m.name for m in members])
        while label in out:
            label += "'"
        out[label] = members
    return out


# ------------------------------------------------------------------------ extra columns
def _task(run: Run) -> str:
    proto = run.metrics.get("protocol", {})
    name = proto.get("name") if isinstance(proto, dict) else None
    return name if name in run.metrics["results"] else next(iter(run.metrics["results"]), "")


def _images_per_s(run: Run) -> float | None:
    hist = run.metrics.get("train", {}).get("history", [])
    rates = [h["images_per_s"] for h in hist if h.get("images_per_s")]
    # equal images per epoch: the overall rate is the harmonic mean of the epochs' rates
    return statistics.harmonic_mean(rates) if rates else None


def _seconds(run: Run) -> float | None:
    if "wall_s" in run.metrics:
        return float(run.metrics["wall_s"])
    train = run.metrics.get("train", {}).get("seconds")
    ev = run.metrics.get("seconds", {}).get("evaluate_total")
    return None if train is None else float(train) + float(ev or 0.0)


#: extra columns by name: (header, value of a run, digits)
EXTRAS: dict[str, tuple[str, Callable[[Run], float | None], int]] = {
    "chance": ("chance", lambda r: r.metrics.get("chance", {}).get(_task(r)), 3),
    "seconds": ("wall s", _seconds, 0),
    "images_per_s": ("train images/s", _images_per_s, 1),
    "best_val": ("best val acc",
                 lambda r: r.metrics.get("train", {}).get("best_val_accuracy"), 3),
}


# ------------------------------------------------------------------------------- table
@dataclass
class Cell:
    values: list[float] = field(default_factory=list)
    digits: int = 4

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def text(self, pm: str = "±") -> str:
        if not self.values:
            return "-"
        d = self.digits
        if self.std is None:
            return f"{self.mean:.{d}f}"
        return f"{self.mean:.{d}f} {pm} {self.std:.{d}f}"


@dataclass
class Table:
    """Rows (label, number of runs, cells) under columns (header tuples)."""

    columns: list[tuple[str, ...]]
    rows: list[tuple[str, int, list[Cell]]]

    def headers(self) -> list[str]:
        return [" ".join(c) for c in self.columns]


def _metric_columns(runs: Sequence[Run], metrics: Sequence[str] | None,
                    hashers: Sequence[str] | None, tasks: Sequence[str] | None
                    ) -> list[tuple[str, str, str]]:
    cols: list[tuple[str, str, str]] = []
    for r in runs:
        for task, per_hasher in r.metrics["results"].items():
            if tasks and task not in tasks:
                continue
            for tag, entry in per_hasher.items():
                if hashers and tag not in hashers:
                    continue
                for name in entry:
                    if name == "per_class" or (metrics and name not in metrics):
                        continue
                    if (task, tag, name) not in cols:
                        cols.append((task, tag, name))
    if metrics:  # within a (task, hasher), the order the user gave
        task_order = list(dict.fromkeys(c[0] for c in cols))
        tag_order = list(dict.fromkeys(c[1] for c in cols))
        cols.sort(key=lambda c: (task_order.index(c[0]), tag_order.index(c[1]),
                                 list(metrics).index(c[2])))
    return cols


def build_table(groups: dict[str, list[Run]], metrics: Sequence[str] | None = None,
                hashers: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
                extras: Sequence[str] = ()) -> Table:
    """One row per group: the metrics' mean (± std over its runs), then ``extras``."""
    runs = [r for members in groups.values() for r in members]
    cols = _metric_columns(runs, metrics, hashers, tasks)
    unknown = [e for e in extras if e not in EXTRAS]
    if unknown:
        raise CompareError(f"unknown extra column {unknown[0]!r} "
                           f"(known: {', '.join(EXTRAS)})")
    if not cols:
        wanted = ", ".join(metrics or ()) or "any metric"
        raise CompareError(f"no run has {wanted}"
                           + (f" for hasher {', '.join(hashers)}" if hashers else "")
                           + (f" in task {', '.join(tasks)}" if tasks else ""))
    columns: list[tuple[str, ...]] = [c for c in cols]
    columns += [(EXTRAS[e][0],) for e in extras]
    rows = []
    for label, members in groups.items():
        cells = []
        for task, tag, name in cols:
            vals = [r.metrics["results"].get(task, {}).get(tag, {}).get(name) for r in members]
            cells.append(Cell([float(v["value"]) for v in vals if isinstance(v, dict)]))
        for e in extras:
            _, fn, digits = EXTRAS[e]
            vals = [fn(r) for r in members]
            cells.append(Cell([float(v) for v in vals if v is not None and not (
                isinstance(v, float) and math.isnan(v))], digits))
        rows.append((label, len(members), cells))
    return Table(columns, rows)


def _latex_escape(text: str) -> str:
    return re.sub(r"([&%$#_{}])", r"\\\1", text)


def render(table: Table, fmt: str = "markdown") -> str:
    """The table as Markdown, LaTeX (booktabs), CSV (mean and std columns) or plain text."""
    heads = ["run", "seeds", *table.headers()]
    if fmt == "markdown":
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        for label, n, cells in table.rows:
            lines.append("| " + " | ".join([label.replace("|", "\\|"), str(n),
                                            *(c.text() for c in cells)]) + " |")
        return "\n".join(lines)
    if fmt == "latex":
        spec = "l" + "r" * (len(heads) - 1)
        lines = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
                 " & ".join(_latex_escape(h) for h in heads) + " \\\\", "\\midrule"]
        for label, n, cells in table.rows:
            lines.append(" & ".join([_latex_escape(label), str(n),
                                     *(c.text("$\\pm$") for c in cells)]) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        head = ["run", "seeds"]
        for h in table.headers():
            head += [f"{h} mean", f"{h} std"]
        w.writerow(head)
        for label, n, cells in table.rows:
            row: list[Any] = [label, n]
            for c in cells:
                row += ["" if c.mean is None else repr(c.mean),
                        "" if c.std is None else repr(c.std)]
            w.writerow(row)
        return buf.getvalue().rstrip("\n")
    if fmt == "table":  # plain, aligned (the CLI draws a rich table on a terminal)
        body = [[label, str(n), *(c.text() for c in cells)] for label, n, cells in table.rows]
        widths = [max(len(r[i]) for r in [heads, *body]) for i in range(len(heads))]
        return "\n".join("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                                   for i, (v, w) in enumerate(zip(r, widths)))
                         for r in [heads, *body])
    raise CompareError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")


def compare(run_dirs: Sequence[str | Path], metrics: Sequence[str] | None = None,
            fmt: str = "markdown", hashers: Sequence[str] | None = None,
            tasks: Sequence[str] | None = None, extras: Sequence[str] = ()) -> str:
    """Load, group and render in one call (what ``zsbir compare`` prints)."""
    runs = [load_run(p) for p in run_dirs]
    return render(build_table(group_runs(runs), metrics, hashers, tasks, extras), fmt)


# ----------------------------------------------------------------------------- summary
def _component_names(value: Any) -> str:
    items = value if isinstance(value, list) else [value]
    names = [str(t.get("name")) for t in items if isinstance(t, dict) and "name" in t]
    return ", ".join(names)


def run_summary(run: Run) -> list[tuple[str, str]]:
    """(field, value) lines describing a finished run, for ``zsbir report``."""
    m, res = run.manifest, run.metrics
    out: list[tuple[str, str]] = [("run", f"{run.name} ({run.path})")]
    for key in ("protocol", "backbone", "teacher", "losses", "sampler", "optimizer",
                "hashers", "rerankers"):
        if key in m:
            out.append((key, _component_names(m[key])))
    model = m.get("model")
    if isinstance(model, dict):  # [model]: its name and each of its component tables
        if "name" in model:
            out.append(("model", str(model["name"])))
        out.extend((f"model.{k}", _component_names(v)) for k, v in model.items()
                   if isinstance(v, dict) and "name" in v)
    classes = res.get("classes", {}).get("counts")
    if classes:
        out.append(("classes", f"{classes['seen']} seen, {classes['unseen']} unseen "
                               f"({classes.get('validation_images', 0)} validation images)"))
    train = res.get("train", {})
    if train:
        best = train.get("best_epoch", -1)
        text = f"{train.get('epochs_run')} epochs, {train.get('global_steps')} steps"
        if best is not None and best >= 0:
            text += (f"; best validation accuracy {train.get('best_val_accuracy', 0):.3f} "
                     f"at epoch {best + 1}")
        if train.get("stopped_early"):
            text += "; stopped early"
        text += f"; weights evaluated: {train.get('selected')}"
        out.append(("training", text))
        rate = _images_per_s(run)
        if train.get("seconds") is not None:
            out.append(("time", f"{train['seconds']:.0f} s build + training"
                                + (f" ({rate:.0f} images/s)" if rate else "")
                                + f", {res.get('seconds', {}).get('evaluate_total', 0):.0f} s "
                                  "evaluation"))
    for task, per_hasher in res.get("results", {}).items():
        size = res.get("sizes", {}).get(task, {})
        head = f"{task} ({size.get('queries', '?')} queries x {size.get('gallery', '?')})"
        for tag, entry in per_hasher.items():
            vals = " ".join(f"{k}={v['value']:.4f}" for k, v in entry.items()
                            if k != "per_class" and isinstance(v, dict))
            out.append((f"{head} {tag}", vals))
        if task in res.get("chance", {}):
            out.append((f"{task} chance", f"{res['chance'][task]:.4f}"))
    skipped = res.get("skipped_images", {}).get("count", 0)
    if skipped:
        out.append(("skipped images", str(skipped)))
    return out
