"""The ``pruning:`` keys of the block-by-block one-shot pipeline (:mod:`artemis.data.pipeline`).

They live here, beside the method that lists them (``magnitude_progressive``), rather than
in ``data/``: the config validation reads them through the method registry, and
``data/pipeline.py`` imports the methods, so the model cannot sit there without an
import cycle.

Example:
    >>> OneShotOptions().pipeline_inputs
    'auto'
    >>> OneShotOptions(pipeline_inputs="dense").resolved_inputs(reconstruction="sparsegpt")
    'dense'
    >>> OneShotOptions().resolved_inputs(reconstruction="none"), OneShotOptions().resolved_inputs("sparsegpt")
    ('dense', 'pruned')
"""

from __future__ import annotations

from pydantic import field_validator

from artemis.core.config import one_of
from artemis.methods.base import MethodOptions

__all__ = ["OneShotOptions", "PIPELINE_INPUTS"]

#: where the one-shot pipeline takes a block's calibration inputs from
PIPELINE_INPUTS = ("auto", "pruned", "dense")


class OneShotOptions(MethodOptions):
    """Options of :func:`artemis.oneshot` (flat keys of the ``pruning:`` section).

    Attributes:
        pipeline_inputs: where each block's calibration inputs come from. ``pruned``: the
            outputs of the previous block *after* it was pruned (sequential, as the
            SparseGPT paper: every block is fitted to the inputs it will see; two
            forward passes of the block); ``dense``: the outputs of the previous block
            before it was pruned, i.e. the dense model's activations (one forward pass
            of the block; the ``activation`` (Wanda) masks are then exactly those of
            ``manager.apply_pruning(s, calibration_data)``). ``auto`` (default):
            ``pruned`` with ``reconstruction: sparsegpt``, ``dense`` otherwise.
    """

    pipeline_inputs: str = "auto"

    @field_validator("pipeline_inputs")
    @classmethod
    def _check_inputs(cls, v: str) -> str:
        return one_of("pipeline_inputs", v, PIPELINE_INPUTS)

    def resolved_inputs(self, reconstruction: str = "none") -> str:
        """``pruned`` or ``dense``: ``auto`` resolved for the given ``reconstruction``."""
        if self.pipeline_inputs != "auto":
            return self.pipeline_inputs
        return "pruned" if reconstruction != "none" else "dense"
