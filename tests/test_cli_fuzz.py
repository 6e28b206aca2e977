"""The command line's own arguments, fuzzed: every odd argument list ends in exit 0, 1 or 2
and never in a traceback; `zsbir list`/`describe` start without importing torch, from a
catalog that matches the live registries; summaries are whole plain sentences."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from zsbir import catalog
from zsbir.cli import main
from zsbir.docstrings import first_sentence, plain_doc

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


# ------------------------------------------------------------------ catalog and start-up
def test_catalog_matches_live_registries():
    """zsbir/catalog.json is what `python -m zsbir.catalog --write` generates now."""
    live = catalog.generate()
    saved = json.loads(catalog.CATALOG_PATH.read_text(encoding="utf-8"))
    stale = []
    for kind in sorted(set(live) | set(saved)):
        a = {e["name"]: e for e in live.get(kind, [])}
        b = {e["name"]: e for e in saved.get(kind, [])}
        stale += [f"{kind}/{n}" for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]
    assert not stale, ("zsbir/catalog.json is stale for " + ", ".join(stale)
                       + ": run `python -m zsbir.catalog --write` and commit it")
    assert catalog.render(live) == catalog.CATALOG_PATH.read_text(encoding="utf-8")


def test_list_and_describe_do_not_import_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom zsbir.cli import main\n"
            "for args in (['list'], ['list', 'losses', 's*'], ['describe', 'losses', 'sake'],"
            " ['describe', 'hashers', 'itq']):\n"
            "    r = CliRunner().invoke(main, args)\n"
            "    assert r.exit_code == 0, r.output\n"
            "print(sorted(m for m in ('torch', 'timm', 'faiss') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"imported: {out.stdout}"


def test_describe_from_the_catalog_shows_parameters_and_source_line():
    res = CliRunner().invoke(main, ["describe", "losses", "ce"])
    assert res.exit_code == 0, res.output
    assert "label_smoothing" in res.output
    location = next(ln for ln in res.output.splitlines() if ln.startswith("defined at "))
    path, line = location.removeprefix("defined at ").rsplit(":", 1)
    src = Path(path).read_text().splitlines()[int(line) - 1]
    assert src.lstrip().startswith(("def ", "class ")), src


def test_summaries_are_whole_plain_sentences():
    for kind, entries in catalog.load().items():
        for e in entries:
            s = e["summary"]
            assert s, f"{kind}/{e['name']} has no docstring summary"
            for markup in ("``", ":meth:", ":func:", ":class:", ":math:", "`"):
                assert markup not in s, f"{kind}/{e['name']}: {markup!r} in {s!r}"
            para = " ".join(plain_doc(e["doc"]).split("\n\n")[0].split())
            assert para.startswith(s), (kind, e["name"])
            assert s == para or s.endswith((".", "!", "?")), f"cut mid-sentence: {s!r}"


@pytest.mark.parametrize(("doc", "want"), [
    ("Adam (Kingma & Ba, 2015), e.g. for SAKE. The rest.", "Adam (Kingma & Ba, 2015), e.g. "
                                                            "for SAKE."),
    ("Uses :meth:`Trainer.fit` and ``x = 1``.\nMore.", "Uses Trainer.fit and x = 1."),
    ("SAKE (Liu et al., ICCV 2019, Sec. 3.4). Next.", "SAKE (Liu et al., ICCV 2019, Sec. 3.4)."),
    ("Liu et al. propose a loss over\ntwo lines. Second.", "Liu et al. propose a loss over "
                                                          "two lines."),
    ("lr 1e-4 (fine. really) then 0.5 as well\n\nNew paragraph.",
     "lr 1e-4 (fine. really) then 0.5 as well"),
    ("A :class:`title <zsbir.x.Y>` role. B.", "A title role."),
    ("", ""),
])
def test_first_sentence(doc, want):
    assert first_sentence(doc) == want


# --------------------------------------------------------------------------------- fuzz
@pytest.fixture(scope="module")
def material(tmp_path_factory) -> dict[str, str]:
    """Files the fuzzed arguments point at: good and bad features, a fake run."""
    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    ql, gl = rng.integers(0, 3, 12), rng.integers(0, 3, 30)
    np.savez(d / "good.npz", query_features=rng.normal(size=(12, 8)), query_labels=ql,
             gallery_features=rng.normal(size=(30, 8)), gallery_labels=gl)
    np.savez(d / "mismatch.npz", query_features=rng.normal(size=(12, 8)), query_labels=ql,
             gallery_features=rng.normal(size=(30, 5)), gallery_labels=gl)
    np.savez(d / "labels_only.npz", query_labels=ql, gallery_labels=gl)
    np.savez(d / "short_labels.npz", query_features=rng.normal(size=(12, 8)),
             query_labels=ql[:3], gallery_features=rng.normal(size=(30, 8)),
             gallery_labels=gl)
    np.save(d / "array.npy", np.zeros(3))
    (d / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (d / "text.toml").write_text("this is = = not toml")
    run = d / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"results": {"t": {"real": {
        "map@all": {"value": 0.5}}}}, "protocol": {"name": "t"}}))
    (d / "empty_run").mkdir()
    (d / "bad_run").mkdir()
    (d / "bad_run" / "metrics.json").write_text("[1, 2]")
    return {k: str(d / v) for k, v in {
        "good": "good.npz", "mismatch": "mismatch.npz", "labels_only": "labels_only.npz",
        "short": "short_labels.npz", "npy": "array.npy", "garbage": "garbage.npz",
        "text": "text.toml", "run": "run", "empty_run": "empty_run", "bad_run": "bad_run",
        "dir": ".", "missing": "does/not/exist"}.items()}


ODD = ["", "-", "--", "--nope", "-x", "ünïcödé", "*", "[", "]", "%s", "{}", "a b", "..",
       "0", "-1", "1e309", "nan", "=", "x=", "\\", "'", '"', "--set", "=1"]


def _pool(cmd: str, m: dict[str, str]) -> list[str]:
    files = [m[k] for k in ("good", "mismatch", "labels_only", "short", "npy", "garbage",
                            "text", "run", "empty_run", "bad_run", "dir", "missing")]
    pools = {
        "list": ["losses", "loss", "hashers", "backbone", "nothing", "s*", "*", "[a-", "?"],
        "describe": ["losses", "hashers", "sake", "ce", "itq", "teachers", "online",
                     "nothing", "protocols", "synthetic"],
        "plugins": [],
        "evaluate": ["--features", "--metric", "--hasher", "--json", "--device", "map@all",
                     "p@100", "p@0", "map@", "map@all-sklearn", "none", "sign", "itq",
                     "itq:8", "itq:abc", "itq:0", "itq:-3", "itq:", "itq:99999", ":", "lsh",
                     "cpu", "cuda", "cuda:9", "banana"],
        "report": ["--no-plot"],
        "compare": ["--metric", "--hasher", "--task", "--extra", "--format", "map@all",
                    "real", "chance", "latex", "csv", "markdown", "table", "html"],
        "validate": ["--show", "--set", "train.epochs=0", "train.epochs=x", "losses[9].w=1",
                     "hashers[0].bits=-1", "protocol.name=nope", "run.seed=1.5",
                     str(EXAMPLES / "quickstart.toml")],
        "run": ["--resume", "--quiet", "-q", "--set", "train.epochs=-1", "protocol=1"],
        # no valid manifest, run or index in these pools: nothing trains or serves
        "bench": ["train", "--steps", "--warmup", "--batch-size", "--synthetic-data",
                  "--json", "--set", "3", "-2", "x"],
        "index": ["build", "update", "--hasher", "--ann", "--device", "--batch-size",
                  "--workers", "flat", "ivf", "cpu", "4", "-1"],
        "search": ["--top", "--class", "--rerank", "--json", "--device", "0", "-5",
                   "alpha_qe", "nope", "cpu"],
    }
    return pools[cmd] + files + ODD


COMMANDS = ("list", "describe", "plugins", "evaluate", "report", "compare", "validate", "run",
            "bench", "index", "search")


@pytest.mark.parametrize("cmd", COMMANDS)
def test_fuzzed_arguments_exit_cleanly(cmd, material):
    rng = random.Random(f"zsbir-cli-fuzz-{cmd}")
    pool = _pool(cmd, material)
    cases = [[cmd], [cmd, "--help"]]
    cases += [[cmd, *rng.choices(pool, k=rng.randint(1, 6))] for _ in range(40)]
    if cmd == "evaluate":  # well-formed calls with odd values
        for spec in ("itq:abc", "itq:0", "lsh", "itq:99999", "sign", "itq:4"):
            for feats in ("good", "mismatch", "short", "labels_only", "garbage", "npy"):
                cases.append([cmd, "--features", material[feats], "--hasher", spec])
    if cmd in ("run", "bench"):  # never a manifest that would train
        cases = [[a for a in c if not a.endswith("quickstart.toml")] for c in cases]
    problems = []
    for args in cases:
        res = CliRunner().invoke(main, args)
        crashed = res.exception is not None and not isinstance(res.exception, SystemExit)
        if res.exit_code not in (0, 1, 2) or crashed or "Traceback" in res.output:
            problems.append(f"zsbir {' '.join(map(repr, args))} -> exit {res.exit_code}, "
                            f"{res.exception!r}\n{res.output[-400:]}")
    assert not problems, "\n".join(problems[:5])


def test_evaluate_hasher_errors_are_one_line(material):
    for spec, words in (("itq:abc", "BITS must be a positive integer"),
                        ("lsh", "unknown hasher 'lsh'"),
                        ("itq:99999", "itq:99999")):
        res = CliRunner().invoke(main, ["evaluate", "--features", material["good"],
                                        "--hasher", spec])
        assert res.exit_code == 2, res.output
        assert words in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
    res = CliRunner().invoke(main, ["evaluate", "--features", material["good"],
                                    "--hasher", "itq:4", "--json"])
    assert res.exit_code == 0 and "itq4" in json.loads(res.output)
