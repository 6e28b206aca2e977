"""Reliability of runs, checkpoints, weights files and manifests (issue 23).

Damaged checkpoints are real ones (the session's ``tiny_run``) with one tensor byte
flipped on disk: ``torch.load`` reads such a file without complaint, so the zip members'
CRC-32s are what catches it. Weights files are written here with ``torch.save``,
``pickle`` and ``safetensors``. Commands run in-process through click's runner with
``catch_exceptions=False``: a traceback (an exception escaping the CLI) fails the test.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from zsbir.cli import main
from zsbir.engine.checkpoint import CheckpointError, load_checkpoint, verify_archive
from zsbir.engine.run import RESOLVED
from zsbir.manifest import (
    MAX_DEPTH,
    ManifestError,
    apply_overrides,
    dump_toml,
    load,
    nesting_problem,
    resolve,
)
from zsbir.models.backbone import (
    WeightsFileError,
    load_state_dict_file,
    weights_file_problem,
)
from zsbir.registry import backbones

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.toml"


def cli(*args: object):
    """Run ``zsbir ARGS``; an exception escaping the CLI (a traceback) fails the test."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def squash(text: str) -> str:
    return "".join(text.split())


def says(res, *parts: str) -> bool:
    return all(squash(p) in squash(res.output) for p in parts)


def no_traceback(res) -> None:
    assert "Traceback" not in res.output and "Aborted!" not in res.output, res.output


def error_lines(res) -> list[str]:
    return [ln for ln in res.output.splitlines() if ln.strip()]


def flip_tensor_byte(path: Path, at: int = 100) -> str:
    """Flip one byte inside the largest tensor member of a ``torch.save`` archive (in
    place, as a bad disk would); returns the member's name."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
    assert info.compress_type == zipfile.ZIP_STORED  # torch stores tensors uncompressed
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:
                                                    info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + min(at, info.file_size - 1)] ^= 0xFF
    path.write_bytes(bytes(data))
    return info.filename


# --------------------------------------------------------------------------- checkpoints
def test_crc_catches_a_flipped_tensor_byte_that_torch_load_misses(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"model": {"w": torch.arange(1000, dtype=torch.float32)}, "step": 3}, path)
    verify_archive(path)  # intact: no error
    member = flip_tensor_byte(path)
    silently = torch.load(path, weights_only=True)["model"]["w"]  # torch does not notice
    assert not torch.equal(silently, torch.arange(1000, dtype=torch.float32))
    with pytest.raises(CheckpointError, match=rf"'{path}' is damaged \(CRC mismatch in "
                                              rf"member '{member}'\)"):
        load_checkpoint(path)


def test_damaged_pickle_member_and_directory_are_refused(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"step": 3, "names": ["a" * 200]}, path)
    data = bytearray(path.read_bytes())
    at = data.index(b"a" * 200)  # inside data.pkl
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"is damaged \(CRC mismatch in member "
                                              r"'[^']*data\.pkl'\)"):
        load_checkpoint(path)
    torch.save({"step": 3}, path)
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the central directory's first entry, garbled
    data[entry:entry + 4] = b"XXXX"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"truncated or not a checkpoint|is damaged"):
        load_checkpoint(path)


def _run_copy(tiny_run: Path, dest: Path, *names: str) -> Path:
    """A copy of the tiny run's manifest and the named checkpoints (not the whole run)."""
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_run / RESOLVED, dest / RESOLVED)
    for n in names:
        shutil.copy(tiny_run / "checkpoints" / n, dest / "checkpoints" / n)
    return dest


def test_resume_from_a_damaged_last_pt_is_one_line_and_changes_nothing(tiny_run, tmp_path):
    d = _run_copy(tiny_run, tmp_path / "run", "last.pt")
    last = d / "checkpoints" / "last.pt"
    member = flip_tensor_byte(last, at=4096)
    before = last.read_bytes()
    res = cli("run", "--resume", d)
    assert res.exit_code == 1, res.output
    no_traceback(res)
    assert says(res, f"checkpoint '{last}' is damaged (CRC mismatch in member '{member}')")
    assert len(error_lines(res)) == 1, res.output
    assert last.read_bytes() == before  # nothing overwritten
    assert not (d / "checkpoints" / "best.pt").exists()


def test_evaluating_a_damaged_final_pt_is_refused(tiny_run, tmp_path):
    from zsbir.engine.index import load_trained

    d = _run_copy(tiny_run, tmp_path / "run", "final.pt")
    final = d / "checkpoints" / "final.pt"
    load_trained(d, device="cpu")  # intact: loads
    flip_tensor_byte(final)
    with pytest.raises(CheckpointError, match=rf"'{final}' is damaged \(CRC mismatch"):
        load_trained(d, device="cpu")
    photos = tmp_path / "photos"
    photos.mkdir()
    res = cli("index", "build", d, photos, tmp_path / "index", "--device", "cpu")
    assert res.exit_code == 1, res.output
    no_traceback(res)
    assert says(res, "is damaged (CRC mismatch in member")


