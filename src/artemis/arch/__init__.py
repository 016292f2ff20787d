"""Architecture adapters (see :mod:`artemis.arch.base`).

Example (a model without a known ``config.model_type`` gets the generic adapter, whose
blocks are its longest list of same-class modules):
    >>> import torch.nn as nn
    >>> from artemis.arch import get_adapter
    >>> net = nn.Sequential(nn.Embedding(10, 4), nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]))
    >>> adapter = get_adapter(net)
    >>> adapter.name, adapter.blocks_path, adapter.block_prefixes()
    ('generic', '1', ['1.0', '1.1', '1.2'])
"""

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
