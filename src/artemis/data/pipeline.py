"""One-shot pruning block by block: time linear in depth, one block resident at a time.

:func:`oneshot` prunes a model once, to the config's ``final_sparsity``, with the methods
that choose masks inside each transformer block (``magnitude_progressive`` with the
``magnitude`` or ``activation`` (Wanda) metric, ``scope`` ``row``/``layer``/``global``/``owl``,
an N:M ``pattern``) and the SparseGPT reconstruction (``reconstruction: sparsegpt``, to
the pruned or the dense model's layer outputs); ``layer_dropout`` and ``structured_sparsity``
have pipelines of their own (:mod:`artemis.data.pipeline_layers`,
:mod:`artemis.data.pipeline_structured`) that remove blocks, heads and neurons. The pipeline:

1. runs every calibration batch through the model until the first block is called (a
   forward pre-hook on block 0 records its inputs: the hidden states and what the block
   needs, such as the attention mask and the position embeddings; the key/value cache
   is dropped, then a private exception ends the pass), once;
2. for each block in order: brings it to the compute device (or reads it from the
   checkpoint), runs the recorded inputs through it once with hooks that gather the
   statistics its targets need (the input norms of ``activation``, the Hessians of
   SparseGPT), chooses the masks with the functions of :mod:`artemis.core.masks`,
   updates the kept weights with :func:`artemis.methods.sparsegpt.sparsegpt_prune`, zeroes
   the pruned ones, and produces the next block's inputs: the outputs of that same
   pass (``pipeline_inputs: dense``: the dense model's activations) or of a second pass
   through the pruned block (``pruned``: sequential, as the SparseGPT paper); then
   writes the block (with ``output_dir``) and moves it back (or frees it).

``scope: owl``, ``scope: global`` with ``activation`` and ``gradient_sensitivity`` need
every block's statistics before the first mask: a statistics pass runs first (step 2 with
the dense weights and the dense model's inputs, gathering the input norms; one forward
pass per block and batch), then the masking pass, which runs the blocks again only for a
reconstruction. For ``gradient_sensitivity`` the statistics pass keeps every block's
inputs; the loss's gradient at the last block's output comes from the model's own forward
with stand-ins in the blocks' places, and a backward sweep runs the blocks again from the
last to the first with gradients (one block resident at a time), so each target gets the
gradient of the manager's whole-model backward pass, batch by batch.
``sparsegpt_target: dense`` carries the dense model's block inputs beside the pruned
model's and reconstructs a block as ``reconstruct_layers`` does, one layer (or group of
layers reading the same input) after another, in two passes of the block per batch: the
dense block on the dense inputs (keeping every target's dense input), then the block on
the pruned inputs with every batch's pass paused before each target
(:class:`~artemis.data.lockstep.PausedForwards`), where the target is updated from the
paused inputs of all batches before the passes go on.

So each block runs each batch a constant number of times (at most 2, plus the statistics
pass); the old SparseGPT path re-ran every batch from the embeddings up to every layer.
With ``max_memory`` a checkpoint folder is opened lazily
(:class:`~artemis.sparse.streaming.LazyCheckpoint`): each block is read before its turn and
freed after it was written; the parameters outside the blocks (embeddings, final norm,
head) are never loaded: while the calibration batches run up to block 0 only what the
model reads of them is read (the embedding rows of the calibration tokens), and at the end
they are copied from the checkpoint to the output a piece at a time. So the parameters
resident at any time are one block, or the outer ones during the capture.

Differences from ``manager.apply_pruning`` (see ``docs/oneshot.md``): with
``pipeline_inputs: pruned`` the statistics of block ``k`` come from the pruned blocks
before it; SparseGPT gathers the Hessians of a block's layers in one pass from the
block's input (the reference implementation's choice), where ``reconstruct_layers``
updates them one after another inside the block (with one target per block the
reconstructed weights are the manager's, bit for bit). With ``sparsegpt_target: dense``,
``scope: owl``, ``scope: global``, ``gradient_sensitivity`` and, with ``pipeline_inputs:
dense``, ``activation``, the result is the manager's, bit for bit (tested).

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> import artemis
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    >>> batches = [{"input_ids": torch.randint(0, 64, (2, 8))} for _ in range(2)]
    >>> cfg = {"pruning": {"final_sparsity": 0.5, "importance_metric": "activation"}}
    >>> summary = artemis.oneshot(model, cfg, batches, progress=False)
    >>> summary["measured_sparsity"], summary["pipeline"]["block_forwards"]
    (0.5, 4)
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import resource
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call
from tqdm.auto import tqdm

from artemis.arch import get_adapter, unwrap_model
from artemis.core.config import PruningConfig, load_pruning_config
from artemis.core.errors import ArtemisError, CalibrationError, ConfigError, ModelError
from artemis.core.masks import count_to_prune, global_masks, layer_mask, nm_masks, row_masks
from artemis.core.sizing import MIB, layer_row, model_compressed_bytes, model_dense_bytes, unique_state_tensors
from artemis.core.targets import PrunableTarget, find_targets, match_pattern
from artemis.data.calibration import (
    _check_batch,
    check_calibration_batches,
    describe_batch,
    extract_loss,
    forward_batch,
)
from artemis.data.lockstep import PausedForwards
from artemis.methods.owl import allocate_counts, outlier_ratio, owl_sparsities
from artemis.methods.pipeline_options import PIPELINE_INPUTS, OneShotOptions
from artemis.methods.sparsegpt import (
    HessianAccumulator,
    dense_target_weight,
    layer_inputs_2d,
    reconstruction_extra_bytes,
    sparsegpt_prune,
)
from artemis.methods.unstructured import rows_count_mask
from artemis.metrics.activation import ActivationMetric, activation_scores
from artemis.metrics.base import METRICS
from artemis.metrics.gradient import ACCUMULATOR_DTYPES, gradient_sensitivity_scores
from artemis.metrics.magnitude import magnitude_scores

__all__ = [
    "oneshot",
    "BlockError",
    "parse_memory_size",
    "capture_block_inputs",
    "capture_inputs_per_block",
    "unsupported_setting",
    "PIPELINE_METRICS",
]

logger = logging.getLogger(__name__)

#: weights scored and sorted at a time when a row-wise mask is chosen (float32 scores and
#: int64 sort indices of this many weights: 3 MiB)
_MASK_CHUNK_ELEMENTS = 1 << 18
#: metrics the pipeline scores inside a block (others raise, naming the metric)
PIPELINE_METRICS = ("magnitude", "activation", "gradient_sensitivity")


class BlockError(ArtemisError, RuntimeError):
    """A block of the one-shot pipeline failed; ``block_index``/``block_name`` say which."""

    def __init__(self, message: str, block_index: int, block_name: str) -> None:
        super().__init__(message)
        self.block_index = block_index
        self.block_name = block_name


class _StandIn(nn.Module):
    """Takes a block's place while the loss is computed from the last block's output: returns
    ``hidden`` (shaped as the block's output: a tensor or a 1-tuple) whatever it is called with."""

    def __init__(self, hidden: Tensor, kind: str) -> None:
        super().__init__()
        self.hidden, self.kind = hidden, kind

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.hidden,) if self.kind == "tuple" else self.hidden


class _StopBlock(Exception):
    """Raised by a layer's pre-hook once its input is recorded (ends a partial block pass)."""


class _InputsCaptured(Exception):
    """Raised by the pre-hook on block 0 once its inputs are recorded (ends the pass)."""


class _OutOfOrder(Exception):
    """A paused pass reached a target before the one being updated (the block calls its
    targets in another order than theirs): the block is redone with restarted passes."""


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_memory_size(value: Union[int, float, str]) -> int:
    """Bytes of a memory size: an integer, or a string such as ``"8GiB"``, ``"512MB"``,
    ``"1.5G"`` (``KB/MB/GB/TB`` are powers of 1000, ``KiB/MiB/GiB/TiB`` and the bare
    ``K/M/G/T`` powers of 1024).

    Example:
        >>> parse_memory_size("8GiB"), parse_memory_size("1.5k"), parse_memory_size(100)
        (8589934592, 1536, 100)
        >>> parse_memory_size("eight")
        Traceback (most recent call last):
        artemis.core.errors.ConfigError: max_memory 'eight' is not a memory size; use bytes or a number with a unit, such as '8GiB', '512MB' or '1.5G'
    """
    if isinstance(value, bool):
        raise ConfigError(f"max_memory must be a number of bytes or a string such as '8GiB', got {value!r}")
    if isinstance(value, (int, float)):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ConfigError(
                f"max_memory {value!r} is not a memory size; use bytes or a number with a unit, "
                "such as '8GiB', '512MB' or '1.5G'"
            )
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise ConfigError(f"max_memory must be a number of bytes or a string such as '8GiB', got {value!r}")
    if not (n > 0) or n != n or n == float("inf"):
        raise ConfigError(f"max_memory must be a positive size, got {value!r}")
    return int(n)


# ----------------------------------------------------------------- block inputs
def _is_cache(v: Any) -> bool:
    return any(c.__name__.endswith("Cache") for c in type(v).__mro__) and not isinstance(v, Tensor)


def _cache_free(kwargs: dict) -> dict:
    """The block's keyword arguments without a key/value cache (and ``use_cache`` off)."""
    out = {}
    for k, v in kwargs.items():
        if _is_cache(v):
            v = None
        elif k == "use_cache":
            v = False
        out[k] = v
    return out


def _hidden_of(args: tuple, kwargs: dict) -> Tensor:
    h = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(h, Tensor):
        raise ModelError(f"the first block was called without a hidden-states tensor (got {type(h).__name__})")
    return h


def _with_hidden(args: tuple, kwargs: dict, h: Tensor) -> tuple[tuple, dict]:
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _rows_2d(x: Tensor, token_mask: Optional[Tensor]) -> Tensor:
    """``layer_inputs_2d`` without the float32 conversion, as a copy (never a view of ``x``):
    ``(tokens, in_features)`` in ``x``'s dtype, the positions where ``token_mask`` is 0 dropped."""
    if token_mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(token_mask.shape):
        return x.detach()[token_mask.to(device=x.device, dtype=torch.bool)].reshape(-1, x.shape[-1])
    return x.detach().reshape(-1, x.shape[-1]).clone()