# --------------------------------------------------------------------------- weights files
def _weights(tmp_path: Path, kind: str) -> Path:
    """A weights file of each kind the checks must tell apart."""
    p = tmp_path / f"{kind}.pt"
    if kind == "directory":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "text":
        p.write_text("these are not weights\n")
    elif kind == "zip_not_torch":
        with zipfile.ZipFile(p, "w") as zf:
            zf.writestr("readme.txt", "hello")
    elif kind == "truncated":
        torch.save({"w": torch.ones(1000)}, p)
        p.write_bytes(p.read_bytes()[:1500])
    elif kind == "list":
        torch.save([torch.ones(2)], p)
    elif kind == "tensor":
        torch.save(torch.ones(3), p)
    elif kind == "dict_of_strings":
        torch.save({"a": "b", "c": 1}, p)
    elif kind == "empty_dict":
        torch.save({}, p)
    elif kind == "malicious":
        p.write_bytes(pickle.dumps({"w": _Evil()}, protocol=2))
    elif kind == "bad_safetensors":
        p = p.with_suffix(".safetensors")
        p.write_bytes(struct.pack("<Q", 9) + b"{not json")
    elif kind == "deep_safetensors":
        p = p.with_suffix(".safetensors")
        header = b"{" + b'"a": ' * 1 + b"[" * 100_000 + b"]" * 100_000 + b"}"
        p.write_bytes(struct.pack("<Q", len(header)) + header)
    elif kind == "safetensors_no_tensors":
        p = p.with_suffix(".safetensors")
        header = json.dumps({"__metadata__": {"a": "b"}}).encode()
        p.write_bytes(struct.pack("<Q", len(header)) + header)
    else:  # pragma: no cover
        raise ValueError(kind)
    return p


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


BAD_WEIGHTS = [
    ("directory", "is a directory, not a weights file"),
    ("fifo", "is a FIFO (named pipe), not a weights file"),
    ("empty", "is empty (0 bytes), not a weights file"),
    ("text", "is not a weights file: neither a torch.save archive"),
    ("zip_not_torch", "is a zip archive but not a torch.save file"),
    ("truncated", "is a truncated or damaged zip archive"),
    ("list", "holds a list, not a state dict"),
    ("tensor", "holds a tensor, not a state dict"),
    ("dict_of_strings", "holds a dict whose 'a' is a string, not a state dict"),
    ("empty_dict", "holds an empty dict, not a state dict"),
    ("malicious", "holds objects other than plain data"),
    ("bad_safetensors", "is not a valid .safetensors file"),
    ("deep_safetensors", "is not a valid .safetensors file"),
    ("safetensors_no_tensors", "holds an empty dict, not a state dict"),
]


@pytest.mark.parametrize(("kind", "expect"), BAD_WEIGHTS, ids=[k for k, _ in BAD_WEIGHTS])
def test_validate_refuses_a_bad_weights_file_with_its_key(tmp_path, kind, expect):
    path = _weights(tmp_path, kind)
    res = cli("validate", QUICKSTART, "--set", f"backbone.weights={json.dumps(str(path))}")
    assert res.exit_code == 2, res.output
    no_traceback(res)
    assert says(res, f"backbone.weights: '{path}' {expect}"), res.output
    assert len(error_lines(res)) == 2  # "FILE: 1 problem" and the problem


@pytest.mark.parametrize("value", ["/dev/zero", "/dev/null"])
def test_validate_refuses_devices_as_weights(value):
    res = cli("validate", QUICKSTART, "--set", f"backbone.weights={json.dumps(value)}")
    assert res.exit_code == 2 and says(res, f"backbone.weights: '{value}' is a character "
                                            "device, not a weights file"), res.output


def test_validate_refuses_an_unreadable_or_missing_weights_file(tmp_path):
    res = cli("validate", QUICKSTART, "--set",
              f"backbone.weights={json.dumps(str(tmp_path / 'absent.pt'))}")
    assert res.exit_code == 2 and says(res, "backbone.weights:", "does not exist")
    if os.geteuid() == 0:
        pytest.skip("by design: root reads every file: no permission error to provoke")
    p = tmp_path / "locked.pt"
    torch.save({"w": torch.ones(2)}, p)
    p.chmod(0)
    res = cli("validate", QUICKSTART, "--set", f"backbone.weights={json.dumps(str(p))}")
    assert res.exit_code == 2 and says(res, "backbone.weights:", "is not readable")


