"""``PruningCallback``: progressive pruning inside a Hugging Face ``transformers.Trainer``.

Attaching the callback is the only change a ``Trainer`` user makes::

    from artemis.train.integrations import PruningCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[PruningCallback({"pruning": {"final_sparsity": 0.6}})])
    trainer.train()
    callback.manager.finalize()          # make the pruning permanent when done

What it does:

* ``on_train_begin`` — creates the :class:`~artemis.core.manager.PruningManager` for the
  Trainer's model (or uses the one you passed) with ``total_steps = state.max_steps``;
  when the Trainer resumes from ``checkpoint-N`` it reloads the manager state saved
  there, so masks and the schedule position are exactly those of the interrupted run.
* ``on_pre_optimizer_step`` — ``manager.step()`` (after ``backward()`` and gradient
  clipping, before ``optimizer.step()``), then zeroes the gradients of pruned weights;
  the manager's optimizer hooks keep pruned weights and optimizer state at zero.
* ``on_save`` — writes ``manager.state_dict()`` to
  ``OUTPUT/checkpoint-N/artemis_pruning_state.safetensors`` next to the Trainer's own
  files: safetensors (the masks and metric tensors) plus JSON in its header (everything
  else), so that resuming never unpickles anything and a crafted file cannot run code
  (see :func:`artemis.train.loading.load_state_file`). An ``artemis_pruning_state.pt``
  of an earlier version is still read, with ``torch.load(weights_only=True)``.

Example:
    >>> from artemis.train.integrations import PruningCallback, STATE_FILE
    >>> cb = PruningCallback({"pruning": {"final_sparsity": 0.5}})
    >>> cb.manager is None, STATE_FILE
    (True, 'artemis_pruning_state.safetensors')
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from transformers import TrainerCallback

from artemis.core.config import PruningConfig, load_pruning_config
from artemis.core.errors import CheckpointError, PruningStateError
from artemis.core.manager import PruningManager
from artemis.train.loading import load_legacy_state_file, load_state_file, save_state_file

__all__ = ["PruningCallback", "STATE_FILE", "LEGACY_STATE_FILE", "read_pruning_state"]

logger = logging.getLogger(__name__)

STATE_FILE = "artemis_pruning_state.safetensors"
#: the file name earlier versions used (a torch.save pickle)
LEGACY_STATE_FILE = "artemis_pruning_state.pt"
_STATE_KIND = "pruning_state"


def read_pruning_state(path: Union[str, os.PathLike]) -> dict:
    """The manager state saved by :class:`PruningCallback` at ``path`` (a :data:`STATE_FILE`,
    or a :data:`LEGACY_STATE_FILE` of an earlier version), tensors on CPU; nothing in
    the file runs.

    Raises:
        CheckpointError: the file cannot be read safely or is not a pruning state; the
            message names it and how to proceed.
    """
    path = Path(path)
    how = (
        "resume from another checkpoint-N, or train without resume_from_checkpoint to start afresh "
        "(the pruning masks cannot be restored without this file)"
    )
    try:
        if path.suffix == ".pt":
            state = load_legacy_state_file(path, "cpu")
        else:
            state = load_state_file(path, _STATE_KIND, "cpu")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {how}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(state).__name__}, not a pruning state; {how}")
    return state


class PruningCallback(TrainerCallback):
    """Drive a :class:`PruningManager` from ``transformers.Trainer`` (see the module docstring).

    Args:
        pruning: a manager already created for the Trainer's model, or a pruning
            config (anything :func:`~artemis.core.config.load_pruning_config` accepts) from
            which the manager is created at the start of training.

    Attributes:
        manager: the manager (None until training starts when a config was given).
    """

    def __init__(
        self,
        pruning: Union[PruningManager, PruningConfig, Mapping, str, os.PathLike],
        *,
        strict_config: bool = True,
    ) -> None:
        self.strict_config = strict_config  # False: resume a state saved with another pruning config
        if isinstance(pruning, PruningManager):
            self.manager: Optional[PruningManager] = pruning
            self.config = pruning.config
        else:
            self.manager = None
            self.config = load_pruning_config(pruning)  # fail at construction on a bad config

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.manager is None:
            if model is None:
                raise PruningStateError("PruningCallback: the Trainer passed no model to on_train_begin")
            self.manager = PruningManager(model, self.config, total_steps=state.max_steps)
        elif self.manager.total_steps is None:
            self.manager._set_total_steps(state.max_steps)
        if state.global_step > 0:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            path = folder / STATE_FILE
            if not path.is_file() and (folder / LEGACY_STATE_FILE).is_file():
                path = folder / LEGACY_STATE_FILE  # written by an earlier version
            if not path.is_file():
                raise CheckpointError(
                    f"resuming at step {state.global_step} but {str(path)!r} is missing; the checkpoint was not "
                    "written with PruningCallback attached, so the pruning masks cannot be restored"
                )
            self.manager.load_state_dict(read_pruning_state(path), strict_config=self.strict_config)
            logger.info("restored pruning state from %s (step %d)", path, state.global_step)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.manager is not None
        self.manager.step()
        self.manager.apply_mask_to_gradients()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.manager is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        save_state_file(folder / STATE_FILE, self.manager.state_dict(), _STATE_KIND)
