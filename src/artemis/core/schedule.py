"""Pure functions of the pruning schedule: which steps are pruning events and what
sparsity each one targets.

Step ``t`` is the ``t``-th call of ``PruningManager.step()``, counted from 0. With
``T`` total steps, pruning starts at ``t_s = round(pruning_start·T)`` and ends at
``t_e = round(pruning_end·T)`` (both rounded half up and clamped to ``[0, T-1]`` so
that the last event is a step that really happens). Masks are recomputed when
``t_s <= t <= t_e`` and ``(t - t_s) % interval == 0``, and always at ``t_e`` so that
the final sparsity is reached exactly.

Example:
    >>> from artemis.core.schedule import sparsity_at, pruning_window
    >>> pruning_window(0.2, 0.8, 100)
    (20, 80)
    >>> round(sparsity_at(50, 20, 80, 0.0, 0.6, "cubic"), 4)
    0.075
    >>> sparsity_at(80, 20, 80, 0.0, 0.6, "cubic")
    0.6
"""

from __future__ import annotations

import math

__all__ = ["round_half_up", "pruning_window", "progress", "shape", "sparsity_at", "is_pruning_event"]


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves away from zero for x >= 0 (Python's ``round``
    rounds halves to even, which would make ``0.5·T`` depend on the parity of ``T/2``)."""
    return int(math.floor(x + 0.5))


def pruning_window(start: float, end: float, total_steps: int) -> tuple[int, int]:
    """Return ``(t_s, t_e)`` for fractions ``start <= end`` of ``total_steps``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps!r}")
    last = total_steps - 1
    t_s = min(max(round_half_up(start * total_steps), 0), last)
    t_e = min(max(round_half_up(end * total_steps), t_s), last)
    return t_s, t_e


def progress(step: int, t_s: int, t_e: int) -> float:
    """Fraction of the pruning window elapsed at ``step``, clamped to [0, 1]."""
    if step <= t_s:
        return 0.0 if step < t_e or t_s != t_e else 1.0
    if step >= t_e:
        return 1.0
    return (step - t_s) / (t_e - t_s)


def shape(p: float, schedule: str) -> float:
    """Fraction of the way from the initial to the final sparsity at progress ``p``.

    ``cubic``: p³ (the cubic schedule of the specification, s_i + (s_f - s_i)·p³, gentle at the start);
    ``cubic_decay``: 1 - (1 - p)³ (Zhu & Gupta 2017, aggressive at the start);
    ``linear``: p.
    """
    if schedule == "cubic":
        return p**3
    if schedule == "cubic_decay":
        return 1.0 - (1.0 - p) ** 3
    if schedule == "linear":
        return p
    raise ValueError(f"unknown schedule {schedule!r}; valid: 'cubic', 'cubic_decay', 'linear'")


def sparsity_at(step: int, t_s: int, t_e: int, initial: float, final: float, schedule: str) -> float:
    """Target sparsity at ``step``: ``initial`` before the window, ``final`` from ``t_e`` on."""
    if step < t_s:
        return initial
    p = progress(step, t_s, t_e)
    if p >= 1.0:
        return final
    return initial + (final - initial) * shape(p, schedule)


def is_pruning_event(step: int, t_s: int, t_e: int, interval: int) -> bool:
    """True when masks are recomputed at ``step``."""
    if step < t_s or step > t_e:
        return False
    return step == t_e or (step - t_s) % interval == 0
