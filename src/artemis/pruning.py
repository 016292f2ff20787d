"""The specification API: ``from artemis.pruning import create_pruning_manager``.

Example:
    >>> import torch.nn as nn
    >>> from artemis.pruning import create_pruning_manager
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> cfg = {"pruning": {"final_sparsity": 0.5, "targets": ["*"], "pruning_interval": 1}}
    >>> mgr = create_pruning_manager(cfg, net, total_steps=10)
    >>> for _ in range(10):
    ...     _ = mgr.step()
    >>> mgr.get_pruning_summary()["measured_sparsity"]
    0.5
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import torch.nn as nn

from artemis.core.config import PruningConfig, load_pruning_config
from artemis.core.manager import PruningManager

__all__ = ["create_pruning_manager", "PruningManager", "PruningConfig"]


def create_pruning_manager(
    config: Union[PruningConfig, Mapping, str, os.PathLike],
    model: nn.Module,
    *,
    total_steps: Optional[int] = None,
) -> PruningManager:
    """Validate ``config`` and return a :class:`PruningManager` for ``model``.

    Args:
        config: ``{"pruning": {...}}``, ``{"model": {"pruning": {...}}}`` (where
            ``sparsity_target`` aliases ``final_sparsity``), a :class:`PruningConfig`, or
            a path to a YAML file holding either dict form.
        model: a Hugging Face model or any ``torch.nn.Module``.
        total_steps: the run's number of ``step()`` calls, if known now.

    Raises:
        ConfigError: the configuration is invalid (the message names the field).
        ModelError: the model has nothing to prune as configured.
    """
    return PruningManager(model, load_pruning_config(config), total_steps=total_steps)
