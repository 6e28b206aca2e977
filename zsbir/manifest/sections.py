"""The sections of a manifest: the core sections' dataclasses (``[run]``, ``[data]``,
``[train]``, ``[evaluation]``), the table of top-level component sections (``[protocol]``,
``[model]``, ``[[losses]]``, ...) and :class:`Manifest`, the resolved form."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from zsbir.constraints import Length, Ordered, Pattern, Range, ResumeSafe
from zsbir.registry import Nested

__all__ = [
    "COMPONENT_KEYS", "COMPONENT_SECTIONS", "CORE_SECTIONS", "DEFAULT_MODEL",
    "DEFAULT_TEACHER_NETWORK", "DataConfig", "EvalConfig", "Manifest", "RESERVED",
    "RESERVED_TYPES", "RunConfig",
    "SECTION_ORDER", "TrainConfig", "student_backbone",
]


# ---------------------------------------------------------------------------- core sections
# ---------------------------------------------------------------------------- core sections
_PLAIN_NAME = Pattern(r"[A-Za-z0-9][A-Za-z0-9_.\-]*",
                      "a plain name (letters, digits, '_', '-', '.'; no '/' and not empty)")
_DEVICE = Pattern(r"auto|cpu|mps|cuda(:\d+)?", "\"auto\", \"cpu\", \"mps\" or \"cuda[:N]\"")
#: why a key may change on ``--resume`` (:class:`~zsbir.constraints.ResumeSafe`)
_WHERE = ResumeSafe("where the run and its caches live, for a moved run")
_HOW = ResumeSafe("how the run executes, not what it computes")
_LOG = ResumeSafe("logging and checkpoint frequency")
_AFTER = ResumeSafe("used only after training")


@dataclass
class RunConfig:
    """``[run]``: where results go and how the run is seeded."""

    name: Annotated[str, _PLAIN_NAME, _WHERE] = "run"
    #: results land in ``output_dir/name`` (relative paths: to the working directory)
    output_dir: Annotated[str, _WHERE] = "runs"
    seed: Annotated[int, Range(ge=0, lt=2**63)] = 0
    #: "auto" picks CUDA when available, else CPU; or "cpu", "cuda", "cuda:1", "mps"
    device: Annotated[str, _DEVICE, _HOW] = "auto"
    #: where caches (file indexes, teacher targets, WordNet) go; default ~/.cache/zsbir
    cache_dir: Annotated[str, _WHERE] = ""
    #: refuse to reuse a run directory that already holds results
    overwrite: Annotated[bool, _WHERE] = False
    #: torch intra-op threads; 0: chosen from the CPUs the process may use (OMP_NUM_THREADS,
    #: MKL_NUM_THREADS and ZSBIR_THREADS win over it; see zsbir.engine.threads)
    threads: Annotated[int, Range(ge=0, le=1024), _HOW] = 0


@dataclass
class DataConfig:
    """``[data]``: image decoding, augmentation and loading.

    Normalization is not set here: it comes from the student backbone's weights
    (``pretrained_cfg``: mean, std), as timm's and torchvision's weights carry it.
    """

    image_size: Annotated[int, Range(ge=16, le=4096)] = 224
    #: data-loader worker processes; -1 = automatic (CUDA: one per core, at most 8;
    #: CPU: one, so that decoding overlaps compute without starving it)
    workers: Annotated[int, Range(ge=-1, le=256), _HOW] = -1
    #: SAKE's recipe: with this probability, a random affine transform + flip
    augment_prob: Annotated[float, Range(ge=0, le=1)] = 0.7
    flip: bool = True
    #: the affine transform's zoom range [low, high]: positive (it divides) and ordered
    scale: Annotated[list[Annotated[float, Range(ge=0.01, le=100)]], Length(exactly=2),
                     Ordered()] = field(default_factory=lambda: [0.7, 1.3])
    rotation: Annotated[float, Range(ge=0, le=180)] = 30.0
    #: the largest shift, in pixels of a 224-pixel input
    translation: Annotated[float, Range(ge=0, le=1000)] = 10.0
    #: "backbone": the mean/std the backbone's weights expect; "none": raw [0, 1] pixels
    normalize: Literal["backbone", "none"] = "backbone"
    #: an unreadable image: "skip" it (reported and counted) or "fail" the run
    on_corrupt: Literal["skip", "fail"] = "skip"
    #: images per batch when embedding for evaluation
    eval_batch_size: Annotated[int, Range(ge=1, le=65536), _AFTER] = 64


@dataclass
class TrainConfig:
    """``[train]``: the loop. ``[train.step]`` names the training step (``zsbir list
    steps``): ``default`` is forward, teacher, weighted losses, backward, optimizer step."""

    epochs: Annotated[int, Range(ge=1, le=100_000)] = 20
    batch_size: Annotated[int, Range(ge=1, le=1_000_000)] = 40
    #: stop an epoch after this many steps (0 = the sampler's full epoch)
    max_steps_per_epoch: Annotated[int, Range(ge=0)] = 0
    #: save a resumable checkpoint every N steps (0 = only at epoch ends)
    checkpoint_every: Annotated[int, Range(ge=0), _LOG] = 200
    #: evaluate seen-class validation accuracy every N epochs (0 = never)
    val_every: Annotated[int, Range(ge=0)] = 1
    #: stop when validation accuracy has not improved for N epochs (0 = never)
    early_stopping: Annotated[int, Range(ge=0)] = 0
    #: which weights are evaluated at the end: the best validation epoch or the last
    select: Annotated[Literal["best_val", "last"], _AFTER] = "best_val"
    #: clip the gradient norm of every trained parameter, losses' included (0 = off)
    grad_clip: Annotated[float, Range(ge=0)] = 0.0
    log_every: Annotated[int, Range(ge=1), _LOG] = 10
    #: mixed precision: "auto" = bf16 autocast on CUDA, off on CPU (fp32 master weights,
    #: losses computed in fp32)
    amp: Literal["auto", "bf16", "off"] = "auto"
    #: channels-last memory format: "auto" = on for CUDA
    channels_last: Annotated[Literal["auto", "on", "off"], _HOW] = "auto"
    #: torch.compile the student and the teacher network ("reduce-overhead" adds CUDA
    #: graphs, for small batches such as SAKE's 40)
    compile: Annotated[Literal["off", "default", "reduce-overhead", "max-autotune"],
                       _HOW] = "off"
    step: Annotated[dict[str, Any], Nested("steps")] = field(
        default_factory=lambda: {"name": "default"})


@dataclass
class EvalConfig:
    """``[evaluation]``: what is measured on the unseen classes."""

    metrics: Annotated[list[str], Length(min=1)] = field(
        default_factory=lambda: ["map@all", "p@100"])
    #: also score generalized ZS-SBIR: seen-class photos join the gallery (SBTKNet Table 3)
    generalized: bool = False
    #: also score photo-to-photo retrieval among unseen photos (ZS-PBIR, SAKE Table 4)
    pbir: bool = False
    per_class: bool = False
    #: queries shown in the retrieval grid PNG (0 = no grid)
    grid_queries: Annotated[int, Range(ge=0, le=100)] = 6
    grid_top: Annotated[int, Range(ge=1, le=100)] = 10
    #: queries per chunk in the ranking engine (0 = from a memory budget)
    chunk_size: Annotated[int, Range(ge=0)] = 0


CORE_SECTIONS: dict[str, type] = {
    "run": RunConfig, "data": DataConfig, "train": TrainConfig, "evaluation": EvalConfig,
}
#: the model when ``[model]`` names none: today's backbone + head (zsbir.models.net)
DEFAULT_MODEL = "backbone_head"
#: top-level component sections: key -> (registry kind, is a list, required, default
#: table, reserved keys with their defaults). Nested component tables (``[model.head]``,
#: ``[teacher.network]``, ``[train.step]``, ...) are not listed anywhere: the resolver
#: reads them from the components' signatures (``Nested`` / ``Factory`` markers).
COMPONENT_SECTIONS: dict[str, tuple[str, bool, bool, Any, dict[str, Any]]] = {
    "protocol": ("protocols", False, True, None, {}),
    "model": ("models", False, False, {"name": DEFAULT_MODEL}, {}),
    "teacher": ("teachers", False, False, None, {}),
    "losses": ("losses", True, True, None, {"weight": 1.0}),
    "sampler": ("samplers", False, False, {"name": "random"}, {}),
    "optimizer": ("optimizers", False, False, {"name": "adam"}, {"groups": None}),
    "schedule": ("schedulers", False, False, {"name": "constant"}, {}),
    "hashers": ("hashers", True, False, [{"name": "none"}], {}),
    "rerankers": ("rerankers", True, False, [], {}),
    # pair scoring (zsbir.pairs): its evaluation settings are the toolkit's keys
    "pair_scorer": ("pair_scorers", False, False, None,
                    {"top_k": 0, "exhaustive": False, "batch_pairs": 256}),
}
#: top-level section -> its registry kind
COMPONENT_KEYS: dict[str, str] = {k: v[0] for k, v in COMPONENT_SECTIONS.items()}
#: keys the toolkit reads from a component table besides the component's own parameters,
#: per kind: ``weight`` is the losses' (the weighted sum), and only theirs; ``groups`` the
#: optimizer's (``[[optimizer.groups]]``: parameter groups, zsbir.engine.param_groups)
RESERVED: dict[str, dict[str, Any]] = {v[0]: v[4] for v in COMPONENT_SECTIONS.values() if v[4]}
#: the types of the reserved keys the resolver checks (``groups``: zsbir.wiring checks it).
#: ``[pair_scorer]``: ``top_k`` re-scores the top K of every hasher's ranking (0: off),
#: ``exhaustive`` scores every (query, gallery item) pair, ``batch_pairs`` is how many
#: aligned pairs go to the device at once (zsbir.pairs)
RESERVED_TYPES: dict[str, dict[str, Any]] = {
    "losses": {"weight": Annotated[float, Range(ge=0)]},
    "pair_scorers": {"top_k": Annotated[int, Range(ge=0, le=1_000_000)],
                     "exhaustive": bool,
                     "batch_pairs": Annotated[int, Range(ge=1, le=2**24)]},
}
#: the teacher's network when ``[teacher.network]`` is not given: an ImageNet classifier
#: on (a fresh copy of) the student's backbone
DEFAULT_TEACHER_NETWORK = "imagenet_classifier"
#: ``backbone``: the shorthand ``[backbone]`` (for ``[model.backbone]``), kept so that
#: problems under it sort where it is written
SECTION_ORDER = ("run", "protocol", "data", "backbone", "model", "teacher", "losses",
                 "sampler", "optimizer", "schedule", "train", "hashers", "rerankers",
                 "pair_scorer", "evaluation", "plugins")


def student_backbone(model: Any) -> Any:
    """The student's backbone table in a ``[model]`` table: ``[model.backbone]``, else the
    photo tower's (``[model.photo]``); ``None`` when the model has neither. The teacher's
    default network copies it; checks written against the shorthand ``[backbone]`` read it."""
    if not isinstance(model, dict):
        return None
    for key in ("backbone", "photo"):
        if isinstance(model.get(key), dict):
            return model[key]
    return None


# ---------------------------------------------------------------------------- the resolved form
# ---------------------------------------------------------------------------- the resolved form
@dataclass
class Manifest:
    """A validated manifest: core sections as dataclasses, component tables as dicts with
    every default filled in (nested component tables too), and the plain-data form
    (``data``) saved with runs. ``plugins`` records the distribution and version of every
    plugin a component of the manifest comes from.

    ``model`` is the student's table (``[model]``: ``name``, ``backbone`` / ``sketch`` +
    ``photo``, ``head``, ...); ``backbone`` and ``head`` read its tables."""

    run: RunConfig
    data_cfg: DataConfig
    model: dict[str, Any]
    train: TrainConfig
    evaluation: Annotated[EvalConfig, _AFTER]
    protocol: dict[str, Any]
    teacher: dict[str, Any] | None
    losses: list[dict[str, Any]]
    sampler: dict[str, Any]
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    hashers: Annotated[list[dict[str, Any]], _AFTER]
    rerankers: Annotated[list[dict[str, Any]], _AFTER] = field(default_factory=list)
    #: ``[pair_scorer]`` (``None``: no pair scoring); its ``top_k`` / ``exhaustive`` /
    #: ``batch_pairs`` are evaluation settings (:data:`RESERVED_TYPES`)
    pair_scorer: Annotated[dict[str, Any] | None, _AFTER] = None
    plugins: dict[str, str] = field(default_factory=dict)
    source: str = "<manifest>"

    @property
    def backbone(self) -> dict[str, Any] | None:
        """The student's backbone table (:func:`student_backbone`: ``[model.backbone]``,
        or the photo tower's)."""
        return student_backbone(self.model)

    @property
    def head(self) -> dict[str, Any] | None:
        """``[model.head]`` (``None`` for a model without one)."""
        head = self.model.get("head")
        return head if isinstance(head, dict) else None

    @property
    def data(self) -> dict[str, Any]:
        """The resolved manifest as plain TOML-able data (the ``[model]`` form: never the
        shorthand ``[backbone]``)."""
        out: dict[str, Any] = {}
        for key in SECTION_ORDER:
            if key in CORE_SECTIONS:
                attr = "data_cfg" if key == "data" else key
                out[key] = dataclasses.asdict(getattr(self, attr))
            elif key != "backbone":
                value = getattr(self, key)
                if value is not None and value != {} and not (key == "rerankers"
                                                               and not value):
                    out[key] = value
        return out

    def to_toml(self) -> str:
        from zsbir.manifest.tomlio import dump_toml

        return dump_toml(self.data)
