"""Artemis: pruning for transformer models.

Example:
    >>> import artemis
    >>> artemis.PruningConfig(final_sparsity=0.5).final_sparsity
    0.5
"""

import importlib
import importlib.util
from typing import Any

from artemis import _moved, _transformers_hook
from artemis.core.errors import (
    ArtemisError,
    CalibrationError,
    CheckpointError,
    ConfigError,
    ModelError,
    PruningStateError,
)

__version__ = "0.1.0"

_moved.install()  # old import paths (artemis.export, artemis.config, ...) keep working
# the "artemis" quantizer, registered with transformers when its quantizer registry is
# imported: from_pretrained and SentenceTransformer then read save_pruned folders
_transformers_hook.install()

# The rest of the API is imported on first use (PEP 562), so that `import artemis` and the
# command line's argument checks run before torch is imported (about 1-2 s).
_LAZY = {
    "create_pruning_manager": "artemis.pruning",
    "oneshot": "artemis.data.pipeline",
    "PruningManager": "artemis.core.manager",
    "PruningConfig": "artemis.core.config",
    "load_pruning_config": "artemis.core.config",
    "save_pruned": "artemis.sparse.checkpoint",
    "load_pruned": "artemis.sparse.checkpoint",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        if f"artemis.{name}" in _moved.MOVED_MODULES or importlib.util.find_spec(f"artemis.{name}") is not None:
            return importlib.import_module(f"artemis.{name}")  # artemis.export, artemis.core, ...
        raise AttributeError(f"module 'artemis' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "create_pruning_manager",
    "oneshot",
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
