"""Structured sparsity (``method: structured_sparsity``) through the one-shot block pipeline.

:func:`artemis.oneshot` hands a ``structured_sparsity`` config to
:class:`StructuredPipeline`, which removes attention heads and MLP neurons as
``manager.apply_pruning(s, batches)`` followed by ``manager.finalize()`` does, one block
resident at a time. :class:`~artemis.methods.structured.StructuredMethod` itself is set up
on the model (its config checks, its units, :meth:`~artemis.methods.structured.StructuredMethod.plan`'s
unit counts, all before anything changes) and does the scoring
(:meth:`~artemis.methods.structured.StructuredMethod.unit_scores`) and the choice; the
pipeline only runs the blocks.

``structured_widths: uniform`` (default): each block's choice needs only its own scores,
so one pass: each block is loaded; with ``activation`` the calibration batches run through
it with :class:`~artemis.metrics.activation.ActivationMetric` attached to its projections
(its outputs are the next block's inputs: the dense model's, as in the manager's
calibration pass, which runs before any unit is masked); its units are scored and the
lowest of each kind chosen; the block is shrunk
(:meth:`~artemis.arch.structures.StructureAdapter.shrink`), written and released.
``per_layer``: the units compete across blocks, so the scores of every block are gathered
first (one float per unit kept), the method chooses, and a second pass loads, shrinks and
writes each block. Then the method's
:meth:`~artemis.methods.structured.StructuredMethod.finish_removal` writes the widths into
the config (or ``artemis_structure``, as ``finalize()`` does), and the parameters outside
the blocks and the config are written: the folder ``save_pruned`` writes for the
finalized model. ``magnitude`` runs no forward pass.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> import artemis
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    >>> batches = [{"input_ids": torch.randint(0, 64, (2, 8))} for _ in range(2)]
    >>> cfg = {"pruning": {"method": "structured_sparsity", "final_sparsity": 0.5, "importance_metric": "activation"}}
    >>> s = artemis.oneshot(model, cfg, batches, progress=False)
    >>> model.config.num_key_value_heads, model.config.intermediate_size, s["pipeline"]["block_forwards"]
    (1, 32, 4)
"""

from __future__ import annotations

import time
import types
from typing import Any, Optional

import torch
import torch.nn as nn

from artemis.core.config import PruningConfig
from artemis.core.errors import CalibrationError
from artemis.core.sizing import MIB, layer_row, model_compressed_bytes, model_dense_bytes, unique_state_tensors
from artemis.core.targets import PrunableTarget
from artemis.data.pipeline import _block_output, _with_hidden
from artemis.data.pipeline_layers import WholeUnitPipeline, capture_inputs_per_block
from artemis.metrics.activation import ActivationMetric

__all__ = ["StructuredPipeline"]


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in dict.fromkeys(module.parameters()) if p.device.type != "meta")