def test_the_teachers_copy_of_the_backbone_names_its_own_key(tmp_path):
    path = _weights(tmp_path, "directory")
    raw = load(QUICKSTART)
    raw["backbone"]["weights"] = str(path)
    raw["teacher"] = {"name": "online"}
    manifest = tmp_path / "t.toml"
    manifest.write_text(dump_toml(raw))
    res = cli("validate", manifest)
    assert res.exit_code == 2
    assert says(res, f"backbone.weights: '{path}' is a directory",
                f"teacher.network.backbone.weights: '{path}' is a directory")


@pytest.mark.parametrize("kind", ["plain", "nested", "legacy", "safetensors"])
def test_good_weights_files_pass_and_load(tmp_path, kind):
    state = {"conv.weight": torch.randn(4, 3), "conv.bias": torch.zeros(4)}
    p = tmp_path / ("w.safetensors" if kind == "safetensors" else "w.pt")
    if kind == "plain":
        torch.save(state, p)
    elif kind == "nested":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, p)
    elif kind == "legacy":
        torch.save(state, p, _use_new_zipfile_serialization=False)
    else:
        from safetensors.torch import save_file

        save_file(state, str(p))
    assert weights_file_problem(p) is None
    loaded = load_state_dict_file(p)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], v)
                                             for k, v in state.items())


def test_loading_refuses_what_validate_refuses_and_damaged_archives(tmp_path):
    """The loaders (run start, the Python API) give the same one-line errors."""
    for kind in ("list", "dict_of_strings", "directory", "malicious"):
        p = _weights(tmp_path, kind)
        with pytest.raises(WeightsFileError, match=str(p)):
            load_state_dict_file(p)
    with pytest.raises(WeightsFileError, match=r"backbone 'resnet18': '.*directory\.pt' is "
                                               "a directory, not a weights file"):
        backbones.get("resnet18")(weights=str(tmp_path / "directory.pt"))
    p = tmp_path / "flipped.pt"
    torch.save({"w": torch.arange(500, dtype=torch.float32)}, p)
    member = flip_tensor_byte(p)
    assert weights_file_problem(p) is None  # validate does not read the tensors
    with pytest.raises(WeightsFileError, match=rf"weights file '{p}' is damaged \(CRC "
                                               rf"mismatch in member '{member}'\)"):
        load_state_dict_file(p)


def test_run_with_weights_of_another_model_or_damaged_is_one_line(tmp_path):
    """Weights that pass validation but cannot be used: refused while building (exit 1),
    before anything is trained, naming the backbone and the file."""
    import timm

    wrong = tmp_path / "other.pt"
    small = timm.create_model("resnet18", pretrained=False, num_classes=10).state_dict()
    torch.save(small, wrong)  # resnet18 keys, but a 10-way classifier: a size mismatch
    base = ["--set", f"run.output_dir={json.dumps(str(tmp_path / 'runs'))}",
            "--set", "train.epochs=1", "--set", "protocol.image_size=32",
            "--set", "data.image_size=32"]
    res = cli("run", QUICKSTART, *base, "--set", f"backbone.weights={json.dumps(str(wrong))}")
    assert res.exit_code == 1, res.output
    no_traceback(res)
    assert says(res, f"backbone 'resnet18': weights file '{wrong}' does not match resnet18",
                "size mismatch")
    full = timm.create_model("resnet18", pretrained=False).state_dict()
    damaged = tmp_path / "damaged.pt"
    torch.save(full, damaged)
    flip_tensor_byte(damaged)
    res = cli("run", QUICKSTART, *base, "--set", "run.name=again",
              "--set", f"backbone.weights={json.dumps(str(damaged))}")
    assert res.exit_code == 1, res.output
    no_traceback(res)
    assert says(res, f"weights file '{damaged}' is damaged (CRC mismatch in member")
    assert not (tmp_path / "runs" / "again" / "checkpoints").exists()


def test_weights_load_with_weights_only(tmp_path, monkeypatch):
    """Every weights read goes through torch.load(weights_only=True)."""
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    p = tmp_path / "w.pt"
    real_state = {"w": torch.ones(2)}
    torch.save(real_state, p)
    weights_file_problem(p)
    load_state_dict_file(p)
    assert calls == [True, True]


def test_existing_path_files_must_be_regular_files(tmp_path):
    """ExistingPath("file") parameters (mapping files, plugins' weights) refuse a
    directory or a device with the key."""
    from zsbir.constraints import ExistingPath

    assert ExistingPath("file").check(str(tmp_path)) == f"{str(tmp_path)!r} is a directory, " \
                                                         "not a file"
    assert "not a regular file" in ExistingPath("file").check("/dev/zero")
    f = tmp_path / "m.txt"
    f.write_text("x")
    assert ExistingPath("file").check(str(f)) is None


