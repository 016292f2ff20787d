"""Artemis: pruning for transformer models.

Example:
    >>> import artemis
    >>> artemis.PruningConfig(final_sparsity=0.5).final_sparsity
    0.5
"""

from artemis import _moved
from artemis.core.config import PruningConfig, load_pruning_config
from artemis.core.errors import (
    ArtemisError,
    CalibrationError,
    CheckpointError,
    ConfigError,
    ModelError,
    PruningStateError,
)
from artemis.core.manager import PruningManager
from artemis.pruning import create_pruning_manager
from artemis.sparse import hf_quantizer
from artemis.sparse.checkpoint import load_pruned, save_pruned

__version__ = "0.1.0"

_moved.install()  # old import paths (artemis.export, artemis.config, ...) keep working
# the "artemis" quantizer, registered with transformers when its quantizer registry is
# imported: from_pretrained and SentenceTransformer then read save_pruned folders
hf_quantizer.install()

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