def _block_output(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    h = getattr(out, "last_hidden_state", None)
    if isinstance(h, Tensor):
        return h
    raise ModelError(f"a block returned {type(out).__name__}; the pipeline needs its hidden states (a tensor)")


def _forward_until_captured(
    model: nn.Module, batch: Any, i: int, device: torch.device, before: str, reach: str
) -> None:
    """Run calibration batch ``i`` through ``model`` (without a key/value cache) until a hook
    or recorder raises ``_InputsCaptured``; a failure on the way (``before`` names where) or
    a pass that ends without calling ``reach`` is a CalibrationError naming the batch."""
    _check_batch(batch, i)
    if isinstance(batch, Mapping) and "use_cache" not in batch and hasattr(getattr(model, "config", None), "use_cache"):
        batch = {**batch, "use_cache": False}
    try:
        forward_batch(model, batch, device)
    except _InputsCaptured:
        return
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise CalibrationError(
            f"calibration batch {i} ({describe_batch(batch)}) failed in the model before {before}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    raise CalibrationError(f"calibration batch {i} ran through the model without calling {reach}")


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, block: nn.Module, batches: Sequence, device: torch.device
) -> list[tuple[tuple, dict]]:
    """``(args, kwargs)`` of ``block`` (the first block) for every batch: each batch runs
    through ``model`` until the block is called, and a pre-hook records its inputs (the
    cache dropped) and stops the pass. One partial forward pass per batch.

    Raises:
        CalibrationError: a batch fails in the model or never reaches the block.
    """
    captured: list[tuple[tuple, dict]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((tuple(args), _cache_free(dict(kwargs))))
        raise _InputsCaptured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, batch in enumerate(batches):
            _forward_until_captured(model, batch, i, device, "the first block", "its first block")
    finally:
        handle.remove()
    return captured


class _Recorder(nn.Module):
    """Takes block ``index``'s place while the inputs are captured: records its arguments and
    returns its input hidden states (as a tensor when the block's forward is annotated so, else
    as a 1-tuple); the last one ends the pass. Other attributes (``attention_type``, read by
    models that give each layer type its own mask) are the block's."""

    def __init__(self, block: nn.Module, sink: list, last: bool) -> None:
        super().__init__()
        self.__dict__["_block"] = block
        self.sink, self.last = sink, last
        try:
            ann = inspect.signature(block.forward).return_annotation
        except (TypeError, ValueError):  # pragma: no cover - builtins
            ann = None
        self.tensor_out = ann is Tensor or ann in ("torch.Tensor", "Tensor")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        h = _hidden_of(args, kwargs)
        if not self.sink:
            self.sink.append(h)
        self.sink.append(_with_hidden(tuple(args), _cache_free(dict(kwargs)), None))
        if self.last:
            raise _InputsCaptured
        return h if self.tensor_out else (h,)


@torch.no_grad()
def capture_inputs_per_block(
    model: nn.Module, blocks: nn.ModuleList, batches: Sequence, device: torch.device
) -> tuple[list[Tensor], list[list[tuple[tuple, dict]]]]:
    """Block 0's input hidden states of every batch, and ``(args, kwargs)`` of every block
    for every batch (``records[b][i]``, the hidden states left out as None: give them with
    ``_with_hidden``). Each batch runs through ``model`` with every block replaced by a
    recorder that passes its input on, so each block's own arguments are recorded (a model
    with sliding-window and full-attention layers gives each its own attention mask; block
    0's would be wrong for the others); the pass ends at the last block. One pass per
    batch, no block runs; the key/value cache is dropped, as in ``capture_block_inputs``.

    Raises:
        CalibrationError: a batch fails in the model or never reaches the last block.
    """
    originals = list(blocks)
    hidden: list[Tensor] = []
    out: list[list[tuple[tuple, dict]]] = []
    try:
        for i, batch in enumerate(batches):
            sink: list[Any] = []
            for j, block in enumerate(originals):
                blocks[j] = _Recorder(block, sink, j == len(originals) - 1)
            _forward_until_captured(model, batch, i, device, "its blocks", "its last block")
            hidden.append(sink[0])
            out.append(sink[1:])
    finally:
        for j, block in enumerate(originals):
            blocks[j] = block
    return hidden, out


# ------------------------------------------------------------------- sources
class _InMemory:
    """The model is resident; blocks are moved to the compute device and back."""

    streamed = False

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
        self.model, self.blocks, self.device = model, blocks, device
        self.home = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.live_bytes = self.peak_bytes = 0

    def _outer_to(self, device: torch.device) -> None:
        if device == self.home == self.device:
            return
        saved = self.blocks._modules.copy()
        self.blocks._modules.clear()
        try:
            self.model.to(device)
        finally:
            self.blocks._modules.update(saved)

    def load_outer(self) -> None:
        self._outer_to(self.device)

    def release_outer(self) -> None:
        self._outer_to(self.home)

    def capturing(self) -> Any:
        """A context for the capture of block 0's inputs (the outer parameters are resident)."""
        return contextlib.nullcontext()

    def write_outer(self, writer: Any, name: str, t: Tensor) -> None:
        writer.add(name, t)

    def load_block(self, i: int) -> None:
        self.blocks[i].to(self.device)

    def release_block(self, i: int) -> None:
        self.blocks[i].to(self.home)

    def read(self, t: PrunableTarget) -> Tensor:
        return t.param

    def trim(self) -> None:
        """Nothing: the in-memory model's process is the caller's."""


class _Streamed:
    """The model is on ``meta``; parameters are read from the checkpoint when needed."""

    streamed = True

    def __init__(self, lazy: Any, prefixes: list[str]) -> None:
        self.lazy = lazy
        self.model = lazy.model
        self.prefixes = prefixes
        params = [n for n, _ in lazy.model.named_parameters(remove_duplicate=False)]
        names = params + [n for n, _ in lazy.model.named_buffers()]
        self.block_names = [[n for n in names if n.startswith(p + ".")] for p in prefixes]
        inside = {n for group in self.block_names for n in group}
        self.outer_names = [n for n in names if n not in inside]
        self.outer_params = [n for n in params if n not in inside]

    @property
    def live_bytes(self) -> int:
        return self.lazy.live_bytes

    @property
    def peak_bytes(self) -> int:
        return self.lazy.peak_bytes

    def load_outer(self) -> None:
        """The stored persistent buffers outside the blocks (the parameters there are read
        only where used while block 0's inputs are captured, and copied to the output at
        the end)."""
        self.lazy.materialise([n for n in self.outer_names if n not in set(self.outer_params)])

    def release_outer(self) -> None:
        self.lazy.release(self.outer_names)

    def capturing(self) -> Any:
        """The parameters outside the blocks while block 0's inputs are captured, read only
        where the model reads them (:meth:`~artemis.sparse.streaming.LazyCheckpoint.on_demand`):
        the embedding rows of the calibration tokens, the small norms whole, a head that is
        not called not at all; all are back on ``meta`` afterwards."""
        return self.lazy.on_demand(self.outer_params)

    def write_outer(self, writer: Any, name: str, t: Tensor) -> None:
        """A tensor outside the blocks: copied from the checkpoint a piece at a time when it
        is on ``meta`` (a parameter), else written (a buffer)."""
        if t.device.type == "meta":
            writer.add_stored(name, self.lazy)
        else:
            writer.add(name, t)

    def load_block(self, i: int) -> None:
        self.lazy.materialise(self.block_names[i])

    def release_block(self, i: int) -> None:
        self.lazy.release(self.block_names[i])

    def read(self, t: PrunableTarget) -> Tensor:
        return self.lazy.read(t.key)

    def trim(self) -> None:
        """Return the heap memory freed by the step just done to the system: the
        temporaries of a forward pass, a mask or a written tensor otherwise stay resident
        (glibc keeps up to 64 MiB of freed heap) and add up within a block."""
        from artemis.sparse.streaming import _return_freed_memory

        _return_freed_memory()


# ---------------------------------------------------------------- the pipeline
#: why the methods other than magnitude_progressive are refused (named in the ConfigError)
_METHOD_REASONS = {
    "expert_pruning": (
        "it removes whole routed experts and router rows of every MoE layer, which the pipeline's per-weight "
        "masks, layer dropout and structured-sparsity passes do not do"
    ),
}
#: the layer scores of ``method: layer_dropout`` that its pipeline gathers (``data/pipeline_layers.py``)
LAYER_DROPOUT_METRICS = ("activation", "magnitude")
#: the unit scores of ``method: structured_sparsity`` that its pipeline gathers (``data/pipeline_structured.py``)
STRUCTURED_METRICS = ("activation", "magnitude")


def unsupported_setting(cfg: PruningConfig, in_memory: bool = False) -> Optional[str]:
    """Why the one-shot pipeline cannot prune with ``cfg`` (the setting named), or None.

    Args:
        cfg: the pruning config.
        in_memory: the model is a module in memory, not a checkpoint streamed with
            ``max_memory``. ``gradient_sensitivity`` is supported only then (its backward
            sweep keeps every block's calibration inputs and one accumulator per prunable
            weight, which ``max_memory`` cannot bound); without it the answer holds for both.

    Example:
        >>> unsupported_setting(load_pruning_config({"pruning": {"importance_metric": "activation"}})) is None
        True
        >>> unsupported_setting(load_pruning_config({"pruning": {"method": "expert_pruning"}}))[:27]
        "method 'expert_pruning' is "
        >>> unsupported_setting(load_pruning_config({"pruning": {"method": "structured_sparsity"}})) is None
        True
        >>> drop = {"method": "layer_dropout", "importance_metric": "activation"}
        >>> unsupported_setting(load_pruning_config({"pruning": drop})) is None
        True
        >>> drop["importance_metric"] = "gradient_sensitivity"
        >>> unsupported_setting(load_pruning_config({"pruning": drop}), in_memory=True)[:71]
        "importance_metric 'gradient_sensitivity' with method 'layer_dropout' is"
        >>> grad = load_pruning_config({"pruning": {"importance_metric": "gradient_sensitivity"}})
        >>> unsupported_setting(grad, in_memory=True) is None, unsupported_setting(grad)[:55]
        (True, "importance_metric 'gradient_sensitivity' is not support")
    """
    if cfg.method == "layer_dropout":
        if cfg.importance_metric not in LAYER_DROPOUT_METRICS:
            return (
                f"importance_metric {cfg.importance_metric!r} with method 'layer_dropout' is not supported by the "
                "one-shot pipeline (a block's score is then the sum of |w * dL/dw| over all its parameters, from the "
                "whole model's loss; the pipeline gathers Block Influence ('activation') and 'magnitude' only); use "
                "one of those, or create_pruning_manager(config, model).apply_pruning(s, batches)"
            )
        return None
    if cfg.method == "structured_sparsity":
        if cfg.importance_metric not in STRUCTURED_METRICS:
            return (
                f"importance_metric {cfg.importance_metric!r} with method 'structured_sparsity' is not supported by "
                "the one-shot pipeline (its scores need the gradients of the whole model's loss; the pipeline "
                f"scores heads and neurons with {', '.join(map(repr, STRUCTURED_METRICS))}); use one of those, or "
                "create_pruning_manager(config, model).apply_pruning(s, batches)"
            )
        return None
    if cfg.method != "magnitude_progressive":
        why = _METHOD_REASONS.get(cfg.method, "its pruning is not a per-weight mask chosen inside one block at a time")
        return (
            f"method {cfg.method!r} is not supported by the one-shot pipeline ({why}; it supports "
            "'magnitude_progressive', 'layer_dropout' and 'structured_sparsity'); prune it with "
            "create_pruning_manager(config, model).apply_pruning(s, batches)"
        )
    metric = cfg.importance_metric
    if metric == "gradient_sensitivity" and not in_memory:
        return (
            "importance_metric 'gradient_sensitivity' is not supported by the one-shot pipeline when it streams a "
            "checkpoint (max_memory): its backward sweep keeps every block's calibration inputs and a float "
            "accumulator per prunable weight (as large as the blocks themselves), which max_memory cannot bound; "
            "pass the model in memory (oneshot(module, ...)) or use manager.apply_pruning(s, calibration_data)"
        )
    if metric not in PIPELINE_METRICS:
        return (
            f"importance_metric {metric!r} is not supported by the one-shot pipeline yet (it supports "
            f"{', '.join(map(repr, PIPELINE_METRICS))}); use manager.apply_pruning(s, calibration_data)"
        )
    return None


def _check_supported(cfg: PruningConfig, calibration: Optional[list], in_memory: bool) -> None:
    reason = unsupported_setting(cfg, in_memory=in_memory)
    if reason is not None:
        raise ConfigError(reason)
    metric = cfg.importance_metric
    if cfg.reconstruction != "none" and cfg.sparsegpt_target == "dense" and cfg.pipeline_inputs == "dense":
        raise ConfigError(
            "sparsegpt_target 'dense' with pipeline_inputs 'dense': the layers' inputs would then be the dense "
            "model's own, so the dense target equals the pruned one; use pipeline_inputs 'pruned' or 'auto' "
            f"(valid: {', '.join(map(repr, PIPELINE_INPUTS))}), or set sparsegpt_target: pruned (the dense "
            "target may come from sparsegpt_variant's defaults)"
        )
    owl = cfg.scope == "owl" and cfg.nm_pattern is None
    if calibration is None and (metric != "magnitude" or cfg.reconstruction != "none" or owl):
        if cfg.reconstruction != "none":
            need = f"reconstruction: {cfg.reconstruction}"
        else:
            need = "scope 'owl'" if owl else f"importance_metric {metric!r}"
        raise CalibrationError(f"{need} needs calibration batches: pass calibration_data to oneshot()")


def _pipeline_class(cfg: PruningConfig) -> Any:
    """The pipeline that prunes with ``cfg``: the masking pipeline, or a structural method's own."""
    if cfg.method == "layer_dropout":
        from artemis.data.pipeline_layers import LayerDropoutPipeline

        return LayerDropoutPipeline
    if cfg.method == "structured_sparsity":
        from artemis.data.pipeline_structured import StructuredPipeline

        return StructuredPipeline
    return _Pipeline


def _target_fn(cfg: PruningConfig) -> Callable[[float], float]:
    """The one-shot target function (as ``PruningMethod.one_shot_target_fn``), with the
    N:M reachability check of ``magnitude_progressive``."""
    final = cfg.final_sparsity
    if not (0.0 <= final < 1.0):
        raise ConfigError(f"final_sparsity must be in [0, 1) for a one-shot prune, got {final!r}")
    if cfg.nm_pattern is not None:
        n, m = cfg.nm_pattern
        k = count_to_prune(m, final)
        if k > m - n or abs(k / m - final) > 1e-9:
            valid = ", ".join(f"{j / m:g}" for j in range(0, m - n + 1))
            raise ConfigError(
                f"sparsity {final!r} is not reachable with pattern {cfg.pattern!r}; prune k of every {m} weights: "
                f"valid sparsities are {valid}"
            )

    def fn(group_final: float) -> float:
        if final <= 0 or group_final == final:
            return final
        return min(group_final, 0.999)

    return fn


class _Pipeline:
    def __init__(
        self,
        cfg: PruningConfig,
        model: nn.Module,
        source: Any,
        targets: list[PrunableTarget],
        prefixes: list[str],
        calibration: Optional[list],
        device: torch.device,
        writer: Any,
        progress: Optional[bool],
    ) -> None:
        self.cfg, self.model, self.source = cfg, model, source
        self.targets, self.prefixes = targets, prefixes
        self.blocks = get_adapter(model).blocks
        self.calibration = calibration
        self.device = device
        self.writer = writer
        self.progress = progress
        self.inputs = OneShotOptions(pipeline_inputs=cfg.pipeline_inputs).resolved_inputs(cfg.reconstruction)
        self.target_fn = _target_fn(cfg)
        self.scope = cfg.scope or METRICS.get(cfg.importance_metric).default_scope
        self.by_block: list[list[PrunableTarget]] = [[] for _ in prefixes]
        for t in targets:
            self.by_block[t.block_index].append(t)
        self.finals = {}
        for t in targets:
            s = None
            for pattern, v in cfg.layer_sparsity.items():
                if match_pattern(pattern, t.name):
                    s = v
                    break
            self.finals[t.key] = self.target_fn(cfg.final_sparsity if s is None else s)
        self.zeros: dict[str, int] = {}
        #: OWL (``scope: owl`` without a pattern) and ``scope: global`` with a calibrated metric
        #: need every block's statistics before the first mask: a statistics pass runs first
        self.owl = cfg.scope == "owl" and cfg.nm_pattern is None
        self.gradients = cfg.importance_metric == "gradient_sensitivity"
        self.stats_pass = (
            self.owl
            or self.gradients
            or (self.scope == "global" and cfg.nm_pattern is None and cfg.importance_metric != "magnitude")
        )
        self.grad_sums: dict[str, Tensor] = {}  # gradient_sensitivity: Σ|g| of each target over the batches
        self.grad_steps: dict[str, int] = {}
        self.dense_target = cfg.reconstruction != "none" and cfg.sparsegpt_target == "dense"
        self.out_kind = "tensor"  # what the blocks return: a tensor or a tuple
        self.dense_stream: Optional[list] = None  # sparsegpt_target: dense: the dense model's block inputs
        # every block's own arguments per batch (records[b][i]): layer types differ in their masks
        self.block_inputs: Optional[list[list[tuple[tuple, dict]]]] = None
        self.stashed: dict[str, Tensor] = {}  # activation sums of squares from the statistics pass
        self.outliers: dict[str, tuple[int, int]] = {}  # OWL: (outliers, weights) of each target
        self.counts: dict[str, int] = {}  # OWL: pruned weights of each target
        self.owl_ratios: dict[str, float] = {}
        self.owl_layer_sparsity: dict[str, float] = {}
        self.forwards = 0
        self.stats_forwards = 0
        self.capture_forwards = 0
        self.block_seconds: list[float] = []
        self.max_resident_blocks = 0
        self.recon = {"layers": 0, "seconds": 0.0, "peak_extra_bytes": 0, "tokens": 0}

    # ---------------------------------------------------------------- masks
    def _scores(self, t: PrunableTarget, weight: Tensor, metric: Any = None) -> Tensor:
        """The metric's scores of ``t``: from the statistics pass's activation sums (as
        ``ActivationMetric.score``), from the metric attached to this block, or the magnitudes."""
        acc = self.grad_sums.get(t.key)
        if acc is not None:
            return gradient_sensitivity_scores(weight, acc, self.grad_steps[t.key])
        sq = self.stashed.get(t.key)
        if sq is not None:
            if t.experts:
                w = t.matrices(weight.detach()).abs().to(torch.float32)
                norm = sq.to(device=w.device, dtype=torch.float32).clamp_min(0).sqrt()
                return t.matrices(w * norm[:, None, :])
            return activation_scores(weight, sq, t.transposed)
        if metric is not None:
            return metric.score(t)
        return magnitude_scores(weight)

    def _global_masks(self) -> dict[str, Tensor]:
        """``scope: global``: one threshold per sparsity group over all blocks, from the
        weights read one at a time (in memory or from the checkpoint) and, for ``activation``,
        the input statistics of the statistics pass."""
        groups: "OrderedDict[float, list[PrunableTarget]]" = OrderedDict()
        for t in self.targets:
            groups.setdefault(self.finals[t.key], []).append(t)
        out: dict[str, Tensor] = {}
        for sparsity, ts in groups.items():
            fns = [lambda t=t: self._scores(t, self.source.read(t)) for t in ts]
            for t, m in zip(ts, global_masks(fns, [t.numel for t in ts], sparsity)):
                out[t.key] = m.cpu()
        return out

    def _row_scores(self, t: PrunableTarget, metric: Any) -> Optional[Callable[[int, int], Tensor]]:
        """A function giving the scores of rows ``a:b`` of ``t``'s ``(out, in)`` view, the very
        values :meth:`_scores` gives there (element-wise metrics: ``magnitude``, ``activation``),
        or None where the scores are not computed row by row (fused experts, gradients)."""
        if t.experts or t.key in self.grad_sums:
            return None
        sq = self.stashed.get(t.key)
        if sq is None and metric is not None:
            if type(metric) is not ActivationMetric:
                return None
            sq = metric.state_dict()["sq"].get(t.key)
            if sq is None:  # no statistics: the whole-layer path raises, naming the layer
                return None
        w = t.param
        if sq is None:
            return lambda a, b: magnitude_scores(t.rows_view(w)[a:b])
        # a transposed weight (in, out): rows a:b of its (out, in) view are its columns a:b
        return lambda a, b: t.rows_view(activation_scores(w[:, a:b] if t.transposed else w[a:b], sq, t.transposed))

    def _rowwise_mask(self, t: PrunableTarget, rows_fn: Callable[[int, int], Tensor]) -> Tensor:
        """The keep-mask of a row-wise choice (``scope: row``, an N:M ``pattern``), chosen a
        few rows at a time: the float32 scores and the sort's indices of the whole layer
        (several times the weight's bytes) are never held at once. Each row's choice depends
        on that row alone, so the mask is the one of the whole-layer call, bit for bit."""
        cfg = self.cfg
        view = t.rows_view(t.param)
        rows, cols = view.shape
        keep = torch.empty(rows, cols, dtype=torch.bool, device=view.device)
        step = max(1, _MASK_CHUNK_ELEMENTS // max(cols, 1))
        sparsity = self.finals[t.key]
        for a in range(0, rows, step):
            b = min(rows, a + step)
            scores = rows_fn(a, b)
            if cfg.nm_pattern is not None:
                n, m = cfg.nm_pattern
                k = min(count_to_prune(m, sparsity), m - n)
                keep[a:b] = True if k == 0 else nm_masks(scores, m - k, m)
            else:
                keep[a:b] = row_masks(scores, sparsity)
            del scores
        return t.from_rows(keep).contiguous()

    def _block_masks(self, ts: list[PrunableTarget], metric: Any) -> dict[str, Tensor]:
        cfg = self.cfg
        masks: dict[str, Tensor] = {}
        for t in ts:
            rows_fn = self._row_scores(t, metric)
            if rows_fn is not None and (cfg.nm_pattern is not None or (not self.owl and self.scope == "row")):
                masks[t.key] = self._rowwise_mask(t, rows_fn)
                continue
            scores = self._scores(t, t.param, metric)
            if tuple(scores.shape) != tuple(t.param.shape):
                raise ValueError(
                    f"scores of {t.key} have shape {tuple(scores.shape)}, the weight {tuple(t.param.shape)}"
                )
            sparsity = self.finals[t.key]
            if cfg.nm_pattern is not None:
                n, m = cfg.nm_pattern
                k = min(count_to_prune(m, sparsity), m - n)
                if k == 0:
                    masks[t.key] = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
                else:
                    masks[t.key] = t.rows_view(nm_masks(t.rows_view(scores), m - k, m)).contiguous()
            elif self.owl:  # the pruned count OWL gave the target (as UnstructuredMethod._owl_masks)
                c = self.counts[t.key]
                if METRICS.get(cfg.importance_metric).default_scope == "row" and scores.dim() == 2:
                    masks[t.key] = t.from_rows(rows_count_mask(t.rows_view(scores), c)).contiguous()
                else:
                    masks[t.key] = layer_mask(scores, c / t.numel)
            elif self.scope == "layer":
                masks[t.key] = layer_mask(scores, sparsity)
            elif self.scope == "row":
                masks[t.key] = t.rows_view(row_masks(t.rows_view(scores), sparsity)).contiguous()
            else:  # pragma: no cover - refused by _check_supported
                raise ConfigError(f"scope {self.scope!r} is not supported by the one-shot pipeline")
        return masks

    # ---------------------------------------------------------------- blocks
    def _run(self, block: nn.Module, stream: list, batches: list, i: int, metric: Any, hooks_state: dict) -> list:
        outs = []
        for b, (args, kwargs) in enumerate(stream):
            batch = batches[b]
            hooks_state["token_mask"] = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            outs.append(self._forward(block, args, kwargs, b, metric, batch))
        return outs

    def _forward(self, block: nn.Module, args: tuple, kwargs: dict, b: int, metric: Any, batch: Any) -> Tensor:
        """One block forward pass of batch ``b`` (counted), with ``metric`` calibrating if given."""
        if metric is not None:
            with metric.calibrating(batch):
                out = block(*args, **kwargs)
        else:
            out = block(*args, **kwargs)
        self.out_kind = "tuple" if isinstance(out, (tuple, list)) else "tensor"
        y = _block_output(out)
        self.forwards += 1
        if not torch.isfinite(y).all():
            raise CalibrationError(f"the block's output for calibration batch {b} has NaN or infinite values")
        return y

    @torch.no_grad()
    def _statistics_block(self, i: int, stream: list) -> Optional[list]:
        """The statistics pass of block ``i`` (dense weights, dense inputs: one forward pass
        per batch): the ``activation`` sums of squares of its targets (kept, one float per
        input feature) and, for OWL, each target's outlier count (the input norms of
        :func:`~artemis.methods.owl.collect_input_norms`, freed after the block). Returns the
        block's outputs, the next block's inputs (None after the last block)."""
        cfg = self.cfg
        block = self.blocks[i]
        ts = self.by_block[i]
        metric = None
        handles: list[Any] = []
        sums: dict[str, Tensor] = {}
        state: dict[str, Any] = {"token_mask": None}
        before = self.forwards
        try:
            if cfg.importance_metric == "activation":
                metric = ActivationMetric(**cfg.metric_options)
                metric.attach(self.model, ts)
            if self.owl:
                for t in ts:

                    def hook(module: nn.Module, args: tuple, t: PrunableTarget = t) -> None:
                        if not args or not isinstance(args[0], Tensor):
                            raise CalibrationError(f"layer {t.name} was called without a tensor input")
                        x = layer_inputs_2d(args[0], state["token_mask"])
                        sq = (x * x).sum(0)
                        sums[t.key] = sq if t.key not in sums else sums[t.key] + sq

                    handles.append(t.module.register_forward_pre_hook(hook))
            outs = self._run(block, stream, self.batches, i, metric, state)
            if metric is not None:
                metric.check_ready()
                sq = metric.state_dict()["sq"]
                for t in ts:
                    self.stashed[t.key] = sq[t.key].clone()
        finally:
            for h in handles:
                h.remove()
            if metric is not None:
                metric.detach()
        self.stats_forwards += self.forwards - before
        if self.owl:
            missing = [t.name for t in ts if t.key not in sums]
            if missing:
                raise CalibrationError(f"no calibration batch reached layers {missing[:3]}; OWL needs their inputs")
            for t in ts:
                self.outliers[t.key] = outlier_ratio(t.rows_view(t.param), sums[t.key].sqrt(), cfg.owl_m)
        return outs if (i < len(self.prefixes) - 1 or self.gradients) else None

    def _owl_counts(self) -> None:
        """Every target's pruned count from the blocks' outlier ratios (as
        ``UnstructuredMethod._owl_masks`` for a one-shot prune: λ at the final sparsity)."""
        cfg = self.cfg
        sparsity = self.target_fn(cfg.final_sparsity)
        units: "OrderedDict[int, list[PrunableTarget]]" = OrderedDict()
        for t in self.targets:
            units.setdefault(t.block_index, []).append(t)
        ratios, sizes = [], []
        for members in units.values():
            out = sum(self.outliers[t.key][0] for t in members)
            tot = sum(self.outliers[t.key][1] for t in members)
            ratios.append(out / tot)
            sizes.append(tot)
        try:
            unit_s = owl_sparsities(ratios, sizes, sparsity, cfg.owl_lambda)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        per_target = [(t, s) for members, s in zip(units.values(), unit_s) for t in members]
        total = count_to_prune(sum(t.numel for t, _ in per_target), sparsity)
        counts = allocate_counts([s for _, s in per_target], [t.numel for t, _ in per_target], total)
        for (t, _), c in zip(per_target, counts):
            self.counts[t.key] = c
            self.owl_layer_sparsity[t.key] = c / t.numel
        self.owl_ratios = {str(u): r for u, r in zip(units, ratios)}

    @torch.no_grad()
    def _process_block(self, i: int, stream: Optional[list], precomputed: Optional[dict]) -> Optional[list]:
        if self.dense_target and stream is not None:
            return self._dense_target_block(i, stream, precomputed)
        cfg = self.cfg
        block = self.blocks[i]
        ts = self.by_block[i]
        last = i == len(self.prefixes) - 1
        use_metric = cfg.importance_metric == "activation" and not self.stats_pass
        needs_stats = stream is not None and (use_metric or cfg.reconstruction != "none")
        metric = None
        accs: dict[str, HessianAccumulator] = {}
        handles: list[Any] = []
        hooks_state: dict[str, Any] = {"token_mask": None}
        dense_out: Optional[list] = None
        try:
            if needs_stats:
                if use_metric:
                    metric = ActivationMetric(**cfg.metric_options)
                    metric.attach(self.model, ts)
                if cfg.reconstruction != "none":
                    for t in ts:
                        acc = accs[t.key] = self._accumulator(t)

                        def hook(module: nn.Module, args: tuple, acc: HessianAccumulator = acc, t=t) -> None:
                            if not args or not isinstance(args[0], Tensor):
                                raise CalibrationError(f"layer {t.name} was called without a tensor input")
                            acc.add(layer_inputs_2d(args[0], hooks_state["token_mask"]))

                        handles.append(t.module.register_forward_pre_hook(hook))
                dense_out = self._run(block, stream, self.batches, i, metric, hooks_state)
                if metric is not None:
                    metric.check_ready()
        finally:
            for h in handles:
                h.remove()
        try:
            if precomputed is not None:
                masks = {t.key: precomputed.pop(t.key).to(t.param.device) for t in ts}
            elif cfg.reconstruction == "none":  # each mask applied once chosen: one alive at a time
                masks = {}
                self.source.trim()  # the forward pass's temporaries
                for t in ts:  # a target's scores read its own weight only: the order does not matter
                    t.param.mul_(self._block_masks([t], metric)[t.key])
                    self.source.trim()
            else:
                masks = self._block_masks(ts, metric)
        finally:
            if metric is not None:
                metric.detach()
        if cfg.reconstruction != "none":
            start = time.perf_counter()
            for t in ts:
                self._update_layer(t, accs.pop(t.key), None, None, masks)
            self.recon["seconds"] += time.perf_counter() - start
        for t in ts:
            if t.key in masks:
                t.param.mul_(masks[t.key])
            self.zeros[t.key] = t.param.numel() - int(torch.count_nonzero(t.param))
        if stream is None or last:
            return None
        if self.inputs == "dense" and dense_out is not None:
            return dense_out
        return self._run(block, stream, self.batches, i, None, hooks_state)

    @torch.no_grad()
    def _dense_target_block(self, i: int, stream: list, precomputed: Optional[dict]) -> Optional[list]:
        """``sparsegpt_target: dense``: block ``i`` as ``reconstruct_layers`` treats it, one
        layer (or group of layers reading the same input) after another, in two block passes
        per batch. (1) The dense block runs on the dense model's inputs: the next block's dense
        inputs, every target's dense input (kept, padding removed) and, with the metric, the
        mask statistics (as the manager's calibration of the dense model); the masks are
        chosen. (2) The block runs on the pruned inputs, every batch's pass paused at each
        target's input (:class:`~artemis.data.lockstep.PausedForwards`): when all passes wait
        before a target (or a group reading the same input), its layers are updated from the
        paused inputs and the kept dense ones, and the passes go on; their ends are the next
        block's pruned inputs. A block that calls its targets in another order than theirs is
        redone with restarted passes (:meth:`_restarted_updates`)."""
        cfg = self.cfg
        block = self.blocks[i]
        ts = self.by_block[i]
        use_metric = cfg.importance_metric == "activation" and not self.stats_pass
        metric = None
        try:
            if use_metric:
                metric = ActivationMetric(**cfg.metric_options)
                metric.attach(self.model, ts)
            new_dense, dense_x = self._dense_pass(block, ts, metric)
            if metric is not None:
                metric.check_ready()
            if precomputed is not None:
                masks = {t.key: precomputed.pop(t.key).to(t.param.device) for t in ts}
            else:
                masks = self._block_masks(ts, metric)
        finally:
            if metric is not None:
                metric.detach()
        names = {id(p): n for n, p in block.named_parameters(remove_duplicate=False)}
        dense_params = {names[id(t.param)]: t.param.detach().clone() for t in ts if id(t.param) in names}
        for t in ts:  # the refitted biases change too: the dense passes keep the old ones
            bias = getattr(t.module, "bias", None)
            if self._fit_bias(t) and id(bias) in names:
                dense_params[names[id(bias)]] = bias.detach().clone()
        copy_bytes = sum(p.numel() * p.element_size() for p in dense_params.values())
        self.recon["dense_copy_bytes"] = max(self.recon.get("dense_copy_bytes", 0), copy_bytes)
        kept = {id(x): x for d in dense_x for x in d.values()}
        kept_bytes = sum(x.numel() * x.element_size() for x in kept.values())
        self.recon["dense_input_bytes"] = max(self.recon.get("dense_input_bytes", 0), kept_bytes)
        last = i == len(self.prefixes) - 1
        saved_masks, saved_layers = dict(masks), self.recon["layers"]
        try:
            try:
                outs = self._paused_updates(block, ts, stream, dense_x, masks, last)
            except _OutOfOrder as exc:
                logger.info("block %d: %s; its targets are redone with restarted passes", i, exc)
                for name, value in dense_params.items():
                    block.get_parameter(name).copy_(value)
                masks.clear()
                masks.update(saved_masks)
                self.recon["layers"] = saved_layers
                self._restarted_updates(block, ts, stream, dense_params, masks)
                outs = None if last else self._run(block, stream, self.batches, i, None, {"token_mask": None})
        finally:
            dense_params.clear()
            del dense_x, kept
        for t in ts:
            t.param.mul_(masks[t.key])
            self.zeros[t.key] = t.param.numel() - int(torch.count_nonzero(t.param))
        if last:
            return None
        self.dense_stream = self._next_inputs(self.dense_stream, new_dense, i)
        return outs

    def _dense_pass(self, block: nn.Module, ts: list, metric: Any) -> tuple[list, list[dict[int, Tensor]]]:
        """The dense block on the dense inputs (one pass per batch, with ``metric`` calibrating):
        its outputs, and for every batch the input of each target module's first call,
        ``{id(module): (tokens, in_features)}`` with the padding removed, in the input's dtype
        (targets that receive the very same tensor share one copy)."""
        captured: list[dict[int, Tensor]] = []
        state: dict[str, Any] = {"token_mask": None, "seen": {}, "objs": []}

        def hook(module: nn.Module, args: tuple) -> None:
            seen = state["seen"]
            if id(module) in seen:  # called again in this pass: the first input counts
                return
            if not args or not isinstance(args[0], Tensor):
                raise CalibrationError(f"layer {type(module).__name__} was called without a tensor input")
            x = args[0]
            for obj, version, stored in state["objs"]:
                if obj is x and version == x._version:
                    seen[id(module)] = stored
                    return
            stored = _rows_2d(x, state["token_mask"])
            seen[id(module)] = stored
            state["objs"].append((x, x._version, stored))

        handles = [m.register_forward_pre_hook(hook) for m in dict.fromkeys(t.module for t in ts)]
        outs = []
        try:
            for b, (args, kwargs) in enumerate(self.dense_stream):
                batch = self.batches[b]
                state["token_mask"] = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                state["seen"], state["objs"] = {}, []
                outs.append(self._forward(block, args, kwargs, b, metric, batch))
                captured.append(state["seen"])
        finally:
            for h in handles:
                h.remove()
            state["objs"] = []
        return outs, captured

    def _paired_statistics(
        self, t: PrunableTarget, inputs: list[tuple[int, Tensor]], dense_x: list[dict[int, Tensor]]
    ) -> tuple[HessianAccumulator, Tensor, Tensor]:
        """``(acc, Σ XₚᵀX_d, Σ X_d)`` of target ``t`` from the pruned inputs ``[(batch, x)]`` and
        the kept dense ones, batch by batch (as the hooks of :meth:`_layer_statistics`)."""
        acc = self._accumulator(t)
        cross = torch.zeros_like(acc.sum)
        dense_sum = torch.zeros(acc.sum.shape[0], dtype=torch.float64, device=acc.sum.device)
        for b, raw in inputs:
            batch = self.batches[b]
            x = layer_inputs_2d(raw, batch.get("attention_mask") if isinstance(batch, Mapping) else None)
            xd = dense_x[b].get(id(t.module))
            if xd is None or xd.shape != x.shape:
                raise CalibrationError(f"layer {t.name} saw different tokens in the dense and the pruned pass")
            acc.add(x)
            xd = xd.to(device=x.device, dtype=torch.float32)
            cross.addmm_(x.T, xd)
            dense_sum.add_(xd.to(torch.float64).sum(0))
        if acc.count == 0:
            raise CalibrationError(f"no calibration token reached layer {t.name}; the block never called it")
        return acc, cross, dense_sum

    def _paused_updates(
        self, block: nn.Module, ts: list, stream: list, dense_x: list[dict[int, Tensor]], masks: dict, last: bool
    ) -> Optional[list]:
        """Step (2) of :meth:`_dense_target_block`: one pass of the block per batch on the
        pruned inputs, paused before each target; returns the passes' outputs (None for the
        last block, whose passes end after its last target). Targets are updated in their
        order; a target whose paused inputs are the very tensors (unchanged) of the previous
        target's, with the same kept dense inputs, reuses its statistics (q/k/v, gate/up).

        Raises:
            _OutOfOrder: a pass reached a target before the one being updated.
        """
        left: dict[int, int] = {}  # targets not yet updated, per module
        for t in ts:
            left[id(t.module)] = left.get(id(t.module), 0) + 1
        prev: Optional[tuple] = None  # (statistics, paused inputs, their versions, dense inputs)
        with PausedForwards(block, stream, [t.module for t in ts], self.device) as passes:
            passes.start()
            self.forwards += len(passes)
            for t in ts:
                inputs = []
                for b in range(len(passes)):
                    state = passes.state(b)
                    if state[0] != "at":  # this batch's pass ended without calling t
                        continue
                    if state[1] is not t.module:
                        raise _OutOfOrder(f"a pass reached {type(state[1]).__name__} before the input of {t.name}")
                    if not isinstance(state[2], Tensor):
                        raise CalibrationError(f"layer {t.name} was called without a tensor input")
                    inputs.append((b, state[2]))
                versions = [x._version for _, x in inputs]
                dense = [dense_x[b].get(id(t.module)) for b, _ in inputs]
                if (
                    prev is not None
                    and inputs
                    and len(inputs) == len(prev[1])
                    and all(b == pb and x is px for (b, x), (pb, px) in zip(inputs, prev[1]))
                    and versions == prev[2]
                    and all(d is not None and d is pd for d, pd in zip(dense, prev[3]))
                ):
                    stats = prev[0]  # the very same inputs as the previous target: its statistics
                else:
                    stats = self._paired_statistics(t, inputs, dense_x)
                prev = (stats, inputs, versions, dense)
                acc, cross_sum, dense_sum = stats
                start = time.perf_counter()
                cross = cross_sum * (2.0 / acc.count)
                dense_mean = (dense_sum / acc.count).to(torch.float32)
                self._update_layer(t, acc, cross, dense_mean, masks)
                t.param.mul_(masks[t.key])
                self.recon["seconds"] += time.perf_counter() - start
                left[id(t.module)] -= 1
                if left[id(t.module)] == 0 and not (last and t is ts[-1]):  # the last block's tail: not needed
                    for b, _ in inputs:
                        passes.resume(b)
            del prev, inputs
            if last:
                return None
            outs = []
            for b in range(len(passes)):
                state = passes.state(b)
                if state[0] != "done":
                    raise _OutOfOrder(f"a pass reached {type(state[1]).__name__} again after its targets were updated")
                out = state[1]
                self.out_kind = "tuple" if isinstance(out, (tuple, list)) else "tensor"
                y = _block_output(out)
                if not torch.isfinite(y).all():
                    raise CalibrationError(f"the block's output for calibration batch {b} has NaN or infinite values")
                outs.append(y)
            return outs

    def _restarted_updates(self, block: nn.Module, ts: list, stream: list, dense_params: dict, masks: dict) -> None:
        """Step (2) of :meth:`_dense_target_block` with restarted passes: for each target (or
        group reading the same input), two partial passes per batch, each stopped at the
        target's input: the block with its dense weights (``dense_params`` substituted with
        ``torch.func.functional_call``) on the dense inputs, and the block as updated so far on
        the pruned inputs. Used when the paused passes cannot be (the block calls its targets
        in another order than theirs)."""
        shared: dict[str, tuple] = {}
        for idx, t in enumerate(ts):
            if t.key in shared:  # the same input tensor as an earlier target of the block
                stats = shared.pop(t.key)
            else:
                stats, same = self._layer_statistics(block, t, ts[idx + 1 :], stream, dense_params)
                for u in ts[idx + 1 :]:
                    if u.key in same:
                        shared[u.key] = stats
            acc, cross_sum, dense_sum = stats
            start = time.perf_counter()
            cross = cross_sum * (2.0 / acc.count)
            dense_mean = (dense_sum / acc.count).to(torch.float32)
            self._update_layer(t, acc, cross, dense_mean, masks)
            self.recon["seconds"] += time.perf_counter() - start

    def _layer_statistics(
        self, block: nn.Module, t: PrunableTarget, later: list, stream: list, dense_params: dict
    ) -> tuple[tuple, set]:
        """``((acc, Σ XₚᵀX_d, Σ X_d), same)`` of target ``t`` over every batch (two partial passes
        of the block per batch, as ``reconstruct_layers``' paired passes), and the keys of the
        ``later`` targets that received the very same input tensor in every batch."""
        acc = self._accumulator(t)
        cross = torch.zeros_like(acc.sum)
        dense_sum = torch.zeros(acc.sum.shape[0], dtype=torch.float64, device=acc.sum.device)
        later_keys = {id(u.module): u.key for u in later}
        state: dict[str, Any] = {"token_mask": None, "phase": "pruned", "x_obj": None, "x_dense": None}
        state.update(batch_same=set(), same=None)

        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], Tensor):
                raise CalibrationError(f"layer {t.name} was called without a tensor input")
            if state["x_obj"] is not None:  # called a second time in this pass: the first input counts
                raise _StopBlock
            x = layer_inputs_2d(args[0], state["token_mask"])
            if state["phase"] == "dense":
                state["x_dense"] = x
                raise _StopBlock
            xd, state["x_dense"] = state["x_dense"], None
            if xd is None or xd.shape != x.shape:
                raise CalibrationError(f"layer {t.name} saw different tokens in the dense and the pruned pass")
            acc.add(x)
            xd = xd.to(x.device)
            cross.addmm_(x.T, xd)
            dense_sum.add_(xd.to(torch.float64).sum(0))
            if not later_keys:
                raise _StopBlock
            state["x_obj"], state["x_version"] = args[0], args[0]._version

        def later_hook(module: nn.Module, args: tuple) -> None:
            if state["x_obj"] is None:  # called before t: not a sharer; let the pass go on
                return
            x = args[0] if args else None
            if x is state["x_obj"] and x._version == state["x_version"] and id(module) in later_keys:
                state["batch_same"].add(later_keys[id(module)])
                return
            raise _StopBlock

        handles = [t.module.register_forward_pre_hook(hook)]
        handles += [u.module.register_forward_pre_hook(later_hook) for u in later if u.module is not t.module]
        try:
            for b, (args, kwargs) in enumerate(stream):
                batch = self.batches[b]
                state["token_mask"] = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                for phase in ("dense", "pruned"):
                    state["phase"], state["x_obj"] = phase, None
                    try:
                        if phase == "dense":
                            d_args, d_kwargs = self.dense_stream[b]
                            functional_call(block, dense_params, tuple(d_args), dict(d_kwargs), strict=False)
                        else:
                            block(*args, **kwargs)
                    except _StopBlock:
                        pass
                    self.forwards += 1
                same = state["batch_same"] if state["x_obj"] is not None else set()
                state["same"] = same if state["same"] is None else state["same"] & same
                state["batch_same"] = set()
        finally:
            for h in handles:
                h.remove()
            state["x_obj"] = None
        if acc.count == 0:
            raise CalibrationError(f"no calibration token reached layer {t.name}; the block never called it")
        return (acc, cross, dense_sum), state["same"] or set()

    def _shrinkage(self) -> str:
        return getattr(self.cfg, "sparsegpt_shrinkage", None) or "none"

    def _fit_bias(self, t: PrunableTarget) -> bool:
        """``sparsegpt_bias_correction`` applies to ``t``: it has a bias, one per output row."""
        bias = getattr(t.module, "bias", None)
        return (
            bool(getattr(self.cfg, "sparsegpt_bias_correction", False))
            and isinstance(bias, Tensor)
            and bias.numel() == t.rows_view(t.param).shape[0]
        )

    def _accumulator(self, t: PrunableTarget) -> HessianAccumulator:
        cols = t.rows_view(t.param).shape[1]
        moments = self._fit_bias(t) or self._shrinkage() != "none"  # as reconstruct_layers
        return HessianAccumulator(cols, device=t.param.device, moments=moments)

    def _update_layer(
        self,
        t: PrunableTarget,
        acc: HessianAccumulator,
        cross: Optional[Tensor],
        dense_mean: Optional[Tensor],
        masks: dict[str, Tensor],
    ) -> None:
        """The reconstruction of one target from its statistics, as ``reconstruct_layers``
        does it: the shrinkage, the bias refit, the dense target (``cross``: ``2XₚᵀX_d/n``,
        ``dense_mean``: the dense inputs' mean), then :func:`sparsegpt_prune`."""
        cfg = self.cfg
        if acc.count == 0:
            raise CalibrationError(f"no calibration token reached layer {t.name}; the block never called it")
        weight = t.rows_view(t.param)
        bias = getattr(t.module, "bias", None)
        fit_bias = self._fit_bias(t)
        shrinkage = self._shrinkage()
        extra_damp = acc.ledoit_wolf_dampening(fit_bias) if shrinkage == "ledoit_wolf" else 0.0
        mean_p = acc.mean() if fit_bias else None
        h = acc.covariance_hessian() if fit_bias else acc.hessian()
        # a NaN or infinite input shows on the diagonal (its square); |Hᵢⱼ| ≤ √(HᵢᵢHⱼⱼ) bounds the rest
        if not torch.isfinite(h.diagonal()).all():
            raise CalibrationError(f"the input Hessian of layer {t.name} has NaN or infinite values")
        damp = cfg.sparsegpt_dampening + extra_damp
        ref_out = None
        if cross is not None and fit_bias:  # the cross product of centred inputs
            cross.addr_(mean_p.to(cross.device), dense_mean.to(cross.device), alpha=-2.0)
        if fit_bias:
            mu_ref = dense_mean if dense_mean is not None else mean_p
            ref_out = weight.detach().to(torch.float32) @ mu_ref.to(weight.device)  # W μ_dense
            mean_p = mean_p.to(weight.device)
        factor = None  # the Cholesky factor of the damped Hessian, shared by the two steps below
        if cross is not None:  # fit the dense model's output from the pruned model's input
            weight, factor = dense_target_weight(weight, h, cross, damp, return_factor=True)
            del cross
        mask = t.rows_view(masks[t.key])
        if cfg.sparsegpt_mask == "metric":
            new_w, _ = sparsegpt_prune(
                weight, h, mask=mask, blocksize=cfg.sparsegpt_blocksize, dampening=damp, factor=factor
            )
        else:
            pattern = None
            if cfg.nm_pattern is not None:
                n, m = cfg.nm_pattern
                k = min(count_to_prune(m, self.finals[t.key]), m - n)
                pattern = (m - k, m) if k > 0 else None
            new_w, keep = sparsegpt_prune(
                weight,
                h,
                sparsity=None if pattern is not None else int((~mask).sum()) / mask.numel(),
                pattern=pattern,
                blocksize=cfg.sparsegpt_blocksize,
                dampening=damp,
                per_row=cfg.sparsegpt_obs_scope == "row",
                factor=factor,
            )
            masks[t.key] = t.rows_view(keep).contiguous()
        if fit_bias:  # b + W μ_d − Ŵ μ_p: the mean output the dense layer gave
            bias.add_((ref_out - new_w.to(torch.float32) @ mean_p).to(bias.dtype))
        t.param.copy_(t.rows_view(new_w))
        self.recon["layers"] += 1
        self.recon["tokens"] = acc.count
        self.recon["peak_extra_bytes"] = max(
            self.recon["peak_extra_bytes"],
            reconstruction_extra_bytes(
                weight.shape[0],
                weight.shape[1],
                cfg.sparsegpt_blocksize,
                dense_target=self.dense_target,
                obs=cfg.sparsegpt_mask == "obs" and cfg.nm_pattern is None,
            ),
        )

    def _capture(self) -> list[tuple[tuple, dict]]:
        """Block 0's ``(args, kwargs)`` for every batch, keeping every block's own arguments in
        ``block_inputs`` (models with sliding-window and full-attention layers give each layer
        type its own attention mask: block 0's would be wrong for the others)."""
        hidden, records = capture_inputs_per_block(self.model, self.blocks, self.batches, self.device)
        self.block_inputs = records
        return [_with_hidden(*rec[0], h) for rec, h in zip(records, hidden)]

    def _next_inputs(self, stream: list, outs: list[Tensor], i: int) -> list[tuple[tuple, dict]]:
        """The inputs of block ``i + 1``: block ``i``'s outputs ``outs`` with block ``i + 1``'s
        own arguments (as the model calls it)."""
        recs = self.block_inputs
        if recs is None or i + 1 >= len(self.prefixes):
            return [_with_hidden(a, k, y) for (a, k), y in zip(stream, outs)]
        return [_with_hidden(*recs[b][i + 1], y) for b, y in enumerate(outs)]

    def _statistics_pass(self) -> None:
        """Every block once, in order, on the dense model's inputs: the statistics that OWL and
        ``scope: global`` need from all blocks before the first mask (then the OWL counts)."""
        src = self.source
        with src.capturing():
            stream: Optional[list] = self._capture()
        self.capture_forwards += len(stream)
        kept: list[list] = []  # gradient_sensitivity: every block's inputs, for the backward sweep
        for i, prefix in enumerate(self.prefixes):
            if self.gradients:
                kept.append(stream)
            try:
                src.load_block(i)
                if src.streamed:
                    self.max_resident_blocks = max(self.max_resident_blocks, self._resident_blocks())
                outs = self._statistics_block(i, stream)
            except BlockError:
                raise
            except Exception as exc:
                raise BlockError(
                    f"one-shot pipeline (statistics pass): block {i} ({prefix}) failed: {type(exc).__name__}: {exc}",
                    i,
                    prefix,
                ) from exc
            finally:
                src.release_block(i)
            if self.gradients and i == len(self.prefixes) - 1:
                self._backward_sweep(kept, outs)
                break
            stream = self._next_inputs(stream, outs, i) if outs is not None else None
        if self.owl:
            self._owl_counts()

    def _head_gradients(self, outs: list[Tensor]) -> list[Tensor]:
        """``∂loss/∂h`` of each batch at the last block's output ``h``: the model's own forward
        runs with every block replaced by a stand-in that returns ``h`` (a leaf that requires
        grad), so the loss is the model's (``outputs.loss``, from the batch's ``labels``), computed
        after the blocks exactly as in the whole model; no block runs and no parameter gets a
        gradient."""
        blocks = self.blocks
        originals = list(blocks)
        params = list(dict.fromkeys(self.model.parameters()))
        saved = [p.requires_grad for p in params]
        grads: list[Tensor] = []
        try:
            for p in params:
                p.requires_grad_(False)
            for b, (batch, h) in enumerate(zip(self.batches, outs)):
                leaf = h.detach().requires_grad_(True)
                for j in range(len(blocks)):
                    blocks[j] = _StandIn(leaf, self.out_kind)
                if (
                    isinstance(batch, Mapping)
                    and "use_cache" not in batch
                    and hasattr(getattr(self.model, "config", None), "use_cache")
                ):
                    batch = {**batch, "use_cache": False}
                with torch.enable_grad():
                    loss = extract_loss(forward_batch(self.model, batch, self.device), batch, None, b)
                    loss.backward()
                if leaf.grad is None:
                    raise CalibrationError(f"the loss of calibration batch {b} does not depend on the last block")
                grads.append(leaf.grad)
        finally:
            for j, block in enumerate(originals):
                blocks[j] = block
            for p, r in zip(params, saved):
                p.requires_grad_(r)
        return grads

    def _backward_sweep(self, kept: list[list], outs: list[Tensor]) -> None:
        """``gradient_sensitivity``: the gradient of the loss with respect to every target,
        batch by batch, by backpropagating one block at a time from the last to the first:
        block ``i`` runs again with gradients on its inputs of the forward sweep, and the
        gradient at its input is the next (earlier) block's output gradient. The sums
        ``Σ|g|`` per target are what the manager's metric accumulates over its backward
        passes of the whole model (one per batch)."""
        src = self.source
        dtype = ACCUMULATOR_DTYPES[self.cfg.metric_options.get("accumulator_dtype", "float32")]
        grads = self._head_gradients(outs)
        first = min((t.block_index for t in self.targets), default=0)
        for i in reversed(range(first, len(self.prefixes))):  # the blocks before the first target: no need
            prefix = self.prefixes[i]
            block = self.blocks[i]
            ts = self.by_block[i]
            stream = kept[i]
            try:
                src.load_block(i)
                params = list(dict.fromkeys(block.parameters()))
                saved = [p.requires_grad for p in params]
                target_ids = {id(t.param) for t in ts}
                try:
                    for p in params:
                        p.requires_grad_(id(p) in target_ids)
                        p.grad = None
                    for b, (args, kwargs) in enumerate(stream):
                        x = _hidden_of(args, kwargs).detach().requires_grad_(i > first)
                        a, k = _with_hidden(args, kwargs, x)
                        with torch.enable_grad():
                            y = self._forward(block, a, k, b, None, self.batches[b])
                            torch.autograd.backward(y, grads[b])
                        for t in ts:
                            g = t.param.grad
                            if g is None:
                                raise CalibrationError(
                                    f"importance_metric 'gradient_sensitivity': {t.name} received no gradient; "
                                    "the loss does not depend on it: exclude it with pruning.exclude"
                                )
                            acc = self.grad_sums.get(t.key)
                            if acc is None:
                                acc = self.grad_sums[t.key] = torch.zeros(g.shape, dtype=dtype, device=g.device)
                            acc.add_(g.detach().abs().to(dtype))
                            self.grad_steps[t.key] = self.grad_steps.get(t.key, 0) + 1
                            t.param.grad = None
                        grads[b] = x.grad if i > first else None
                finally:
                    for p, r in zip(params, saved):
                        p.requires_grad_(r)
                        p.grad = None
                self.stats_forwards += len(stream)
            except BlockError:
                raise
            except Exception as exc:
                raise BlockError(
                    f"one-shot pipeline (backward sweep): block {i} ({prefix}) failed: {type(exc).__name__}: {exc}",
                    i,
                    prefix,
                ) from exc
            finally:
                src.release_block(i)
            kept[i] = []  # this block's inputs are no longer needed
        if self.grad_sums and not any(bool(a.any()) for a in self.grad_sums.values()):
            raise CalibrationError(
                "importance_metric 'gradient_sensitivity': every accumulated gradient is exactly zero, so the "
                "scores carry no information; use a task loss or another metric"
            )

    def _resident_blocks(self) -> int:
        return sum(1 for b in self.blocks if any(p.device.type != "meta" for p in b.parameters()))

    def run(self) -> dict[str, Any]:
        src = self.source
        src.load_outer()
        stream = None
        self.batches = self.calibration or []
        start = time.perf_counter()
        if self.stats_pass:
            self._statistics_pass()
        precomputed = self._global_masks() if (self.scope == "global" and self.cfg.nm_pattern is None) else None
        use_metric = self.cfg.importance_metric == "activation" and not self.stats_pass
        if use_metric or self.cfg.reconstruction != "none":
            with src.capturing():
                stream = self._capture()
            self.capture_forwards += len(stream)
            if self.dense_target:
                self.dense_stream = list(stream)
        bar = tqdm(
            total=len(self.prefixes),
            desc="one-shot",
            unit="block",
            disable=None if self.progress is None else not self.progress,
        )
        try:
            for i, prefix in enumerate(self.prefixes):
                t0 = time.perf_counter()
                try:
                    src.load_block(i)
                    if src.streamed:
                        self.max_resident_blocks = max(self.max_resident_blocks, self._resident_blocks())
                    outs = self._process_block(i, stream, precomputed)
                    if self.writer is not None:
                        for name, t in unique_state_tensors(self.blocks[i]):
                            self.writer.add(f"{prefix}.{name}", t)
                            src.trim()
                except BlockError:
                    raise
                except Exception as exc:
                    raise BlockError(
                        f"one-shot pipeline: block {i} ({prefix}) failed: {type(exc).__name__}: {exc}", i, prefix
                    ) from exc
                finally:
                    src.release_block(i)
                if outs is not None:
                    stream = self._next_inputs(stream, outs, i)
                self.block_seconds.append(time.perf_counter() - t0)
                bar.set_postfix(block=i, seconds=f"{self.block_seconds[-1]:.2f}")
                bar.update(1)
        finally:
            bar.close()
        if self.writer is not None:
            block_names = {f"{p}." for p in self.prefixes}
            for name, t in unique_state_tensors(self.model):
                if not any(name.startswith(b) for b in block_names):
                    src.write_outer(self.writer, name, t)
        seconds = time.perf_counter() - start
        return {"seconds": seconds}


def _peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def _summary(pipe: _Pipeline, model: nn.Module, adapter_name: str, extra: dict) -> dict[str, Any]:
    cfg = pipe.cfg
    layers = []
    nnz = {}
    for t in pipe.targets:
        p = t.param
        zeros = pipe.zeros.get(t.key, 0)
        nnz[id(p)] = p.numel() - zeros
        layers.append(layer_row(t.name, p, zeros))
    prunable = sum(t.numel for t in pipe.targets)
    pruned = sum(pipe.zeros.values())
    dense = model_dense_bytes(model)
    compressed = model_compressed_bytes(model, [t.param for t in pipe.targets], nnz=nnz)
    target = pipe.target_fn(cfg.final_sparsity)
    metrics = {
        "model_size_reduction": 1.0 - compressed / dense if dense else 0.0,
        "current_sparsity": pruned / prunable if prunable else 0.0,
        "parameters_pruned": pruned,
        "parameters_prunable": prunable,
        "target_sparsity": target,
        "baseline_model_size_mb": dense / MIB,
        "compressed_model_size_mb": compressed / MIB,
        "pruning_events": 1,
        "mask_memory_mb": 0.0,
    }
    summary: dict[str, Any] = {
        "enabled": cfg.enabled,
        "method": cfg.method,
        "importance_metric": cfg.importance_metric,
        "schedule": cfg.schedule,
        "scope": pipe.scope,
        "architecture": adapter_name,
        "step": 0,
        "total_steps": None,
        "finalized": True,
        "target_sparsity": target,
        "final_sparsity": cfg.final_sparsity,
        "measured_sparsity": metrics["current_sparsity"],
        "pruning_metrics": metrics,
        "layers": layers,
    }
    if cfg.pattern is not None:
        summary["pattern"] = cfg.pattern
    if pipe.owl:
        summary["owl_layer_sparsity"] = dict(pipe.owl_layer_sparsity)
        summary["owl_outlier_ratios"] = dict(pipe.owl_ratios)
    if cfg.reconstruction != "none":
        summary["reconstruction"] = cfg.reconstruction
        summary["last_reconstruction"] = {
            **pipe.recon,
            "select": cfg.sparsegpt_mask,
            "target": cfg.sparsegpt_target,
            "dense_copy_bytes": pipe.recon.get("dense_copy_bytes", 0),
            "passes": len(pipe.prefixes),
            "shared_hessians": 0,
        }
    summary["pipeline"] = extra
    return summary


def _resolve_folder(model: Union[str, os.PathLike]) -> Path:
    path = Path(model)
    if path.is_dir():
        return path
    if isinstance(model, str) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
        except Exception as exc:
            raise ModelError(
                f"model {model!r} is not a local folder and cannot be fetched from the Hub ({exc})"
            ) from exc
    raise ModelError(f"model {str(model)!r}: no such folder")


def oneshot(
    model: Union[nn.Module, str, os.PathLike],
    config: Any,
    calibration_data: Optional[Any] = None,
    output_dir: Union[str, os.PathLike, None] = None,
    *,
    max_memory: Union[int, str, None] = None,
    device: Union[str, torch.device, None] = None,
    progress: Optional[bool] = None,
) -> dict[str, Any]:
    """Prune ``model`` once to the config's ``final_sparsity``, block by block.

    Args:
        model: a module (pruned in place), or a Hugging Face checkpoint folder (or Hub id,
            fetched with ``huggingface_hub`` when online) that is loaded, or with
            ``max_memory`` opened lazily; the folder is only read.
        config: as :func:`artemis.create_pruning_manager` (``{"pruning": {...}}``, a
            :class:`~artemis.core.config.PruningConfig` or a YAML path). Supported:
            ``magnitude_progressive`` with ``magnitude`` or ``activation``, every ``scope``
            (``row``, ``layer``, ``global``, ``owl``), N:M ``pattern``, ``layer_sparsity``,
            ``reconstruction: sparsegpt`` (``sparsegpt_target`` ``pruned`` or ``dense``)
            and ``pipeline_inputs`` (:class:`~artemis.methods.pipeline_options.OneShotOptions`);
            ``layer_dropout`` with ``activation`` (Block Influence) or ``magnitude``
            (:mod:`artemis.data.pipeline_layers`: the dropped blocks are removed, the model
            edited in place or written without them); ``structured_sparsity`` with
            ``activation`` or ``magnitude`` (:mod:`artemis.data.pipeline_structured`: heads and
            neurons removed, as ``finalize()`` removes them). Anything else
            (``gradient_sensitivity`` on a streamed checkpoint or with those two methods,
            ``expert_pruning``, targets outside the blocks) raises :class:`~artemis.core.errors.ConfigError` naming it
            and why (:func:`unsupported_setting`).
        calibration_data: batches (dicts of tensors or tensors, as ``apply_pruning``);
            needed by ``activation``, ``scope: owl`` and the reconstruction; ignored (with
            a warning) by plain ``magnitude``.
        output_dir: when given, the pruned model is written there in the
            :func:`~artemis.save_pruned` format, block by block, into a temporary
            sibling folder renamed into place at the end (an error leaves nothing there).
        max_memory: bytes (or ``"8GiB"``-style) the parameters may take: a checkpoint
            folder is then streamed (one block resident at a time; the parameters outside
            the blocks only while block 0's inputs are captured, never with a block); a
            ``ConfigError`` when the larger of the two does not fit.
        device: where the blocks are computed (default: the model's device; CPU for a
            streamed folder).
        progress: a tqdm bar over the blocks (default: on a terminal).

    Returns:
        The summary of ``manager.get_pruning_summary()``'s shape, plus ``pipeline``:
        ``{"inputs", "streamed", "blocks", "block_forwards" (all passes, the statistics pass
        included), "statistics_forwards", "capture_forwards", "seconds",
        "block_seconds", "peak_rss_bytes", "peak_param_bytes", "activation_bytes",
        "max_resident_blocks", "output"}``.

    Raises:
        ConfigError: an unsupported method/metric/scope, or a bad ``max_memory``.
        CalibrationError: missing or malformed calibration data.
        BlockError: a block failed (its index and name, and the cause, in the message).

    Example:
        >>> import torch, tempfile
        >>> from transformers import BertConfig, BertModel
        >>> import artemis
        >>> bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=64)).eval()
        >>> batches = [{"input_ids": torch.randint(0, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}]
        >>> cfg = {"pruning": {"final_sparsity": 0.5, "reconstruction": "sparsegpt"}}
        >>> out = tempfile.mkdtemp() + "/pruned"
        >>> s = artemis.oneshot(bert, cfg, batches, out, progress=False)
        >>> s["measured_sparsity"], s["pipeline"]["inputs"], artemis.load_pruned(out) is not None
        (0.5, 'pruned', True)
    """
    cfg = load_pruning_config(config)
    budget = parse_memory_size(max_memory) if max_memory is not None else None
    data = None
    if calibration_data is not None:
        data = check_calibration_batches(calibration_data)
    owl = cfg.scope == "owl" and cfg.nm_pattern is None
    if data is not None and cfg.importance_metric == "magnitude" and cfg.reconstruction == "none" and not owl:
        logger.warning("importance_metric 'magnitude' without reconstruction needs no calibration data; not read")
        data = None
    _check_supported(cfg, data, in_memory=budget is None or isinstance(model, nn.Module))
    source_dir: Optional[Path] = None
    lazy = None
    if isinstance(model, nn.Module):
        net = unwrap_model(model)
        if budget is not None:
            logger.warning("max_memory applies to checkpoint folders; the module given is already in memory")
    else:
        source_dir = _resolve_folder(model)
        if budget is not None:
            from artemis.sparse.streaming import LazyCheckpoint

            lazy = LazyCheckpoint(source_dir, device=device)
            net = lazy.model
        else:
            import transformers

            from artemis.sparse.checkpoint import _read_json

            archs = _read_json(source_dir / "config.json").get("architectures") or []
            cls = getattr(transformers, archs[0], None) if archs else None
            cls = cls or transformers.AutoModel
            net = cls.from_pretrained(str(source_dir), dtype="auto").eval()
    if source_dir is None:
        name = getattr(getattr(net, "config", None), "_name_or_path", None)
        if isinstance(name, str) and name and os.path.isdir(name):
            source_dir = Path(name)
    adapter = get_adapter(net)
    if adapter.blocks is None or len(adapter.blocks) == 0:
        raise ModelError(f"{type(net).__name__} has no transformer blocks; the one-shot pipeline prunes block by block")
    prefixes = adapter.block_prefixes()
    targets = find_targets(net, patterns=cfg.targets, exclude=cfg.exclude, block_prefixes=prefixes)
    outside = [t.name for t in targets if t.block_index is None]
    if outside:
        raise ConfigError(
            f"the one-shot pipeline prunes weights inside the transformer blocks; {outside[0]!r} is outside "
            f"({len(outside)} such targets, named by pruning.targets: no model has a default target outside its "
            "blocks): exclude it (pruning.exclude) or use manager.apply_pruning"
        )
    if lazy is not None:
        compute = lazy.device
        source: Any = _Streamed(lazy, prefixes)
        outer, largest, total = streaming_bytes(net, adapter.blocks)
        # never resident together: the outer parameters are mapped only while block 0's
        # inputs are captured (and copied a piece at a time at the end), the blocks come after
        need = max(outer, largest)
        if need > budget:
            raise ConfigError(
                f"max_memory {max_memory!r} ({budget / MIB:.1f} MiB) is below what streaming needs: the parameters "
                f"outside the blocks take {outer / MIB:.1f} MiB (mapped while the first block's inputs are "
                f"captured) and the largest block {largest / MIB:.1f} MiB (the whole model {total / MIB:.1f} MiB); "
                "raise max_memory"
            )
    else:
        home = next((p.device for p in net.parameters()), torch.device("cpu"))
        compute = torch.device(device) if device is not None else home
        source = _InMemory(net, adapter.blocks, compute)
    writer = None
    if output_dir is not None:
        from artemis.sparse.streaming import StreamingWriter

        # a structural method's smaller model is stored dense, as save_pruned stores it
        candidates = {t.key: t.name for t in targets} if cfg.method == "magnitude_progressive" else {}
        writer = StreamingWriter(output_dir, net, candidates, source_dir=source_dir)
    was_training = net.training
    net.eval()
    rss0 = _peak_rss_bytes()
    if compute.type == "cuda":
        torch.cuda.reset_peak_memory_stats(compute)
    try:
        pipe = _pipeline_class(cfg)(cfg, net, source, targets, prefixes, data, compute, writer, progress)
        info = pipe.run()
        out_info = writer.close() if writer is not None else None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        net.train(was_training)
        if lazy is not None:
            source.release_outer()
            lazy.close()
        else:
            source.release_outer()
    act = 0
    if data:
        act = sum(_hidden_bytes(b, net) for b in data) * (3 if pipe.dense_target else 2) // 2
        act += getattr(pipe, "recon", {}).get("dense_input_bytes", 0)  # a block's kept dense target inputs
        if pipe.gradients:  # the backward sweep keeps every block's inputs
            act = max(act, sum(_hidden_bytes(b, net) for b in data) * (len(prefixes) + 1) // 2)
    extra = {
        "inputs": pipe.inputs if data else None,
        "streamed": lazy is not None,
        "max_memory_bytes": budget,
        "device": str(compute),
        "blocks": len(prefixes),
        "block_forwards": pipe.forwards,
        "capture_forwards": pipe.capture_forwards,
        "statistics_forwards": pipe.stats_forwards,
        "seconds": info["seconds"],
        "block_seconds": pipe.block_seconds,
        "peak_rss_bytes": _peak_rss_bytes(),
        "peak_rss_before_bytes": rss0,
        "peak_param_bytes": source.peak_bytes if lazy is not None else model_dense_bytes(net),
        "activation_bytes": act,
        "max_resident_blocks": pipe.max_resident_blocks if lazy is not None else len(prefixes),
        "output": out_info,
    }
    if compute.type == "cuda":
        extra["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated(compute))
    if not isinstance(pipe, _Pipeline):  # a method with its own pipeline and summary
        return pipe.summary(adapter.name, extra)
    return _summary(pipe, net, adapter.name, extra)


def streaming_bytes(model: nn.Module, blocks: Sequence[nn.Module]) -> tuple[int, int, int]:
    """``(outside the blocks, largest block, whole model)``: the parameter bytes that bound
    a streamed run (tied parameters counted once; meta parameters count their bytes)."""
    block_bytes = [sum(p.numel() * p.element_size() for p in dict.fromkeys(b.parameters())) for b in blocks]
    total = model_dense_bytes(model)
    return total - sum(block_bytes), max(block_bytes, default=0), total


def _hidden_bytes(batch: Any, model: nn.Module) -> int:
    """Bytes of one batch's hidden states (inputs and outputs of a block: 2 tensors)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    if hidden is None or not isinstance(ids, Tensor):
        return 0
    return 2 * ids.numel() * int(hidden) * 4
