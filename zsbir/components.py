"""Imports every module that registers a built-in component (once, on first lookup)."""

from zsbir import rerankers  # noqa: F401
from zsbir.data import protocols, quadruplet, samplers, synthetic  # noqa: F401
from zsbir.engine import optim, schedules, step  # noqa: F401
from zsbir.hashing import hashers  # noqa: F401
from zsbir.losses import classification, distillation, metric  # noqa: F401
from zsbir.models import cse_resnet, efficientnet_lite, heads, net, timm_backbones  # noqa: F401
from zsbir.teachers import strategies  # noqa: F401
