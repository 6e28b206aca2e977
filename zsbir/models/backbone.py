"""The backbone contract and pretrained-weights sources.

A registered backbone factory returns a :class:`Backbone`: an ``nn.Module`` mapping images
(and, for a conditional backbone such as SAKE's CSE-ResNet-50, the domain bit) to pooled
features, that also exposes its ImageNet classifier when it has pretrained weights, so
that heads can be initialized from it and it can serve as a frozen teacher.

Weights are separate from the constructor (as in timm): a factory takes
``pretrained: bool`` and ``weights: str | None`` (a local file). With ``pretrained = true``
and no file, the weights are looked up in timm's / Hugging Face's / torch.hub's local
caches, never downloaded unless ``download = true``; when none is found the error says
exactly which file would be used and how to provide one.

A ``weights`` file is checked before anything is built (:func:`weights_file_problem`, the
:class:`~zsbir.constraints.WeightsFile` constraint that ``zsbir validate`` applies): a
regular, readable file in a format told by its first bytes (a ``torch.save`` zip archive,
a legacy pickle, ``.safetensors``) that holds a state dict (names -> tensors), read with
``torch.load(weights_only=True)``, memory-mapped so that the check is cheap. Loading it
(:func:`load_state_dict_file`) also verifies the archive's checksums. Every problem is one
line naming the file (:class:`WeightsFileError`).
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from torch import nn

from zsbir.constraints import BASE_WEIGHTS, WeightsFile

__all__ = ["IMAGENET_CFG", "Backbone", "PretrainedCfg", "TimmBackbone", "WeightsFileError",
           "backbone_tokens", "WeightsNotFoundError", "WeightsPath", "find_cached_weights",
           "load_state_dict_file", "resolve_weights", "weights_file_problem"]


@dataclass(frozen=True)
class PretrainedCfg:
    """What a backbone's weights expect of their input, after timm's ``pretrained_cfg``
    and torchvision's weights ``transforms()``: the data transform is derived from it.

    Attributes:
        mean, std: per-channel normalization in [0, 1] scale.
        input_size: (C, H, W) the weights were trained at (informational: the manifest's
            ``data.image_size`` decides the size used).
        interpolation: resize filter ("bilinear", "bicubic").
        source: where the weights came from (a file path, a package, ``"random init"``).
    """

    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    input_size: tuple[int, int, int] = (3, 224, 224)
    interpolation: str = "bilinear"
    source: str = "random init"

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std),
                "input_size": list(self.input_size), "interpolation": self.interpolation,
                "source": self.source}


#: ImageNet mean/std, 224 px, bilinear: what most ImageNet weights (and zsbir's own
#: untrained backbones) use
IMAGENET_CFG = PretrainedCfg()


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights were asked for and no local source has them."""


class WeightsFileError(ValueError):
    """A ``weights`` file that is not a readable state dict; the message names the file."""


#: the annotation of a backbone's ``weights`` parameter: a local file, checked by
#: ``zsbir validate`` (:class:`~zsbir.constraints.WeightsFile`); in the student another
#: path may be given on resume (its content is checked against the checkpoint's base)
WeightsPath = Annotated[str | None, WeightsFile(), BASE_WEIGHTS]


