"""Streaming calibration batches through a model to gather the statistics of a metric.

Batches: any iterable (a list, a generator, a ``DataLoader``) of

* dicts (or any mapping, such as a tokenizer's ``BatchEncoding``) of tensors, passed as
  ``model(**batch)`` — :func:`artemis.data.corpus.tokenize_batches` and
  :func:`artemis.data.corpus.token_blocks` make these;
* tensors, passed as ``model(batch)``.

What is run depends on the metric:

* ``needs_activations`` (``activation``): a forward pass under ``torch.no_grad()``;
  the metric's forward hooks gather the statistics.
* ``needs_gradients`` (``gradient_sensitivity``): a forward and a backward pass on the
  model's own loss (``outputs.loss``, present when the batch holds ``labels``) or on
  ``loss_fn(outputs, batch)``, then ``metric.on_step()``: one accumulation per batch.
  Only the pruned weights get gradients (every other parameter has ``requires_grad``
  switched off for the duration), so the extra memory is one gradient per pruned weight.
* neither (``magnitude``): nothing to gather; the data is not read and a warning is logged.

The model runs in ``eval()`` mode (no dropout). Afterwards, also when a batch raises,
the model is as it was: its train/eval mode, every parameter's ``requires_grad`` and
``.grad``, and no calibration state left on the metric. A failed calibration discards
the statistics it gathered (so a later prune cannot silently use half of them).

Example:
    >>> import torch, torch.nn as nn
    >>> from artemis import create_pruning_manager
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> mgr = create_pruning_manager({"pruning": {"targets": ["*"], "importance_metric": "activation"}}, net)
    >>> mgr.calibrate([torch.randn(8, 4) for _ in range(3)], progress=False)
    3
    >>> mgr.apply_pruning(0.5)
    >>> [int((m.weight == 0).sum()) for m in (net[0], net[2])]
    [8, 4]
"""

from __future__ import annotations

import logging
from collections.abc import Iterable as IterableABC
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from artemis.core.errors import CalibrationError

if TYPE_CHECKING:  # pragma: no cover
    from artemis.core.manager import PruningManager

__all__ = [
    "run_calibration",
    "forward_batch",
    "describe_batch",
    "extract_loss",
    "model_device",
    "check_calibration_batches",
]

logger = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], Tensor]

_HOW = (
    "calibration data must be an iterable of batches, each a dict of tensors (passed as model(**batch), "
    "e.g. artemis.data.corpus.tokenize_batches(texts, tokenizer)) or a tensor (passed as model(batch))"
)


def describe_batch(batch: Any) -> str:
    """A short description of a batch for error messages.

    Example:
        >>> import torch
        >>> describe_batch({"input_ids": torch.zeros(2, 3, dtype=torch.long), "flag": True})
        'dict{input_ids: int64(2, 3), flag: bool}'
    """

    def one(v: Any) -> str:
        if isinstance(v, Tensor):
            return f"{str(v.dtype).replace('torch.', '')}{tuple(v.shape)}"
        return type(v).__name__

    if isinstance(batch, Mapping):
        return "dict{" + ", ".join(f"{k}: {one(v)}" for k, v in batch.items()) + "}"
    return one(batch)


def _check_batch(batch: Any, index: int) -> None:
    if isinstance(batch, Mapping):
        if not batch:
            raise CalibrationError(f"calibration batch {index} is an empty dict; {_HOW}")
        bad = [k for k in batch if not isinstance(k, str)]
        if bad:
            raise CalibrationError(f"calibration batch {index} has non-string keys {bad[:3]}; {_HOW}")
        tensors = {k: v for k, v in batch.items() if isinstance(v, Tensor)}
        lists = [k for k, v in batch.items() if isinstance(v, (list, tuple))]
        if lists:
            raise CalibrationError(
                f"calibration batch {index} ({describe_batch(batch)}): {lists[0]!r} is a Python list, not a tensor; "
                "tokenize with return_tensors='pt' (artemis.data.corpus.tokenize_batches does)"
            )
        if not tensors:
            raise CalibrationError(f"calibration batch {index} ({describe_batch(batch)}) holds no tensor; {_HOW}")
        for k, v in tensors.items():
            if v.dim() == 0 or v.numel() == 0:
                raise CalibrationError(
                    f"calibration batch {index}: {k!r} has shape {tuple(v.shape)}; tensors must have a batch "
                    "dimension and at least one element"
                )
        return
    if isinstance(batch, Tensor):
        if batch.dim() == 0 or batch.numel() == 0:
            raise CalibrationError(
                f"calibration batch {index} is a tensor of shape {tuple(batch.shape)}; it needs a batch dimension "
                "and at least one element"
            )
        return
    raise CalibrationError(f"calibration batch {index} is a {type(batch).__name__}; {_HOW}")


