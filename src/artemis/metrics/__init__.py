"""Importance metrics: registry and built-in metrics (``magnitude``, ``gradient_sensitivity``,
``activation``).

Example:
    >>> import torch
    >>> from artemis.metrics import METRICS, magnitude_scores
    >>> METRICS.get("activation").__name__
    'ActivationMetric'
    >>> magnitude_scores(torch.tensor([[-3.0, 1.0]])).tolist()
    [[3.0, 1.0]]
"""

from artemis.metrics.activation import ActivationMetric, activation_scores
from artemis.metrics.base import METRICS, ImportanceMetric
from artemis.metrics.gradient import (
    GradientSensitivityMetric,
    GradientSensitivityOptions,
    gradient_sensitivity_scores,
)
from artemis.metrics.magnitude import MagnitudeMetric, magnitude_scores

__all__ = [
    "METRICS",
    "ImportanceMetric",
    "MagnitudeMetric",
    "magnitude_scores",
    "GradientSensitivityMetric",
    "GradientSensitivityOptions",
    "gradient_sensitivity_scores",
    "ActivationMetric",
    "activation_scores",
]
