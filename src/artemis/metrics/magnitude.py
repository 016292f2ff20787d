"""``magnitude``: the absolute value of each weight."""

from __future__ import annotations

import torch
from torch import Tensor

from artemis.core.targets import PrunableTarget
from artemis.metrics.base import METRICS, ImportanceMetric

__all__ = ["MagnitudeMetric", "magnitude_scores"]


def magnitude_scores(weight: Tensor) -> Tensor:
    """``|w|`` in float32, shaped like ``weight``.

    Example:
        >>> import torch
        >>> magnitude_scores(torch.tensor([[-2.0, 0.5]], dtype=torch.bfloat16)).tolist()
        [[2.0, 0.5]]
    """
    return weight.detach().abs().to(torch.float32)


@METRICS.register("magnitude")
class MagnitudeMetric(ImportanceMetric):
    """Scores each weight by ``|w|``. Needs no statistics; free between pruning events."""

    name = "magnitude"

    def score(self, target: PrunableTarget) -> Tensor:
        return magnitude_scores(target.param)
