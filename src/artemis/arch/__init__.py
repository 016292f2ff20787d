"""Architecture adapters (see :mod:`artemis.arch.base`)."""

from artemis.arch.base import ADAPTERS, ArchitectureAdapter, GenericAdapter, get_adapter, unwrap_model
from artemis.arch.families import BertAdapter, GPT2Adapter, LlamaAdapter

__all__ = [
    "ADAPTERS",
    "ArchitectureAdapter",
    "GenericAdapter",
    "get_adapter",
    "unwrap_model",
    "LlamaAdapter",
    "GPT2Adapter",
    "BertAdapter",
]
