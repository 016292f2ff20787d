"""Putting it together: pruning + Hybrid LoRA-Adapter + Efficiency-Transformer + distillation.

:func:`prepare_finetuning` takes the specification's combined run configuration (the ``model``
and ``fine_tuning`` sections) and a model, and returns a :class:`FinetuneSession`
whose ``model`` is ready for any training loop. The order matters and is fixed here:

1. validate everything and check the machine (``peft``, an 8-bit backend) — the model
   is untouched if anything is wrong;
2. keep a frozen dense copy as the distillation teacher (if enabled);
3. measure on the dense model: layer importance (adaptive layer selection) and
   adjacent-block similarity (cross-layer sharing);
4. tie the chosen adjacent pairs (so the pruning manager sees each shared weight once);
5. create the pruning manager on the plain model (masks keyed by plain names);
6. Hybrid LoRA-Adapter: attach adapters to the selected blocks only and tie the
   adapters of shared pairs; otherwise freeze the blocks that were not selected.

Training loop contract: optimise ``session.trainable_parameters()``, compute the loss
with ``session.loss(batch)`` (task loss, plus the distillation term when enabled), call
``session.manager.step()`` after ``backward()`` and before ``optimizer.step()``.

Example:
    >>> from artemis.finetune.session import check_run_options
    >>> check_run_options({"hybrid_lora_adapter": True}, {"method": "efficiency_transformer"}).method
    'efficiency_transformer'
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor

from artemis.arch import get_adapter, unwrap_model
from artemis.core.config import format_validation_error
from artemis.core.errors import CalibrationError, ConfigError
from artemis.finetune.config import (
    DistillationConfig,
    FineTuningConfig,
    check_8bit_backend,
    load_finetuning_config,
    require_peft,
)
from artemis.finetune.efficiency import (
    adjacent_similarity,
    choose_shared_pairs,
    freeze_layers,
    layer_importance,
    select_trainable_layers,
    share_adjacent_layers,
)
from artemis.finetune.lora import MergeReport, attach_lora, count_parameters, merge_lora_preserving_sparsity

__all__ = ["FinetuneSession", "prepare_finetuning", "apply_finetuning", "check_run_options", "distillation_loss"]

logger = logging.getLogger(__name__)

_MODEL_KEYS = ("hybrid_lora_adapter", "load_in_8bit")


def check_run_options(model_section: Optional[Mapping], fine_tuning_section: Any) -> FineTuningConfig:
    """Validate the fine-tuning-related options of a run; raise before anything is loaded.

    Args:
        model_section: the ``model`` section (only ``hybrid_lora_adapter`` and
            ``load_in_8bit`` are read here; other keys belong to the loader).
        fine_tuning_section: the ``fine_tuning`` section (or ``None``).

    Raises:
        ConfigError: an unknown ``fine_tuning.method`` or key, a non-boolean flag,
            ``hybrid_lora_adapter`` without ``peft``, ``load_in_8bit`` without a backend.
    """
    ms = dict(model_section or {})
    for key in _MODEL_KEYS:
        v = ms.get(key, False)
        if not isinstance(v, bool):
            raise ConfigError(f"model.{key} must be true or false, got {v!r}")
    ft = load_finetuning_config(fine_tuning_section)
    if ms.get("hybrid_lora_adapter"):
        require_peft()
    if ms.get("load_in_8bit"):
        check_8bit_backend()
    return ft


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Knowledge-distillation term between two output tensors ``(..., features)``.

    For logits: ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` averaged over positions (Hinton
    et al.). Use it on logits; for embeddings see :meth:`FinetuneSession.loss`.

    >>> import torch
    >>> float(distillation_loss(torch.zeros(2, 5), torch.zeros(2, 5), 2.0))
    0.0
    """
    s = F.log_softmax(student.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


@dataclass
class FinetuneSession:
    """Everything :func:`prepare_finetuning` set up (see the module docstring).

    Attributes:
        model: the model to train (a ``PeftModel`` with the Hybrid LoRA-Adapter).
        base_model: the plain model inside (same object when there is no adapter).
        manager: the pruning manager, or ``None`` without a pruning section.
        config: the validated ``fine_tuning`` section.
        teacher: frozen dense copy, when distillation is enabled.
        layer_scores: per-block importance used for selection (or ``None``).
        similarity: adjacent-pair similarity used for sharing (or ``None``).
        trainable_layers: block indices that train (all blocks when no selection).
        shared_pairs: tied ``(i, j)`` block pairs.
        hybrid_lora: whether adapters were attached.
        distillation: the distillation settings used by :meth:`loss`.
    """

    model: nn.Module
    base_model: nn.Module
    manager: Any
    config: FineTuningConfig
    teacher: Optional[nn.Module] = None
    layer_scores: Optional[Tensor] = None
    similarity: Optional[Tensor] = None
    trainable_layers: list[int] = field(default_factory=list)
    shared_pairs: list[tuple[int, int]] = field(default_factory=list)
    hybrid_lora: bool = False
    distillation: DistillationConfig = field(default_factory=DistillationConfig)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters to give the optimizer (each shared parameter once)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        trainable, total = count_parameters(self.model)
        return {"trainable": trainable, "total": total}

    def loss(self, batch: Mapping[str, Any]) -> Tensor:
        """Task loss (when the model returns one) mixed with distillation from the teacher.

        With distillation: ``(1 − alpha)·task + alpha·KD`` where KD is
        :func:`distillation_loss` on logits, or ``1 − cos`` of the last hidden states for
        models without logits (encoders). Without a task loss, KD alone.

        Raises:
            ConfigError: no distillation and the model returns no loss.
        """
        out = self.model(**batch)
        task = getattr(out, "loss", None)
        dist = self.distillation
        if self.teacher is None or not dist.enabled:
            if task is None:
                raise ConfigError(
                    "the model returned no loss (no labels in the batch?) and distillation is off; "
                    "pass labels or enable distillation"
                )
            return task
        with torch.no_grad():
            t_out = self.teacher(**batch)
        s_logits, t_logits = getattr(out, "logits", None), getattr(t_out, "logits", None)
        if s_logits is not None and t_logits is not None:
            kd = distillation_loss(s_logits, t_logits, dist.temperature)
        else:
            s_h, t_h = out.last_hidden_state, t_out.last_hidden_state
            kd = (1 - F.cosine_similarity(s_h.float(), t_h.float(), dim=-1)).mean()
        if task is None:
            return kd
        return (1 - dist.alpha) * task + dist.alpha * kd

    def merge(self, eval_batches: Optional[Iterable[dict]] = None) -> tuple[nn.Module, MergeReport]:
        """Fold the adapters in, keeping the sparsity (see :func:`merge_lora_preserving_sparsity`);
        ``self.model`` becomes the plain model."""
        if not self.hybrid_lora:
            raise ConfigError("merge() needs model.hybrid_lora_adapter: true (there is no adapter to merge)")
        masks = self.manager if self.manager is not None else {}
        base, report = merge_lora_preserving_sparsity(self.model, masks, eval_batches)
        self.model = self.base_model = base
        self.hybrid_lora = False
        return base, report

    def summary(self) -> dict[str, Any]:
        return {
            "hybrid_lora": self.hybrid_lora,
            "method": self.config.method,
            "trainable_layers": list(self.trainable_layers),
            "shared_pairs": [list(p) for p in self.shared_pairs],
            "layer_scores": None if self.layer_scores is None else [round(float(s), 6) for s in self.layer_scores],
            "similarity": None if self.similarity is None else [round(float(s), 6) for s in self.similarity],
            "distillation": self.teacher is not None,
            **self.parameter_counts(),
        }


def apply_finetuning(
    model: nn.Module,
    fine_tuning: Any,
    *,
    hybrid_lora_adapter: bool = False,
    calibration_data: Optional[Iterable[dict]] = None,
    create_manager: Optional[Callable[[nn.Module], Any]] = None,
) -> FinetuneSession:
    """Steps 3–6 of the module docstring on ``model`` (in place): scores, sharing, the
    pruning manager (made by ``create_manager(model)``), adapters or freezing.

    This is the hook for a training loop that owns the teacher and the manager's
    configuration (``artemis prune``); peft injects the adapters into ``model`` itself,
    so ``model(**batch)`` and ``model.parameters()`` (filtered on ``requires_grad``) are
    all such a loop needs afterwards.

    Args:
        model: the dense plain model.
        fine_tuning: the ``fine_tuning`` section (dict or :class:`FineTuningConfig`).
        hybrid_lora_adapter: attach LoRA adapters to a frozen base.
        calibration_data: batches for the layer scores (iterated more than once).
        create_manager: builds the pruning manager on the (possibly shared) model;
            ``None`` for no pruning.

    Raises:
        ConfigError: invalid options, ``peft`` missing (checked before any change).
        CalibrationError: the scores need batches and none were given.
    """
    ft = load_finetuning_config(fine_tuning)
    if hybrid_lora_adapter:
        require_peft()
    et = ft.efficiency_transformer
    use_et = ft.method == "efficiency_transformer"
    needs_data = use_et and (
        et.cross_layer_parameter_sharing or (et.adaptive_layer_selection and et.importance_metric == "activation")
    )
    data = list(calibration_data) if calibration_data is not None else None
    if needs_data and not data:
        raise CalibrationError(
            "fine_tuning.efficiency_transformer needs calibration batches for the layer scores "
            "(pass calibration_data=...), or use importance_metric: magnitude without sharing"
        )
    model = unwrap_model(model)
    adapter = get_adapter(model)

    was_training = model.training
    model.eval()
    scores = sim = None
    pairs: list[tuple[int, int]] = []
    try:
        if use_et and et.adaptive_layer_selection:
            scores = layer_importance(model, adapter, data, et.importance_metric, max_batches=et.calibration_batches)
        if use_et and et.cross_layer_parameter_sharing:
            sim = adjacent_similarity(model, data, adapter=adapter, max_batches=et.calibration_batches)
            pairs = choose_shared_pairs(sim, et.shared_layer_pairs)
    finally:
        model.train(was_training)

    if scores is not None:
        trainable = select_trainable_layers(scores, fraction=et.trainable_layer_fraction, shared_pairs=pairs)
    else:
        trainable = list(range(adapter.num_blocks))
    if hybrid_lora_adapter:  # validate the adapter targets before changing anything
        from artemis.finetune.lora import lora_target_names

        lora_target_names(model, ft.lora.target_modules, trainable if scores is not None else None)
    if pairs:
        share_adjacent_layers(model, pairs, adapter=adapter)
    manager = create_manager(model) if create_manager is not None else None

    train_model: nn.Module = model
    if hybrid_lora_adapter:
        lc = ft.lora
        layers = trainable if scores is not None else None
        train_model = attach_lora(
            model, manager, r=lc.r, alpha=lc.alpha, target_modules=lc.target_modules, layers=layers, dropout=lc.dropout
        )
        if pairs:
            share_adjacent_layers(model, pairs, adapter=adapter)  # tie the new adapters too
    elif scores is not None:
        freeze_layers(model, trainable, adapter=adapter)

    session = FinetuneSession(
        model=train_model,
        base_model=model,
        manager=manager,
        config=ft,
        layer_scores=scores,
        similarity=sim,
        trainable_layers=trainable,
        shared_pairs=pairs,
        hybrid_lora=hybrid_lora_adapter,
    )
    logger.info("fine-tuning setup: %s", session.summary())
    return session


def prepare_finetuning(
    model: nn.Module,
    config: Mapping[str, Any],
    *,
    calibration_data: Optional[Iterable[dict]] = None,
    total_steps: Optional[int] = None,
    distillation: Union[DistillationConfig, Mapping, None] = None,
) -> FinetuneSession:
    """Set up pruning, adapters, layer selection, sharing and distillation for ``model``.

    Args:
        model: the plain (dense) model, modified in place.
        config: the run configuration: ``{"model": {"hybrid_lora_adapter", "load_in_8bit",
            "pruning": {...}}, "fine_tuning": {...}}`` (a top-level ``pruning`` section
            also works). Other ``model`` keys (``base_model``...) are ignored here.
        calibration_data: batches for the ``activation`` layer scores and the layer
            similarity (a list; it is iterated more than once).
        total_steps: training steps (for the pruning schedule).
        distillation: :class:`DistillationConfig` (or its dict); when enabled a frozen
            dense copy taken before any change is the teacher of :meth:`FinetuneSession.loss`.

    Returns:
        A :class:`FinetuneSession`.

    Raises:
        ConfigError: invalid options or missing backend (nothing changed).
        CalibrationError: scores that need data and none was given.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"config must be a mapping with model/fine_tuning sections, got {type(config).__name__}")
    model_section = config.get("model") or {}
    if not isinstance(model_section, Mapping):
        raise ConfigError(f"model must be a mapping, got {model_section!r}")
    ft = check_run_options(model_section, config.get("fine_tuning"))
    if isinstance(distillation, DistillationConfig):
        dist = distillation
    else:
        try:
            dist = DistillationConfig.model_validate(dict(distillation or {}))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "distillation")) from None
    pruning_cfg = None
    if "pruning" in config or "pruning" in model_section:
        from artemis.core.config import load_pruning_config

        pruning_cfg = load_pruning_config(dict(config))
    model = unwrap_model(model)
    teacher = None
    if dist.enabled:
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    def make_manager(m: nn.Module) -> Any:
        from artemis.core.manager import PruningManager

        return PruningManager(m, pruning_cfg, total_steps=total_steps)

    session = apply_finetuning(
        model,
        ft,
        hybrid_lora_adapter=bool(model_section.get("hybrid_lora_adapter", False)),
        calibration_data=calibration_data,
        create_manager=make_manager if pruning_cfg is not None else None,
    )
    session.teacher = teacher
    session.distillation = dist
    return session
