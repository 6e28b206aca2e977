"""Checkpoints as plain data.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts, loadable with
``torch.load(path, weights_only=True)`` and readable without zsbir. It is serialized in
memory, written to a temporary file in the same directory (``.NAME.*.tmp``), flushed,
fsynced and renamed over the target, so a run killed while saving never leaves a truncated
checkpoint behind; :func:`clean_stale_temporaries` removes the temporaries such a kill
leaves, at the next start.

Every error a user can meet here is one line naming the file (:class:`CheckpointError`):
a full disk or an unwritable directory when saving; a missing, empty, truncated, garbage,
damaged or non-plain-data (possibly malicious) file when loading. ``torch.save`` writes a
zip archive whose members carry CRC-32 checksums: :func:`verify_archive` checks every one
before a checkpoint is loaded (one read of the file), so a bit flipped on disk in a
tensor's bytes, which ``torch.load`` itself does not notice, is refused, not resumed.
And, as the last line of defence against a diverged run, :func:`atomic_save` refuses to
write a floating-point tensor holding NaN or infinity (:class:`NonFiniteCheckpointError`),
so every checkpoint on disk is a finite state.

What a checkpoint holds: ``last.pt`` and ``best.pt`` hold what trains (the model's
trainable parameters and buffers, :func:`trainable_state`), the components' state, and
``base``, a reference to the frozen weights the model was built from (each weights file:
key, path, size, sha256; and a digest of the frozen tensors, :func:`base_reference`). A
frozen foundation tower therefore is not copied into every checkpoint; resuming or loading
``best.pt`` rebuilds the model from the base weights, checks them (:func:`check_base`,
one line naming the file when it changed or is gone) and loads the checkpoint over them.
``final.pt`` stays self-contained (search indexes copy it).
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import random
import shutil
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zsbir.digest import file_sha256

__all__ = ["CheckpointError", "NonFiniteCheckpointError", "atomic_save", "base_reference",
           "capture_rng", "check_base", "clean_stale_temporaries", "first_non_finite",
           "frozen_digest", "frozen_names", "load_checkpoint", "load_model_checkpoint",
           "load_trainable_state",
           "package_versions", "restore_rng", "trainable_state", "verify_archive"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


class NonFiniteCheckpointError(CheckpointError, FloatingPointError):
    """A checkpoint refused because a floating-point tensor holds NaN or infinity."""


def _tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(key path, tensor)`` for every tensor in nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{i}]")


def first_non_finite(obj: Any) -> tuple[str, str] | None:
    """``(key path, "NaN" | "inf")`` of the first floating-point tensor in ``obj`` holding a
    non-finite value, or ``None`` when every one is finite."""
    for path, t in _tensors(obj):
        if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
            continue
        if not bool(torch.isfinite(t).all()):
            return path, "NaN" if bool(torch.isnan(t).any()) else "inf"
    return None


def atomic_save(obj: Any, path: str | Path) -> Path:
    """Serialize ``obj`` and write it to ``path`` atomically (temporary file + rename).

    Raises :class:`NonFiniteCheckpointError` (nothing written) when a floating-point
    tensor holds NaN or infinity, and :class:`CheckpointError` naming the file and the
    cause (no space left on the device, permission denied, ...) when writing fails; the
    temporary file is removed either way.
    """
    path = Path(path)
    bad = first_non_finite(obj)
    if bad is not None:
        raise NonFiniteCheckpointError(
            f"refusing to write checkpoint {str(path)!r}: {bad[0]} holds {bad[1]} values "
            "(the weights diverged); the previous checkpoint is kept")
    buf = io.BytesIO()
    torch.save(obj, buf)  # in memory first: a failing disk then raises a plain OSError
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            view = buf.getbuffer()
            while view:
                n = os.write(fh.fileno(), view)
                view = view[n:]
            del view
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {str(path)!r}: "
                              f"{_os_reason(exc, path.parent)}") from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def _os_reason(exc: OSError, directory: Path) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(directory).free
            return f"no space left on the device ({free / 2**20:.0f} MiB free)"
        except OSError:
            return "no space left on the device"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied ({exc.filename or directory})"
    if exc.errno == errno.EROFS:
        return "the file system is read-only"
    return exc.strerror or str(exc)


def clean_stale_temporaries(directory: str | Path) -> list[Path]:
    """Remove the ``.NAME.*.tmp`` files a killed :func:`atomic_save` left in ``directory``.

    Call it only while holding the run directory's lock (nobody else is saving there)."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for p in directory.glob(".*.tmp"):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def verify_archive(path: str | Path, what: str = "checkpoint") -> None:
    """Check the CRC-32 of every member of a ``torch.save`` zip archive (reads it once).

    Raises :class:`CheckpointError` naming the file and the first damaged member. A file
    that is not a zip archive (a legacy pickle, a truncated file) is left to the loader."""
    path = Path(path)
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError,
            RuntimeError) as exc:  # a damaged header or directory
        raise CheckpointError(f"{what} {str(path)!r} is damaged ({exc}); it cannot be "
                              "trusted: restore it or start again") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {str(path)!r}: "
                              f"{exc.strerror or exc}") from exc
    if bad is not None:
        raise CheckpointError(f"{what} {str(path)!r} is damaged (CRC mismatch in member "
                              f"{bad!r}); it cannot be trusted: restore it or start again")