class Backbone(nn.Module):
    """Images (B, 3, H, W) and domain bits (B,) -> pooled features (B, num_features).

    Attributes:
        num_features: width of the pooled features.
        conditional: whether ``forward`` uses the domain bit (0 photo, 1 sketch).
        pretrained: whether ImageNet weights were loaded.
    """

    num_features: int
    conditional: bool = False
    pretrained: bool = False
    #: what the weights expect of their input (the data transform follows it)
    pretrained_cfg: PretrainedCfg = IMAGENET_CFG

    def forward(self, x: torch.Tensor, domain: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def imagenet_classifier(self) -> nn.Linear | None:
        """The pretrained 1000-way classifier on the pooled features, if there is one."""
        return None


def backbone_tokens(backbone: nn.Module, x: torch.Tensor, domain: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(pooled features, tokens or None)``: tokens when the backbone can give them in
    the same pass (a ``forward_tokens`` method defined by its ``forward``'s class or a
    subclass of it: a subclass that overrides ``forward`` only gives no tokens, so its
    pooled features stay its own), else ``backbone(x, domain)`` and ``None``."""
    cls = type(backbone)
    tok = getattr(cls, "forward_tokens", None)
    if tok is not None:
        fwd_owner = next(c for c in cls.__mro__ if "forward" in vars(c))
        tok_owner = next(c for c in cls.__mro__ if "forward_tokens" in vars(c))
        if issubclass(tok_owner, fwd_owner):
            return backbone.forward_tokens(x, domain)
    return backbone(x, domain), None


class TimmBackbone(Backbone):
    """Any timm model, pooled features from ``forward_head(pre_logits=True)``."""

    def __init__(self, model: nn.Module, pretrained: bool, source: str | None = None):
        super().__init__()
        self.model = model
        self.num_features = int(model.num_features)
        self.pretrained = pretrained
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.pretrained_cfg = PretrainedCfg(
            mean=tuple(cfg.get("mean", IMAGENET_CFG.mean)),
            std=tuple(cfg.get("std", IMAGENET_CFG.std)),
            input_size=tuple(cfg.get("input_size", IMAGENET_CFG.input_size)),
            # the weights' filter; untrained models keep zsbir's bilinear
            interpolation=str(cfg.get("interpolation") or "bilinear") if pretrained
            else "bilinear",
            source=source or (f"timm {cfg.get('architecture', '?')}"
                              f"{'.' + cfg['tag'] if cfg.get('tag') else ''}"
                              if pretrained else "random init"))

    def forward(self, x: torch.Tensor, domain: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward_tokens(self, x: torch.Tensor, domain: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled features, tokens)`` from one pass: the pooled features of
        :meth:`forward` and the unpooled ``forward_features`` as (B, T, D) tokens (a
        transformer's output tokens as they are; a CNN's (B, C, h, w) map as one C-wide
        token per position, T = h * w): what pair scorers read (``tokens`` output)."""
        feats = self.model.forward_features(x)
        pooled = self.model.forward_head(feats, pre_logits=True)
        tokens = feats.flatten(2).transpose(1, 2) if feats.ndim == 4 else feats
        return pooled, tokens

    def imagenet_classifier(self) -> nn.Linear | None:
        head = self.model.get_classifier()
        if self.pretrained and isinstance(head, nn.Linear) and head.out_features == 1000:
            return head
        return None


#: a file's type when it is not a regular file (``stat`` test, words)
_NOT_REGULAR = ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"))
#: the largest .safetensors JSON header read (the format's own limit is 100 MB)
_MAX_SAFETENSORS_HEADER = 100 * 2**20


def weights_format(path: str | Path) -> str:
    """``"zip"`` (``torch.save``), ``"pickle"`` (legacy ``torch.save``) or ``"safetensors"``,
    told by the file's first bytes; :class:`WeightsFileError` (or
    :class:`WeightsNotFoundError`) naming the file when it is not a readable weights file."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise WeightsNotFoundError(f"{str(path)!r} does not exist") from None
    except OSError as exc:
        raise WeightsFileError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise WeightsFileError(f"{str(path)!r} is a directory, not a weights file")
    if not stat.S_ISREG(st.st_mode):
        kind = next((w for test, w in _NOT_REGULAR if test(st.st_mode)), "special file")
        raise WeightsFileError(f"{str(path)!r} is a {kind}, not a weights file")
    if st.st_size == 0:
        raise WeightsFileError(f"{str(path)!r} is empty (0 bytes), not a weights file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise WeightsFileError(f"{str(path)!r} is not readable: "
                               f"{exc.strerror or exc}") from exc
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise WeightsFileError(f"{str(path)!r} is a truncated or damaged zip archive, "
                                   f"not a weights file ({exc})") from exc
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            raise WeightsFileError(f"{str(path)!r} is a zip archive but not a torch.save "
                                   "file (no data.pkl member)")
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    n = int.from_bytes(head[:8], "little")
    if len(head) > 8 and head[8:9] == b"{" and 8 + n <= st.st_size:
        return "safetensors"
    raise WeightsFileError(
        f"{str(path)!r} is not a weights file: neither a torch.save archive or pickle nor "
        f".safetensors (it starts with {head[:8]!r})")


def _read_weights(path: Path, fmt: str, check_only: bool) -> Any:
    """The object a weights file holds; ``check_only``: a memory-mapped view (zip) or the
    tensor names (.safetensors header) without reading the data."""
    from zsbir.engine.checkpoint import CheckpointError, verify_archive

    if fmt == "safetensors":
        if check_only:
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if n > _MAX_SAFETENSORS_HEADER:
                    raise WeightsFileError(f"{str(path)!r}: a .safetensors header of {n} "
                                           "bytes is too large: the file is damaged")
                raw = fh.read(n)
            try:
                header = json.loads(raw)
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise WeightsFileError(f"{str(path)!r} is not a valid .safetensors file "
                                       f"(its header is not JSON: {exc})") from exc
            if not isinstance(header, dict):
                return header
            return {k: v for k, v in header.items() if k != "__metadata__"}
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - SafetensorError and friends: the file's fault
            raise WeightsFileError(f"{str(path)!r} is not a valid .safetensors file "
                                   f"({type(exc).__name__}: {_first_line(exc)})") from exc
    if not check_only:
        try:
            verify_archive(path, "weights file")
        except CheckpointError as exc:
            raise WeightsFileError(str(exc)) from exc
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: not the user's
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=check_only and fmt == "zip")
    except pickle.UnpicklingError as exc:
        from zsbir.engine.checkpoint import unpickling_detail

        detail = unpickling_detail(exc)
        raise WeightsFileError(
            f"{str(path)!r} holds objects other than plain data (tensors, numbers, strings, "
            "lists, dicts), which could run code when loaded: refused"
            + (f" ({detail[:120]})" if detail else "")) from exc
    except OSError as exc:
        raise WeightsFileError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a truncated or damaged file, whatever torch says
        raise WeightsFileError(f"{str(path)!r} is truncated or damaged, not a readable "
                               f"weights file ({type(exc).__name__}: {_first_line(exc)})"
                               ) from exc


def _first_line(exc: BaseException) -> str:
    """The telling line of an exception's message (torch's load errors span lines)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    told = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else "")
    return told[:200]


