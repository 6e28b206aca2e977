"""CLIP's image and text towers (open_clip), weights only from a local file.

Sain et al., "CLIP for All Things Zero-Shot Sketch-Based Image Retrieval, Fine-Grained or
Not", CVPR 2023 (code: aneeshan95/Sketch_LVM), Sec. 4: a frozen CLIP ViT-B/32 whose
LayerNorms are trained, with a few learnable *visual prompt* tokens per domain (one set
for sketches, one for photos) fed to the image transformer beside the class and patch
tokens; the image tower's projected class-token output is the retrieval feature.

- backbone ``clip_vit``: the prompted image tower (:class:`ClipVisionBackbone`);
- network ``clip_text``: the frozen text tower with CLIP's tokenizer
  (:class:`ClipTextTower`), which the ``clip_text_classifier`` head reads once.

Weights: ``weights = "/path/open_clip_model.safetensors"`` (or ``.bin`` / ``.pt``: a state
dict as open_clip saves ``model.state_dict()``), loaded with ``open_clip.load_checkpoint``
(``weights_only=True``, strict). Nothing is ever downloaded: ``pretrained = true`` without
a file is an error naming the ``weights`` key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
from torch import nn

from zsbir.constraints import BASE_WEIGHTS, ExistingPath, Range
from zsbir.models.backbone import Backbone, PretrainedCfg, WeightsNotFoundError

__all__ = ["CLIP_MEAN", "CLIP_STD", "ClipTextTower", "ClipVisionBackbone", "build_clip",
           "clip_config", "freeze_clip"]

#: OpenAI CLIP's normalization (open_clip.OPENAI_DATASET_MEAN / _STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Arch = Literal["ViT-B-32", "ViT-B-16"]
Freeze = Literal["all_but_layernorm", "released_code", "none"]

#: ``source`` of a tower without a weights file (as zsbir's PretrainedCfg says it)
RANDOM = "random init"


def clip_config(arch: str, config: str = "") -> dict[str, Any]:
    """open_clip's model config for ``arch``, or the JSON file ``config`` (either the
    config itself, ``{"embed_dim", "vision_cfg", "text_cfg"}``, or an
    ``open_clip_config.json`` holding it under ``model_cfg``)."""
    import open_clip

    if config:
        path = Path(config).expanduser()
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"config {str(path)!r}: cannot read an open_clip model config "
                             f"({exc})") from exc
        cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else cfg
        what = f"config {str(path)!r}"
    else:
        cfg = open_clip.get_model_config(arch)
        what = f"arch {arch!r}"
    if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
        raise ValueError(f"{what}: not an open_clip model config (needs embed_dim, "
                         "vision_cfg and text_cfg)")
    vision = cfg["vision_cfg"]
    if "timm_model_name" in vision or not isinstance(vision.get("layers", 12), int):
        raise ValueError(f"{what}: the image tower must be open_clip's VisionTransformer "
                         "(no timm or ResNet towers)")
    if vision.get("attentional_pool") or vision.get("pool_type", "tok") != "tok" or \
            vision.get("final_ln_after_pool") or vision.get("pos_embed_type",
                                                            "learnable") != "learnable":
        raise ValueError(f"{what}: visual prompts need a class-token ViT (pool_type 'tok', "
                         "learnable positional embedding, no attentional pooling)")
    return cfg


def _weights_error(owner: str, pretrained: bool, weights: str) -> Path | None:
    """The weights file to load, ``None`` for random initialization, or a clear error."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"{owner}.weights: file {str(path)!r} does not exist")
        return path
    if pretrained:
        raise WeightsNotFoundError(
            f"{owner}.weights: pretrained = true needs a local CLIP weights file: set "
            f"{owner}.weights = \"/path/open_clip_model.safetensors\" (or .bin: a state dict "
            "as open_clip saves it); nothing is downloaded. Or set "
            f"{owner}.pretrained = false for a randomly initialized tower.")
    return None


def build_clip(owner: str, arch: str, config: str, quick_gelu: bool, weights: str,
               pretrained: bool, load: bool = True) -> tuple[nn.Module, str]:
    """An ``open_clip.CLIP`` (both towers) with the weights file loaded; returns (model,
    source). ``owner`` names the manifest table in errors (``backbone``). ``load = False``
    (a trained model being rebuilt, whose checkpoint holds the weights) skips the file."""
    import open_clip

    cfg = clip_config(arch, config)
    source = _weights_error(owner, pretrained, weights) if load else None
    model = open_clip.CLIP(**cfg, quick_gelu=quick_gelu)
    if source is None:
        return model, RANDOM
    try:
        open_clip.load_checkpoint(model, str(source), strict=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure: name the file and the key
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{owner}.weights: {str(source)!r} is not an open_clip state dict "
                         f"for {config or arch}: {first}") from exc
    return model, str(source)