def unpickling_detail(exc: BaseException) -> str:
    """The line of torch's ``weights_only`` refusal that names what was refused (its
    advice about ``weights_only`` left out), or ''."""
    return next((ln.strip() for ln in str(exc).splitlines()
                 if ln.strip() and "WeightsUnpickler" not in ln and "PyTorch" not in ln
                 and "weights_only" not in ln), "")


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code runs), after
    :func:`verify_archive` has checked its checksums.

    Raises :class:`CheckpointError` naming the file when it is missing, empty, truncated,
    damaged, not a ``torch.save`` file, or holds objects other than plain data. ``what``
    names the file in those messages (``"weights file"`` for a backbone's weights, say)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no {what} at {str(path)!r}")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {str(path)!r}: {exc.strerror}") from exc
    if size == 0:
        raise CheckpointError(f"{what} {str(path)!r} is empty (0 bytes): it was not "
                              "written completely")
    verify_archive(path, what)
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: not the user's
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        with open(path, "rb") as fh:
            head = fh.read(2)
        if not (head[:1] == b"\x80" or zipfile.is_zipfile(path)):  # no pickle, no zip
            raise CheckpointError(f"{what} {str(path)!r} is truncated or not a {what} "
                                  f"({size} bytes; not a torch.save file)") from exc
        detail = unpickling_detail(exc)
        raise CheckpointError(
            f"refusing to load {what} {str(path)!r}: it holds objects other than plain "
            "data (tensors, numbers, strings, lists, dicts), which could run code when "
            "loaded" + (f" ({detail[:120]})" if detail else "")) from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {str(path)!r}: "
                              f"{exc.strerror or exc}") from exc
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, KeyError,
            AttributeError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{what} {str(path)!r} is truncated or not a {what} "
                              f"({size} bytes; {type(exc).__name__})") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{what} {str(path)!r} holds a {type(ckpt).__name__}, "
                              "not a dict")
    return ckpt


