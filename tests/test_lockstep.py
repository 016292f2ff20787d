"""PausedForwards: block passes paused at chosen layers, one thread per batch."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn

from artemis.data.lockstep import PausedForwards


class _Block(nn.Module):
    """x → a(x) → relu → b(·) + x; ``b`` is called twice when ``twice``; raises on a NaN input."""

    def __init__(self, twice: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2, bias=False)
        self.b = nn.Linear(2, 2, bias=False)
        self.twice = twice
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
            self.b.weight.copy_(torch.eye(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if torch.isnan(h).any():
            raise ValueError("NaN in the block")
        y = self.b(h)
        if self.twice:
            y = self.b(y)
        return y + x


def _inputs(*rows):
    return [((torch.tensor([r]),), {}) for r in rows]


def test_passes_pause_in_order_and_see_the_layers_updated_while_waiting():
    block = _Block()
    inputs = _inputs([1.0, 1.0], [2.0, -1.0])
    with PausedForwards(block, inputs, [block.a, block.b]) as passes:
        assert list(passes.start()) == [0, 1]
        assert [passes.state(b)[1] for b in range(2)] == [block.a, block.a]
        assert passes.state(1)[2].tolist() == [[2.0, -1.0]]
        with torch.no_grad():
            block.a.weight.mul_(3.0)  # changed while both passes wait before it
        states = [passes.resume(b) for b in range(2)]
        assert [s[1] for s in states] == [block.b, block.b]
        assert states[0][2].tolist() == [[3.0, 6.0]]  # relu(3·diag(1, 2)·x)
        assert states[1][2].tolist() == [[6.0, 0.0]]
        with torch.no_grad():
            block.b.weight.zero_()
        done = [passes.resume(b) for b in range(2)]
    assert [d[0] for d in done] == ["done", "done"]
    assert done[0][1].tolist() == [[1.0, 1.0]]  # b now outputs 0: the residual alone
    assert not block.a._forward_pre_hooks and not block.b._forward_pre_hooks
    assert done[0][1].grad_fn is None  # the passes run under no_grad


def test_only_the_first_call_of_a_layer_pauses():
    block = _Block(twice=True)
    with PausedForwards(block, _inputs([1.0, 1.0]), [block.b]) as passes:
        passes.start()
        assert passes.state(0)[1] is block.b
        assert passes.resume(0)[0] == "done"  # the second call of b runs through


def test_an_error_in_a_pass_is_raised_by_the_call_that_ran_it_and_close_ends_the_others():
    block = _Block()
    inputs = _inputs([1.0, 1.0], [float("nan"), 0.0], [0.5, 0.5])
    before = threading.active_count()
    passes = PausedForwards(block, inputs, [block.b])
    with pytest.raises(ValueError, match="NaN in the block"):
        passes.start()  # pass 1 fails before it reaches b
    assert passes.state(0)[0] == "at"
    passes.close()
    assert passes.state(0) == ("closed",)
    assert threading.active_count() == before
    assert not block.b._forward_pre_hooks
    passes.close()  # idempotent


def test_resume_of_a_finished_pass_is_refused():
    block = _Block()
    with PausedForwards(block, _inputs([1.0, 1.0]), [block.a]) as passes:
        passes.start()
        assert passes.resume(0)[0] == "done"
        with pytest.raises(RuntimeError, match="pass 0 is not paused"):
            passes.resume(0)


def test_calls_outside_the_passes_are_not_paused():
    """The hooks only stop the passes' own threads: the block called directly (here, while
    the passes wait) runs through."""
    block = _Block()
    with PausedForwards(block, _inputs([1.0, 1.0]), [block.a]) as passes:
        passes.start()
        with torch.no_grad():
            assert block(torch.tensor([[1.0, 1.0]])).tolist() == [[2.0, 3.0]]
        assert passes.resume(0)[1].tolist() == [[2.0, 3.0]]


def test_the_callers_autocast_applies_inside_the_passes():
    block = _Block()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        passes = PausedForwards(block, _inputs([1.0, 1.0]), [block.b])
    with passes:
        passes.start()
        assert passes.state(0)[2].dtype == torch.bfloat16  # a's output under autocast
        assert passes.resume(0)[0] == "done"