def freeze_clip(module: nn.Module, freeze: str) -> None:
    """Set ``requires_grad`` on a CLIP tower.

    - ``all_but_layernorm`` (the paper, Sec. 4): only LayerNorm weights and biases train;
    - ``released_code``: what Sketch_LVM's ``freeze_all_but_bn`` leaves trainable: it
      freezes the ``weight``/``bias`` of every non-LayerNorm module, so every other
      parameter (the attention ``in_proj_weight``/``in_proj_bias``, the class and
      positional embeddings, the output projection) stays trainable too;
    - ``none``: everything trains.
    """
    if freeze == "none":
        module.requires_grad_(True)
        return
    if freeze == "all_but_layernorm":
        module.requires_grad_(False)
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.requires_grad_(True)
        return
    if freeze == "released_code":
        module.requires_grad_(True)
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                continue
            for attr in ("weight", "bias"):
                p = getattr(m, attr, None)
                if isinstance(p, nn.Parameter):
                    p.requires_grad_(False)
        return
    raise ValueError(f"freeze: expected 'all_but_layernorm', 'released_code' or 'none', "
                     f"got {freeze!r}")


def _load_pretrained(ctx: Any) -> bool:
    return bool(getattr(ctx, "load_pretrained", True)) if ctx is not None else True


def _image_size(cfg: dict[str, Any]) -> int:
    size = cfg["vision_cfg"].get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise ValueError(f"square CLIP input sizes only, got {size}")
        size = size[0]
    return int(size)


class ClipVisionBackbone(Backbone):
    """CLIP's image tower with learnable visual prompts per domain (Sain et al., CVPR 2023).

    For an image x of domain d (0 photo, 1 sketch) with patch embeddings p_1..p_N, class
    embedding c, positional embeddings E and the domain's prompts P_d = (P_d1..P_dK)
    (``prompts`` = K tokens of the transformer's width, 3 in the paper):

        z_0 = [c + E_0, P_d1, .., P_dK, p_1 + E_1, .., p_N + E_N]
        f(x) = LN_post(ViT(LN_pre(z_0))[0]) W_proj                (B, embed_dim)

    The prompts carry no positional embedding and the image transformer has no attention
    mask, so the output does not depend on where they sit in the sequence: after the
    class token (as here and in the paper's figure) or after the patches (as the released
    code appends them) give the same f(x). Prompts start as N(0, 1) draws, as in the
    released code. ``forward`` returns f(x), CLIP's projected image embedding; the
    ``clip_text_classifier`` head normalizes it.
    """

    conditional: ClassVar[bool] = True

    def __init__(self, visual: nn.Module, prompts: int, freeze: str, source: str,
                 pretrained: bool, image_size: int):
        super().__init__()
        self.visual = visual
        freeze_clip(self.visual, freeze)
        width = int(visual.conv1.out_channels)
        #: learnable prompt tokens: [photo, sketch] x prompts x width
        self.prompts = nn.Parameter(torch.randn(2, prompts, width))
        self.num_features = int(visual.output_dim)
        self.pretrained = pretrained
        self.num_prompts = prompts
        self.pretrained_cfg = PretrainedCfg(
            mean=CLIP_MEAN, std=CLIP_STD, input_size=(3, image_size, image_size),
            interpolation="bicubic",
            source=source)

    def forward(self, x: torch.Tensor, domain: torch.Tensor | None = None) -> torch.Tensor:
        if domain is None:
            raise ValueError("clip_vit: the prompted image tower needs each image's domain "
                             "(0 photo, 1 sketch)")
        v = self.visual
        t = v.conv1(x.to(v.conv1.weight.dtype))           # (B, width, g, g)
        t = t.flatten(2).transpose(1, 2)                   # (B, g*g, width)
        cls = v.class_embedding.to(t.dtype).expand(t.shape[0], 1, -1)
        t = torch.cat([cls, t], dim=1) + v.positional_embedding.to(t.dtype)
        prompts = self.prompts.to(t.dtype)[domain.long()]  # (B, K, width)
        t = torch.cat([t[:, :1], prompts, t[:, 1:]], dim=1)
        t = v.patch_dropout(t)
        t = v.ln_pre(t)
        t = v.transformer(t)
        pooled = v.ln_post(t[:, 0])
        return pooled @ v.proj if v.proj is not None else pooled


