"""Pruning methods: registry and built-in methods.

Importing this package registers the built-in methods; :data:`METHODS` (defined in
:mod:`artemis.core.registry`) imports it on its first lookup.

Example:
    >>> from artemis.methods import METHODS
    >>> METHODS.get("layer_dropout").__name__
    'LayerDropoutMethod'
    >>> "magnitude_progressive" in METHODS, "no_such_method" in METHODS
    (True, False)
"""

from artemis.methods.base import METHODS, MethodOptions, PruningMethod, TargetFn
from artemis.methods.expert_pruning import ExpertPruningMethod
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
    "ExpertPruningMethod",
]
