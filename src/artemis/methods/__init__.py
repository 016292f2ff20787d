"""Pruning methods: registry and built-in methods."""

from artemis.methods.base import METHODS, PruningMethod, TargetFn
from artemis.methods.layer_dropout import LayerDropoutMethod
from artemis.methods.unstructured import UnstructuredMethod
from artemis.methods.structured import StructuredMethod

__all__ = ["METHODS", "PruningMethod", "TargetFn", "UnstructuredMethod", "StructuredMethod", "LayerDropoutMethod"]
