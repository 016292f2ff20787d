"""A small name → class registry shared by metrics, methods and architecture adapters.

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
import re
from typing import Callable, Generic, Iterator, TypeVar

from artemis.core.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry(Generic[T]):
    """Maps a lower-case name to a class; rejects duplicates and malformed names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

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
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(self.unknown_message(name)) from None

    def unknown_message(self, name: object) -> str:
        valid = ", ".join(repr(n) for n in sorted(self._items))
        msg = f"unknown {self.kind} {name!r}; valid: {valid}"
        close = difflib.get_close_matches(str(name), list(self._items), n=1)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
        return msg

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
