"""Importance metrics: registry and built-in metrics."""

from artemis.metrics.base import METRICS, ImportanceMetric
from artemis.metrics.magnitude import MagnitudeMetric, magnitude_scores

__all__ = ["METRICS", "ImportanceMetric", "MagnitudeMetric", "magnitude_scores"]