def clip_vit(
    arch: Arch = "ViT-B-32",
    weights: Annotated[str, ExistingPath("file"), BASE_WEIGHTS] = "",
    pretrained: bool = True,
    prompts: Annotated[int, Range(ge=0, le=64)] = 3,
    freeze: Freeze = "all_but_layernorm",
    quick_gelu: bool = True,
    config: Annotated[str, ExistingPath("file")] = "",
    ctx: Any = None,
) -> ClipVisionBackbone:
    """CLIP ViT image tower with per-domain visual prompts (Sain et al., CVPR 2023).

    f(x) = LN_post(ViT(LN_pre([c + E_0, P_d, patches + E]))[0]) W_proj, with P_d the
    ``prompts`` learnable tokens of the image's domain d (photo or sketch); see
    :class:`ClipVisionBackbone`. Paper: ViT-B/32, 3 prompts per domain, everything frozen
    but the LayerNorms.

    Args:
        arch: open_clip architecture, ViT-B/32 (the paper's) or ViT-B/16.
        weights: local open_clip state dict (``.safetensors``, ``.bin`` or ``.pt``, as
            open_clip saves ``model.state_dict()``); nothing is downloaded.
        pretrained: the weights file is required (an error names ``backbone.weights``
            when it is missing); false: a randomly initialized tower (tests).
        prompts: prompt tokens per domain (paper: 3); 0 disables prompting.
        freeze: ``all_but_layernorm`` (paper), ``released_code`` (what the authors'
            code leaves trainable, see :func:`freeze_clip`) or ``none``.
        quick_gelu: QuickGELU activations, as OpenAI's CLIP weights need (the paper's);
            false for weights trained with GELU (e.g. LAION's).
        config: an open_clip model config JSON used instead of ``arch``'s (custom or
            test-sized towers).
    """
    cfg = clip_config(arch, config)
    model, source = build_clip("backbone", arch, config, quick_gelu, weights, pretrained,
                               load=_load_pretrained(ctx))
    backbone = ClipVisionBackbone(model.visual, prompts, freeze, source,
                                  pretrained=source != RANDOM,
                                  image_size=_image_size(cfg))
    del model
    return backbone


def _check_tower(params: dict[str, Any], manifest: dict[str, Any], owner: str) -> list[str]:
    problems = []
    if params.get("pretrained", True) and not params.get("weights"):
        problems.append(f"pretrained = true needs {owner}.weights, a local open_clip state "
                        "dict (.safetensors or .bin); nothing is downloaded (or set "
                        "pretrained = false)")
    return problems


def _check_backbone(params: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    problems = _check_tower(params, manifest, "backbone")
    try:
        size = _image_size(clip_config(params.get("arch", "ViT-B-32"),
                                       params.get("config", "")))
    except ValueError as exc:
        return [*problems, str(exc)]
    data_size = (manifest.get("data") or {}).get("image_size")
    if isinstance(data_size, int) and data_size != size:
        problems.append(f"the CLIP image tower takes {size}x{size} images, but "
                        f"data.image_size = {data_size}: set data.image_size = {size}")
    return problems


clip_vit.check_manifest = _check_backbone  # type: ignore[attr-defined]


class ClipTextTower(nn.Module):
    """CLIP's frozen text tower and tokenizer: ``encode_text(texts) -> (N, embed_dim)``.

    The text transformer's output at the end-of-text token, projected
    (``open_clip.CLIP.encode_text``); open_clip's BPE tokenizer ships with the package, so
    nothing is fetched. ``logit_scale`` is CLIP's learned temperature exp(t) (100 for
    OpenAI's weights). Frozen and always in eval mode.
    """

    def __init__(self, model: nn.Module, source: str, context_length: int):
        super().__init__()
        import open_clip

        model.visual = nn.Identity()  # the image tower is the backbone's business
        self.clip = model
        self.source = source
        self.embed_dim = int(model.text_projection.shape[1]) \
            if isinstance(model.text_projection, torch.Tensor) \
            else int(model.text_projection.out_features)
        self.tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ClipTextTower:  # always frozen, always eval
        return super().train(False)

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.detach().exp())

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        device = next(self.clip.parameters()).device
        tokens = self.tokenizer(texts).to(device)
        return self.clip.encode_text(tokens).float()

    def forward(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``{"features": encode_text(texts)}``; a text tower has no image input."""
        return {"features": self.encode_text(texts)}


def clip_text(
    arch: Arch = "ViT-B-32",
    weights: Annotated[str, ExistingPath("file"), BASE_WEIGHTS] = "",
    pretrained: bool = True,
    quick_gelu: bool = True,
    config: Annotated[str, ExistingPath("file")] = "",
    ctx: Any = None,
) -> ClipTextTower:
    """CLIP's frozen text tower (open_clip), weights only from a local file.

    ``encode_text(texts)`` gives CLIP text embeddings t = LN_final(T(tokens))[eot] W_text;
    the ``clip_text_classifier`` head encodes "a photo of a {class}" once with it (Sain et
    al., CVPR 2023). Parameters as for backbone ``clip_vit`` (same file: open_clip saves
    both towers in one state dict).
    """
    cfg = clip_config(arch, config)
    model, source = build_clip("network", arch, config, quick_gelu, weights, pretrained,
                               load=_load_pretrained(ctx))
    return ClipTextTower(model, source, int(cfg["text_cfg"].get("context_length", 77)))


def _check_text(params: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    return _check_tower(params, manifest, "network")


clip_text.check_manifest = _check_text  # type: ignore[attr-defined]