def check_calibration_batches(batches: Any) -> list:
    """Materialise calibration ``batches`` as a list (kept by the manager and iterated at
    every pruning event, once per layer by the reconstruction) and check them.

    Raises:
        CalibrationError: not an iterable of dict/tensor batches, or empty.
    """
    if isinstance(batches, (dict, Tensor)):
        raise CalibrationError(
            "calibration data must be an iterable of batches (a list of dicts or tensors), got a single "
            f"{type(batches).__name__}; wrap it in a list"
        )
    try:
        out = list(batches)
    except TypeError:
        raise CalibrationError(
            f"calibration data must be an iterable of batches, got {type(batches).__name__}"
        ) from None
    if not out:
        raise CalibrationError("calibration data is empty; pass at least one batch")
    for i, b in enumerate(out):
        if not isinstance(b, (dict, Tensor)):
            raise CalibrationError(
                f"calibration batch {i} is a {type(b).__name__}; each batch must be a dict of tensors "
                "(passed as model(**batch)) or a tensor (passed as model(batch))"
            )
    return out


def forward_batch(model: torch.nn.Module, batch: Any, device: torch.device) -> Any:
    """Run ``model`` on one batch: a mapping as ``model(**batch)``, a tensor as ``model(batch)``.

    Tensors are moved to ``device``; other values are passed as they are.
    """
    if isinstance(batch, Mapping):
        kwargs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        return model(**kwargs)
    if isinstance(batch, Tensor):
        return model(batch.to(device))
    raise CalibrationError(f"calibration batch is a {type(batch).__name__}; {_HOW}")


