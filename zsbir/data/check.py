"""``zsbir data check``: what a downloaded dataset holds, measured against its protocol.

:func:`check_dataset` reads a dataset the way a protocol does and reports, before any
training:

- the **layout** recognized (:func:`zsbir.data.layouts.detect_layout`, the protocol's own
  layout table) and its directories;
- the **classes** of each directory against the protocol's class list: missing, extra,
  and likely misspellings with a suggestion (:func:`_suggest`: the protocol's matching key,
  then the same key with parenthesized text dropped, ``"cup (with handle)"`` -> ``"cup"``,
  then :func:`difflib.get_close_matches`);
- **image counts** per directory and domain against the published sizes of the extended
  datasets (:data:`PUBLISHED_DIRS`, :data:`PUBLISHED_SPLITS`, each with its source);
- **unreadable files**: zero-byte files, files that cannot be stat-ed or decoded (decoding
  every image is the full check's default), with their paths and reasons;
- **duplicated files across classes**: same bytes in two class folders, found by size
  first, then BLAKE2b of the first 8 KiB, then of whole files, each round only for the
  files that still match a file of another class (:func:`find_duplicates`);
- the **split** a run would use: the registered protocol itself is called with the same
  parameters (its own split code, never a copy), and its counts are reported.

The data *cannot serve the protocol* (``ok`` false, exit status 1) when no layout is found,
a class is missing, empty or matched by several folders in a directory, or the protocol
refuses the tree. Count mismatches, unreadable files (left out by the protocol) and
duplicates are warnings (``--strict``: they fail too).

**At run time** (:func:`build_protocol`, called where :func:`zsbir.build.build` builds the
protocol) the same report is made without the two expensive parts: no decoding (unless the
protocol's own ``verify_images`` is set) and no hashing for duplicates, so it costs the
protocol's own indexing plus a comparison of names; a protocol this module has no layout
table for (``synthetic``, plugins) is built directly, with no check at all.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import click

__all__ = ["PUBLISHED_DIRS", "PUBLISHED_SPLITS", "SCHEMA", "CheckReport", "build_protocol",
           "check_dataset", "check_table", "find_duplicates"]

#: version of the JSON report's layout (``zsbir data check --json``)
SCHEMA = 1

_SRC_SKETCHY = ("Sangkloy et al., SIGGRAPH 2016 (Sketchy: 75,471 sketches of 12,500 photos, "
                "125 classes)")
_SRC_SKETCHY_EXT = "Liu et al., CVPR 2017 (Deep Sketch Hashing: 60,502 extended photos)"
_SRC_TUB = "Eitz et al., SIGGRAPH 2012 (TU-Berlin: 20,000 sketches, 250 classes)"
_SRC_TUB_EXT = ("Zhang et al., CVPR 2016 (204,489 photos), as extended by Liu et al., "
                "CVPR 2017")
_SRC_LISTS = "the public file lists ({})"

#: published number of images of each layout directory of a whole dataset:
#: ``{protocol: {role: (images, source)}}``
PUBLISHED_DIRS: dict[str, dict[str, tuple[int, str]]] = {
    "sketchy_ext": {"sketch": (75_471, _SRC_SKETCHY), "photo": (12_500, _SRC_SKETCHY),
                    "photo_extended": (60_502, _SRC_SKETCHY_EXT)},
    "tuberlin_ext": {"sketch": (20_000, _SRC_TUB), "photo": (204_489, _SRC_TUB_EXT)},
}

#: published test-split sizes: ``{(protocol, split, photos or None): {part: (n, source)}}``
#: (``query``: unseen sketches, ``gallery``: unseen photos, not generalized)
PUBLISHED_SPLITS: dict[tuple[str, str, str | None], dict[str, tuple[int, str]]] = {
    ("sketchy_ext", "sk-sh", "original+extended"): {
        "query": (15_229, _SRC_LISTS.format("SAKE dataset/Sketchy/zeroshot1")),
        "gallery": (17_101, _SRC_LISTS.format("SAKE dataset/Sketchy/zeroshot1; 2,499 "
                                              "duplicate an extended photo"))},
    ("sketchy_ext", "sk-ye", "original+extended"): {
        "query": (12_694, _SRC_LISTS.format("ZSE-SBIR zeroshot0")),
        "gallery": (12_553, _SRC_LISTS.format("ZSE-SBIR zeroshot0"))},
    ("tuberlin_ext", "tub-sh", None): {
        "query": (2_400, _SRC_LISTS.format("SAKE dataset/TUBerlin/zeroshot, 30 x 80")),
        "gallery": (27_989, _SRC_LISTS.format("SAKE dataset/TUBerlin/zeroshot"))},
    ("quickdraw_ext", "qd-de", None): {
        "query": (92_291, _SRC_LISTS.format("Doodle2Search test lists")),
        "gallery": (54_151, _SRC_LISTS.format("Doodle2Search test lists"))},
}

_DATASETS = {"sketchy_ext": "sketchy", "tuberlin_ext": "tuberlin", "quickdraw_ext": "quickdraw",
             "folder": None}


@dataclass
class CheckReport:
    """The result of :func:`check_dataset`; :meth:`to_dict` is the ``--json`` form."""

    root: str
    protocol: str
    params: dict[str, Any]
    layout: dict[str, Any] | None = None
    classes: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    bad_files: list[dict[str, str]] = field(default_factory=list)
    duplicates: dict[str, Any] = field(default_factory=lambda: {"checked": False, "groups": []})
    split: dict[str, int] | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    decoded: bool = False
    protocol_error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the data can serve the protocol (warnings allowed)."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "ok": self.ok, **asdict(self)}

    def text(self) -> str:
        """The human-readable report (what ``zsbir data check`` prints)."""
        split = self.params.get("split")
        out = [f"data check: {self.root} for protocol {self.protocol}"
               + (f" (split {split!r})" if split else "")]
        if self.layout:
            out.append(f"layout: {self.layout['name']} at {self.layout['base']}")
            out += [f"  {role}: {path}" for role, path in self.layout["dirs"].items()]
        else:
            out.append("layout: none recognized")
        for role, c in self.classes.get("by_role", {}).items():
            out.append(f"classes in {role}: {c['matched']} of {self.classes['expected']} "
                       f"matched, {len(c['missing'])} missing, {len(c['extra'])} extra")
            if c["missing"]:
                out.append(f"  missing: {', '.join(map(repr, c['missing']))}")
            if c["extra"]:
                out.append(f"  extra: {', '.join(map(repr, c['extra']))}")
            out += [f"  {s['folder']!r} looks like class {s['class']!r}"
                    for s in c["suggestions"]]
        for role, c in self.counts.get("by_role", {}).items():
            pub = (f" (published {c['published']:,}: {c['source']})" if c["published"]
                   is not None else "")
            out.append(f"images in {role} ({c['domain']} domain): {c['files']:,}{pub}")
        if self.bad_files:
            out.append(f"files left out ({len(self.bad_files)}):")
            out += [f"  {b['path']}: {b['reason']}" for b in self.bad_files[:_SHOWN]]
            out += _more(len(self.bad_files))
        elif self.layout:
            out.append("files left out: none" + ("" if self.decoded else
                                                 " (images not decoded)"))
        if self.duplicates["checked"]:
            groups = self.duplicates["groups"]
            out.append(f"files duplicated across classes: {len(groups)} group(s)")
            for g in groups[:_SHOWN]:
                out.append("  " + " = ".join(f"{f['path']} ({f['class']})" for f in g["files"]))
            out += _more(len(groups))
        if self.split is not None:
            s = self.split
            out.append(f"split: {s['seen_classes']} seen / {s['unseen_classes']} unseen "
                       f"classes; train {s['train']:,}, val {s['val']:,}, query {s['query']:,},"
                       f" gallery {s['gallery']:,} images")
        for w in self.warnings:
            out.append(f"warning: {w}")
        for p in self.problems:
            out.append(f"problem: {p}")
        out.append("result: " + ("ok: the data can serve the protocol" if self.ok else
                                 f"the data cannot serve {self.protocol}"))
        return "\n".join(out)


#: files and duplicate groups listed in the text report (all of them in the JSON one)
_SHOWN = 50


def _more(n: int) -> list[str]:
    return [f"  ... and {n - _SHOWN} more (all listed by --json)"] if n > _SHOWN else []


# --------------------------------------------------------------------------- classes
def _loose(name: str) -> str:
    """The matching key with parenthesized text dropped: ``cup (with handle)`` -> ``cup``."""
    from zsbir.data.classnames import normalize

    return normalize(re.sub(r"\([^)]*\)", " ", name))


def _suggest(folder: str, candidates: Sequence[str]) -> str | None:
    """The class ``folder`` most likely means among ``candidates`` (missing classes)."""
    from zsbir.data.classnames import normalize

    loose = {_loose(c): c for c in candidates}
    if _loose(folder) in loose:
        return loose[_loose(folder)]
    keys = {normalize(c): c for c in candidates}
    close = difflib.get_close_matches(normalize(folder), list(keys), n=1, cutoff=0.7)
    return keys[close[0]] if close else None


def _compare_classes(expected: Sequence[str], by_role: dict[str, list[str]]
                     ) -> dict[str, dict[str, Any]]:
    """Per role: matched / missing / extra class folders and suggestions for the extra ones
    (``folder`` protocol: a name found in one role but not another is also a candidate)."""
    from zsbir.data.classnames import normalize

    keys = {normalize(c): c for c in expected}
    out: dict[str, dict[str, Any]] = {}
    for role, folders in by_role.items():
        found = {normalize(f) for f in folders}
        missing = [c for c in expected if normalize(c) not in found]
        extra = sorted(f for f in folders if normalize(f) not in keys)
        others = [set(map(normalize, fs)) for r, fs in by_role.items() if r != role]
        lonely = sorted(f for f in folders if normalize(f) in keys
                        and any(normalize(f) not in o for o in others))
        suggestions = []
        for f in extra + lonely:
            target = _suggest(f, [c for c in missing if normalize(c) != normalize(f)])
            if target is not None:
                suggestions.append({"folder": f, "class": target})
        out[role] = {"found": len(folders), "matched": len(found & set(keys)),
                     "missing": missing, "extra": extra, "suggestions": suggestions}
    return out


# ------------------------------------------------------------------------ duplicates
#: bytes read from each same-size candidate before hashing whole files
_HEAD = 8192


def _digest(path: str, limit: int | None = None) -> str | None:
    """BLAKE2b of a file (of its first ``limit`` bytes when given); ``None``: unreadable."""
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as fh:
            if limit is not None:
                h.update(fh.read(limit))
            else:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def _cross_class(groups: dict[Any, list[tuple[str, str]]]) -> list[tuple[Any, str, str]]:
    """(key, path, class) of the members of groups that span more than one class."""
    return [(k, p, c) for k, g in groups.items() if len({c for _, c in g}) > 1 for p, c in g]


def find_duplicates(files: Iterable[tuple[str, str]], workers: int = 8) -> list[dict[str, Any]]:
    """Groups of byte-identical files that sit in more than one class.

    ``files``: (path, class key). Three rounds, each keeping only the groups that still span
    several classes: the size (one ``stat`` a file), the BLAKE2b of the first 8 KiB, then
    the BLAKE2b of the whole file; reads run in threads. Distinct images rarely share a
    size *and* their first 8 KiB, so nearly every file costs one ``stat`` and at most one
    small read, and only true duplicates are read whole.
    """
    groups: dict[tuple[int, str], list[tuple[str, str]]] = {}
    for path, cls in files:
        try:
            groups.setdefault((os.stat(path).st_size, ""), []).append((path, cls))
        except OSError:
            continue
    with ThreadPoolExecutor(max(1, min(workers, os.cpu_count() or 1))) as pool:
        for limit in (_HEAD, None):
            todo = _cross_class(groups)
            digests = list(pool.map(lambda t, n=limit: _digest(t[1], n), todo, chunksize=32))
            groups = {}
            for ((size, _), p, c), d in zip(todo, digests):
                if d is not None:
                    groups.setdefault((size, d), []).append((p, c))
    return [{"hash": d, "size": size, "files": [{"path": p, "class": c}
                                                for p, c in sorted(group)]}
            for (size, d), group in sorted(groups.items(), key=lambda kv: sorted(kv[1]))
            if len({c for _, c in group}) > 1]


# ---------------------------------------------------------------------------- checks
def _roles(protocol: str, params: dict[str, Any]) -> tuple[str, ...]:
    if protocol == "sketchy_ext":
        from zsbir.data.protocols import sketchy_roles

        return sketchy_roles(params.get("photos", "original+extended"))
    return ("sketch", "photo")


def _layouts(protocol: str) -> Sequence[Any]:
    from zsbir.data import protocols as p

    return {"sketchy_ext": p.SKETCHY_LAYOUTS, "tuberlin_ext": p.TUBERLIN_LAYOUTS,
            "quickdraw_ext": p.QUICKDRAW_LAYOUTS, "folder": (p.FOLDER_LAYOUT,)}[protocol]


def _classify(reason: str) -> str:
    if reason == "zero-byte file":
        return "zero-byte"
    if reason.startswith(("unreadable", "cannot decode", "class folder left out",
                          "broken symbolic", "symbolic link loop")):
        return "unreadable"
    return "other"


def check_table(table: dict[str, Any], ctx: Any = None, decode: bool | None = None,
                duplicates: bool = True, supplied: dict[str, Any] | None = None
                ) -> tuple[CheckReport, Any]:
    """Check the data a resolved protocol table (``[protocol]``) names.

    ``decode``: decode every image (``None``: as the table's ``verify_images``);
    ``duplicates``: look for files duplicated across classes; ``supplied``: what the call
    site passes the protocol (``zsbir.injection.supply("protocols")``). Returns the report and the
    protocol's data (``None`` when the protocol refused the tree).
    """
    from zsbir.build import build_component
    from zsbir.context import BuildContext
    from zsbir.data.classnames import class_split, normalize
    from zsbir.data.layouts import ProtocolError, detect_layout, load_index
    from zsbir.data.protocols import _index_dir
    from zsbir.injection import supply

    name = table["name"]
    params = {k: v for k, v in table.items() if k != "name"}
    report = CheckReport(os.path.abspath(os.path.expanduser(str(params["root"]))), name,
                         params)
    dataset = _DATASETS[name]
    roles = _roles(name, params)
    what = f"{name}" + (f" (split {params['split']!r})" if "split" in params else "")
    try:
        resolved = detect_layout(params["root"], _layouts(name), roles,
                                 params.get("layout", "auto"), what)
    except ProtocolError as exc:
        report.problems.append(str(exc))
        report.protocol_error = str(exc)
        return report, None
    report.layout = {"name": resolved.layout, "base": resolved.base,
                     "dirs": {r: resolved.dirs[r] for r in roles}}
    decode = bool(params.get("verify_images")) if decode is None else decode
    report.decoded = decode
    ctx = ctx if ctx is not None else BuildContext()
    index = load_index(resolved, _index_dir(params.get("cache_dir"), ctx), decode,
                       bool(params.get("rebuild_index")))
    folders = {r: list(index.dirs[resolved.dirs[r]]) for r in roles}
    if dataset is not None:
        expected = list(class_split(dataset, params["split"]).all)
    else:  # folder: the classes are the folder names of both directories
        expected = sorted({normalize(f): f for r in ("photo", "sketch")
                           for f in folders[r]}.values())
    by_role = _compare_classes(expected, folders)
    report.classes = {"expected": len(expected), "by_role": by_role}
    for role, c in by_role.items():
        if c["missing"]:
            report.problems.append(f"{role}: {len(c['missing'])} of the protocol's "
                                   f"{len(expected)} classes have no folder")
        if c["extra"]:
            report.warnings.append(f"{role}: {len(c['extra'])} folder(s) match no class "
                                   "and are left out")

    # counts: usable images of the matched class folders
    keys = {normalize(c): c for c in expected}
    published = PUBLISHED_DIRS.get(name, {})
    by_role_counts: dict[str, Any] = {}
    by_domain = {"sketch": 0, "photo": 0}
    members: list[tuple[str, str]] = []
    for role in roles:
        layout_dir = resolved.dirs[role]
        domain = "sketch" if role == "sketch" else "photo"
        n = 0
        for f in folders[role]:
            if normalize(f) in keys:
                paths = index.files(layout_dir, f, decode)
                n += len(paths)
                members += [(p, keys[normalize(f)]) for p in paths]
        pub, src = published.get(role, (None, None))
        by_role_counts[role] = {"domain": domain, "files": n, "published": pub, "source": src}
        by_domain[domain] += n
        if pub is not None and n != pub:
            report.warnings.append(f"{role}: {n:,} images where the published dataset has "
                                   f"{pub:,} ({n - pub:+,}; {src})")
    report.counts = {"by_role": by_role_counts, "by_domain": by_domain}

    # files left out, under the directories this protocol reads
    bases = tuple(resolved.dirs[r] + os.sep for r in roles)
    reasons = {**index.skipped, **((index.decode_failures or {}) if decode else {})}
    report.bad_files = [{"path": p, "reason": r, "kind": _classify(r)}
                        for p, r in sorted(reasons.items()) if p.startswith(bases)]
    unreadable = [b for b in report.bad_files if b["kind"] != "other"]
    if unreadable:
        report.warnings.append(f"{len(unreadable)} image file(s) zero-byte or unreadable, "
                               "left out (listed above)")

    if duplicates:
        groups = find_duplicates(members)
        report.duplicates = {"checked": True, "groups": groups}
        if groups:
            report.warnings.append(f"{len(groups)} group(s) of identical files in different "
                                   "classes")

    # the split: the protocol itself, with the same parameters
    data = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unmatched folders: reported above
            data = build_component("protocols", table, ctx, **(
                supply("protocols") if supplied is None else supplied))
    except ProtocolError as exc:
        report.protocol_error = str(exc)
        if report.ok:  # not explained by the checks above (e.g. the folder unseen list)
            report.problems.append(str(exc))
        else:
            report.problems.extend(
                f"{ln.strip()}" for ln in str(exc).splitlines()[1:]
                if ln.strip().startswith(("class folders with no usable", "several folders")))
    if data is not None:
        s = data.summary()
        report.split = {k: s[k] for k in ("seen_classes", "unseen_classes", "train", "val",
                                          "query", "gallery")}
        key = (name, params.get("split"), params.get("photos"))
        if not params.get("generalized"):
            for part, (pub, src) in PUBLISHED_SPLITS.get(key, {}).items():
                if s[part] != pub:
                    report.warnings.append(f"split {part}: {s[part]:,} images where the "
                                           f"published split has {pub:,} ({src})")
    return report, data


def check_dataset(root: str, protocol: str, params: dict[str, Any] | None = None,
                  decode: bool = True, duplicates: bool = True) -> CheckReport:
    """``zsbir data check``: resolve ``{name: protocol, root: root, **params}`` as a
    manifest's ``[protocol]`` table (:class:`~zsbir.manifest.ManifestError` on a bad value)
    and check it (:func:`check_table`)."""
    from zsbir.manifest import resolve_component

    if protocol not in _DATASETS:
        from zsbir.data.layouts import ProtocolError

        raise ProtocolError(f"data check: protocol {protocol!r} has no dataset to check "
                            f"(it reads: {', '.join(_DATASETS)})")
    table = resolve_component("protocols", {"name": protocol, "root": root, **(params or {})},
                              "protocol")
    return check_table(table, decode=decode, duplicates=duplicates)[0]


def build_protocol(table: dict[str, Any], ctx: Any, **supplied: Any) -> Any:
    """The protocol's data, for :func:`zsbir.build.build`: the run-time check first (no
    hashing; decoding only when the protocol verifies images), stopping with the report
    (:class:`~zsbir.data.layouts.ProtocolError`) when the data cannot serve the protocol.
    Protocols without a dataset layout (``synthetic``, plugins) are built directly.
    ``supplied``: what :func:`zsbir.build.build` passes (``supply("protocols")``)."""
    import logging

    from zsbir.build import build_component
    from zsbir.data.layouts import ProtocolError

    if table["name"] not in _DATASETS:
        return build_component("protocols", table, ctx, **supplied)
    report, data = check_table(table, ctx, duplicates=False, supplied=supplied)
    if not report.ok or data is None:
        head = report.protocol_error or f"{table['name']}: the data cannot serve the protocol"
        raise ProtocolError(f"{head}\n{report.text()}")
    for w in report.warnings:
        logging.getLogger(__name__).warning("data check: %s", w)
    return data


# ------------------------------------------------------------------------------- CLI
@click.group("data")
def data_group() -> None:
    """Check datasets on disk before training."""


@data_group.command("check")
@click.argument("root", type=click.Path(file_okay=False))
@click.option("--protocol", "protocol", required=True,
              type=click.Choice(sorted(_DATASETS)), help="The protocol the data should serve.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="A protocol parameter, e.g. --set split=sk-ye or --set "
                   "'unseen=[\"cat\"]' (repeatable; values are TOML literals).")
@click.option("--no-decode", is_flag=True, help="Do not decode every image (faster).")
@click.option("--no-duplicates", is_flag=True, help="Do not look for duplicated files.")
@click.option("--strict", is_flag=True, help="Exit 1 on warnings too (counts, unreadable "
                                             "files, duplicates, extra folders).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check_cmd(root: str, protocol: str, overrides: tuple[str, ...], no_decode: bool,
              no_duplicates: bool, strict: bool, as_json: bool) -> None:
    """Check the dataset under ROOT against a protocol before training: layout, classes,
    image counts, unreadable and duplicated files, the split a run would use.

    Exit status 0: the data can serve the protocol; 1: it cannot (or, with --strict, a
    warning); 2: a bad option or parameter."""
    from zsbir.manifest import apply_overrides

    params = apply_overrides({}, list(overrides), "--set")
    params.pop("root", None)
    report = check_dataset(root, protocol, params, decode=not no_decode,
                           duplicates=not no_duplicates)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.text())
    if not report.ok:
        n = len(report.problems)
        raise click.ClickException(f"the data under {report.root} cannot serve {protocol} "
                                   f"({n} problem{'s' if n != 1 else ''}, listed in the report)")
    if strict and report.warnings:
        raise click.ClickException(f"--strict: {len(report.warnings)} warning(s) about the "
                                   f"data under {report.root} (listed in the report)")