def capture_rng() -> dict[str, Any]:
    """Every RNG state as plain data (Python's as a list, numpy's as its dict form)."""
    py = random.getstate()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": _np_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _np_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def package_versions() -> dict[str, str]:
    """Versions of the packages a run depends on."""
    import importlib.metadata as md

    out = {}
    for name in ("zsbir", "torch", "torchvision", "timm", "numpy", "faiss-cpu", "nltk"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------- what trains, and its base
#: manifest sections whose ``weights`` files the student's frozen weights come from
BASE_SECTIONS = ("model", "backbone")


def frozen_names(model: torch.nn.Module) -> set[str]:
    """``state_dict`` keys of the model's parameters that do not train."""
    return {n for n, p in model.named_parameters(remove_duplicate=False)
            if not p.requires_grad}


def trainable_state(state: dict[str, torch.Tensor], frozen: set[str]) -> dict[str, Any]:
    """A model ``state_dict`` without its frozen parameters: what trains, and the buffers.
    ``frozen``: :func:`frozen_names` of the student (the layout of every model saved)."""
    return {k: v for k, v in state.items() if k not in frozen}


def _weights_files(table: Any, path: str) -> Iterator[tuple[str, str]]:
    """``(key path, file)`` of every ``weights`` file named in a manifest table."""
    if isinstance(table, list):
        for i, t in enumerate(table):
            yield from _weights_files(t, f"{path}[{i}]")
    elif isinstance(table, dict):
        for k, v in table.items():
            if k == "weights" and isinstance(v, str) and v:
                yield f"{path}.{k}", v
            else:
                yield from _weights_files(v, f"{path}.{k}")


def frozen_digest(model: torch.nn.Module, frozen: set[str]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the model's frozen tensors."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name in frozen:
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\0".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def base_reference(model: torch.nn.Module, manifest_data: dict[str, Any],
                   frozen: set[str]) -> dict[str, Any]:
    """What a partial checkpoint (``last.pt``, ``best.pt``) needs beside itself: each
    weights file the student was built from (key path, file path, size, sha256) and a
    digest of its frozen tensors, as plain data."""
    files = []
    for section in BASE_SECTIONS:
        for key, file in _weights_files(manifest_data.get(section), section):
            p = Path(file).expanduser()
            if p.is_file():
                files.append({"key": key, "path": str(p), "size": p.stat().st_size,
                              "sha256": file_sha256(p)})
    return {"files": files, "frozen": sorted(frozen),
            "frozen_digest": frozen_digest(model, frozen)}


def check_base(saved: dict[str, Any] | None, current: dict[str, Any], where: str | Path
               ) -> None:
    """Refuse a partial checkpoint whose base weights changed or are gone: one line
    (:class:`CheckpointError`) naming the checkpoint and the weights file. ``saved``:
    the checkpoint's ``base``; ``current``: :func:`base_reference` of the model built now."""
    if not saved:
        return  # a self-contained checkpoint (final.pt, an older last.pt)
    now = {f["key"]: f for f in current.get("files", [])}
    for f in saved.get("files", []):
        cur = now.get(f["key"])
        if cur is None or not Path(cur["path"]).is_file():
            raise CheckpointError(
                f"{str(where)!r} holds only what trains; its base weights file "
                f"{f['path']!r} ({f['key']}) is gone: restore it to resume or evaluate")
        if (cur["size"], cur["sha256"]) != (f["size"], f["sha256"]):
            raise CheckpointError(
                f"{str(where)!r} holds only what trains; its base weights file "
                f"{cur['path']!r} ({f['key']}) changed since it was written (sha256 "
                f"{f['sha256'][:12]}... -> {cur['sha256'][:12]}...): restore the original")
    if saved.get("frozen") != current.get("frozen") \
            or saved.get("frozen_digest") != current.get("frozen_digest"):
        raise CheckpointError(
            f"{str(where)!r} holds only what trains, and the frozen base weights built now "
            "differ from those it was trained on (another weights file or version, or other "
            "frozen parameters): restore them, or start a new run")


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor],
                         frozen: set[str], where: str | Path) -> None:
    """Load a (possibly partial) model state: every key the model has must be in it except
    the frozen parameters, already in place from the verified base weights."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        bad = missing or result.unexpected_keys
        raise CheckpointError(
            f"{str(where)!r} does not fit the model ({'missing' if missing else 'unexpected'}"
            f" keys: {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")


def load_model_checkpoint(model: torch.nn.Module, ckpt: dict[str, Any],
                          manifest_data: dict[str, Any], where: str | Path = "checkpoint"
                          ) -> None:
    """Load a checkpoint's ``model`` into a freshly built model: a self-contained one
    (``final.pt``) whole; one holding only what trains (``last.pt``, ``best.pt``: it has a
    ``base``) over the base weights the build loaded, after :func:`check_base`."""
    base = ckpt.get("base")
    if not base:
        model.load_state_dict(ckpt["model"])
        return
    frozen = frozen_names(model)
    check_base(base, base_reference(model, manifest_data, frozen), where)
    load_trainable_state(model, ckpt["model"], frozen, where)
