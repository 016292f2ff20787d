"""Architecture adapters (see :mod:`artemis.arch.base`)."""

from artemis.arch.base import ADAPTERS, ArchitectureAdapter, GenericAdapter, get_adapter, unwrap_model
from artemis.arch.families import BertAdapter, GPT2Adapter, LlamaAdapter
from artemis.arch.layers import check_block_removal, remove_blocks

__all__ = [
    "ADAPTERS",
    "ArchitectureAdapter",
    "GenericAdapter",
    "get_adapter",
    "unwrap_model",
    "LlamaAdapter",
    "GPT2Adapter",
    "BertAdapter",
    "check_block_removal",
    "remove_blocks",
]
