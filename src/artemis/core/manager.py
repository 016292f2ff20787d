"""The pruning manager: the stateful lifecycle on top of the pure mask math.

Lifecycle::

    create_pruning_manager(config, model)     # validate, find targets; nothing changed yet
      └─ step(total_steps)   × many           # after backward(); prunes at pruning events
         apply_mask_to_gradients()            # optional: the optimizer hook enforces masks anyway
         optimizer.step()                     # hooks: clear pruned optimizer state, re-apply masks
      └─ finalize()                           # fold masks, remove every hook, (shrink the model)
      └─ prepare_for_quantization()           # finalize() + ready for int8

One-shot use: ``apply_magnitude_pruning(s)`` or ``apply_pruning(s, calibration_data)``.

Masks are kept on the weight's device as ``torch.bool`` tensors (one byte per prunable
weight), or bit-packed (one bit per weight, unpacked where a mask is applied) with
``packed_masks: true`` (:class:`~artemis.core.masks.MaskStore`); reading
``manager.masks[key]`` always gives a bool mask.

Keeping pruned weights at zero needs no call from the user: a global
optimizer *pre*-step hook zeroes the pruned entries of every optimizer state tensor
shaped like the weight (momentum, Adam moments) the first time an optimizer steps
after a mask changed and zeroes the gradients of pruned weights before every step
(so ``apply_mask_to_gradients()`` is optional, though harmless), and a *post*-step hook multiplies each masked weight by its
mask after every ``optimizer.step()``. Only optimizers that subclass
``torch.optim.Optimizer`` are seen by these hooks; with any other optimizer call
``manager.apply_masks()`` after each of its steps.

Several processes (DDP, FSDP2 ``fully_shard``, ``accelerate``): create the manager on
every rank after wrapping the model, and call every method on every rank; see
:mod:`artemis.core.distributed` and ``docs/distributed.md``. Under FSDP2 masks are kept
for each rank's local shard only.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from artemis.arch import get_adapter, unwrap_model
from artemis.core.config import PruningConfig
from artemis.core.distributed import (
    _all_equal,
    check_no_fsdp1,
    inspect_sharding,
    is_distributed,
    is_dtensor,
    local_tensor,
    shard_like,
)
from artemis.core.errors import CalibrationError, CheckpointError, ConfigError, PruningStateError
from artemis.core.masks import MaskStore
from artemis.core.schedule import is_pruning_event, pruning_window, sparsity_at
from artemis.core.sizing import MIB, layer_row, model_compressed_bytes, model_dense_bytes
from artemis.core.targets import is_prunable_module
from artemis.data.calibration import check_calibration_batches, run_calibration
from artemis.methods import METHODS, PruningMethod
from artemis.metrics import METRICS, ImportanceMetric
from artemis.sparse.quantization import default_quant_targets, enable_fake_quant, prepare_model_for_quantization

__all__ = ["PruningManager", "STATE_FORMAT_VERSION"]

logger = logging.getLogger(__name__)

STATE_FORMAT_VERSION = 1


class PruningManager:
    """Drives pruning of one model over a training run (see the module docstring).

    Args:
        model: the model (a DDP/``torch.compile`` wrapper is unwrapped).
        config: a validated :class:`~artemis.core.config.PruningConfig`.
        total_steps: number of ``step()`` calls in the run; may instead be given to
            ``step()`` (or as ``config.total_steps``).

    Attributes:
        baseline_model_size: dense size of the model in MiB, at its own dtype, measured
            at creation.
        pruning_metrics: dict with ``model_size_reduction``, ``current_sparsity``,
            ``parameters_pruned``, ``parameters_prunable``, ``target_sparsity``,
            ``compressed_model_size_mb`` and ``pruning_events``; updated at every pruning
            event and by ``get_pruning_summary()``.
        masks: ``{parameter key: bool keep-mask}`` (a :class:`~artemis.core.masks.MaskStore`:
            bit-packed inside with ``packed_masks: true``, bool when read).
        calibration_data: the batches kept by :meth:`set_calibration_data` for the methods
            whose every pruning event needs them (None otherwise).
        last_reconstruction: the report of the last pruning event's
            ``PruningMethod.reconstruct`` (SparseGPT), or None.

    Example:
        >>> import torch.nn as nn
        >>> from artemis import create_pruning_manager
        >>> net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> mgr = create_pruning_manager({"pruning": {"targets": ["*"]}}, net)
        >>> mgr.apply_magnitude_pruning(0.5)
        >>> mgr.pruning_metrics["parameters_pruned"], mgr.pruning_metrics["parameters_prunable"]
        (160, 320)
    """

    def __init__(self, model: nn.Module, config: PruningConfig, *, total_steps: Optional[int] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, PruningConfig):
            raise TypeError(f"config must be a PruningConfig, got {type(config).__name__}")
        check_no_fsdp1(model)
        self.wrapped_model = model
        self.model = unwrap_model(model)
        self.config = config
        self.adapter = get_adapter(self.model)
        method_cls = METHODS.get(config.method)
        self.metric: ImportanceMetric = method_cls.create_metric(config.importance_metric, **config.metric_options)
        self.method: PruningMethod = method_cls(self)
        self.method.setup()
        self._params: dict[str, nn.Parameter] = self.method.masked_params()
        self._param_ids = {id(p): k for k, p in self._params.items()}
        #: FSDP2 layout of the prunable weights (None unless some are sharded DTensors).
        self.sharding = inspect_sharding(self._params)
        if self.sharding is not None and not self.method.supports_sharded_params:
            raise ConfigError(
                f"method {config.method!r} does not support parameters sharded by FSDP2 (fully_shard); "
                "use DDP, or a method that supports sharding (magnitude_progressive)"
            )
        if self.sharding is not None:
            self.method.check_sharding(self.sharding, self.metric)
        self.masks: MaskStore = MaskStore(packed=config.packed_masks)
        self._mask_version: dict[str, int] = {}
        self._opt_seen: "weakref.WeakKeyDictionary[Optimizer, dict[str, int]]" = weakref.WeakKeyDictionary()
        self._step = 0
        self._events = 0
        self._last_target = 0.0
        self._finalized = False
        self._grads_masked = False
        self._closed = False
        self.total_steps: Optional[int] = None
        ts = total_steps if total_steps is not None else config.total_steps
        if ts is not None:
            self._set_total_steps(ts)
        self.baseline_model_size = model_dense_bytes(self.model) / MIB
        self._hooks: list[Any] = []
        self._fake_quant: Any = None  # artemis.sparse.quantization.FakeQuantHandle while QAT is on
        # batches kept for methods that need them at every event (set_calibration_data, apply_pruning)
        self.calibration_data: Optional[list] = None
        self.last_reconstruction: Optional[dict[str, Any]] = None
        self.pruning_metrics: dict[str, Any] = {}
        self._refresh_metrics()
        if config.enabled:
            self._install()

    # ------------------------------------------------------------------ hooks
    def _install(self) -> None:
        ref = weakref.ref(self)

        def pre(opt: Optimizer, args: Any, kwargs: Any) -> None:
            mgr = ref()
            if mgr is not None:
                mgr._before_optimizer_step(opt)

        def post(opt: Optimizer, args: Any, kwargs: Any) -> None:
            mgr = ref()
            if mgr is not None:
                mgr._after_optimizer_step(opt)

        self._hooks.append(register_optimizer_step_pre_hook(pre))
        self._hooks.append(register_optimizer_step_post_hook(post))
        self.metric.attach(self.model, self.method.targets)
        self.method.install()

    def _enable_quantization_aware(self) -> None:
        """From ``pruning_end`` on, run the masked layers with fake-quantized int8 weights."""
        self._fake_quant = enable_fake_quant(self._quant_modules())

    def _quant_modules(self) -> list[nn.Module]:
        """The pruned ``Linear``/``Conv1D`` layers still in the model (QAT and int8 scales);
        for a method whose units are not such layers, every one inside the blocks."""
        present = set(self.model.modules())
        mods = [t.module for t in self.method.targets if t.module in present and is_prunable_module(t.module)]
        if not mods:
            mods = [self.model.get_submodule(n) for n in default_quant_targets(self.model)]
        return mods

    @property
    def quantization_aware_active(self) -> bool:
        """True while the masked layers run with fake-quantized int8 weights."""
        return self._fake_quant is not None

    def _remove_hooks(self) -> None:
        if self._fake_quant is not None:
            self._fake_quant.remove()
            self._fake_quant = None
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.metric.detach()
        self.method.remove()

    def _optimizer_params(self, opt: Optimizer) -> list[tuple[str, nn.Parameter]]:
        out = []
        for group in opt.param_groups:
            for p in group["params"]:
                key = self._param_ids.get(id(p))
                if key is not None:
                    out.append((key, p))
        return out

    @torch.no_grad()
    def _before_optimizer_step(self, opt: Optimizer) -> None:
        if not self.masks:
            return
        seen = self._opt_seen.setdefault(opt, {})
        for key, p in self._optimizer_params(opt):
            if key not in self.masks:
                continue
            mask_grad = p.grad is not None and not self._grads_masked
            mask_state = seen.get(key) != self._mask_version[key]
            if not (mask_grad or mask_state):
                continue  # no mask read: with packed masks that saves an unpack
            mask = self.masks[key]
            if mask_grad:
                local_tensor(p.grad).mul_(mask)
            if not mask_state:
                continue
            state = opt.state.get(p, {})
            for value in state.values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    local_tensor(value).mul_(mask)
            seen[key] = self._mask_version[key]

    @torch.no_grad()
    def _after_optimizer_step(self, opt: Optimizer) -> None:
        self._grads_masked = False
        if not self.masks:
            return
        for key, p in self._optimizer_params(opt):
            mask = self.masks.get(key)
            if mask is not None:
                local_tensor(p).mul_(mask)

    # --------------------------------------------------------------- schedule
    def _set_total_steps(self, total_steps: int) -> None:
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
            raise ConfigError(f"total_steps must be a positive integer, got {total_steps!r}")
        if self.total_steps is not None and total_steps != self.total_steps:
            raise ConfigError(
                f"total_steps changed from {self.total_steps} to {total_steps} during the run; "
                "the schedule is fixed once it has started"
            )
        self.total_steps = total_steps

    def _window(self, total_steps: int) -> tuple[int, int]:
        return pruning_window(self.config.pruning_start, self.config.pruning_end, total_steps)

    def target_sparsity_at(self, step: int, total_steps: Optional[int] = None) -> float:
        """Target sparsity (of the default group) at ``step`` of a run of ``total_steps``."""
        total = self._resolve_total(total_steps)
        t_s, t_e = self._window(total)
        c = self.config
        return sparsity_at(step, t_s, t_e, c.initial_sparsity, c.final_sparsity, c.schedule)

    def should_prune(self, step: int, total_steps: Optional[int] = None) -> bool:
        """True when masks are recomputed at ``step``."""
        total = self._resolve_total(total_steps)
        t_s, t_e = self._window(total)
        return is_pruning_event(step, t_s, t_e, self.config.pruning_interval)

    def _resolve_total(self, total_steps: Optional[int]) -> int:
        if total_steps is not None:
            return total_steps
        if self.total_steps is None:
            raise ConfigError(
                "total_steps is unknown: pass step(total_steps=N), create_pruning_manager(..., "
                "total_steps=N) or set pruning.total_steps"
            )
        return self.total_steps

    @property
    def current_step(self) -> int:
        """Number of ``step()`` calls so far."""
        return self._step

    # -------------------------------------------------------------- lifecycle
    def _check_active(self, what: str) -> None:
        if self._finalized:
            raise PruningStateError(
                f"{what}() called after finalize(); the pruning is already permanent"
                + (" (the manager was closed with close())" if self._closed else "")
            )

    def step(self, total_steps: Optional[int] = None) -> bool:
        """Advance the schedule by one training step; prune if this step is an event.

        Call it after ``loss.backward()`` and before ``optimizer.step()``.
        Returns True when masks were recomputed at this step.
        """
        self._check_active("step")
        if total_steps is not None:
            self._set_total_steps(total_steps)
        total = self._resolve_total(None)
        t = self._step
        pruned = False
        if self.config.enabled:
            self._check_calibration_data()  # fail at the first step, not at the first event
            t_s, t_e = self._window(total)
            if t <= t_e:  # statistics are only gathered while a pruning event is still to come
                self.metric.on_step()
            self.method.on_step()
            if is_pruning_event(t, t_s, t_e, self.config.pruning_interval):
                c = self.config
                self._prune(
                    lambda final: sparsity_at(t, t_s, t_e, c.initial_sparsity, final, c.schedule),
                    self.metric,
                )
                pruned = True
            if self.config.quantization_aware and t >= t_e and self._fake_quant is None:
                self._enable_quantization_aware()
        self._step += 1
        return pruned

    def _check_params_current(self) -> None:
        """Under several processes: the model's weights must still be the parameters the
        manager was created with (FSDP2 and ``Accelerator.prepare`` replace them)."""
        for t in self.method.targets:
            if t.param is not self._params[t.key]:
                raise PruningStateError(
                    f"the weight {t.key} is no longer the parameter the pruning manager was created with; "
                    "create the manager after fully_shard()/Accelerator.prepare(), and call step() after "
                    "backward() (FSDP2 swaps in unsharded parameters between forward and backward)"
                )

    @torch.no_grad()
    def _prune(self, target_fn: Callable[[float], float], metric: ImportanceMetric) -> None:
        distributed = is_distributed()
        if distributed:
            self._check_params_current()
            metric.all_reduce_(None)
        metric.check_ready()
        previous = self.masks.copy()  # the masks of the previous event (shallow: nothing is unpacked)
        new_masks = self.method.compute_masks(  # nothing changed yet
            target_fn, metric, previous=previous, calibration=self.calibration_data, sharding=self.sharding
        )
        for key, mask in new_masks.items():
            p = local_tensor(self._params[key])
            if mask.shape != p.shape or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask for {key} has shape {tuple(mask.shape)}/{mask.dtype}; expected {tuple(p.shape)}/bool"
                )
        if distributed:
            replicated = [k for k in new_masks if self.sharding is None or not self.sharding.is_sharded(k)]
            if replicated and not _all_equal([int(new_masks[k].sum()) for k in replicated]):
                raise PruningStateError(
                    "the masks differ between ranks (kept-weight counts differ): the weights or the metric's "
                    "statistics are not the same on every rank; a metric that gathers per-rank statistics must "
                    "sum them in ImportanceMetric.all_reduce_()"
                )
        for key in list(new_masks):
            p = local_tensor(self._params[key])
            mask = new_masks[key] = new_masks[key].to(p.device)
            self.masks[key] = mask
            self._mask_version[key] = self._mask_version.get(key, 0) + 1
        # the method may update the kept weights (it needs them unmasked) and move the pruned ones
        report = self.method.reconstruct(new_masks, previous=previous, calibration=self.calibration_data)
        if report is not None:
            self.last_reconstruction = report
            for key, mask in new_masks.items():
                self.masks[key] = mask
        for key, mask in new_masks.items():
            local_tensor(self._params[key]).mul_(mask)
        metric.reset()
        self._events += 1
        self._last_target = target_fn(self.config.final_sparsity)
        self._refresh_metrics()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Multiply every masked parameter by its mask (the optimizer hook does this for
        ``torch.optim`` optimizers; call it yourself after any other optimizer's step)."""
        for key, mask in self.masks.items():
            local_tensor(self._params[key]).mul_(mask)

    @torch.no_grad()
    def apply_mask_to_gradients(self) -> None:
        """Zero the gradients of pruned weights (call between ``backward()`` and ``optimizer.step()``)."""
        for key, mask in self.masks.items():
            g = self._params[key].grad
            if g is not None:
                local_tensor(g).mul_(mask)
        self._grads_masked = True  # the optimizer pre-hook need not do it again

    def _check_sparsity(self, sparsity: float) -> float:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (0.0 <= float(sparsity) < 1.0):
            raise ConfigError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
        return float(sparsity)

    def _one_shot_sparsity(self, sparsity: Optional[float]) -> float:
        """The sparsity of a one-shot prune: ``sparsity`` (the method checks it against an N:M
        pattern), or, when None, the one the config's N:M pattern fixes."""
        if sparsity is not None:
            return self._check_sparsity(sparsity)
        if self.config.nm_pattern is None:
            raise ConfigError(
                "apply_pruning needs a sparsity (a number in [0, 1)); only an N:M pattern in the config fixes it"
            )
        n, m = self.config.nm_pattern
        return (m - n) / m

    def apply_magnitude_pruning(self, sparsity: float) -> None:
        """Prune now, one-shot, to ``sparsity`` by weight magnitude (whatever the configured
        metric), with the configured method and scope."""
        self._check_active("apply_magnitude_pruning")
        s = self._one_shot_sparsity(sparsity)
        self._check_calibration_data()  # e.g. reconstruction / OWL need batches
        self._prune(self.method.one_shot_target_fn(s), METRICS.get("magnitude")())

    def apply_pruning(
        self,
        sparsity: Optional[float] = None,
        calibration_data: Optional[Iterable] = None,
        *,
        loss_fn: Optional[Callable[[Any, Any], Tensor]] = None,
        progress: Optional[bool] = None,
    ) -> None:
        """Prune now, one-shot, to ``sparsity`` with the configured method and metric.

        Args:
            sparsity: fraction of the method's units to prune, in [0, 1). With an N:M
                ``pattern`` it may be omitted (the pattern fixes it: 0.5 for 2:4) and must
                otherwise be a whole number of weights per group (0, 0.25 or 0.5 for 2:4).
            calibration_data: batches streamed through the model first (see
                :meth:`calibrate`) for metrics that need statistics; without it the
                statistics gathered so far (training steps, an earlier ``calibrate``) are used.
            loss_fn: for ``gradient_sensitivity``: ``loss_fn(outputs, batch) -> scalar``
                when the model's output has no ``loss``.
            progress: show a progress bar while calibrating (default: when on a terminal).

        Raises:
            CalibrationError: the metric has no statistics, or the data is malformed.
        """
        self._check_active("apply_pruning")
        s = self._one_shot_sparsity(sparsity)
        if calibration_data is not None and self._needs_calibration_data():
            calibration_data = self.set_calibration_data(calibration_data)
        self._check_calibration_data()
        stats = self.metric.needs_activations or self.metric.needs_gradients
        if calibration_data is not None and (stats or not self._needs_calibration_data()):
            # (kept for SparseGPT/OWL above; calibrate() warns when nothing at all reads it)
            self.calibrate(calibration_data, loss_fn=loss_fn, progress=progress)
        self._prune(self.method.one_shot_target_fn(s), self.metric)

    # ------------------------------------------------------- calibration data kept
    @property
    def needs_calibration_data(self) -> bool:
        """Whether every pruning event needs the batches of :meth:`set_calibration_data`
        (the method's ``calibration_need``: ``reconstruction: sparsegpt`` or ``scope: owl``),
        beyond any metric statistics."""
        return self._needs_calibration_data()

    def _needs_calibration_data(self) -> bool:
        return self.method.calibration_need(self.config) is not None

    def _check_calibration_data(self) -> None:
        need = self.method.calibration_need(self.config)
        if need is not None and self.calibration_data is None:
            raise CalibrationError(
                f"{need} needs calibration batches at every pruning event: pass "
                "apply_pruning(s, calibration_data=batches) for one-shot pruning, or call "
                "manager.set_calibration_data(batches) before training"
            )

    def set_calibration_data(self, data: Iterable) -> list:
        """Keep calibration batches for the reconstruction and OWL at every pruning event.

        The batches (dicts of tensors or tensors, as for :meth:`calibrate`) are stored as
        a list, since they are iterated once per layer; keep the set small (SparseGPT
        uses 128 sequences). Returns the list.
        """
        self.calibration_data = check_calibration_batches(data)
        return self.calibration_data

    def calibrate(
        self,
        data: Iterable,
        *,
        loss_fn: Optional[Callable[[Any, Any], Tensor]] = None,
        progress: Optional[bool] = None,
    ) -> int:
        """Stream calibration batches through the model to gather metric statistics.

        Statistics gathered before are replaced. See
        :func:`artemis.data.calibration.run_calibration` for the batch formats, the loss used
        by gradient metrics and the guarantees on errors. Returns the number of batches.
        """
        self._check_active("calibrate")
        own = getattr(self.metric, "calibrate", None)  # a metric with its own calibration pass
        if callable(own):
            if loss_fn is not None:
                raise ConfigError(
                    f"calibrate(loss_fn=...) is not supported by the {self.config.method!r} method's "
                    "layer-level metric; it uses the model's own loss"
                )
            return own(self, data)
        return run_calibration(self, data, loss_fn=loss_fn, progress=progress)

    def close(self) -> None:
        """Remove every hook the manager installed **without** making the pruning permanent:
        weights stay as they are (pruned entries zero), masks are forgotten and nothing
        enforces them any more. Use it to abandon a manager (``artemis.evaluation.analysis`` does,
        after restoring the dense weights). The manager cannot be used afterwards."""
        if self._finalized:
            return
        self._remove_hooks()
        self._finalized = True
        self._closed = True
        self.masks = MaskStore(packed=self.config.packed_masks)

    def finalize(self) -> nn.Module:
        """Make the pruning permanent: fold masks into the weights, remove every hook the
        manager installed, let the method rebuild the model if it is structural.
        Returns the model. A second call raises :class:`PruningStateError`."""
        if self._finalized:
            raise PruningStateError("finalize() was already called; the pruning is already permanent")
        with torch.no_grad():
            self.apply_masks()
        self._remove_hooks()
        self.method.finalize()
        self._finalized = True
        self._refresh_metrics()
        self.masks = MaskStore(packed=self.config.packed_masks)
        self.calibration_data = None  # release the kept batches
        return self.model

    def prepare_for_quantization(self) -> nn.Module:
        """``finalize()`` (if not done yet: every mask folded into its weight), then attach
        per-channel int8 scales computed from the kept weights (buffer ``int8_scale``) to
        every pruned layer; ``artemis.sparse.quantization.quantize_int8(model)`` converts exactly
        those layers. Returns the model."""
        if not self._finalized:
            self.finalize()
        return prepare_model_for_quantization(self.model, self._quant_modules())

    @property
    def finalized(self) -> bool:
        return self._finalized

    # ---------------------------------------------------------------- summary
    def sparse_params(self) -> list[nn.Parameter]:
        """Parameters stored in the sparse-bitmask layout by the size accounting and export."""
        if self.method.structural:
            return []
        return [t.param for t in self.method.targets]

    @torch.no_grad()
    def _nonzero_counts(self) -> dict[str, int]:
        """Non-zero count of every target weight (whole weight; summed over shards)."""
        counts = {t.key: int(torch.count_nonzero(local_tensor(t.param))) for t in self.method.targets}
        if self.sharding is not None:
            keys = [k for k in counts if self.sharding.is_sharded(k)]
            summed = self.sharding.collective.all_reduce_sum(torch.tensor([counts[k] for k in keys], dtype=torch.int64))
            counts.update({k: int(v) for k, v in zip(keys, summed.tolist())})
        return counts

    @torch.no_grad()
    def _refresh_metrics(self) -> None:
        params = [t.param for t in self.method.targets]
        method_counts = self.method.parameter_counts()
        nnz: Optional[dict[int, int]] = None
        if method_counts is None:
            prunable = sum(p.numel() for p in params)
            counts = self._nonzero_counts()
            nnz = {id(t.param): counts[t.key] for t in self.method.targets}
            pruned = prunable - sum(nnz.values())
        else:
            pruned, prunable = method_counts
        compressed = model_compressed_bytes(self.model, self.sparse_params(), nnz=nnz)
        dense = self.baseline_model_size * MIB
        self.pruning_metrics = {
            "model_size_reduction": 1.0 - compressed / dense if dense else 0.0,
            "current_sparsity": pruned / prunable if prunable else 0.0,
            "parameters_pruned": pruned,
            "parameters_prunable": prunable,
            "target_sparsity": self._last_target,
            "baseline_model_size_mb": self.baseline_model_size,
            "compressed_model_size_mb": compressed / MIB,
            "pruning_events": self._events,
            "mask_memory_mb": self.masks.nbytes() / MIB,
        }
        self.method.update_pruning_metrics(self.pruning_metrics)

    @torch.no_grad()
    def get_pruning_summary(self) -> dict[str, Any]:
        """Plain JSON-able summary: configuration, step, target and measured sparsity,
        ``pruning_metrics`` and a per-layer table (name, shape, sparsity)."""
        self._refresh_metrics()
        counts = self._nonzero_counts()
        layers = []
        for t in self.method.targets:
            layers.append(layer_row(t.name, t.param, t.param.numel() - counts[t.key]))
        c = self.config
        summary = {
            "enabled": c.enabled,
            "method": c.method,
            "importance_metric": c.importance_metric,
            "schedule": c.schedule,
            "scope": self.method.scope(self.metric),
            "architecture": self.adapter.name,
            "step": self._step,
            "total_steps": self.total_steps,
            "finalized": self._finalized,
            "target_sparsity": self._last_target,
            "final_sparsity": c.final_sparsity,
            "measured_sparsity": self.pruning_metrics["current_sparsity"],
            "pruning_metrics": dict(self.pruning_metrics),
            "layers": layers,
        }
        summary.update(self.method.summary())
        return summary

    # ----------------------------------------------------------- checkpoints
    def _masks_state(self) -> dict[str, Tensor]:
        if self.sharding is None and not is_distributed():
            return {k: m.detach().cpu().clone() for k, m in self.masks.items()}
        # Several processes: one entry per prunable weight (all True where nothing is pruned
        # yet) so that a fresh manager's state_dict() is a complete template for
        # torch.distributed.checkpoint.load; FSDP2 masks stay sharded, as DTensors.
        from torch.distributed.tensor import DTensor  # here: torch builds without distributed lack it

        out: dict[str, Tensor] = {}
        for key, p in self._params.items():
            lp = local_tensor(p)
            m = self.masks.get(key)
            m = m.detach().clone() if m is not None else torch.ones(lp.shape, dtype=torch.bool, device=lp.device)
            if is_dtensor(p):
                out[key] = DTensor.from_local(m, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            else:
                out[key] = m.cpu()
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: schedule position, masks, metric and method state.

        Under several processes the masks hold one entry per prunable weight, and under
        FSDP2 they are ``DTensor`` s sharded like the weights: save the dict with
        ``torch.distributed.checkpoint.save`` (each rank writes its shards) and load
        it with ``torch.distributed.checkpoint.load({"pruning": manager})`` (the
        manager is a ``Stateful``); see ``docs/distributed.md``. Under DDP the masks are
        the same on every rank and ``torch.save`` on one rank is enough.
        """
        return {
            "format_version": STATE_FORMAT_VERSION,
            "config": self.config.model_dump(),
            "step": self._step,
            "total_steps": self.total_steps,
            "events": self._events,
            "last_target": self._last_target,
            "finalized": self._finalized,
            "masks": self._masks_state(),
            "metric": self.metric.state_dict(),
            "method": self.method.state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any], *, strict_config: bool = True) -> None:
        """Restore a :meth:`state_dict`; masks are re-applied to the weights.

        Args:
            state: a :meth:`state_dict`.
            strict_config: refuse a state saved with another pruning configuration (the
                message names the fields that differ); ``False`` loads it anyway, and the
                schedule and masks then continue under this manager's configuration.

        Raises:
            CheckpointError: another format version, another configuration (with
                ``strict_config``), masks that do not fit this model, or a finalized state.
        """
        self._check_active("load_state_dict")
        version = state.get("format_version")
        if version != STATE_FORMAT_VERSION:
            raise CheckpointError(
                f"pruning state has format_version {version!r}; this Artemis reads version {STATE_FORMAT_VERSION}"
            )
        saved_config = state.get("config")
        if strict_config and isinstance(saved_config, Mapping):
            mine = self.config.model_dump()
            # how masks are stored and the step count the state carries itself do not change the result
            ignored = {"packed_masks", "total_steps"}
            # fields one side lacks (added by a newer Artemis, with their defaults) are not compared
            differ = sorted(k for k in set(mine) & set(saved_config) - ignored if mine[k] != saved_config[k])
            if differ:
                shown = "; ".join(
                    f"{k}: {saved_config.get(k)!r} (saved) vs {mine.get(k)!r} (this manager)" for k in differ
                )
                raise CheckpointError(
                    f"pruning state was saved with another configuration ({shown}); resume with the same "
                    "pruning config, or pass load_state_dict(state, strict_config=False) to load it anyway"
                )
        masks = state.get("masks", {})
        unknown = sorted(set(masks) - set(self._params))
        if unknown:
            raise CheckpointError(
                f"pruning state has masks for {unknown[:3]} which are not prunable parameters of this model"
            )
        for key, mask in masks.items():
            if tuple(mask.shape) != tuple(self._params[key].shape):
                raise CheckpointError(
                    f"pruning state mask for {key} has shape {tuple(mask.shape)}, the parameter has "
                    f"{tuple(self._params[key].shape)}"
                )
        if state.get("finalized"):
            raise CheckpointError("pruning state was saved after finalize(); there is nothing to resume")
        local_masks = {key: self._local_mask(key, mask) for key, mask in masks.items()}
        if state.get("total_steps") is not None:
            self.total_steps = None
            self._set_total_steps(int(state["total_steps"]))
        self._step = int(state["step"])
        self._events = int(state.get("events", 0))
        self._last_target = float(state.get("last_target", 0.0))
        self.masks = MaskStore(packed=self.config.packed_masks)
        for key, mask in local_masks.items():
            p = local_tensor(self._params[key])
            self.masks[key] = mask.to(device=p.device, dtype=torch.bool)
            self._mask_version[key] = self._mask_version.get(key, 0) + 1
            p.mul_(self.masks[key])
        self.metric.load_state_dict(state.get("metric", {}))
        self.method.load_state_dict(state.get("method", {}))
        if (
            self.config.enabled
            and self.config.quantization_aware
            and self.total_steps is not None
            and self._fake_quant is None
            and self._step > self._window(self.total_steps)[1]
        ):
            self._enable_quantization_aware()  # resumed after pruning_end: QAT was on
        self._refresh_metrics()

    def _local_mask(self, key: str, mask: Tensor) -> Tensor:
        """The part of a saved (whole or sharded) mask that this rank's weight holds."""
        p = self._params[key]
        if is_dtensor(mask):
            if not is_dtensor(p):
                return mask.full_tensor()
            if mask.device_mesh != p.device_mesh or tuple(mask.placements) != tuple(p.placements):
                mask = mask.redistribute(p.device_mesh, p.placements)
            local = mask.to_local()
        else:
            local = shard_like(mask, p)
        if tuple(local.shape) != tuple(local_tensor(p).shape):
            raise CheckpointError(
                f"pruning state mask for {key} has a local shard of shape {tuple(local.shape)}, this rank's "
                f"weight shard has {tuple(local_tensor(p).shape)}"
            )
        return local

    def __repr__(self) -> str:
        return (
            f"PruningManager(method={self.config.method!r}, metric={self.config.importance_metric!r}, "
            f"targets={len(self.method.targets)}, step={self._step}, finalized={self._finalized})"
        )
