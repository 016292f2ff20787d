"""Typed, validated configuration.

The YAML keys of the specification are a contract. A pruning section can
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

Keys that belong to one pruning method (``reconstruction``, ``sparsegpt_*``, ``owl_*``,
``structured_*``, the ``layer_dropout:`` sub-section) are declared by the method, as an
options model next to its code (:class:`artemis.methods.base.MethodOptions`); this module
finds them through the method registry, without importing the methods:

    >>> cfg = load_pruning_config({"pruning": {"reconstruction": "sparsegpt"}})
    >>> cfg.reconstruction, cfg.sparsegpt_blocksize, cfg.needs_calibration_batches
    ('sparsegpt', 128, True)
    >>> load_pruning_config({"pruning": {"method": "layer_dropout", "owl_lambda": 0.1}})
    Traceback (most recent call last):
    ...
    artemis.core.errors.ConfigError: pruning: owl_lambda only apply to method 'magnitude_progressive' (method is 'layer_dropout'); ...
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from artemis.core.errors import ConfigError
from artemis.core.masks import parse_nm_pattern
from artemis.core.registry import METHODS, METRICS

if TYPE_CHECKING:  # pragma: no cover
    from artemis.methods.base import MethodOptions
    from artemis.methods.layer_dropout import LayerDropoutOptions
    from artemis.methods.sparsegpt import RECONSTRUCTIONS, SPARSEGPT_OBS_SCOPES, SPARSEGPT_TARGETS
    from artemis.methods.structured import STRUCTURED_UNITS, STRUCTURED_WIDTHS

__all__ = [
    "PruningConfig",
    "ConfigSection",
    "LayerDropoutOptions",
    "load_pruning_config",
    "load_yaml",
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
_CHOICES = {"schedule": SCHEDULES, "scope": SCOPES}

#: names that moved next to the method that owns them, still importable from here
_MOVED = {
    "LayerDropoutOptions": "artemis.methods.layer_dropout",
    "RECONSTRUCTIONS": "artemis.methods.sparsegpt",
    "SPARSEGPT_OBS_SCOPES": "artemis.methods.sparsegpt",
    "SPARSEGPT_TARGETS": "artemis.methods.sparsegpt",
    "STRUCTURED_UNITS": "artemis.methods.structured",
    "STRUCTURED_WIDTHS": "artemis.methods.structured",
}

_O = TypeVar("_O", bound="MethodOptions")


def __getattr__(name: str) -> Any:
    """``from artemis.core.config import LayerDropoutOptions`` (and the other moved names)."""
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # imported on use, not at the top: the methods import this module (a cycle otherwise)
    return getattr(importlib.import_module(module), name)


def _options_models() -> list[type["MethodOptions"]]:
    """Every registered method's options models, each once."""
    out: list[type["MethodOptions"]] = []
    for cls in METHODS.classes():
        for model in cls.options_models:
            if model not in out:
                out.append(model)
    return out


def _option_keys() -> dict[str, type["MethodOptions"]]:
    """Config key → the options model that declares it (flat keys and sub-section names)."""
    keys: dict[str, type["MethodOptions"]] = {}
    for model in _options_models():
        for key in [model.section] if model.section is not None else list(model.model_fields):
            keys.setdefault(key, model)
    return keys


def _owners(test: Any) -> list[str]:
    """The registered methods for which ``test(method class)`` is true."""
    return [n for n in METHODS.names() if test(METHODS.get(n))]


def _either(names: Sequence[str]) -> str:
    return " or ".join(map(repr, names)) or "none"


def _check_unknown_keys(model_cls: type[BaseModel], data: Any, more: Sequence[str] = ()) -> None:
    """Raise ValueError for keys the model (or ``more``) does not know, with a suggestion."""
    if not isinstance(data, Mapping):
        return
    known: set[str] = set(more)
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


def _is_number_type(annotation: Any) -> bool:
    if annotation in (int, float):
        return True
    args = get_args(annotation)
    return bool(args) and all(a in (int, float, type(None)) for a in args) and any(a in (int, float) for a in args)


def _is_number_mapping_type(annotation: Any) -> bool:
    """``dict[str, float]`` and the like (optionally inside ``Optional``)."""
    for candidate in (annotation, *get_args(annotation)):
        if get_origin(candidate) in (dict, Mapping):
            args = get_args(candidate)
            if len(args) == 2 and _is_number_type(args[1]):
                return True
    return False


