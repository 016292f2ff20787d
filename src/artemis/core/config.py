"""Typed, validated configuration.

The YAML keys of the seed documentation are a contract. A pruning section can
arrive in three shapes, all accepted by :func:`load_pruning_config` (and so by
``create_pruning_manager``):

* ``{"pruning": {...}}`` — the plain form;
* ``{"model": {"pruning": {...}}}`` — the combined form, where ``sparsity_target``
  is an alias of ``final_sparsity``;
* a :class:`PruningConfig`, or a path to a YAML file holding either dict form.

Everything is checked here, at the boundary: an unknown key fails with a
"did you mean" suggestion, an out-of-range value fails naming the field and
the value, an unknown method, metric or schedule fails listing the valid names.

Example:
    >>> from artemis.core.config import load_pruning_config
    >>> cfg = load_pruning_config({"pruning": {"final_sparsity": 0.5}})
    >>> cfg.method, cfg.final_sparsity, cfg.schedule
    ('magnitude_progressive', 0.5, 'cubic')
    >>> load_pruning_config({"pruning": {"final_sparsty": 0.5}})
    Traceback (most recent call last):
    ...
    artemis.core.errors.ConfigError: pruning: unknown key 'final_sparsty' (did you mean 'final_sparsity'?)...
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from artemis.core.errors import ConfigError

__all__ = [
    "PruningConfig",
    "ConfigSection",
    "LayerDropoutOptions",
    "load_pruning_config",
    "read_yaml",
    "format_validation_error",
    "SCHEDULES",
    "SCOPES",
    "RECONSTRUCTIONS",
    "SPARSEGPT_OBS_SCOPES",
    "SPARSEGPT_TARGETS",
    "parse_nm_pattern",
    "one_of",
    "STRUCTURED_UNITS",
    "STRUCTURED_WIDTHS",
]

SCHEDULES = ("cubic", "cubic_decay", "linear")
SCOPES = ("global", "layer", "row", "owl")
RECONSTRUCTIONS = ("none", "sparsegpt")
SPARSEGPT_OBS_SCOPES = ("layer", "row")
SPARSEGPT_TARGETS = ("pruned", "dense")
STRUCTURED_UNITS = ("attention_heads", "mlp_neurons")
STRUCTURED_WIDTHS = ("uniform", "per_layer")
_CHOICES = {
    "schedule": SCHEDULES,
    "scope": SCOPES,
    "reconstruction": RECONSTRUCTIONS,
    "sparsegpt_obs_scope": SPARSEGPT_OBS_SCOPES,
    "sparsegpt_target": SPARSEGPT_TARGETS,
    "structured_widths": STRUCTURED_WIDTHS,
}


def parse_nm_pattern(pattern: str) -> tuple[int, int]:
    """``"N:M"`` → ``(N, M)``: keep N weights in every group of M consecutive input weights.

    Example:
        >>> parse_nm_pattern("2:4")
        (2, 4)
        >>> parse_nm_pattern("4:4")
        Traceback (most recent call last):
        ...
        ValueError: pattern is not valid: ...
    """
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if m is None or not (0 < int(m.group(1)) < int(m.group(2)) <= 128):
        raise ValueError(
            "pattern is not valid: write 'N:M' with 0 < N < M <= 128 (N kept in every group of M "
            f"consecutive input weights), for example '2:4' or '4:8'; got {pattern!r}"
        )
    return int(m.group(1)), int(m.group(2))


def _check_unknown_keys(model_cls: type[BaseModel], data: Any) -> None:
    """Raise ConfigError for keys the model does not know, with a suggestion."""
    if not isinstance(data, Mapping):
        return
    known: set[str] = set()
    for name, field in model_cls.model_fields.items():
        known.add(name)
        if field.alias:
            known.add(field.alias)
        if field.validation_alias and isinstance(field.validation_alias, str):
            known.add(field.validation_alias)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown key {key!r}{hint}. Valid keys: {', '.join(sorted(known))}")


class ConfigSection(BaseModel):
    """Base of every config section (here, in :mod:`artemis.train.run_config` and
    :mod:`artemis.finetune.config`): unknown keys fail with a "did you mean" hint and the
    list of valid keys, and assignments after construction are validated too."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _unknown_keys(cls, data: Any) -> Any:
        _check_unknown_keys(cls, data)
        return data


def one_of(name: str, value: Any, valid: Sequence[str]) -> Any:
    """``value`` if it is one of ``valid``, else ``ValueError`` naming the field and the choices.

    Example:
        >>> one_of("schedule", "cubic", SCHEDULES)
        'cubic'
        >>> one_of("schedule", "cubik", SCHEDULES)
        Traceback (most recent call last):
        ValueError: unknown schedule 'cubik'; valid: 'cubic', 'cubic_decay', 'linear'
    """
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(repr, valid))}")
    return value


