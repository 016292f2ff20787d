"""Layer dropout (``method: layer_dropout``) through the one-shot block pipeline.

:func:`artemis.oneshot` hands a ``layer_dropout`` config to :class:`LayerDropoutPipeline`,
which removes whole blocks as ``manager.apply_pruning(s, batches)`` followed by
``manager.finalize()`` does, one block resident at a time:

1. **Statistics pass**, every block once, in order. ``activation`` (Block Influence): the
   calibration batches run until block 0 is called (its inputs are recorded, as for the
   other methods), then each block runs on the previous block's outputs and adds, per
   batch, :func:`~artemis.metrics.blocks.influence_terms` of its input and output hidden
   states (every token, padding included, as the method's own hooks do). The inputs are
   the dense model's: a one-shot prune drops no block before the scores are known, so the
   manager's calibration pass sees the same activations. ``magnitude``: the L2 norm of
   each block's parameters (:func:`~artemis.metrics.blocks.layer_magnitude`), read while
   the block is loaded; no data.
2. **Choice**: :class:`~artemis.methods.layer_dropout.LayerDropoutMethod` itself, set up on
   the model (its config checks, its layer count ``round_half_up(s·L)``, its refusals of
   models whose blocks cannot be removed) and given the scores: its ``compute_masks``
   picks the blocks, its ``summary`` describes them.
3. **Copy pass** (with ``output_dir``): each kept block is loaded again and written under
   its new index; then the method's ``finalize`` removes the dropped blocks from the model
   (renumbered ``layer_idx``, ``num_hidden_layers`` and the per-layer config lists updated,
   :func:`~artemis.arch.layers.remove_blocks`), and the parameters outside the blocks and
   the config are written. A module passed in memory is edited in place; a streamed
   checkpoint's model stays on ``meta`` and only its config changes.

``gradient_sensitivity`` (``Σ|w·g|`` over every parameter of a block, from the whole
model's loss) is refused by :func:`~artemis.data.pipeline.unsupported_setting`.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> import artemis
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)).eval()
    >>> batches = [{"input_ids": torch.randint(0, 64, (2, 8))} for _ in range(2)]
    >>> cfg = {"pruning": {"method": "layer_dropout", "final_sparsity": 0.5, "importance_metric": "activation"}}
    >>> s = artemis.oneshot(model, cfg, batches, progress=False)
    >>> len(s["layers_dropped"]), model.config.num_hidden_layers, s["pipeline"]["block_forwards"]
    (2, 2, 8)
"""

from __future__ import annotations

import abc
import time
import types
from typing import Any, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from artemis.arch import get_adapter
from artemis.core.config import PruningConfig
from artemis.core.errors import CalibrationError
from artemis.core.sizing import MIB, model_dense_bytes, unique_state_tensors
from artemis.core.targets import PrunableTarget
from artemis.data.pipeline import (
    BlockError,
    _block_output,
    _with_hidden,
    capture_inputs_per_block,
)
from artemis.metrics.blocks import LayerImportance, influence_terms, layer_magnitude

__all__ = ["LayerDropoutPipeline", "capture_inputs_per_block"]


class _Gathered(LayerImportance):
    """Layer scores gathered by the pipeline (``magnitude`` of a streamed checkpoint: the
    method's own parameter lists are on ``meta`` there)."""

    def __init__(self, name: str, scores: dict[int, float]) -> None:
        super().__init__(name)
        self.scores = scores

    def layer_scores(self, layers: Any) -> dict[int, float]:
        return {i: self.scores[i] for i in layers}


class WholeUnitPipeline(abc.ABC):
    """What the pipelines of the methods that remove whole units (blocks, heads, neurons)
    share: built by :func:`artemis.oneshot` with the arguments of its masking pipeline, the
    method's own metric made from the config (``method_class().create_metric``); nothing is
    changed before ``run``. Their blocks always see the dense model's inputs."""

    dense_target = False
    gradients = False
    inputs = "dense"
    label = "one-shot"  # the progress bar's name

    @staticmethod
    @abc.abstractmethod
    def method_class() -> Any:
        """The method class whose metric, checks and choices the pipeline uses."""

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
        self.prefixes = prefixes
        self.adapter = get_adapter(model)
        self.blocks = self.adapter.blocks
        self.calibration = calibration or []
        self.device, self.writer, self.progress = device, writer, progress
        self.metric = self.method_class().create_metric(cfg.importance_metric, **cfg.metric_options)
        self.forwards = self.stats_forwards = self.capture_forwards = 0
        self.block_seconds: list[float] = []
        self.max_resident_blocks = 0

    # ------------------------------------------------------------------ passes
    def _each_block(self, indices: list[int], what: str, work: Any) -> None:
        """``work(i)`` for each block index with the block loaded; a failure is a BlockError."""
        src = self.source
        bar = tqdm(
            total=len(indices),
            desc=f"{self.label} ({what})",
            unit="block",
            disable=None if self.progress is None else not self.progress,
        )
        try:
            for i in indices:
                t0 = time.perf_counter()
                prefix = self.prefixes[i]
                try:
                    src.load_block(i)
                    if src.streamed:
                        self.max_resident_blocks = max(self.max_resident_blocks, self._resident_blocks())
                    work(i)
                except BlockError:
                    raise
                except Exception as exc:
                    raise BlockError(
                        f"one-shot pipeline ({what}): block {i} ({prefix}) failed: {type(exc).__name__}: {exc}",
                        i,
                        prefix,
                    ) from exc
                finally:
                    src.release_block(i)
                self.block_seconds.append(time.perf_counter() - t0)
                bar.set_postfix(block=i, seconds=f"{self.block_seconds[-1]:.2f}")
                bar.update(1)
        finally:
            bar.close()

    def _resident_blocks(self) -> int:
        return sum(1 for b in self.blocks if any(p.device.type != "meta" for p in b.parameters()))


