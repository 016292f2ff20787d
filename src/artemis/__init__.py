"""Artemis: pruning for transformer models.

Example:
    >>> import artemis
    >>> artemis.PruningConfig(final_sparsity=0.5).final_sparsity
    0.5
"""

from artemis.config import PruningConfig, load_pruning_config
from artemis.errors import (
    ArtemisError,
    CalibrationError,
    CheckpointError,
    ConfigError,
    ModelError,
    PruningStateError,
)
from artemis.export import load_pruned, save_pruned
from artemis.manager import PruningManager
from artemis.pruning import create_pruning_manager

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "create_pruning_manager",
    "PruningManager",
    "PruningConfig",
    "load_pruning_config",
    "save_pruned",
    "load_pruned",
    "ArtemisError",
    "ConfigError",
    "ModelError",
    "CalibrationError",
    "CheckpointError",
    "PruningStateError",
]
