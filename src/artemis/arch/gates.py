"""Wrappers that change what a transformer block does without touching its parameters.

:class:`BlockGate` replaces one block's ``forward`` on the instance (so parameter names and
``state_dict`` keys do not change) by ``x + alpha·(f(x) − x)``: ``alpha = 1`` is the block,
``alpha = 0`` the identity on the residual stream. Layer dropout fades and cuts blocks
with it. :func:`block_hidden` finds the hidden states in a block's output, whatever its
return structure (a tensor in transformers 5.x, a tuple in older or custom blocks).

Example:
    >>> import torch, torch.nn as nn
    >>> block = nn.Linear(4, 4)
    >>> gate = BlockGate(block, alpha=0.0)
    >>> gate.install()
    >>> x = torch.randn(2, 4)
    >>> torch.equal(block(x), x)  # the identity while gated off
    True
    >>> gate.remove()
    >>> torch.equal(block(x), x)
    False
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor

from artemis.core.errors import ModelError

__all__ = ["BlockGate", "block_hidden", "CACHE_ARGS"]

#: Block-forward arguments that carry a KV cache (transformers 5.x and 4.x names).
CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def block_hidden(x: Any) -> Tensor:
    """The hidden states in a block's output: the tensor itself, the first item of a tuple,
    or ``last_hidden_state``.

    Example:
        >>> import torch
        >>> h = torch.zeros(1, 2, 4)
        >>> block_hidden((h, None)) is h
        True
    """
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):
        return x[0]
    if hasattr(x, "last_hidden_state"):
        return x.last_hidden_state
    raise ModelError(f"cannot find the hidden state in a block output of type {type(x).__name__}")


class BlockGate:
    """Replaces one block's ``forward`` (on the instance) by a gate.

    ``alpha`` is the block's remaining contribution: the output is
    ``x + alpha·(f(x) − x)``; at ``alpha == 0`` the block is not run at all (unless a KV
    cache is passed) and its input is returned in the block's return structure.
    """

    def __init__(self, block: nn.Module, alpha: float = 0.0) -> None:
        self.block = block
        self.alpha = float(alpha)
        self._had_instance_forward = "forward" in block.__dict__
        self._previous = block.__dict__.get("forward")
        self._inner: Callable[..., Any] = block.forward
        try:
            self._signature: Optional[inspect.Signature] = inspect.signature(self._inner)
        except (TypeError, ValueError):  # pragma: no cover - builtins
            self._signature = None
        # None: unknown (learnt from the first real call); 0: returns a tensor.
        self._tuple_len: Optional[int] = 0 if self._returns_tensor() else None
        self.installed = False

    def _returns_tensor(self) -> bool:
        """True when the block's forward is annotated to return a tensor (HF 5.x blocks)."""
        if self._signature is None:
            return False
        ann = self._signature.return_annotation
        return ann is Tensor or ann in ("torch.Tensor", "Tensor")

    def install(self) -> None:
        self.block.forward = self._forward  # instance attribute: state_dict keys unchanged
        self.installed = True

    def remove(self) -> None:
        if not self.installed:
            return
        if self._had_instance_forward:
            self.block.forward = self._previous
        else:
            del self.block.__dict__["forward"]
        self.installed = False

    def _arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        if self._signature is None:
            return dict(kwargs)
        try:
            return dict(self._signature.bind_partial(*args, **kwargs).arguments)
        except TypeError:
            return dict(kwargs)

    def _record(self, out: Any) -> None:
        self._tuple_len = len(out) if isinstance(out, tuple) else 0

    def _with_hidden(self, out: Any, hidden: Tensor) -> Any:
        if isinstance(out, tuple):
            return (hidden,) + tuple(out[1:])
        return hidden

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        arguments = self._arguments(args, kwargs)
        if args:
            x = args[0]
        elif "hidden_states" in kwargs:
            x = kwargs["hidden_states"]
        else:
            x = next(iter(arguments.values()))
        if self.alpha > 0.0:  # fading: run the block, scale its update of the residual stream
            out = self._inner(*args, **kwargs)
            self._record(out)
            h = out[0] if isinstance(out, tuple) else out
            return self._with_hidden(out, x + self.alpha * (h - x))
        # In eval mode, keep a KV cache consistent for generation (training-mode caches are
        # thrown away by the model), and learn the return structure once if unknown.
        has_cache = not self.block.training and any(arguments.get(k) is not None for k in CACHE_ARGS)
        if has_cache or self._tuple_len is None:
            with torch.no_grad():
                out = self._inner(*args, **kwargs)
            self._record(out)
            return self._with_hidden(out, x)
        if self._tuple_len:
            return (x,) + (None,) * (self._tuple_len - 1)
        return x
