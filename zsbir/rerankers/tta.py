"""Test-time augmentation of embeddings: each image is embedded as it is and under the
named views (default: a horizontal flip), and the L2-normalized embeddings are averaged,
``e(x) = norm(1/V sum_v norm(f(t_v(x))))`` (flip TTA as in e.g. Krizhevsky et al., NIPS
2012, Sec. 4.1, averaging predictions over reflections; here averaged embeddings, both for
the sketch queries and the photo gallery). Score: cosine of the averaged embeddings.

It ``needs_model``: the evaluator embeds the images again under :data:`~.base.VIEWS` and
hands (N, 1 + len(views), d) arrays to ``fit`` / ``scores``. Cost: one more forward pass per
view over queries and gallery; scoring as the plain ranking.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F

from zsbir.constraints import Length, Range
from zsbir.registry import rerankers

from .base import Reranker

__all__ = ["TestTimeAugmentation"]


class TestTimeAugmentation(Reranker):
    """Averaged embeddings over image views (see the module docstring)."""

    __test__ = False  # not a pytest class
    needs_model = True
    view_ndim = 3

    def __init__(self, views: tuple[str, ...] = ("hflip",), chunk_size: int = 1024,
                 ctx: Any = None):
        super().__init__(chunk_size, ctx)
        self.views = tuple(views)

    @property
    def tag(self) -> str:
        return "tta_" + "_".join(self.views)

    @staticmethod
    def average(x: torch.Tensor) -> torch.Tensor:
        """(N, V, d) unit views -> (N, d) normalized mean."""
        return F.normalize(x.mean(1), dim=1)

    def _check_views(self, x: torch.Tensor, name: str) -> None:
        if x.shape[1] != 1 + len(self.views):
            raise ValueError(f"{name} has {x.shape[1]} view(s), reranker {self.tag!r} "
                             f"needs {1 + len(self.views)} (the plain one + {self.views})")

    def _fit(self, gallery: torch.Tensor, queries: torch.Tensor | None) -> None:
        self._check_views(gallery, "gallery")
        self.averaged = self.average(gallery)

    def _scores(self, q: torch.Tensor) -> torch.Tensor:
        self._check_views(q, "queries")
        return self.average(q) @ self.averaged.T


@rerankers.register("tta")
def tta(views: Annotated[list[Literal["hflip"]], Length(min=1)] = ["hflip"],  # noqa: B006
        chunk_size: Annotated[int, Range(ge=1)] = 1024,
        ctx: Any = None) -> TestTimeAugmentation:
    """Test-time augmentation: embeddings averaged over the image and its views (default
    a horizontal flip), queries and gallery alike; needs the model."""
    return TestTimeAugmentation(tuple(views), chunk_size, ctx)
