"""Exception types raised by Artemis.

Every error caused by user input is a ``ValueError`` subclass (so existing
``except ValueError`` code keeps working) whose message names the offending
field, file or module, shows the bad value and says what would be valid.
Lifecycle misuse (calling ``step()`` after ``finalize()``, say) raises
:class:`PruningStateError`, a ``RuntimeError``.

Example:
    >>> from artemis import load_pruning_config
    >>> try:
    ...     load_pruning_config({"pruning": {"final_sparsity": 1.5}})
    ... except ValueError as exc:  # a ConfigError is a ValueError
    ...     print(type(exc).__name__, str(exc))
    ConfigError pruning.final_sparsity: final_sparsity must be in [0, 1), got 1.5
"""

from __future__ import annotations

__all__ = [
    "ArtemisError",
    "ConfigError",
    "ModelError",
    "CalibrationError",
    "CheckpointError",
    "PruningStateError",
]


class ArtemisError(Exception):
    """Base class of every exception Artemis raises on purpose."""


class ConfigError(ArtemisError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class ModelError(ArtemisError, ValueError):
    """The model cannot be pruned as asked (no prunable weights, unknown architecture, ...)."""


class CalibrationError(ArtemisError, ValueError):
    """Calibration data or the statistics a metric needs are missing or malformed."""


class CheckpointError(ArtemisError, ValueError):
    """A saved model or manager state is missing, truncated or inconsistent."""


class PruningStateError(ArtemisError, RuntimeError):
    """A manager method was called at the wrong point of its lifecycle."""
