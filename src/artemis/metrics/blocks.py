"""Importance of whole transformer blocks: for layer dropout and for Efficiency-Transformer's
layer selection.

* Block Influence (ShortGPT, Men et al. 2024): ``1 − cos(x_in, x_out)`` between the
  residual stream entering and leaving a block, averaged over real tokens.
  :func:`influence_terms` is the pure per-batch term; :func:`block_influence` runs a
  model over calibration batches and returns every block's score.
* :func:`layer_magnitude` (L2 norm of a block's parameters) and
  :func:`layer_gradient_sensitivity` (``Σ|w·g|``).
* :class:`LayerImportance`: the metric ``method: layer_dropout`` is driven with
  (statistics gathered by hooks during training or calibration).
* :func:`layer_importance`: one score per block, ``activation`` or ``magnitude``.

Example:
    >>> import torch
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> influence_terms(x, torch.tensor([[0.0, 1.0], [0.0, 2.0]]))
    (1.0, 2.0)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from artemis.arch import ArchitectureAdapter, get_adapter, unwrap_model
from artemis.arch.gates import block_hidden
from artemis.core.errors import CalibrationError, CheckpointError, ConfigError, ModelError
from artemis.data.calibration import forward_batch, run_calibration
from artemis.metrics.base import ImportanceMetric

if TYPE_CHECKING:  # pragma: no cover
    from artemis.core.manager import PruningManager
    from artemis.core.targets import PrunableTarget
    from artemis.methods.layer_dropout import LayerDropoutMethod

__all__ = [
    "LAYER_METRICS",
    "influence_terms",
    "block_influence",
    "layer_magnitude",
    "layer_gradient_sensitivity",
    "layer_importance",
    "model_blocks",
    "feed_batches",
    "token_weights",
    "LayerImportance",
]

LAYER_METRICS = ("magnitude", "gradient_sensitivity", "activation")


def influence_terms(x_in: Tensor, x_out: Tensor, token_weights: Optional[Tensor] = None) -> tuple[float, float]:
    """Sum over tokens of ``1 − cos(x_in, x_out)`` and the token count.

    Args:
        x_in: hidden states entering the block, ``(..., hidden)``.
        x_out: hidden states leaving it, same shape.
        token_weights: optional weight per token, shape ``x_in.shape[:-1]`` (an attention
            mask: 1 on real tokens, 0 on padding, which then counts for nothing).

    Returns:
        ``(sum, count)``; the Block Influence is ``sum / count`` (``count`` is the sum of
        the weights when given).

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> influence_terms(x, x)
        (0.0, 2.0)
        >>> influence_terms(x, torch.tensor([[0.0, 1.0], [0.0, 2.0]]))
        (1.0, 2.0)
        >>> influence_terms(x, torch.tensor([[0.0, 1.0], [0.0, 2.0]]), torch.tensor([0.0, 1.0]))
        (0.0, 1.0)
    """
    a = x_in.detach().reshape(-1, x_in.shape[-1]).float()
    b = x_out.detach().reshape(-1, x_out.shape[-1]).float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)  # (tokens,)
    if token_weights is None:
        return float((1.0 - cos).sum()), float(cos.numel())
    w = token_weights.detach().reshape(-1).to(cos.dtype)
    if w.numel() != cos.numel():
        raise ValueError(
            f"influence_terms: token_weights has {w.numel()} entries for {cos.numel()} tokens "
            f"(hidden states of shape {tuple(x_in.shape)})"
        )
    return float(((1.0 - cos) * w).sum()), float(w.sum())


def layer_magnitude(params: Iterable[Tensor]) -> float:
    """L2 norm of all ``params`` taken together.

    Example:
        >>> import torch
        >>> layer_magnitude([torch.tensor([3.0]), torch.tensor([[4.0]])])
        5.0
    """
    total = 0.0
    for p in params:
        total += float(p.detach().float().pow(2).sum())
    return math.sqrt(total)


def layer_gradient_sensitivity(params: Iterable[Tensor]) -> float:
    """``Σ |w · g|`` over ``params`` that have a gradient (0 for those without).

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.tensor([2.0, -1.0])); w.grad = torch.tensor([0.5, 3.0])
        >>> layer_gradient_sensitivity([w])
        4.0
    """
    total = 0.0
    for p in params:
        if p.grad is not None:
            total += float((p.detach().float() * p.grad.detach().float()).abs().sum())
    return total


def model_blocks(model: nn.Module, adapter: Optional[ArchitectureAdapter]) -> nn.ModuleList:
    adapter = adapter if adapter is not None else get_adapter(unwrap_model(model))
    if adapter.blocks is None or len(adapter.blocks) == 0:
        raise ModelError(
            f"{type(model).__name__} has no transformer blocks the {adapter.name!r} adapter can find; "
            "layer selection and sharing work on block lists (model.layers, encoder.layer, ...)"
        )
    return adapter.blocks


def feed_batches(model: nn.Module, data: Iterable[dict], limit: Optional[int]) -> int:
    device = next(model.parameters()).device
    n = 0
    for batch in data:
        if limit is not None and n >= limit:
            break
        if not isinstance(batch, dict):
            raise CalibrationError(f"calibration batches must be dicts of tensors, got {type(batch).__name__}")
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items() if k != "labels"}
        model(**batch)
        n += 1
    if n == 0:
        raise CalibrationError("no calibration batches were given; the layer scores need at least one")
    return n


def token_weights(batch_mask: Optional[Tensor], hidden: Tensor) -> Tensor:
    # (batch, tokens) weights: 1 on real tokens, 0 on padding
    if batch_mask is not None and batch_mask.shape == hidden.shape[:2]:
        return batch_mask.to(hidden.dtype)
    return torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)


@torch.no_grad()
def block_influence(
    model: nn.Module,
    data: Iterable[dict],
    *,
    adapter: Optional[ArchitectureAdapter] = None,
    max_batches: Optional[int] = None,
) -> Tensor:
    """Block Influence ``1 − cos(input, output)`` of every block, averaged over the real
    (non-padding) tokens; the per-batch measure is
    :func:`influence_terms`, the one layer dropout ranks with.

    Args:
        model: the model (not modified; put in eval mode by the caller for determinism).
        data: batches (dicts of model inputs; ``labels`` are dropped, an
            ``attention_mask`` excludes padding from the average).
        adapter: the architecture adapter (found from the model when ``None``).
        max_batches: stop after this many batches.

    Returns:
        A float32 tensor ``(num_blocks,)``; higher means the block changes its input more.

    Raises:
        CalibrationError: no batches.
    """
    blocks = model_blocks(model, adapter)
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    counts = torch.zeros(len(blocks), dtype=torch.float64)
    current_mask: list[Optional[Tensor]] = [None]
    inputs: dict[int, Tensor] = {}
    handles = []

    def pre(i: int):
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def post(i: int):
        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            x = inputs.pop(i)  # (batch, tokens, hidden)
            s, n = influence_terms(x, block_hidden(out), token_weights(current_mask[0], x))
            sums[i] += s
            counts[i] += n

        return hook

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(block.register_forward_hook(post(i)))

    def masked(data: Iterable[dict]):
        for batch in data:
            current_mask[0] = batch.get("attention_mask") if isinstance(batch, dict) else None
            yield batch

    try:
        feed_batches(model, masked(data), max_batches)
    finally:
        for h in handles:
            h.remove()
    return (sums / counts.clamp_min(1)).float()


@torch.no_grad()
def _magnitude_importance(blocks: nn.ModuleList) -> Tensor:
    out = []
    for block in blocks:
        sq, n = 0.0, 0
        for m in block.modules():
            w = getattr(m, "weight", None)
            if isinstance(w, Tensor) and w.dim() == 2:
                sq += float(w.float().pow(2).sum())
                n += w.numel()
        out.append(math.sqrt(sq / n) if n else 0.0)
    return torch.tensor(out, dtype=torch.float32)


def layer_importance(
    model: nn.Module,
    adapter: Optional[ArchitectureAdapter] = None,
    data: Optional[Iterable[dict]] = None,
    metric: str = "activation",
    *,
    max_batches: Optional[int] = None,
) -> Tensor:
    """Importance score of every transformer block (higher = more worth training).

    Args:
        model: the model (not modified).
        adapter: its architecture adapter (found when ``None``).
        data: calibration batches; needed by ``activation``.
        metric: ``activation`` (Block Influence, :func:`block_influence`) or
            ``magnitude`` (RMS of the block's 2-D weights).
        max_batches: batches used by ``activation``.

    Returns:
        float32 tensor ``(num_blocks,)``.

    Raises:
        ConfigError: unknown metric. CalibrationError: ``activation`` without data.
    """
    if metric == "activation":
        if data is None:
            raise CalibrationError(
                "layer importance 'activation' (Block Influence) needs calibration batches; "
                "pass data=... or use metric='magnitude'"
            )
        return block_influence(model, data, adapter=adapter, max_batches=max_batches)
    if metric == "magnitude":
        return _magnitude_importance(model_blocks(model, adapter))
    raise ConfigError(f"unknown layer importance metric {metric!r}; valid: 'activation', 'magnitude'")


class LayerImportance(ImportanceMetric):
    """Layer-level importance (see the module docstring); driven by the manager like any
    metric, but it scores whole blocks of its :class:`LayerDropoutMethod`.

    the method's own ``on_step()`` advances its fade-outs.
    """

    default_scope = "layer"

    def __init__(self, name: str = "magnitude", **options: Any) -> None:
        super().__init__(**options)
        if name not in LAYER_METRICS:
            raise ConfigError(f"unknown layer importance metric {name!r}; valid: {', '.join(map(repr, LAYER_METRICS))}")
        self.name = name  # type: ignore[misc]
        self.needs_gradients = name == "gradient_sensitivity"  # type: ignore[misc]
        self.needs_activations = name == "activation"  # type: ignore[misc]
        self.method: Optional["LayerDropoutMethod"] = None
        self._hooks: list[Any] = []
        self.sums: dict[int, float] = {}
        self.counts: dict[int, float] = {}

    def bind(self, method: "LayerDropoutMethod") -> None:
        self.method = method

    def _require_method(self) -> "LayerDropoutMethod":
        if self.method is None:
            raise RuntimeError("LayerImportance is not bound to a LayerDropoutMethod; call bind(method)")
        return self.method

    # lifecycle
    def attach(self, model: nn.Module, targets: Sequence["PrunableTarget"]) -> None:
        super().attach(model, targets)
        method = self._require_method()
        if not self.needs_activations:
            return
        for index, block in enumerate(method.blocks):
            self._hooks.append(block.register_forward_hook(self._make_hook(index), with_kwargs=True))

    def _make_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            method = self.method
            if method is None or index in method.dropped:
                return
            x_in = args[0] if args else kwargs.get("hidden_states")
            x_out = output[0] if isinstance(output, tuple) else output
            if not isinstance(x_in, Tensor) or not isinstance(x_out, Tensor) or x_in.shape != x_out.shape:
                return
            with torch.no_grad():
                s, n = influence_terms(x_in, x_out)
            self.sums[index] = self.sums.get(index, 0.0) + s
            self.counts[index] = self.counts.get(index, 0) + n

        return hook

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def accumulate_gradients(self) -> None:
        """Add ``Σ|w·g|`` of every remaining layer from the current ``.grad``s."""
        method = self._require_method()
        for index in method.active_layers():
            value = layer_gradient_sensitivity(method.block_params[index])
            self.sums[index] = self.sums.get(index, 0.0) + value
            self.counts[index] = self.counts.get(index, 0) + 1

    def on_step(self) -> None:
        self._require_method()
        if self.needs_gradients:
            self.accumulate_gradients()

    def check_ready(self) -> None:
        """Readiness is checked when layers are actually due (in :meth:`layer_scores`)."""

    def layer_scores(self, layers: Sequence[int]) -> dict[int, float]:
        """Scores of ``layers`` (original block indices).

        Raises:
            CalibrationError: ``activation``/``gradient_sensitivity`` has no statistics for
                one of them yet.
        """
        method = self._require_method()
        if self.name == "magnitude":
            return {i: layer_magnitude(method.block_params[i]) for i in layers}
        missing = [i for i in layers if self.counts.get(i, 0) == 0]
        if missing:
            if self.needs_gradients:
                how = (
                    "call manager.step() after loss.backward() during training, or pass "
                    "calibration batches with labels (the model must return a loss)"
                )
            else:
                how = (
                    "run training forward passes, or pass calibration batches "
                    "(apply_pruning(s, calibration_data) or manager.calibrate(data))"
                )
            raise CalibrationError(
                f"layer importance {self.name!r} has no statistics for layers {missing} since the last "
                f"pruning event; {how}"
            )
        if self.needs_gradients:
            return {i: self.sums[i] for i in layers}
        return {i: self.sums[i] / self.counts[i] for i in layers}

    def score(self, target: "PrunableTarget") -> Tensor:
        raise TypeError(
            f"layer importance {self.name!r} scores whole layers (layer_scores), not individual weights; "
            f"it is used by method 'layer_dropout' only"
        )

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def calibrate(self, manager: "PruningManager", data: Iterable) -> None:
        """Stream calibration batches: forward only for ``activation`` (and ``magnitude``,
        which ignores them); forward and backward of the model's loss for
        ``gradient_sensitivity`` (existing ``.grad``s are restored afterwards)."""
        if not self.needs_gradients:
            run_calibration(manager, data)
            return
        if isinstance(data, (dict, Tensor)):
            raise CalibrationError(
                "calibration data must be an iterable of batches (a list of dicts or tensors), got a "
                f"single {type(data).__name__}; wrap it in a list"
            )
        model = manager.model
        device = next(model.parameters()).device
        params = [p for p in model.parameters() if p.requires_grad]
        saved = {id(p): p.grad for p in params}
        was_training = model.training
        model.eval()
        n = 0
        try:
            for batch in data:
                for p in params:
                    p.grad = None
                with torch.enable_grad():
                    out = forward_batch(model, batch, device)
                    loss = getattr(out, "loss", None)
                    if loss is None and isinstance(out, dict):
                        loss = out.get("loss")
                    if loss is None:
                        raise CalibrationError(
                            "importance_metric 'gradient_sensitivity' calibrates on the model's loss, but "
                            f"{type(model).__name__} returned none for a calibration batch; pass batches "
                            "with labels (for a causal LM: input_ids and labels)"
                        )
                    loss.backward()
                self.accumulate_gradients()
                n += 1
        finally:
            for p in params:
                p.grad = saved[id(p)]
            model.train(was_training)
        if n == 0:
            raise CalibrationError("calibration data is empty; pass at least one batch")

    def state_dict(self) -> dict:
        return {"name": self.name, "sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        if state and state.get("name", self.name) != self.name:
            raise CheckpointError(
                f"pruning state holds statistics of layer metric {state.get('name')!r}, this manager uses {self.name!r}"
            )
        self.sums = {int(k): float(v) for k, v in state.get("sums", {}).items()}
        self.counts = {int(k): float(v) for k, v in state.get("counts", {}).items()}