def _check_no_bool_numbers(model_cls: type[BaseModel], data: Any) -> None:
    """``final_sparsity: true`` is a mistake, not 1.0: refuse booleans for number fields,
    and for the values of number-valued mappings (``layer_sparsity: {fc: false}``)."""
    if not isinstance(data, Mapping):
        return
    for name, field in model_cls.model_fields.items():
        for key in {name, field.alias} - {None}:
            value = data.get(key)
            if isinstance(value, bool) and _is_number_type(field.annotation):
                raise ValueError(f"{key} must be a number, got {value!r}")
            if isinstance(value, Mapping) and _is_number_mapping_type(field.annotation):
                for inner, v in value.items():
                    if isinstance(v, bool):
                        raise ValueError(f"{key}[{inner!r}] must be a number, got {v!r}")


class ConfigSection(BaseModel):
    """Base of every config section (here, in :mod:`artemis.train.run_config` and
    :mod:`artemis.finetune.config`): unknown keys fail with a "did you mean" hint and the
    list of valid keys, and assignments after construction are validated too."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _unknown_keys(cls, data: Any) -> Any:
        _check_unknown_keys(cls, data)
        _check_no_bool_numbers(cls, data)
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
        schedule: ``cubic`` (the cubic schedule of the specification, gentle at the start),
            ``cubic_decay`` (Zhu & Gupta, aggressive at the start) or ``linear``.
        scope: ``global`` (one threshold across all prunable weights), ``layer`` (each
            weight matrix to the target on its own), ``row`` (each output row on its own,
            as Wanda does) or ``owl`` (outlier-weighted layer-wise sparsity: each block gets
            a sparsity from its share of activation outliers, the sizes-weighted average
            being exactly the target; needs calibration data; options in
            :class:`artemis.methods.owl.OWLOptions`). ``None`` means the metric's default
            (``row`` for ``activation``, ``global`` otherwise).
        pattern: ``"N:M"`` semi-structured sparsity (``"2:4"``, ``"4:8"``): in every group of
            M consecutive input weights of a row exactly N are kept (chosen by the metric).
            Fixes the final sparsity at 1 − N/M (set ``final_sparsity`` to it or omit it);
            progressive runs prune round(s(t)·M) weights per group at each event. Only for
            methods with ``supports_pattern`` (``magnitude_progressive``). Parsed once, at
            validation: :attr:`nm_pattern`.
        targets: module-name patterns selecting the prunable modules (``fnmatch`` globs
            such as ``"*.mlp.*"``, or regular expressions prefixed with ``re:``). Default:
            every ``nn.Linear`` / HF ``Conv1D`` inside the transformer blocks.
        exclude: patterns removed from the targets.
        layer_sparsity: pattern → final sparsity overrides for matching modules.
        total_steps: optional; may instead be passed to ``step()`` or the manager.

    Method options: the keys a pruning method owns are declared by its options models
    (``PruningMethod.options_models``) and read as attributes like the keys above
    (``cfg.owl_lambda``), with their defaults when not given:

    * :class:`artemis.methods.sparsegpt.SparseGPTOptions` — ``reconstruction`` and
      ``sparsegpt_variant`` (``artemis`` or ``paper``: the settings of the keys not given),
      ``sparsegpt_blocksize``, ``sparsegpt_dampening``, ``sparsegpt_mask``,
      ``sparsegpt_obs_scope``, ``sparsegpt_target``, ``sparsegpt_shrinkage``,
      ``sparsegpt_bias_correction`` (``magnitude_progressive``);
    * :class:`artemis.methods.owl.OWLOptions` — ``owl_lambda``, ``owl_m``
      (``magnitude_progressive`` with ``scope: owl``);
    * :class:`artemis.methods.structured.StructuredOptions` — ``structured_units``,
      ``structured_widths``, ``structured_norm``, ``structured_reduction``
      (``structured_sparsity``);
    * :class:`artemis.methods.layer_dropout.LayerDropoutOptions` — the ``layer_dropout:``
      sub-section (``layer_dropout``).

    A non-default value of options the configured method does not take fails, naming the
    methods that take them; the method's cross-field rules run through its
    ``validate_config``.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True, validate_assignment=True)

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
    pattern: Optional[str] = None

    _nm: Optional[tuple[int, int]] = PrivateAttr(default=None)
    _options: dict[Any, Any] = PrivateAttr(default_factory=dict)
    _given_options: Optional[set[str]] = PrivateAttr(default=None)

    @property
    def nm_pattern(self) -> Optional[tuple[int, int]]:
        """``(N, M)`` of ``pattern``, parsed at validation (None without a pattern)."""
        return self._nm

    @property
    def needs_calibration_batches(self) -> bool:
        """Whether every pruning event needs calibration batches of its own (the method's
        ``calibration_need``: ``reconstruction: sparsegpt``, or ``scope: owl`` without a
        pattern)."""
        return METHODS.get(self.method).calibration_need(self) is not None

    def __setattr__(self, name: str, value: Any) -> None:
        extra = self.__pydantic_extra__
        if name.startswith("_") or name in type(self).model_fields or extra is None:
            super().__setattr__(name, value)
            return
        # a method option is an extra attribute, stored before it is validated: undo a bad one
        saved, given = dict(extra), self._given_options
        self._given_options = (given or set()) | {name}
        try:
            super().__setattr__(name, value)
        except ValidationError:
            object.__setattr__(self, "__pydantic_extra__", saved)
            self._given_options = given
            self._validate_method_options()
            raise

    def __eq__(self, other: object) -> bool:
        # equal values are equal configs, whichever keys were given and which derived
        if not isinstance(other, PruningConfig):
            return NotImplemented
        return type(self) is type(other) and self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]  # mutable, as pydantic's models

    def given(self) -> dict[str, Any]:
        """The keys set by the user (given to the constructor or assigned), with their
        values: what re-validating needs to give the same config, without the values that
        defaults and variants derived (which a changed key must be free to derive again).

        Example:
            >>> cfg = PruningConfig(final_sparsity=0.5, reconstruction="sparsegpt")
            >>> sorted(cfg.given())
            ['final_sparsity', 'reconstruction']
        """
        keys = set(self.model_fields_set) | (self._given_options or set())
        return {k: v for k, v in self.model_dump(mode="python").items() if k in keys}

    def method_options(self, model: type[_O]) -> Optional[_O]:
        """The validated instance of a method's options ``model`` (None for a sub-section
        that is not given, or a model no registered method declares)."""
        return self._options.get(model)

    @model_validator(mode="before")
    @classmethod
    def _unknown_keys(cls, data: Any) -> Any:
        _check_unknown_keys(cls, data, more=list(_option_keys()))
        _check_no_bool_numbers(cls, data)
        return data

    @model_validator(mode="before")
    @classmethod
    def _aliases_and_pattern(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "importance_metric" not in data and data.get("method") in METHODS:
            default = getattr(METHODS.get(data["method"]), "default_metric", None)
            if default is not None:  # a method scoring its own units names its default metric
                data = {**data, "importance_metric": default}
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
        if v not in METHODS:
            raise ValueError(METHODS.unknown_message(v))
        return v

    @field_validator("importance_metric")
    @classmethod
    def _check_metric(cls, v: str, info) -> str:
        method = info.data.get("method")
        supported = METHODS.get(method).supported_metrics if method in METHODS else None
        if supported is not None:  # the method scores its own units (e.g. whole layers)
            if v not in supported:
                raise ValueError(
                    f"unknown importance_metric {v!r} for method {method!r}; valid: " + ", ".join(map(repr, supported))
                )
            return v
        if v not in METRICS:
            raise ValueError(METRICS.unknown_message(v))
        return v

    @field_validator("schedule", "scope")
    @classmethod
    def _check_choice(cls, v: Optional[str], info) -> Optional[str]:
        if v is None and info.field_name == "scope":  # None: the metric's default scope
            return v
        return one_of(info.field_name, v, _CHOICES[info.field_name])

    @field_validator("pattern", mode="before")
    @classmethod
    def _check_pattern(cls, v: Any) -> Optional[str]:
        if isinstance(v, int) and not isinstance(v, bool) and v >= 60:
            raise ValueError(
                f"pattern must be a string 'N:M' such as '2:4', got the number {v}: a YAML 1.1 reader "
                f'(yaml.safe_load) reads an unquoted 2:4 as the base-60 number 124; quote it (pattern: "2:4")'
            )
        if v is not None:
            n, m = parse_nm_pattern(v)
            return f"{n}:{m}"
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

    def _validate_method_options(self) -> None:
        """Validate the keys of every registered method's options models (flat keys and
        sub-sections, kept as extra attributes so that ``cfg.<key>`` reads them) and keep
        the validated instances for :meth:`method_options`."""
        extra = self.__pydantic_extra__
        if extra is None:  # pragma: no cover - extra="allow" always gives a dict
            extra = self.__pydantic_extra__ = {}
        keys = _option_keys()
        _check_unknown_keys(type(self), {k: v for k, v in extra.items() if k not in keys}, more=list(keys))
        if self._given_options is None:  # first validation: the extras are what the user gave
            self._given_options = set(extra)
        options: dict[Any, Any] = {}
        errors: list[Any] = []
        for model in _options_models():
            if model.section is None:
                # only the keys the user gave: the others are derived again (a changed variant)
                given = {k: extra[k] for k in model.model_fields if k in extra and k in self._given_options}
                loc: tuple[str, ...] = ()
            else:
                given = extra.get(model.section)
                loc = (model.section,)
                if given is None or isinstance(given, model):
                    extra[model.section] = options[model] = given
                    continue
            try:
                value = model.model_validate(given)
            except ValidationError as exc:
                errors += [
                    {"type": e["type"], "loc": loc + tuple(e["loc"]), "input": e["input"], "ctx": e.get("ctx", {})}
                    for e in exc.errors()
                ]
                continue
            if model.section is None:
                extra.update({k: getattr(value, k) for k in model.model_fields})
            else:
                extra[model.section] = value
            options[model] = value
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        self._options = options

    @model_validator(mode="after")
    def _cross_field(self) -> "PruningConfig":
        self._validate_method_options()
        if self.importance_metric in METRICS:
            METRICS.get(self.importance_metric).validate_options(self.metric_options)
        if self.pruning_start > self.pruning_end:
            raise ValueError(
                f"pruning_start ({self.pruning_start}) is after pruning_end ({self.pruning_end}); "
                "pruning_start must be <= pruning_end"
            )
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"initial_sparsity ({self.initial_sparsity}) is above final_sparsity "
                f"({self.final_sparsity}); sparsity can only grow during pruning"
            )
        self._nm = None
        if self.pattern is not None:
            n, m = self._nm = parse_nm_pattern(self.pattern)
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
        method = METHODS.get(self.method)
        if self.pattern is not None and not method.supports_pattern:
            raise ValueError(
                f"pattern {self.pattern!r} only applies to method {_either(_owners(lambda c: c.supports_pattern))} "
                f"(method is {self.method!r}); remove it or change the method"
            )
        for model, options in self._options.items():
            used = options.in_use(self) if options is not None and model not in method.options_models else []
            if not used:
                continue
            owners = _owners(lambda c, model=model: model in c.options_models)
            if model.section is not None:
                raise ValueError(
                    f"the {model.section} section is only used by method {_either(owners)} (method is "
                    f"{self.method!r}); remove it or set method: {' or '.join(owners)}"
                )
            raise ValueError(
                f"{', '.join(used)} only apply to method {_either(owners)} (method is {self.method!r}); "
                "remove them or change the method"
            )
        method.validate_config(self)
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


class _YAMLLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without YAML 1.1's base-60 numbers: ``pattern: 2:4`` is the
    string ``"2:4"``, not the integer 124 (``2*60 + 4``) that PyYAML makes of it."""


_YAMLLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YAMLLoader.add_implicit_resolver(  # checked before the number resolvers of the same first character
    "tag:yaml.org,2002:str", re.compile(r"^[0-9]+:[0-9]+$"), list("0123456789")
)
for _first in "0123456789":
    _YAMLLoader.yaml_implicit_resolvers[_first].insert(0, _YAMLLoader.yaml_implicit_resolvers[_first].pop())


def load_yaml(text: str) -> Any:
    """Parse YAML ``text`` safely, reading ``N:M`` (``2:4``, ``4:8``) as a string.

    Example:
        >>> load_yaml("pattern: 2:4")
        {'pattern': '2:4'}
        >>> load_yaml("steps: 10")
        {'steps': 10}
    """
    loader = _YAMLLoader(text)  # a SafeLoader: builds plain data only, never Python objects
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: Union[str, os.PathLike]) -> dict:
    """Read a YAML mapping from ``path`` with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = load_yaml(p.read_text(encoding="utf-8"))
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
