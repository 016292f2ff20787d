"""Typed options of fine-tuning on a pruned model, and the checks that need the machine.

The specification's combined configuration spreads these over two sections::

    model:
      load_in_8bit: true          # -> check_8bit_backend()
      hybrid_lora_adapter: true   # -> require_peft(); LoRA on the sparse, frozen base
      pruning: {...}              # -> artemis.core.config.PruningConfig
    fine_tuning:
      method: "efficiency_transformer"
      efficiency_transformer:
        adaptive_layer_selection: true
        cross_layer_parameter_sharing: true

:class:`FineTuningConfig` validates the ``fine_tuning`` section (extra keys are
rejected with a suggestion, like every Artemis config). Keys the specification leaves out
(LoRA rank, how many layers to train, how many pairs to share) have defaults and are
documented in ``docs/finetune.md``.

Example:
    >>> from artemis.finetune.config import load_finetuning_config
    >>> cfg = load_finetuning_config({"method": "efficiency_transformer",
    ...     "efficiency_transformer": {"adaptive_layer_selection": True}})
    >>> cfg.efficiency_transformer.trainable_layer_fraction, cfg.lora.r
    (0.5, 8)
    >>> load_finetuning_config({"method": "efficient_transformer"})
    Traceback (most recent call last):
    ...
    artemis.core.errors.ConfigError: fine_tuning.method: unknown fine-tuning method 'efficient_transformer'...
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Mapping, Optional

from pydantic import ValidationError, field_validator, model_validator

from artemis.core.config import ConfigSection, format_validation_error
from artemis.core.errors import ConfigError

__all__ = [
    "FINETUNE_METHODS",
    "LAYER_IMPORTANCE_METRICS",
    "LoRAConfig",
    "EfficiencyTransformerConfig",
    "DistillationConfig",
    "FineTuningConfig",
    "load_finetuning_config",
    "require_peft",
    "check_8bit_backend",
]

#: ``fine_tuning.method`` values: ``full`` trains every layer, ``efficiency_transformer``
#: applies the ``efficiency_transformer`` options (layer selection, sharing).
FINETUNE_METHODS = ("full", "efficiency_transformer")
#: Layer-importance measures usable by adaptive layer selection.
LAYER_IMPORTANCE_METRICS = ("activation", "magnitude")


class LoRAConfig(ConfigSection):
    """``fine_tuning.lora``: the Hybrid LoRA-Adapter (used when ``model.hybrid_lora_adapter``).

    Attributes:
        r: adapter rank (>= 1).
        alpha: LoRA scaling numerator (the update is ``alpha / r · B A``).
        dropout: dropout on the adapter input.
        target_modules: module-name suffixes that get an adapter (peft's matching);
            ``None`` means every ``Linear`` inside the transformer blocks (the same
            weights the pruning targets by default).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Optional[list[str]] = None

    @field_validator("r")
    @classmethod
    def _r(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"r must be a positive rank, got {v!r}")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {v!r}")
        return v


class EfficiencyTransformerConfig(ConfigSection):
    """``fine_tuning.efficiency_transformer``.

    Attributes:
        adaptive_layer_selection: score each transformer block, train only the most
            important ``trainable_layer_fraction`` of them and freeze the rest.
        cross_layer_parameter_sharing: tie the parameters of the ``shared_layer_pairs``
            most similar adjacent blocks (the later block uses the earlier one's
            parameters) and train the shared copy.
        importance_metric: ``activation`` (Block Influence, 1 − cos(block input, block
            output), needs calibration batches) or ``magnitude`` (mean |w| of the block's
            weights, data-free).
        trainable_layer_fraction: fraction of blocks kept trainable, in (0, 1]; at least
            one block is kept.
        shared_layer_pairs: number of adjacent pairs to tie (>= 1); pairs never overlap.
        calibration_batches: batches used for the scores.
    """

    adaptive_layer_selection: bool = False
    cross_layer_parameter_sharing: bool = False
    importance_metric: str = "activation"
    trainable_layer_fraction: float = 0.5
    shared_layer_pairs: int = 1
    calibration_batches: int = 4

    @field_validator("importance_metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v not in LAYER_IMPORTANCE_METRICS:
            raise ValueError(
                f"unknown layer importance metric {v!r}; valid: {', '.join(map(repr, LAYER_IMPORTANCE_METRICS))}"
            )
        return v

    @field_validator("trainable_layer_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"trainable_layer_fraction must be in (0, 1], got {v!r}")
        return v

    @field_validator("shared_layer_pairs", "calibration_batches")
    @classmethod
    def _positive(cls, v: int, info) -> int:
        if v < 1:
            raise ValueError(f"{info.field_name} must be at least 1, got {v!r}")
        return v


class DistillationConfig(ConfigSection):
    """Distillation from the dense model, for :func:`~artemis.finetune.session.prepare_finetuning`.

    Attributes:
        enabled: keep a frozen dense copy of the model (taken before any pruning,
            sharing or adapter) as the teacher.
        temperature: softmax temperature of the KL term (> 0).
        alpha: weight of the KL term; the task loss gets ``1 − alpha``.
    """

    enabled: bool = False
    temperature: float = 2.0
    alpha: float = 0.5

    @field_validator("temperature")
    @classmethod
    def _t(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"temperature must be > 0, got {v!r}")
        return v

    @field_validator("alpha")
    @classmethod
    def _a(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {v!r}")
        return v


class FineTuningConfig(ConfigSection):
    """The ``fine_tuning`` section.

    Attributes:
        method: one of :data:`FINETUNE_METHODS`.
        efficiency_transformer: options of the ``efficiency_transformer`` method.
        lora: Hybrid LoRA-Adapter options.

    Distillation is not part of this section: the run configuration's top-level
    ``distillation:`` section drives it in ``artemis prune``, and
    :func:`artemis.finetune.session.prepare_finetuning` takes a
    :class:`DistillationConfig` argument.
    """

    method: str = "full"
    efficiency_transformer: EfficiencyTransformerConfig = EfficiencyTransformerConfig()
    lora: LoRAConfig = LoRAConfig()

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in FINETUNE_METHODS:
            import difflib

            close = difflib.get_close_matches(str(v), FINETUNE_METHODS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown fine-tuning method {v!r}; valid: {', '.join(map(repr, FINETUNE_METHODS))}{hint}")
        return v

    @model_validator(mode="after")
    def _cross(self) -> "FineTuningConfig":
        et = self.efficiency_transformer
        if self.method != "efficiency_transformer" and (
            et.adaptive_layer_selection or et.cross_layer_parameter_sharing
        ):
            raise ValueError(
                f"efficiency_transformer options are set but method is {self.method!r}; "
                "set method: 'efficiency_transformer' to use them"
            )
        return self


def load_finetuning_config(section: Any) -> FineTuningConfig:
    """Validate a ``fine_tuning`` section (a dict, ``None`` for defaults, or a config).

    Raises:
        ConfigError: naming the field (``fine_tuning.<key>``), the bad value and what is valid.
    """
    if isinstance(section, FineTuningConfig):
        return section
    if section is None:
        return FineTuningConfig()
    if not isinstance(section, Mapping):
        raise ConfigError(f"fine_tuning must be a mapping of options, got {section!r}")
    try:
        return FineTuningConfig.model_validate(dict(section))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "fine_tuning")) from None


def require_peft() -> Any:
    """Import and return ``peft``; a clear error naming the fix when it is missing.

    Raises:
        ConfigError: ``peft`` is not installed.
    """
    try:
        return importlib.import_module("peft")
    except ImportError:
        raise ConfigError(
            "model.hybrid_lora_adapter: true needs the 'peft' package, which is not installed; "
            "install it with `pip install 'artemis-prune[lora]'` (or `pip install peft`), "
            "or set model.hybrid_lora_adapter: false"
        ) from None


def check_8bit_backend() -> None:
    """Raise unless 8-bit loading can run here (``bitsandbytes`` and a CUDA device).

    Raises:
        ConfigError: naming what is missing and the fix.
    """
    import torch

    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the 'bitsandbytes' package is not installed (`pip install bitsandbytes`)")
    if not torch.cuda.is_available():
        missing.append("no CUDA device is available (bitsandbytes' 8-bit matmul runs on GPUs)")
    if missing:
        raise ConfigError(
            "model.load_in_8bit: true needs an 8-bit backend, and none can run here: "
            + "; ".join(missing)
            + ". Set model.load_in_8bit: false (the pruned model can still be quantized to int8 "
            "after training with prepare_for_quantization())"
        )