def _sparsity(name: str, value: float) -> float:
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


class LayerDropoutOptions(ConfigSection):
    """The ``layer_dropout:`` sub-section (only valid with ``method: layer_dropout``).

    Attributes:
        fade_steps: a dropped layer's contribution to the residual stream is scaled down
            linearly to zero over this many ``step()`` calls before it becomes the identity
            (0 or 1: cut at once).
    """

    fade_steps: int = 0

    @field_validator("fade_steps")
    @classmethod
    def _check_fade(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"fade_steps must be >= 0 steps, got {v!r}")
        return v


class PruningConfig(ConfigSection):
    """The ``pruning:`` section.

    Attributes:
        enabled: when false, the manager is created but never prunes (its summary says so).
        method: ``magnitude_progressive`` (unstructured, the default), ``structured_sparsity``
            or ``layer_dropout``; the registered methods are listed in the error for an
            unknown name.
        initial_sparsity: sparsity at ``pruning_start`` (in [0, 1)).
        final_sparsity: sparsity reached exactly at ``pruning_end`` (in [0, 1)); alias
            ``sparsity_target``.
        pruning_start: fraction of training after which pruning starts (t_s = round(start·T)).
        pruning_end: fraction of training at which the final sparsity is reached.
        pruning_interval: steps between pruning events (masks recomputed), at least 1.
        importance_metric: ``magnitude``, ``gradient_sensitivity`` or ``activation``.
        metric_options: options of the importance metric, checked against the metric's
            ``options_model`` (``gradient_sensitivity``: ``accumulator_dtype``, one of
            ``float32`` (default), ``bfloat16``, ``float16``). Empty by default.
        quantization_aware: fake-quantize pruned weights to int8 after the final sparsity
            is reached so the model adapts to quantization noise.
        packed_masks: keep the masks at 1 bit per weight instead of 1 byte (``bool``), and
            unpack each one where it is applied: 8× less mask memory (Llama-3.1-8B: 0.9 GiB
            instead of 7 GiB) for extra time at every mask application (measured in
            BENCHMARKS.md, core section). Default ``false``.
        schedule: ``cubic`` (the seed's formula, gentle at the start), ``cubic_decay``
            (Zhu & Gupta, aggressive at the start) or ``linear``.
        scope: ``global`` (one threshold across all prunable weights), ``layer`` (each
            weight matrix to the target on its own), ``row`` (each output row on its own,
            as Wanda does) or ``owl`` (outlier-weighted layer-wise sparsity: each block gets
            a sparsity from its share of activation outliers, the sizes-weighted average
            being exactly the target; needs calibration data). ``None`` means the metric's
            default (``row`` for ``activation``, ``global`` otherwise).
        owl_lambda: OWL's spread λ: per-block sparsities lie within target ± 2λ (the
            outlier ratios are scaled to a range of 2λ), at the final sparsity; a
            progressive run's earlier events at sparsity ``s`` use ``λ·s/final_sparsity``.
            In (0, 0.5]; default 0.08.
        owl_m: OWL's outlier threshold M: a weight is an outlier when its score
            ``|W_ij|·‖X_j‖`` exceeds M times its layer's mean score. Default 5.
        pattern: ``"N:M"`` semi-structured sparsity (``"2:4"``, ``"4:8"``): in every group of
            M consecutive input weights of a row exactly N are kept (chosen by the metric).
            Fixes the final sparsity at 1 − N/M (set ``final_sparsity`` to it or omit it);
            progressive runs prune round(s(t)·M) weights per group at each event.
        reconstruction: ``none`` (default) or ``sparsegpt``: after the masks are chosen,
            update the kept weights of each layer (one layer at a time) to minimise the
            layer's output error on calibration data (the OBS update with the inverse
            Hessian of the layer inputs). Needs calibration data (``apply_pruning(s,
            calibration_data)`` or ``manager.set_calibration_data(batches)``).
        sparsegpt_blocksize: columns updated together by the reconstruction (default 128).
        sparsegpt_dampening: fraction of the mean Hessian diagonal added to its diagonal
            before inversion (default 0.01).
        sparsegpt_mask: ``metric`` (default): the reconstruction keeps the masks the
            metric, scope and pattern chose; ``obs``: it keeps only each layer's pruned count
            (or the N:M pattern) and chooses the weights itself by the OBS saliency
            ``w²/[H⁻¹]ᵢᵢ²`` while it updates, as the SparseGPT paper does.
        sparsegpt_obs_scope: with ``sparsegpt_mask: obs`` and no ``pattern``, where the
            OBS saliency competes: ``layer`` (default; as the paper, each block of columns
            prunes its share over all rows of the layer) or ``row`` (every output row prunes
            the same share of its weights in each block, as Wanda's per-row comparison).
        sparsegpt_target: which output each layer is reconstructed to: ``pruned``
            (default; as the paper, ``‖W X − Ŵ X‖²`` with ``X`` the layer's inputs in the
            model pruned so far) or ``dense`` (``‖W X_dense − Ŵ X‖²``: the dense model's
            output from the pruned model's input, so each layer also corrects the error
            that the earlier pruned layers left). ``dense`` runs every calibration batch
            twice per layer and keeps a copy of the pruned weights as they were before the
            event; it needs enough calibration tokens (several times the widest layer's
            input size), else it fits the calibration noise.
        targets: module-name patterns selecting the prunable modules (``fnmatch`` globs
            such as ``"*.mlp.*"``, or regular expressions prefixed with ``re:``). Default:
            every ``nn.Linear`` / HF ``Conv1D`` inside the transformer blocks.
        exclude: patterns removed from the targets.
        layer_sparsity: pattern → final sparsity overrides for matching modules.
        total_steps: optional; may instead be passed to ``step()`` or the manager.
        layer_dropout: options of ``method: layer_dropout`` (:class:`LayerDropoutOptions`).
        structured_units: ``structured_sparsity`` only: which structures are pruned,
            any of ``attention_heads`` (KV head groups with their query heads) and
            ``mlp_neurons``; default both.
        structured_widths: ``structured_sparsity`` only: ``uniform`` (default; every
            block keeps the same number of heads and neurons, so the saved model is a
            plain Hugging Face model) or ``per_layer`` (units ranked across blocks; load
            the result with ``artemis.methods.structured.load_pruned_model``).
    """

    enabled: bool = True
    method: str = "magnitude_progressive"
    initial_sparsity: float = 0.0
    final_sparsity: float = Field(0.6, alias="sparsity_target")
    pruning_start: float = 0.2
    pruning_end: float = 0.8
    pruning_interval: int = 50
    importance_metric: str = "magnitude"
    metric_options: dict[str, Any] = Field(default_factory=dict)
    quantization_aware: bool = False
    packed_masks: bool = False
    schedule: str = "cubic"
    scope: Optional[str] = None
    targets: Optional[list[str]] = None
    exclude: list[str] = Field(default_factory=list)
    layer_sparsity: dict[str, float] = Field(default_factory=dict)
    total_steps: Optional[int] = None
    layer_dropout: Optional[LayerDropoutOptions] = None
    # --- issue 9: reconstruction, N:M patterns and OWL (see docs/advanced_pruning.md)
    reconstruction: str = "none"
    pattern: Optional[str] = None
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    sparsegpt_blocksize: int = 128
    sparsegpt_dampening: float = 0.01
    sparsegpt_mask: Literal["metric", "obs"] = "metric"
    sparsegpt_obs_scope: str = "layer"
    sparsegpt_target: str = "pruned"
    structured_units: list[str] = Field(default_factory=lambda: list(STRUCTURED_UNITS))
    structured_widths: str = "uniform"

    @property
    def needs_calibration_batches(self) -> bool:
        """Whether every pruning event needs calibration batches of its own
        (``reconstruction: sparsegpt``, or ``scope: owl`` without a pattern)."""
        return self.reconstruction != "none" or (self.scope == "owl" and self.pattern is None)

    @model_validator(mode="before")
    @classmethod
    def _aliases_and_pattern(cls, data: Any) -> Any:
        if (
            isinstance(data, Mapping)
            and data.get("pattern") is not None
            and "final_sparsity" not in data
            and "sparsity_target" not in data
        ):
            try:  # an N:M pattern fixes the final sparsity; a bad pattern fails in its validator
                n, m = parse_nm_pattern(data["pattern"])
                data = {**data, "final_sparsity": 1.0 - n / m}
            except ValueError:
                pass
        if isinstance(data, Mapping) and "sparsity_target" in data and "final_sparsity" in data:
            raise ValueError(
                "both 'sparsity_target' and 'final_sparsity' are set "
                f"({data['sparsity_target']!r} and {data['final_sparsity']!r}); "
                "they are aliases, keep one"
            )
        return data

    @field_validator("initial_sparsity", "final_sparsity")
    @classmethod
    def _check_sparsity(cls, v: float, info) -> float:
        return _sparsity(info.field_name, v)

    @field_validator("pruning_start", "pruning_end")
    @classmethod
    def _check_fraction(cls, v: float, info) -> float:
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"{info.field_name} must be a fraction of training in [0, 1], got {v!r}")
        return v

    @field_validator("pruning_interval")
    @classmethod
    def _check_interval(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"pruning_interval must be at least 1 step, got {v!r}")
        return v

    @field_validator("total_steps")
    @classmethod
    def _check_total(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v < 1:
            raise ValueError(f"total_steps must be at least 1, got {v!r}")
        return v

    @field_validator("method")
    @classmethod
    def _check_method(cls, v: str) -> str:
        from artemis.methods import METHODS

        if v not in METHODS:
            raise ValueError(METHODS.unknown_message(v))
        return v

    @field_validator("importance_metric")
    @classmethod
    def _check_metric(cls, v: str, info) -> str:
        from artemis.methods import METHODS
        from artemis.metrics import METRICS

        method = info.data.get("method")
        supported = getattr(METHODS.get(method), "supported_metrics", None) if method in METHODS else None
        if supported is not None:  # the method scores its own units (e.g. whole layers)
            if v not in supported:
                raise ValueError(
                    f"unknown importance_metric {v!r} for method {method!r}; valid: " + ", ".join(map(repr, supported))
                )
            return v
        if v not in METRICS:
            raise ValueError(METRICS.unknown_message(v))
        return v

    @field_validator(
        "schedule", "scope", "reconstruction", "sparsegpt_obs_scope", "sparsegpt_target", "structured_widths"
    )
    @classmethod
    def _check_choice(cls, v: Optional[str], info) -> Optional[str]:
        if v is None and info.field_name == "scope":  # None: the metric's default scope
            return v
        return one_of(info.field_name, v, _CHOICES[info.field_name])

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            n, m = parse_nm_pattern(v)
            return f"{n}:{m}"
        return v

    @field_validator("owl_lambda")
    @classmethod
    def _check_owl_lambda(cls, v: float) -> float:
        if not (0.0 < v <= 0.5):
            raise ValueError(f"owl_lambda must be in (0, 0.5], got {v!r}")
        return v

    @field_validator("owl_m")
    @classmethod
    def _check_owl_m(cls, v: float) -> float:
        if not (v > 0.0):
            raise ValueError(f"owl_m must be > 0 (outlier = score above owl_m × the layer mean), got {v!r}")
        return v

    @field_validator("sparsegpt_blocksize")
    @classmethod
    def _check_blocksize(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"sparsegpt_blocksize must be at least 1 column, got {v!r}")
        return v

    @field_validator("sparsegpt_dampening")
    @classmethod
    def _check_damp(cls, v: float) -> float:
        if not (0.0 < v <= 1.0):
            raise ValueError(f"sparsegpt_dampening must be in (0, 1], got {v!r}")
        return v

    @field_validator("layer_sparsity")
    @classmethod
    def _check_layer_sparsity(cls, v: dict[str, float]) -> dict[str, float]:
        for pattern, s in v.items():
            _sparsity(f"layer_sparsity[{pattern!r}]", s)
        return v

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        if v is not None and len(v) == 0:
            raise ValueError("targets is an empty list; omit it to use the default targets")
        return v

    @field_validator("structured_units")
    @classmethod
    def _check_structured_units(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"structured_units is empty; use one or both of {', '.join(map(repr, STRUCTURED_UNITS))}")
        for u in v:
            if u not in STRUCTURED_UNITS:
                one_of("structured unit", u, STRUCTURED_UNITS)
        if len(set(v)) != len(v):
            raise ValueError(f"structured_units lists a unit twice: {v!r}")
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> "PruningConfig":
        defaults = {"structured_units": list(STRUCTURED_UNITS), "structured_widths": "uniform"}
        structured_keys = {k for k, d in defaults.items() if getattr(self, k) != d}
        if structured_keys and self.method != "structured_sparsity":
            raise ValueError(
                f"{', '.join(sorted(structured_keys))} only apply to method 'structured_sparsity' "
                f"(method is {self.method!r}); remove them or change the method"
            )
        from artemis.metrics import METRICS

        if self.importance_metric in METRICS:
            METRICS.get(self.importance_metric).validate_options(self.metric_options)
        if self.pruning_start > self.pruning_end:
            raise ValueError(
                f"pruning_start ({self.pruning_start}) is after pruning_end ({self.pruning_end}); "
                "pruning_start must be <= pruning_end"
            )
        if self.layer_dropout is not None and self.method != "layer_dropout":
            raise ValueError(
                f"the layer_dropout section is only used by method 'layer_dropout' (method is "
                f"{self.method!r}); remove it or set method: layer_dropout"
            )
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"initial_sparsity ({self.initial_sparsity}) is above final_sparsity "
                f"({self.final_sparsity}); sparsity can only grow during pruning"
            )
        if self.sparsegpt_obs_scope != "layer" and (self.sparsegpt_mask != "obs" or self.pattern is not None):
            raise ValueError(
                f"sparsegpt_obs_scope {self.sparsegpt_obs_scope!r} only applies with sparsegpt_mask: obs and no "
                f"pattern (sparsegpt_mask is {self.sparsegpt_mask!r}, pattern is {self.pattern!r}); remove it"
            )
        if self.pattern is not None:
            n, m = parse_nm_pattern(self.pattern)
            if abs(self.final_sparsity - (1.0 - n / m)) > 1e-9:
                raise ValueError(
                    f"pattern {self.pattern!r} prunes exactly {1.0 - n / m:g} of every group, but "
                    f"final_sparsity is {self.final_sparsity}; set final_sparsity: {1.0 - n / m:g} or omit it"
                )
            if self.scope is not None:
                raise ValueError(
                    f"scope {self.scope!r} does not apply with pattern {self.pattern!r}: N:M chooses "
                    "within each group of M weights; remove scope"
                )
            if self.layer_sparsity:
                raise ValueError(
                    f"layer_sparsity does not apply with pattern {self.pattern!r}: every layer is "
                    f"{self.pattern}; remove layer_sparsity or pattern"
                )
        extras = [
            name
            for name, on in (
                (f"reconstruction: {self.reconstruction}", self.reconstruction != "none"),
                (f"pattern: {self.pattern}", self.pattern is not None),
                ("scope: owl", self.scope == "owl"),
            )
            if on
        ]
        if extras and self.method != "magnitude_progressive":
            raise ValueError(
                f"{', '.join(extras)} applies to unstructured pruning only (method "
                f"'magnitude_progressive'), not to method {self.method!r}"
            )
        if self.scope == "owl" and self.layer_sparsity:
            raise ValueError(
                "layer_sparsity does not apply with scope 'owl': OWL chooses every layer's sparsity; remove one of them"
            )
        return self


