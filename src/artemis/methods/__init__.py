"""Pruning methods: registry and built-in methods."""

from artemis.methods.base import METHODS, PruningMethod, TargetFn
from artemis.methods.layer_dropout import LayerDropoutMethod
from artemis.methods.structured import StructuredMethod
from artemis.methods.unstructured import UnstructuredMethod

__all__ = ["METHODS", "PruningMethod", "TargetFn", "UnstructuredMethod", "StructuredMethod", "LayerDropoutMethod"]