class StructuredPipeline(WholeUnitPipeline):
    """``method: structured_sparsity`` block by block (see the module docstring)."""

    label = "structured"

    @staticmethod
    def method_class() -> Any:
        from artemis.methods.structured import StructuredMethod

        return StructuredMethod

    def __init__(self, cfg: PruningConfig, model: nn.Module, *args: Any) -> None:
        super().__init__(cfg, model, *args)
        StructuredMethod = self.method_class()
        prefixes = self.prefixes
        stand_in = types.SimpleNamespace(config=cfg, model=model, adapter=self.adapter, metric=self.metric, masks={})
        self.method = StructuredMethod(stand_in)  # type: ignore[arg-type]
        self.method.setup()  # its checks and plan: nothing changes yet
        self.sparsity = float(cfg.final_sparsity)
        self.target = self.method.one_shot_target_fn(self.sparsity)(self.sparsity)
        self.counts = self.method.plan(self.target)
        self.groups_of: list[list[int]] = [[] for _ in prefixes]
        for gi, g in enumerate(self.method.groups):
            self.groups_of[g.block_index].append(gi)
        self.targets_of: list[list[PrunableTarget]] = [[] for _ in prefixes]
        for t in self.method.targets:
            self.targets_of[t.block_index].append(t)
        self.baseline_bytes = model_dense_bytes(model)
        self.params_before = self.method.params_before
        self.scores: list[Optional[torch.Tensor]] = [None] * len(self.method.groups)
        self.chosen: list[set[int]] = [set() for _ in self.method.groups]
        self.rows: dict[str, dict] = {}

    @torch.no_grad()
    def _score(self, i: int, state: dict) -> None:
        """The unit scores of block ``i``'s groups; with ``activation`` the block runs every
        batch (the statistics, and its outputs: the next block's inputs)."""
        groups = [self.method.groups[gi] for gi in self.groups_of[i]]
        if self.cfg.importance_metric != "activation":
            scores = self.method.unit_scores(self.metric, groups)
        else:
            block = self.blocks[i]
            metric = ActivationMetric(**self.cfg.metric_options)
            metric.attach(self.model, self.targets_of[i])
            try:
                outs = []
                for b, x in enumerate(state["hidden"]):
                    args, kwargs = _with_hidden(*state["records"][b][i], x)
                    with metric.calibrating(self.calibration[b]):
                        y = _block_output(block(*args, **kwargs))
                    self.forwards += 1
                    if not torch.isfinite(y).all():
                        raise CalibrationError(
                            f"the block's output for calibration batch {b} has NaN or infinite values"
                        )
                    outs.append(y)
                metric.check_ready()
                scores = self.method.unit_scores(metric, groups)
            finally:
                metric.detach()
            state["hidden"] = outs if i < len(self.prefixes) - 1 else []
        for gi, sc in zip(self.groups_of[i], scores):
            self.scores[gi] = sc

    def _shrink_and_write(self, i: int) -> None:
        """Block ``i`` without its chosen units (the method's structure adapter rebuilds its
        projections), written under its name; its summary rows recorded."""
        method = self.method
        block = self.blocks[i]
        before = _param_bytes(block)
        for gi in self.groups_of[i]:
            g = method.groups[gi]
            keep = [u for u in range(g.num_units) if u not in self.chosen[gi]]
            method.structures.shrink(self.model, g, keep)
        if self.source.streamed:  # the rebuilt projections are smaller than what was read
            self.source.lazy.live_bytes -= before - _param_bytes(block)
        for t in self.targets_of[i]:
            p = self.model.get_submodule(t.name).get_parameter(t.param_name)
            self.rows[t.name] = layer_row(t.name, p, p.numel() - int(torch.count_nonzero(p)))
        if self.writer is not None:
            for name, t in unique_state_tensors(block):
                self.writer.add(f"{self.prefixes[i]}.{name}", t)

    def run(self) -> dict[str, Any]:
        src = self.source
        start = time.perf_counter()
        src.load_outer()
        state: dict[str, Any] = {}
        if self.cfg.importance_metric == "activation":
            with src.capturing():
                hidden, records = capture_inputs_per_block(self.model, self.blocks, self.calibration, self.device)
            self.capture_forwards += len(records)
            state = {"records": records, "hidden": hidden}
        method = self.method
        if method.uniform:  # each block's choice is its own: one pass

            def one_pass(i: int) -> None:
                self._score(i, state)
                for gi in self.groups_of[i]:
                    k = self.counts[method.groups[gi].kind]
                    self.chosen[gi] = method._lowest(self.scores[gi], set(), k)
                self._shrink_and_write(i)

            self._each_block(list(range(len(self.prefixes))), "prune", one_pass)
        else:  # per_layer: the units compete across blocks; every score first
            self._each_block(list(range(len(self.prefixes))), "statistics", lambda i: self._score(i, state))
            self.stats_forwards = self.forwards
            self.chosen = method.choose(self.counts, self.scores, [set() for _ in method.groups])
            self._each_block(list(range(len(self.prefixes))), "prune", self._shrink_and_write)
        if method.uniform:
            self.stats_forwards = 0
        method.finish_removal(self.chosen, self.params_before)  # the config's widths, the counts
        if self.writer is not None:
            inside = tuple(f"{p}." for p in self.prefixes)
            for name, t in unique_state_tensors(self.model):
                if not name.startswith(inside):
                    src.write_outer(self.writer, name, t)
        return {"seconds": time.perf_counter() - start}

    # ----------------------------------------------------------------- summary
    def summary(self, adapter_name: str, extra: dict[str, Any]) -> dict[str, Any]:
        """The shape of ``manager.get_pruning_summary()`` after ``apply_pruning`` and
        ``finalize()`` with this method, plus ``pipeline``."""
        cfg = self.cfg
        method = self.method
        removed, prunable = method.parameter_counts()
        compressed = model_compressed_bytes(self.model, [])
        dense = self.baseline_bytes
        metrics: dict[str, Any] = {
            "model_size_reduction": 1.0 - compressed / dense if dense else 0.0,
            "current_sparsity": removed / prunable if prunable else 0.0,
            "parameters_pruned": removed,
            "parameters_prunable": prunable,
            "target_sparsity": self.target,
            "baseline_model_size_mb": dense / MIB,
            "compressed_model_size_mb": compressed / MIB,
            "pruning_events": 1,
            "mask_memory_mb": 0.0,
        }
        method.update_pruning_metrics(metrics)
        summary: dict[str, Any] = {
            "enabled": cfg.enabled,
            "method": cfg.method,
            "importance_metric": cfg.importance_metric,
            "schedule": cfg.schedule,
            "scope": method.scope(self.metric),
            "architecture": adapter_name,
            "step": 0,
            "total_steps": None,
            "finalized": True,
            "target_sparsity": self.target,
            "final_sparsity": cfg.final_sparsity,
            "measured_sparsity": metrics["current_sparsity"],
            "pruning_metrics": metrics,
            "layers": [self.rows[t.name] for t in method.targets],
        }
        summary.update(method.summary())
        summary["pipeline"] = extra
        return summary
