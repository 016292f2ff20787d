import pytest

from artemis.core.schedule import is_pruning_event, pruning_window, round_half_up, shape, sparsity_at


def test_round_half_up():
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 2.4999)] == [1, 2, 3, 2]


def test_window_clamped_to_last_step():
    assert pruning_window(0.2, 0.8, 100) == (20, 80)
    assert pruning_window(0.0, 1.0, 10) == (0, 9)
    assert pruning_window(0.25, 0.25, 10) == (3, 3)


def test_cubic_formula_exact():
    # s(t) = s_i + (s_f - s_i) * ((t - t_s)/(t_e - t_s))**3
    assert sparsity_at(20, 20, 80, 0.1, 0.7, "cubic") == pytest.approx(0.1)
    assert sparsity_at(50, 20, 80, 0.1, 0.7, "cubic") == pytest.approx(0.1 + 0.6 * 0.125)
    assert sparsity_at(80, 20, 80, 0.1, 0.7, "cubic") == 0.7
    assert sparsity_at(10, 20, 80, 0.1, 0.7, "cubic") == 0.1
    assert sparsity_at(95, 20, 80, 0.1, 0.7, "cubic") == 0.7


def test_cubic_decay_and_linear():
    assert sparsity_at(50, 20, 80, 0.0, 0.8, "cubic_decay") == pytest.approx(0.8 * (1 - 0.5**3))
    assert sparsity_at(50, 20, 80, 0.0, 0.8, "linear") == pytest.approx(0.4)
    # cubic is gentle at the start, cubic_decay aggressive
    assert shape(0.25, "cubic") < shape(0.25, "linear") < shape(0.25, "cubic_decay")


def test_events():
    events = [t for t in range(100) if is_pruning_event(t, 20, 80, 25)]
    assert events == [20, 45, 70, 80]
    assert [t for t in range(10) if is_pruning_event(t, 3, 3, 5)] == [3]


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule 'exp'"):
        shape(0.5, "exp")
