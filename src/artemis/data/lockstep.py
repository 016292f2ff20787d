"""Block forward passes that pause at chosen layers, all batches in step.

A layer-by-layer reconstruction inside a block (SparseGPT with ``sparsegpt_target: dense``)
needs, for each layer in turn, that layer's inputs over *every* calibration batch, computed
with the layers before it already updated. Restarting the block's forward pass for every
layer costs one partial pass per layer and batch. :class:`PausedForwards` runs the block
once per batch instead, each batch's pass in its own thread, and stops every pass at the
first call of each watched layer (a forward pre-hook waits there): the caller reads the
inputs of all the paused passes, updates the layer, and lets the passes run on to the next
watched layer. So the inputs each layer sees are those of a partial pass restarted after
the layers before it were updated (the same operations on the same values), and the block
runs once per batch.

Only one thread computes at any time (each waits for the caller's go before it runs), in a
fixed order, so the result does not depend on the scheduling. The threads run the block
under ``torch.no_grad()``, with the autocast state the caller had when the object was made
and, on CUDA, with the given device current (these are per thread in PyTorch).

Memory: while the passes are paused, each batch's pass holds what its forward holds at
that point (the block's input, its residual stream, the paused layer's input), for every
batch at once.

Example:
    >>> import torch, torch.nn as nn
    >>> block = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    >>> inputs = [((torch.ones(3, 2),), {}), ((torch.zeros(1, 2),), {})]
    >>> passes = PausedForwards(block, inputs, [block[0], block[2]])
    >>> [passes.state(b)[0] for b in passes.start()]
    ['at', 'at']
    >>> passes.state(0)[1] is block[0], tuple(passes.state(0)[2].shape)
    (True, (3, 2))
    >>> with torch.no_grad():
    ...     block[2].weight.zero_()  # a layer changed while the passes wait before it  # doctest: +ELLIPSIS
    Parameter...
    >>> [passes.resume(b)[1] is block[2] for b in range(2)]
    [True, True]
    >>> [passes.resume(b)[0] for b in range(2)]
    ['done', 'done']
    >>> torch.equal(passes.state(0)[1], block[2].bias.expand(3, 2))
    True
    >>> passes.close()
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["PausedForwards"]


class _Abort(BaseException):
    """Raised inside a paused pass that :meth:`PausedForwards.close` ends (not an Exception,
    so that no ``except Exception`` of the model's code swallows it)."""


class _Pass:
    """One batch's pass: its thread, the two semaphores of the hand-over and its state."""

    def __init__(self) -> None:
        self.go = threading.Semaphore(0)
        self.ready = threading.Semaphore(0)
        self.state: tuple = ("new",)
        self.seen: set[int] = set()
        self.abort = False
        self.thread: Optional[threading.Thread] = None


class PausedForwards:
    """``block(*args, **kwargs)`` for every ``(args, kwargs)`` of ``inputs``, each pass in its
    own thread, paused at the first call of each module of ``modules``.

    :meth:`state` of a pass is ``("at", module, x)`` (paused before ``module`` runs on ``x``,
    its first positional argument), ``("done", output)`` (the block returned), or, after
    :meth:`close`, ``("closed",)``. An exception raised inside a pass is raised again by the
    :meth:`start` or :meth:`resume` that ran it. Use as a context manager or call
    :meth:`close`: paused threads are ended there.
    """

    def __init__(
        self,
        block: nn.Module,
        inputs: Sequence[tuple[tuple, dict]],
        modules: Sequence[nn.Module],
        device: Optional[torch.device] = None,
    ) -> None:
        self.block = block
        self.inputs = list(inputs)
        self.device = device
        self._local = threading.local()
        self._autocast = []  # the caller's autocast state, per device type (thread-local in PyTorch)
        for kind in ("cpu", "cuda"):
            try:
                if torch.is_autocast_enabled(kind):
                    self._autocast.append((kind, torch.get_autocast_dtype(kind)))
            except (TypeError, RuntimeError):  # an older torch without the per-device query
                pass
        self._passes = [_Pass() for _ in self.inputs]
        self._handles = [m.register_forward_pre_hook(self._hook) for m in dict.fromkeys(modules)]

    def __enter__(self) -> "PausedForwards":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._passes)

    # ------------------------------------------------------------------ threads
    def _hook(self, module: nn.Module, args: tuple) -> None:
        p = getattr(self._local, "current", None)
        if p is None or id(module) in p.seen:  # not one of these passes, or not the first call
            return
        p.seen.add(id(module))
        p.state = ("at", module, args[0] if args else None)
        p.ready.release()
        p.go.acquire()
        if p.abort:
            raise _Abort

    def _work(self, b: int) -> None:
        p = self._passes[b]
        p.go.acquire()
        self._local.current = p
        try:
            if p.abort:
                raise _Abort
            args, kwargs = self.inputs[b]
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.no_grad())
                if self.device is not None and self.device.type == "cuda":
                    stack.enter_context(torch.cuda.device(self.device))
                for kind, dtype in self._autocast:
                    stack.enter_context(torch.autocast(kind, dtype=dtype))
                out = self.block(*args, **kwargs)
            p.state = ("done", out)
        except _Abort:
            p.state = ("closed",)
        except BaseException as exc:  # handed to the caller, raised there
            p.state = ("error", exc)
        finally:
            self._local.current = None
            p.ready.release()

    def _step(self, b: int) -> tuple:
        p = self._passes[b]
        p.go.release()
        p.ready.acquire()
        if p.state[0] == "error":
            exc = p.state[1]
            p.state = ("closed",)
            raise exc
        return p.state

    # ------------------------------------------------------------------ caller
    def start(self) -> range:
        """Run every pass, in order, to its first pause (or its end); returns the batch indices."""
        for b, p in enumerate(self._passes):
            p.thread = threading.Thread(target=self._work, args=(b,), name=f"artemis-pass-{b}", daemon=True)
            p.thread.start()
            self._step(b)
        return range(len(self._passes))

    def state(self, b: int) -> tuple:
        """Where pass ``b`` stands: ``("at", module, x)``, ``("done", output)`` or ``("closed",)``."""
        return self._passes[b].state

    def resume(self, b: int) -> tuple:
        """Let pass ``b`` run on to its next pause (or its end); returns its new state."""
        state = self._passes[b].state
        if state[0] != "at":
            raise RuntimeError(f"pass {b} is not paused (it is {state[0]!r})")
        return self._step(b)

    def close(self) -> None:
        """End every paused pass (its forward raises a private exception at the pause) and
        remove the hooks. Idempotent."""
        for p in self._passes:
            if p.thread is not None and p.state[0] == "at":
                p.abort = True
                p.go.release()
                p.ready.acquire()
        for p in self._passes:
            if p.thread is not None:
                p.thread.join()
                p.thread = None
            if p.state[0] in ("at", "new"):
                p.state = ("closed",)
        for h in self._handles:
            h.remove()
        self._handles = []