# --------------------------------------------------------------------------- value ranges
@pytest.mark.parametrize(("item", "expect"), [
    ("data.scale=[0.0, 0.0]", ["data.scale[0]: must be >= 0.01, got 0.0",
                               "data.scale[1]: must be >= 0.01, got 0.0"]),
    ("data.scale=[0.0, 1.0]", ["data.scale[0]: must be >= 0.01"]),
    ("data.scale=[-1.0, 1.0]", ["data.scale[0]: must be >= 0.01, got -1.0"]),
    ("data.scale=[1.3, 0.7]", ["data.scale: must be in increasing order ([low, high]), "
                               "got [1.3, 0.7]"]),
    ("data.translation=1e308", ["data.translation: must be <= 1000"]),
    ("train.batch_size=0", ["train.batch_size: must be >= 1"]),
    ("schedule.name=\"one_cycle\"", []),
])
def test_validate_refuses_ranges_that_divide_by_zero(item, expect):
    res = cli("validate", QUICKSTART, "--set", "data.augment_prob=1.0", "--set", item)
    no_traceback(res)
    if not expect:
        assert res.exit_code == 0, res.output
        return
    assert res.exit_code == 2, res.output
    assert says(res, *expect), res.output


def test_equal_scale_bounds_are_a_fixed_zoom():
    res = cli("validate", QUICKSTART, "--set", "data.scale=[1.0, 1.0]")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("scale", [(0.0, 0.0), (1.3, 0.7), (-1.0, 1.0)])
def test_a_transform_built_in_python_refuses_a_degenerate_scale(scale):
    from zsbir.data.loading import Transform

    with pytest.raises(ValueError, match=r"scale must be \[low, high\] with 0 < low <= high"):
        Transform(size=32, train=True, scale=scale)


# --------------------------------------------------------------------------- nesting depth
def _deep(n: int, kind: str) -> str:
    return {"array": "[" * n + "1" + "]" * n,
            "table": "{a = " * n + "1" + "}" * n}[kind]


@pytest.mark.parametrize("kind", ["array", "table"])
def test_a_manifest_file_nested_600_deep_is_one_problem(tmp_path, kind):
    path = tmp_path / "deep.toml"
    path.write_text(QUICKSTART.read_text() + f"\n[evaluation.extra]\nx = {_deep(600, kind)}\n")
    res = cli("validate", path)
    assert res.exit_code == 2, res.output
    no_traceback(res)
    assert says(res, str(path), "nested too deeply for the TOML parser")


def test_table_headers_nested_600_deep_name_the_key(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text(QUICKSTART.read_text() + "\n[" + ".".join(["model", "head"] + ["x"] * 600)
                    + "]\nv = 1\n")
    res = cli("validate", path)
    assert res.exit_code == 2, res.output
    no_traceback(res)
    assert says(res, "model.head.x.x.x.x...:", f"nested deeper than {MAX_DEPTH} levels")


def test_inline_tables_nested_40_deep_name_the_key(tmp_path):
    path = tmp_path / "deep.toml"
    text = QUICKSTART.read_text().replace('embed_dim = 64', f'embed_dim = 64\nx = '
                                                            f'{_deep(40, "table")}')
    path.write_text(text)
    res = cli("validate", path)
    assert res.exit_code == 2
    assert says(res, "model.head.x.a.a.a...:", "nested deeper than")


@pytest.mark.parametrize(("depth", "expect"), [
    (600, "--set model.head.x: the value is nested deeper than"),
    (400, "model.head.x[0][0][0]...: nested deeper than"),
])
def test_set_values_nested_deep_are_refused(depth, expect):
    res = cli("validate", QUICKSTART, "--set", f"model.head.x={_deep(depth, 'array')}")
    assert res.exit_code == 2, res.output
    no_traceback(res)
    assert says(res, expect)
    res = cli("validate", QUICKSTART, "--set", ".".join(["model", "head"] + ["x"] * depth)
              + "=1")
    assert res.exit_code == 2 and says(res, "model.head.x.x.x.x...: nested deeper than")


def test_depth_limit_boundary_and_python_api():
    ok: dict = {}
    node = ok
    for _ in range(MAX_DEPTH - 1):
        node = node.setdefault("k", {})
    node["leaf"] = 1  # the leaf value sits MAX_DEPTH keys down
    assert nesting_problem(ok) is None
    node["leaf"] = [1]  # one level more
    problem = nesting_problem(ok)
    assert problem is not None and problem.path == "k.k.k.k.k.k..."
    raw = load(QUICKSTART)
    deep: list = []
    for _ in range(3000):
        deep = [deep]
    raw["evaluation"]["x"] = deep
    with pytest.raises(ManifestError, match="nested deeper than"):
        resolve(raw)
    with pytest.raises(ManifestError, match="nested deeper than"):
        apply_overrides(raw, [])
