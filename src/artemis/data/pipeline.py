"""One-shot pruning block by block: time linear in depth, one block resident at a time.

:func:`oneshot` prunes a model once, to the config's ``final_sparsity``, with the methods
that choose masks inside each transformer block (``magnitude_progressive`` with the
``magnitude`` or ``activation`` (Wanda) metric, ``scope`` ``row``/``layer``, an N:M
``pattern``, ``global`` for ``magnitude``) and the SparseGPT reconstruction
(``reconstruction: sparsegpt``). The pipeline:

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

So each block runs each batch at most twice (once without calibration statistics to
gather); the old SparseGPT path re-ran every batch from the embeddings up to every layer.
With ``max_memory`` a checkpoint folder is opened lazily
(:class:`~artemis.sparse.streaming.LazyCheckpoint`): the parameters outside the blocks
(embeddings, final norm, head) are read once, each block is read before its turn and freed
after it was written, so the parameters resident at any time are one block plus the rest.

Differences from ``manager.apply_pruning`` (see ``docs/oneshot.md``): with
``pipeline_inputs: pruned`` the statistics of block ``k`` come from the pruned blocks
before it; SparseGPT gathers the Hessians of a block's layers in one pass from the
block's input (the reference implementation's choice), where ``reconstruct_layers``
updates them one after another inside the block. With ``pipeline_inputs: dense`` the
``activation`` masks are exactly those of ``apply_pruning``.

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
from tqdm.auto import tqdm

from artemis.arch import get_adapter, unwrap_model
from artemis.core.config import PruningConfig, load_pruning_config
from artemis.core.errors import ArtemisError, CalibrationError, ConfigError, ModelError
from artemis.core.masks import count_to_prune, global_masks, layer_mask, nm_masks, row_masks
from artemis.core.sizing import MIB, layer_row, model_compressed_bytes, model_dense_bytes, unique_state_tensors
from artemis.core.targets import PrunableTarget, find_targets, match_pattern
from artemis.data.calibration import _check_batch, check_calibration_batches, describe_batch, forward_batch
from artemis.methods.pipeline_options import OneShotOptions
from artemis.methods.sparsegpt import HessianAccumulator, layer_inputs_2d, reconstruction_extra_bytes, sparsegpt_prune
from artemis.metrics.activation import ActivationMetric
from artemis.metrics.base import METRICS
from artemis.metrics.magnitude import magnitude_scores

__all__ = [
    "oneshot",
    "BlockError",
    "parse_memory_size",
    "capture_block_inputs",
    "unsupported_setting",
    "PIPELINE_METRICS",
]

logger = logging.getLogger(__name__)

#: metrics the pipeline scores inside a block (others raise, naming the metric)
PIPELINE_METRICS = ("magnitude", "activation")


class BlockError(ArtemisError, RuntimeError):
    """A block of the one-shot pipeline failed; ``block_index``/``block_name`` say which."""

    def __init__(self, message: str, block_index: int, block_name: str) -> None:
        super().__init__(message)
        self.block_index = block_index
        self.block_name = block_name


class _InputsCaptured(Exception):
    """Raised by the pre-hook on block 0 once its inputs are recorded (ends the pass)."""


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


def _block_output(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    h = getattr(out, "last_hidden_state", None)
    if isinstance(h, Tensor):
        return h
    raise ModelError(f"a block returned {type(out).__name__}; the pipeline needs its hidden states (a tensor)")


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
            _check_batch(batch, i)
            if (
                isinstance(batch, Mapping)
                and "use_cache" not in batch
                and hasattr(getattr(model, "config", None), "use_cache")
            ):
                batch = {**batch, "use_cache": False}
            try:
                forward_batch(model, batch, device)
            except _InputsCaptured:
                continue
            except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as exc:
                raise CalibrationError(
                    f"calibration batch {i} ({describe_batch(batch)}) failed in the model before the first block: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            raise CalibrationError(f"calibration batch {i} ran through the model without calling its first block")
    finally:
        handle.remove()
    return captured


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

    def load_block(self, i: int) -> None:
        self.blocks[i].to(self.device)

    def release_block(self, i: int) -> None:
        self.blocks[i].to(self.home)

    def read(self, t: PrunableTarget) -> Tensor:
        return t.param


class _Streamed:
    """The model is on ``meta``; parameters are read from the checkpoint when needed."""

    streamed = True

    def __init__(self, lazy: Any, prefixes: list[str]) -> None:
        self.lazy = lazy
        self.model = lazy.model
        self.prefixes = prefixes
        names = [n for n, _ in lazy.model.named_parameters(remove_duplicate=False)]
        names += [n for n, _ in lazy.model.named_buffers()]
        self.block_names = [[n for n in names if n.startswith(p + ".")] for p in prefixes]
        inside = {n for group in self.block_names for n in group}
        self.outer_names = [n for n in names if n not in inside]

    @property
    def live_bytes(self) -> int:
        return self.lazy.live_bytes

    @property
    def peak_bytes(self) -> int:
        return self.lazy.peak_bytes

    def load_outer(self) -> None:
        self.lazy.materialise(self.outer_names)

    def release_outer(self) -> None:
        self.lazy.release(self.outer_names)

    def load_block(self, i: int) -> None:
        self.lazy.materialise(self.block_names[i])

    def release_block(self, i: int) -> None:
        self.lazy.release(self.block_names[i])

    def read(self, t: PrunableTarget) -> Tensor:
        return self.lazy.read(t.key)


# ---------------------------------------------------------------- the pipeline
def unsupported_setting(cfg: PruningConfig) -> Optional[str]:
    """Why the one-shot pipeline cannot prune with ``cfg`` (the setting named), or None.

    Example:
        >>> unsupported_setting(load_pruning_config({"pruning": {"importance_metric": "activation"}})) is None
        True
        >>> unsupported_setting(load_pruning_config({"pruning": {"method": "layer_dropout"}}))[:26]
        "method 'layer_dropout' is "
    """
    if cfg.method != "magnitude_progressive":
        return (
            f"method {cfg.method!r} is not supported by the one-shot pipeline yet (it supports "
            "'magnitude_progressive'); prune it with create_pruning_manager(config, model).apply_pruning(s, batches)"
        )
    metric = cfg.importance_metric
    if metric not in PIPELINE_METRICS:
        return (
            f"importance_metric {metric!r} is not supported by the one-shot pipeline yet (it supports "
            f"{', '.join(map(repr, PIPELINE_METRICS))}); use manager.apply_pruning(s, calibration_data)"
        )
    if cfg.scope == "owl":
        return (
            "scope 'owl' is not supported by the one-shot pipeline yet (its per-block sparsities need the "
            "outlier statistics of every block first); use manager.apply_pruning(s, calibration_data)"
        )
    if cfg.scope == "global" and metric != "magnitude" and cfg.pattern is None:
        return (
            f"scope 'global' with importance_metric {metric!r} is not supported by the one-shot pipeline yet "
            "(one threshold over all blocks needs every block's statistics first); use scope 'row' or 'layer', "
            "or manager.apply_pruning(s, calibration_data)"
        )
    if cfg.reconstruction != "none" and cfg.sparsegpt_target != "pruned":
        return (
            f"sparsegpt_target {cfg.sparsegpt_target!r} is not supported by the one-shot pipeline yet; "
            "use sparsegpt_target: pruned, or manager.apply_pruning(s, calibration_data)"
        )
    return None


def _check_supported(cfg: PruningConfig, calibration: Optional[list]) -> None:
    reason = unsupported_setting(cfg)
    if reason is not None:
        raise ConfigError(reason)
    metric = cfg.importance_metric
    if calibration is None and (metric != "magnitude" or cfg.reconstruction != "none"):
        need = (
            f"reconstruction: {cfg.reconstruction}" if cfg.reconstruction != "none" else f"importance_metric {metric!r}"
        )
        raise CalibrationError(f"{need} needs calibration batches: pass calibration_data to oneshot()")


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
        self.forwards = 0
        self.block_seconds: list[float] = []
        self.max_resident_blocks = 0
        self.recon = {"layers": 0, "seconds": 0.0, "peak_extra_bytes": 0, "tokens": 0}

    # ---------------------------------------------------------------- masks
    def _global_masks(self) -> dict[str, Tensor]:
        """``scope: global`` with ``magnitude``: one threshold per sparsity group over all
        blocks, from the weights read one at a time (in memory or from the checkpoint)."""
        groups: "OrderedDict[float, list[PrunableTarget]]" = OrderedDict()
        for t in self.targets:
            groups.setdefault(self.finals[t.key], []).append(t)
        out: dict[str, Tensor] = {}
        for sparsity, ts in groups.items():
            fns = [lambda t=t: magnitude_scores(self.source.read(t)) for t in ts]
            for t, m in zip(ts, global_masks(fns, [t.numel for t in ts], sparsity)):
                out[t.key] = m.cpu()
        return out

    def _block_masks(self, ts: list[PrunableTarget], metric: Any) -> dict[str, Tensor]:
        cfg = self.cfg
        masks: dict[str, Tensor] = {}
        for t in ts:
            scores = metric.score(t) if metric is not None else magnitude_scores(t.param)
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
            if metric is not None:
                with metric.calibrating(batch):
                    y = _block_output(block(*args, **kwargs))
            else:
                y = _block_output(block(*args, **kwargs))
            self.forwards += 1
            if not torch.isfinite(y).all():
                raise CalibrationError(f"the block's output for calibration batch {b} has NaN or infinite values")
            outs.append(y)
        return outs

    @torch.no_grad()
    def _process_block(self, i: int, stream: Optional[list], precomputed: Optional[dict]) -> Optional[list]:
        cfg = self.cfg
        block = self.blocks[i]
        ts = self.by_block[i]
        needs_stats = stream is not None and (cfg.importance_metric == "activation" or cfg.reconstruction != "none")
        metric = None
        accs: dict[str, HessianAccumulator] = {}
        handles: list[Any] = []
        hooks_state: dict[str, Any] = {"token_mask": None}
        dense_out: Optional[list] = None
        try:
            if needs_stats:
                if cfg.importance_metric == "activation":
                    metric = ActivationMetric(**cfg.metric_options)
                    metric.attach(self.model, ts)
                if cfg.reconstruction != "none":
                    for t in ts:
                        cols = t.rows_view(t.param).shape[1]
                        acc = accs[t.key] = HessianAccumulator(cols, device=t.param.device)

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
            else:
                masks = self._block_masks(ts, metric)
        finally:
            if metric is not None:
                metric.detach()
        if cfg.reconstruction != "none":
            self._reconstruct(ts, masks, accs)
        for t in ts:
            t.param.mul_(masks[t.key])
            self.zeros[t.key] = t.param.numel() - int(torch.count_nonzero(t.param))
        if stream is None or i == len(self.prefixes) - 1:
            return None
        if self.inputs == "dense" and dense_out is not None:
            return dense_out
        return self._run(block, stream, self.batches, i, None, hooks_state)

    def _reconstruct(self, ts: list[PrunableTarget], masks: dict[str, Tensor], accs: dict) -> None:
        cfg = self.cfg
        start = time.perf_counter()
        for t in ts:
            acc = accs[t.key]
            if acc.count == 0:
                raise CalibrationError(f"no calibration token reached layer {t.name}; the block never called it")
            h = acc.hessian()
            if not torch.isfinite(h).all():
                raise CalibrationError(f"the input Hessian of layer {t.name} has NaN or infinite values")
            weight = t.rows_view(t.param)
            mask = t.rows_view(masks[t.key])
            if cfg.sparsegpt_mask == "metric":
                new_w, _ = sparsegpt_prune(
                    weight, h, mask=mask, blocksize=cfg.sparsegpt_blocksize, dampening=cfg.sparsegpt_dampening
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
                    dampening=cfg.sparsegpt_dampening,
                    per_row=cfg.sparsegpt_obs_scope == "row",
                )
                masks[t.key] = t.rows_view(keep).contiguous()
            t.param.copy_(t.rows_view(new_w))
            self.recon["layers"] += 1
            self.recon["tokens"] = acc.count
            self.recon["peak_extra_bytes"] = max(
                self.recon["peak_extra_bytes"],
                reconstruction_extra_bytes(weight.shape[0], weight.shape[1], cfg.sparsegpt_blocksize),
            )
            del h
        self.recon["seconds"] += time.perf_counter() - start

    def _resident_blocks(self) -> int:
        return sum(1 for b in self.blocks if any(p.device.type != "meta" for p in b.parameters()))

    def run(self) -> dict[str, Any]:
        src = self.source
        src.load_outer()
        stream = None
        self.batches = self.calibration or []
        precomputed = self._global_masks() if (self.scope == "global" and self.cfg.nm_pattern is None) else None
        needs_data = self.cfg.importance_metric != "magnitude" or self.cfg.reconstruction != "none"
        start = time.perf_counter()
        if needs_data:
            stream = capture_block_inputs(self.model, self.blocks[0], self.batches, self.device)
            self.forwards_capture = len(stream)
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
                except BlockError:
                    raise
                except Exception as exc:
                    raise BlockError(
                        f"one-shot pipeline: block {i} ({prefix}) failed: {type(exc).__name__}: {exc}", i, prefix
                    ) from exc
                finally:
                    src.release_block(i)
                if outs is not None:
                    stream = [_with_hidden(a, k, y) for (a, k), y in zip(stream, outs)]
                self.block_seconds.append(time.perf_counter() - t0)
                bar.set_postfix(block=i, seconds=f"{self.block_seconds[-1]:.2f}")
                bar.update(1)
        finally:
            bar.close()
        if self.writer is not None:
            block_names = {f"{p}." for p in self.prefixes}
            for name, t in unique_state_tensors(self.model):
                if not any(name.startswith(b) for b in block_names):
                    self.writer.add(name, t)
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
    if cfg.reconstruction != "none":
        summary["reconstruction"] = cfg.reconstruction
        summary["last_reconstruction"] = {
            **pipe.recon,
            "select": cfg.sparsegpt_mask,
            "target": cfg.sparsegpt_target,
            "dense_copy_bytes": 0,
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
            ``magnitude_progressive`` with ``magnitude`` or ``activation``, ``scope``
            ``row``/``layer`` (``global`` for ``magnitude``), N:M ``pattern``,
            ``layer_sparsity``, ``reconstruction: sparsegpt`` (``sparsegpt_target:
            pruned``) and ``pipeline_inputs`` (:class:`~artemis.methods.pipeline_options.OneShotOptions`).
            Anything else raises :class:`~artemis.core.errors.ConfigError` naming it.
        calibration_data: batches (dicts of tensors or tensors, as ``apply_pruning``);
            needed by ``activation`` and the reconstruction; ignored (with a warning) by
            plain ``magnitude``.
        output_dir: when given, the pruned model is written there in the
            :func:`~artemis.save_pruned` format, block by block, into a temporary
            sibling folder renamed into place at the end (an error leaves nothing there).
        max_memory: bytes (or ``"8GiB"``-style) the parameters may take: a checkpoint
            folder is then streamed (one block resident at a time, plus the embeddings
            and the other parameters outside the blocks); a ``ConfigError`` when that
            does not fit.
        device: where the blocks are computed (default: the model's device; CPU for a
            streamed folder).
        progress: a tqdm bar over the blocks (default: on a terminal).

    Returns:
        The summary of ``manager.get_pruning_summary()``'s shape, plus ``pipeline``:
        ``{"inputs", "streamed", "blocks", "block_forwards", "capture_forwards", "seconds",
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
    if data is not None and cfg.importance_metric == "magnitude" and cfg.reconstruction == "none":
        logger.warning("importance_metric 'magnitude' without reconstruction needs no calibration data; not read")
        data = None
    _check_supported(cfg, data)
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
            f"({len(outside)} such targets): exclude it (pruning.exclude) or use manager.apply_pruning"
        )
    if lazy is not None:
        compute = lazy.device
        source: Any = _Streamed(lazy, prefixes)
        block_bytes = [sum(p.numel() * p.element_size() for p in dict.fromkeys(b.parameters())) for b in adapter.blocks]
        total = model_dense_bytes(net)
        need = total - sum(block_bytes) + max(block_bytes)
        if need > budget:
            raise ConfigError(
                f"max_memory {max_memory!r} ({budget / MIB:.1f} MiB) is below what streaming needs: the parameters "
                f"outside the blocks plus the largest block take {need / MIB:.1f} MiB (the whole model "
                f"{total / MIB:.1f} MiB); raise max_memory"
            )
    else:
        home = next((p.device for p in net.parameters()), torch.device("cpu"))
        compute = torch.device(device) if device is not None else home
        source = _InMemory(net, adapter.blocks, compute)
    writer = None
    if output_dir is not None:
        from artemis.sparse.streaming import StreamingWriter

        candidates = {t.key: t.name for t in targets}
        writer = StreamingWriter(output_dir, net, candidates, source_dir=source_dir)
    was_training = net.training
    net.eval()
    rss0 = _peak_rss_bytes()
    if compute.type == "cuda":
        torch.cuda.reset_peak_memory_stats(compute)
    pipe = _Pipeline(cfg, net, source, targets, prefixes, data, compute, writer, progress)
    try:
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
        act = sum(_hidden_bytes(b, net) for b in data)
    extra = {
        "inputs": pipe.inputs if data else None,
        "streamed": lazy is not None,
        "max_memory_bytes": budget,
        "device": str(compute),
        "blocks": len(prefixes),
        "block_forwards": pipe.forwards,
        "capture_forwards": len(data) if data else 0,
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
    return _summary(pipe, net, adapter.name, extra)


def _hidden_bytes(batch: Any, model: nn.Module) -> int:
    """Bytes of one batch's hidden states (inputs and outputs of a block: 2 tensors)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    if hidden is None or not isinstance(ids, Tensor):
        return 0
    return 2 * ids.numel() * int(hidden) * 4