def extract_loss(outputs: Any, batch: Any, loss_fn: Optional[LossFn], index: int = 0) -> Tensor:
    """The scalar loss of one batch: ``loss_fn(outputs, batch)``, else the model's own
    ``outputs.loss`` / ``outputs["loss"]``, else ``outputs`` itself if it is a scalar tensor.

    Raises:
        CalibrationError: no loss can be found, or it is not a scalar tensor.
    """
    if loss_fn is not None:
        loss = loss_fn(outputs, batch)
        where = "loss_fn(outputs, batch)"
    else:
        loss = getattr(outputs, "loss", None)
        if loss is None and isinstance(outputs, Mapping):
            loss = outputs.get("loss")
        if loss is None and isinstance(outputs, Tensor) and outputs.dim() == 0:
            loss = outputs
        where = "the model's output loss"
        if loss is None:
            raise CalibrationError(
                f"importance_metric 'gradient_sensitivity' needs a loss for calibration batch {index} "
                f"({describe_batch(batch)}), but the model's output ({type(outputs).__name__}) has no 'loss': include "
                "'labels' in each batch (artemis.data.corpus.token_blocks does for causal LMs) or pass "
                "loss_fn=lambda outputs, batch: ... to calibrate()/apply_pruning()"
            )
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise CalibrationError(f"{where} for calibration batch {index} must be a scalar tensor, got {shape}")
    if not loss.requires_grad:
        raise CalibrationError(
            f"{where} for calibration batch {index} does not depend on any pruned weight (it has no gradient); "
            "compute it from the model's outputs"
        )
    return loss


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module).

    Example:
        >>> import torch
        >>> model_device(torch.nn.Linear(2, 2)), model_device(torch.nn.ReLU())
        (device(type='cpu'), device(type='cpu'))
    """
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def run_calibration(
    manager: "PruningManager",
    data: Iterable,
    *,
    loss_fn: Optional[LossFn] = None,
    progress: Optional[bool] = None,
) -> int:
    """Stream ``data`` through ``manager.model`` to gather ``manager.metric``'s statistics.

    Statistics gathered before are replaced (the metric is reset first).

    Args:
        manager: the pruning manager (its model, targets and metric are used).
        data: an iterable of batches (see the module docstring).
        loss_fn: ``loss_fn(outputs, batch) -> scalar tensor`` for gradient metrics when
            the model's output has no ``loss``.
        progress: show a ``tqdm`` progress bar; ``None`` shows it on a terminal only.

    Returns:
        The number of batches run (0 when the metric needs no statistics).

    Raises:
        CalibrationError: ``data`` is not an iterable of batches, is empty, a batch has
            the wrong type or shape (the model's own error is attached), or no loss.
    """
    metric = manager.metric
    if isinstance(data, (Mapping, Tensor, str, bytes)) or not isinstance(data, IterableABC):
        if isinstance(data, Mapping):
            shown = "a single dict (wrap a single batch in a list)"
        elif isinstance(data, (Tensor, str, bytes)):
            shown = f"a single {type(data).__name__} (wrap a single batch in a list)"
        else:
            shown = f"a {type(data).__name__}, which is not iterable"
        raise CalibrationError(f"{_HOW}; got {shown}")
    if loss_fn is not None and not callable(loss_fn):
        raise CalibrationError(f"loss_fn must be callable as loss_fn(outputs, batch), got {type(loss_fn).__name__}")
    gradients = bool(metric.needs_gradients)
    if not (gradients or metric.needs_activations):
        logger.warning(
            "importance_metric %r gathers no statistics; calibration data is not needed and was not read",
            metric.name,
        )
        return 0
    if loss_fn is not None and not gradients:
        logger.warning("loss_fn is ignored: importance_metric %r needs no gradients", metric.name)

    model = manager.model
    device = model_device(model)
    target_ids = {id(t.param) for t in manager.method.targets}
    params = list(dict.fromkeys(model.parameters()))  # unique
    saved_mode = {m: m.training for m in model.modules()}
    saved_requires = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(
        total=total,
        desc=f"calibrating ({metric.name})",
        unit="batch",
        disable=None if progress is None else not progress,
        leave=False,
    )
    metric.reset()
    n = 0
    ok = False
    try:
        model.eval()
        if gradients:
            for p in params:
                p.requires_grad_(id(p) in target_ids)
                p.grad = None
        for batch in data:
            _check_batch(batch, n)
            with metric.calibrating(batch):
                try:
                    if gradients:
                        with torch.enable_grad():
                            outputs = forward_batch(model, batch, device)
                            loss = extract_loss(outputs, batch, loss_fn, n)
                            del outputs
                            loss.backward()
                        del loss
                        metric.on_step()
                        for p in params:
                            p.grad = None
                    else:
                        with torch.no_grad():
                            forward_batch(model, batch, device)
                except CalibrationError:
                    raise
                except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as exc:
                    raise CalibrationError(
                        f"calibration batch {n} ({describe_batch(batch)}) failed in the model: "
                        f"{type(exc).__name__}: {exc}. {_HOW}, shaped as the model expects"
                    ) from exc
            n += 1
            bar.update(1)
        if n == 0:
            raise CalibrationError(
                f"calibration data is empty: the iterable yielded no batches. {_HOW}; pass at least one batch"
            )
        ok = True
    finally:
        bar.close()
        for m, mode in saved_mode.items():
            m.training = mode
        for p, req, g in zip(params, saved_requires, saved_grads):
            p.requires_grad_(req)
            p.grad = g
        if not ok:
            metric.reset()  # never leave half-gathered statistics behind
    logger.info("calibrated %s on %d batches", metric.name, n)
    return n
