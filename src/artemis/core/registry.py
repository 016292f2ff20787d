"""A small name → class registry shared by metrics, methods and architecture adapters.

The registries of pruning methods (:data:`METHODS`) and importance metrics
(:data:`METRICS`) live here, so that the config can ask them for names, options and
validation rules without importing the methods or metrics. Each fills itself on first
lookup by importing its built-in package (``artemis.methods``, ``artemis.metrics``),
whose modules register their classes.

Example:
    >>> from artemis.core.registry import Registry
    >>> colours = Registry("colour")
    >>> @colours.register("red")
    ... class Red: ...
    >>> colours.get("red").__name__
    'Red'
    >>> colours.get("blue")
    Traceback (most recent call last):
    ...
    artemis.core.errors.ConfigError: unknown colour 'blue'; valid: 'red'
"""

from __future__ import annotations

import difflib
import importlib
import re
from typing import TYPE_CHECKING, Callable, Generic, Iterator, Optional, TypeVar

from artemis.core.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from artemis.methods.base import PruningMethod
    from artemis.metrics.base import ImportanceMetric

__all__ = ["Registry", "METHODS", "METRICS"]

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry(Generic[T]):
    """Maps a lower-case name to a class; rejects duplicates and malformed names.

    Args:
        kind: what is registered, for error messages (``"method"``).
        builtins: dotted name of the package whose import registers the built-in
            entries; it is imported on the first lookup (``get``, ``in``, ``names`` ...),
            not on ``register``.
    """

    def __init__(self, kind: str, *, builtins: Optional[str] = None) -> None:
        self.kind = kind
        self.builtins = builtins
        self._items: dict[str, T] = {}
        self._loaded = builtins is None

    def _load_builtins(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # set first: the package's modules register while it is imported
        try:
            # imported here, not at the top: the built-in package imports this module
            importlib.import_module(self.builtins)  # type: ignore[arg-type]
        except BaseException:
            self._loaded = False
            raise

    def register(self, name: str, *, overwrite: bool = False) -> Callable[[T], T]:
        """Class decorator registering ``cls`` under ``name``."""
        if not _NAME.match(name):
            raise ValueError(
                f"{self.kind} name {name!r} is not valid: use lower-case letters, digits and '_', "
                "starting with a letter"
            )

        def decorator(cls: T) -> T:
            if name in self._items and not overwrite and self._items[name] is not cls:
                raise ValueError(
                    f"a {self.kind} named {name!r} is already registered ({self._items[name]!r}); "
                    "pass overwrite=True to replace it"
                )
            self._items[name] = cls
            return cls

        return decorator

    def get(self, name: str) -> T:
        self._load_builtins()
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(self.unknown_message(name)) from None

    def unknown_message(self, name: object) -> str:
        self._load_builtins()
        valid = ", ".join(repr(n) for n in sorted(self._items))
        msg = f"unknown {self.kind} {name!r}; valid: {valid}"
        close = difflib.get_close_matches(str(name), list(self._items), n=1)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
        return msg

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._items)

    def classes(self) -> list[T]:
        """The registered classes, in name order."""
        return [self._items[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


METHODS: "Registry[type[PruningMethod]]" = Registry("method", builtins="artemis.methods")
"""Pruning methods by name (the config's ``method``); see :mod:`artemis.methods.base`."""

METRICS: "Registry[type[ImportanceMetric]]" = Registry("importance_metric", builtins="artemis.metrics")
"""Importance metrics by name (the config's ``importance_metric``); see :mod:`artemis.metrics.base`."""