def format_validation_error(err: ValidationError, where: str) -> str:
    """Turn a pydantic error into one readable line per problem, naming field and value."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "__root__")
        field = f"{where}.{loc}" if loc else where
        msg = e.get("msg", "")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        value = e.get("input")
        shown = "" if isinstance(value, Mapping) else f" (got {value!r})"
        if "got " in msg:
            shown = ""
        lines.append(f"{field}: {msg}{shown}")
    return "; ".join(lines)


def read_yaml(path: Union[str, os.PathLike]) -> dict:
    """Read a YAML mapping from ``path`` with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def _validate_pruning(section: Any, where: str) -> PruningConfig:
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where} must be a mapping of pruning options, got {section!r}")
    try:
        return PruningConfig.model_validate(dict(section))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None


def load_pruning_config(source: Union[PruningConfig, Mapping, str, os.PathLike]) -> PruningConfig:
    """Return the validated pruning section of ``source``.

    Args:
        source: a :class:`PruningConfig`; a dict with a ``pruning`` section; a dict with
            ``model.pruning`` (the combined form); or a path to a YAML file holding either.

    Raises:
        ConfigError: the source holds no pruning section, or the section is invalid.
    """
    if isinstance(source, PruningConfig):
        return source
    where_file = ""
    if isinstance(source, (str, os.PathLike)):
        where_file = f"{os.fspath(source)}: "
        source = read_yaml(source)
    if not isinstance(source, Mapping):
        raise ConfigError(
            f"config must be a dict, a PruningConfig or a path to a YAML file, got {type(source).__name__}"
        )
    try:
        if "pruning" in source:
            if isinstance(source.get("model"), Mapping) and "pruning" in source["model"]:
                raise ConfigError("both 'pruning' and 'model.pruning' are present; keep one pruning section")
            return _validate_pruning(source["pruning"], "pruning")
        model = source.get("model")
        if isinstance(model, Mapping) and "pruning" in model:
            return _validate_pruning(model["pruning"], "model.pruning")
    except ConfigError as exc:
        raise ConfigError(f"{where_file}{exc}") from None
    keys = ", ".join(map(repr, source)) or "none"
    raise ConfigError(
        f"{where_file}no pruning section found (top-level keys: {keys}); "
        "expected {'pruning': {...}} or {'model': {'pruning': {...}}}"
    )