def _unwrap(obj: Any) -> Any:
    """The state dict inside a training checkpoint (``state_dict``/``model``/...)."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return obj


def _what(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return "a tensor"
    name = {list: "list", tuple: "tuple", dict: "dict", str: "string", int: "number",
            float: "number", bool: "bool", type(None): "None"}.get(type(obj))
    return f"a {name}" if name else f"a {type(obj).__name__}"


def _state_dict_problem(path: Path, obj: Any, is_tensor: Any) -> str | None:
    """Why ``obj`` (unwrapped) is not a state dict: names -> tensors; ``None`` if it is."""
    if not isinstance(obj, dict):
        return f"{str(path)!r} holds {_what(obj)}, not a state dict (names -> tensors)"
    if not obj:
        return f"{str(path)!r} holds an empty dict, not a state dict (names -> tensors)"
    bad = next(((k, v) for k, v in obj.items()
                if not isinstance(k, str) or not is_tensor(v)), None)
    if bad is not None:
        return (f"{str(path)!r} holds a dict whose {bad[0]!r} is {_what(bad[1])}, not a "
                "state dict (names -> tensors)")
    return None


def _is_header_entry(v: Any) -> bool:
    return isinstance(v, dict) and {"dtype", "shape", "data_offsets"} <= set(v)


def weights_file_problem(path: str | Path) -> str | None:
    """What is wrong with a ``weights`` file, in one line naming it; ``None`` when it is a
    regular, readable weights file holding a state dict. Cheap: a ``torch.save`` archive
    is memory-mapped (its tensors are not read), a .safetensors file's header alone read."""
    path = Path(path).expanduser()
    try:
        fmt = weights_format(path)
        obj = _read_weights(path, fmt, check_only=True)
    except (WeightsFileError, WeightsNotFoundError) as exc:
        return str(exc)
    check = _is_header_entry if fmt == "safetensors" else (
        lambda v: isinstance(v, torch.Tensor))
    return _state_dict_problem(path, obj if fmt == "safetensors" else _unwrap(obj), check)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file with ``weights_only=True`` (never falls back to pickle), after
    checking its format and checksums; :class:`WeightsFileError` naming it otherwise.

    Accepts a plain state dict or a checkpoint holding one under ``state_dict``/``model``.
    """
    path = Path(path)
    fmt = weights_format(path)
    obj = _unwrap(_read_weights(path, fmt, check_only=False))
    problem = _state_dict_problem(path, obj, lambda v: isinstance(v, torch.Tensor))
    if problem:
        raise WeightsFileError(problem)
    return {k.removeprefix("module."): v for k, v in obj.items()}


def find_cached_weights(timm_name: str) -> Path | None:
    """The locally cached pretrained file timm would use for ``timm_name``, if any.

    Looks in the Hugging Face hub cache (``hf_hub_id``) and torch.hub's checkpoint
    directory (``url``) without touching the network.
    """
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name.split(".")[0])
    if cfg is None:
        return None
    tag = timm_name.split(".", 1)[1] if "." in timm_name else None
    if tag:
        cfg = timm.models.get_pretrained_cfg(timm_name) or cfg
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for fname in ("model.safetensors", "pytorch_model.bin",
                          getattr(cfg, "hf_hub_filename", None)):
                if not fname:
                    continue
                found = try_to_load_from_cache(hub_id, fname)
                if isinstance(found, str) and os.path.isfile(found):
                    return Path(found)
        except ImportError:
            pass
    url = getattr(cfg, "url", None)
    if url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if candidate.is_file():
            return candidate
    return None


def resolve_weights(
    backbone: str, timm_name: str, pretrained: bool, weights: str | None, download: bool
) -> Path | None:
    """Where the pretrained weights come from: a file, the local cache, or ``None``.

    Raises :class:`WeightsNotFoundError` with instructions when they are asked for and
    cannot be found offline.
    """
    if weights:
        path = Path(weights).expanduser()
        try:
            weights_format(path)
        except WeightsNotFoundError:
            raise WeightsNotFoundError(
                f"backbone {backbone!r}: weights file {str(path)!r} does not exist") from None
        except WeightsFileError as exc:
            raise WeightsFileError(f"backbone {backbone!r}: {exc}") from None
        return path
    if not pretrained:
        return None
    cached = find_cached_weights(timm_name)
    if cached is not None or download:
        return cached  # None + download: let timm fetch it
    raise WeightsNotFoundError(
        f"backbone {backbone!r}: pretrained weights were asked for (pretrained = true) but "
        f"none are on this machine: no `weights` file was given and timm's caches hold no "
        f"weights for {timm_name!r}. Give a local file with `backbone.weights = "
        f"\"/path/to/{timm_name}.pth\"` (a state dict readable by torch.load(weights_only="
        f"True), or .safetensors), set `backbone.download = true` on a machine with "
        f"internet access, or set `backbone.pretrained = false`."
    )


def create_timm(
    backbone: str, timm_name: str, pretrained: bool, weights: str | None, download: bool,
    **kwargs: Any,
) -> tuple[nn.Module, bool]:
    """Create a timm model with weights from :func:`resolve_weights`; returns (model, loaded)."""
    import timm

    source = resolve_weights(backbone, timm_name, pretrained, weights, download)
    if source is None and not (pretrained and download):
        return timm.create_model(timm_name, pretrained=False, **kwargs), False
    if source is not None and source.suffix not in (".safetensors",) and not str(
        source
    ).endswith(".bin"):
        # plain state dict: load it ourselves so nested checkpoints work too
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
        try:
            state = load_state_dict_file(source)
        except WeightsFileError as exc:
            raise WeightsFileError(f"backbone {backbone!r}: {exc}") from None
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # size mismatches
            raise WeightsFileError(f"backbone {backbone!r}: weights file {str(source)!r} does "
                                   f"not match {timm_name}: {_first_line(exc)}") from exc
        if missing or unexpected:
            raise WeightsFileError(
                f"backbone {backbone!r}: weights file {str(source)!r} does not match "
                f"{timm_name}: missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}"
                f", unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        return model, True
    if source is not None and weights_format(source) == "zip":  # timm reads it: verify first
        from zsbir.engine.checkpoint import CheckpointError, verify_archive

        try:
            verify_archive(source, "weights file")
        except CheckpointError as exc:
            raise WeightsFileError(f"backbone {backbone!r}: {exc}") from exc
    overlay = {"file": str(source)} if source is not None else None
    model = timm.create_model(
        timm_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
    )
    return model, True
