"""Pruning methods: registry and built-in methods.

Importing this package registers the built-in methods; :data:`METHODS` (defined in
:mod:`artemis.core.registry`) imports it on its first lookup.
"""

from artemis.methods.base import METHODS, MethodOptions, PruningMethod, TargetFn
from artemis.methods.layer_dropout import LayerDropoutMethod
from artemis.methods.structured import StructuredMethod
from artemis.methods.unstructured import UnstructuredMethod

__all__ = [
    "METHODS",
    "MethodOptions",
    "PruningMethod",
    "TargetFn",
    "UnstructuredMethod",
    "StructuredMethod",
    "LayerDropoutMethod",
]