class LayerDropoutPipeline(WholeUnitPipeline):
    """``method: layer_dropout`` block by block (see the module docstring)."""

    label = "layer dropout"

    @staticmethod
    def method_class() -> Any:
        from artemis.methods.layer_dropout import LayerDropoutMethod

        return LayerDropoutMethod

    def __init__(self, cfg: PruningConfig, model: nn.Module, *args: Any) -> None:
        super().__init__(cfg, model, *args)
        LayerDropoutMethod = self.method_class()
        # the method's setup: its config checks, the layer count, the removal checks (nothing changes)
        stand_in = types.SimpleNamespace(config=cfg, model=model, adapter=self.adapter, metric=self.metric)
        self.method = LayerDropoutMethod(stand_in)  # type: ignore[arg-type]
        self.method.setup()
        self.baseline_bytes = model_dense_bytes(model)
        # the parameters each block's magnitude counts (the method's block_params: none of an earlier
        # block), by name: a streamed block's parameters are new objects at every load
        self.own_params: list[list[str]] = []
        for block, params in zip(self.blocks, self.method.block_params):
            ids = {id(p) for p in params}
            self.own_params.append([n for n, p in block.named_parameters() if id(p) in ids])
        self.target = 0.0

    @torch.no_grad()
    def _statistics(self) -> LayerImportance:
        """The statistics pass: every block's score, in a metric the method can read."""
        n = len(self.prefixes)
        if self.cfg.importance_metric == "magnitude":
            scores: dict[int, float] = {}

            def magnitude(i: int) -> None:
                block = self.blocks[i]
                scores[i] = layer_magnitude([block.get_parameter(n) for n in self.own_params[i]])

            self._each_block(list(range(n)), "statistics", magnitude)
            return _Gathered("magnitude", scores)

        metric = self.metric  # activation: the method's own sums and counts, filled as its hooks fill them
        metric.bind(self.method)
        with self.source.capturing():
            hidden, records = capture_inputs_per_block(self.model, self.blocks, self.calibration, self.device)
        self.capture_forwards += len(records)
        state = {"hidden": hidden}  # block i's inputs, one tensor per batch

        def influence(i: int) -> None:
            block = self.blocks[i]
            outs = []
            for b, x in enumerate(state["hidden"]):
                args, kwargs = _with_hidden(*records[b][i], x)
                y = _block_output(block(*args, **kwargs))
                self.forwards += 1
                self.stats_forwards += 1
                if not torch.isfinite(y).all():
                    raise CalibrationError(f"the block's output for calibration batch {b} has NaN or infinite values")
                if i < n - 1:
                    outs.append(y)
                if x.shape == y.shape:
                    s, c = influence_terms(x, y)
                    metric.sums[i] = metric.sums.get(i, 0.0) + s
                    metric.counts[i] = metric.counts.get(i, 0) + c
            state["hidden"] = outs

        self._each_block(list(range(n)), "statistics", influence)
        return metric

    def run(self) -> dict[str, Any]:
        src = self.source
        start = time.perf_counter()
        src.load_outer()
        scorer = self._statistics()
        sparsity = self.cfg.final_sparsity
        target_fn = self.method.one_shot_target_fn(sparsity)
        self.method.compute_masks(target_fn, scorer)  # the method's choice (it gates the dropped blocks)
        self.target = target_fn(sparsity)
        keep = self.method.active_layers()
        writer = self.writer
        if writer is not None:
            new_prefix = {old: self.prefixes[new] for new, old in enumerate(keep)}

            def copy(i: int) -> None:
                for name, t in unique_state_tensors(self.blocks[i]):
                    writer.add(f"{new_prefix[i]}.{name}", t)

            self._each_block(keep, "copy", copy)
        self.method.finalize()  # the dropped blocks removed, the config updated
        if writer is not None:
            inside = tuple(f"{p}." for p in self.prefixes)
            for name, t in unique_state_tensors(self.model):
                if not name.startswith(inside):
                    src.write_outer(writer, name, t)
        return {"seconds": time.perf_counter() - start}

    # ----------------------------------------------------------------- summary
    def summary(self, adapter_name: str, extra: dict[str, Any]) -> dict[str, Any]:
        """The shape of ``manager.get_pruning_summary()`` after ``apply_pruning`` and
        ``finalize()`` with this method, plus ``pipeline``."""
        cfg = self.cfg
        metrics: dict[str, Any] = {
            "target_sparsity": self.target,
            "baseline_model_size_mb": self.baseline_bytes / MIB,
            "pruning_events": 1,
            "mask_memory_mb": 0.0,
        }
        self.method.update_pruning_metrics(metrics)
        summary: dict[str, Any] = {
            "enabled": cfg.enabled,
            "method": cfg.method,
            "importance_metric": cfg.importance_metric,
            "schedule": cfg.schedule,
            "scope": self.method.scope(self.metric),
            "architecture": adapter_name,
            "step": 0,
            "total_steps": None,
            "finalized": True,
            "target_sparsity": self.target,
            "final_sparsity": cfg.final_sparsity,
            "measured_sparsity": metrics["current_sparsity"],
            "pruning_metrics": metrics,
        }
        summary.update(self.method.summary())
        summary["pipeline"] = extra
        return summary
