"""Streaming calibration batches through a model for metrics that need statistics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import Tensor

from artemis.errors import CalibrationError

if TYPE_CHECKING:  # pragma: no cover
    from artemis.manager import PruningManager

__all__ = ["run_calibration", "forward_batch"]


def forward_batch(model: torch.nn.Module, batch: Any, device: torch.device) -> Any:
    """Run ``model`` on one batch: a dict as ``model(**batch)``, a tensor as ``model(batch)``."""
    if isinstance(batch, dict):
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        return model(**batch)
    if isinstance(batch, Tensor):
        return model(batch.to(device))
    raise CalibrationError(
        f"calibration batch must be a dict of tensors (passed as model(**batch)) or a tensor "
        f"(passed as model(batch)), got {type(batch).__name__}"
    )


def run_calibration(manager: "PruningManager", data: Iterable) -> int:
    """Stream ``data`` through ``manager.model`` with no gradient; return the batch count."""
    model = manager.model
    try:
        device = next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        device = torch.device("cpu")
    if isinstance(data, (dict, Tensor)):
        raise CalibrationError(
            "calibration data must be an iterable of batches (a list of dicts or tensors), got a single "
            f"{type(data).__name__}; wrap it in a list"
        )
    was_training = model.training
    model.eval()
    n = 0
    try:
        with torch.no_grad():
            for batch in data:
                forward_batch(model, batch, device)
                n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise CalibrationError("calibration data is empty; pass at least one batch")
    return n
