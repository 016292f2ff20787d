import pytest
import torch

from artemis.core.masks import count_to_prune, global_masks, layer_mask, nm_masks, row_masks, score_keys


def test_hand_computed_global_mask():
    a = torch.tensor([[0.1, 0.9], [0.5, 0.2]])
    b = torch.tensor([0.3, 0.7, 0.05, 0.6])
    ma, mb = global_masks([lambda: a, lambda: b], [4, 4], 0.5)
    assert ma.tolist() == [[False, True], [True, False]]
    assert mb.tolist() == [False, True, False, True]


def test_ties_broken_by_layer_then_index():
    a = torch.tensor([1.0, 2.0, 2.0])
    b = torch.tensor([2.0, 2.0, 3.0])
    # 6 scores, prune 3: the 1.0 plus the first two 2.0s in (layer, index) order
    ma, mb = global_masks([lambda: a, lambda: b], [3, 3], 0.5)
    assert ma.tolist() == [False, False, False]
    assert mb.tolist() == [True, True, True]
    ma, mb = global_masks([lambda: a, lambda: b], [3, 3], 4 / 6)
    assert ma.tolist() == [False, False, False]
    assert mb.tolist() == [False, True, True]


def test_exact_count_random_and_matches_sort():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        layers = [torch.rand(int(torch.randint(1, 500, (1,), generator=g)), generator=g) for _ in range(4)]
        if trial % 2:
            layers = [(x * 8).round() / 8 for x in layers]  # many ties
        s = float(torch.rand(1, generator=g))
        masks = global_masks([lambda x=x: x for x in layers], [x.numel() for x in layers], s)
        n = sum(x.numel() for x in layers)
        k = count_to_prune(n, s)
        assert sum(int((~m).sum()) for m in masks) == k
        # pruned set equals the first k of a stable sort over the concatenation
        cat = torch.cat(layers)
        order = torch.sort(cat, stable=True).indices[:k]
        expected = torch.ones(n, dtype=torch.bool)
        expected[order] = False
        assert torch.equal(torch.cat([m.flatten() for m in masks]), expected)


def test_zero_scores_and_extremes():
    x = torch.zeros(10)
    assert int((~layer_mask(x, 0.3)).sum()) == 3
    assert layer_mask(x, 0.3).tolist() == [False] * 3 + [True] * 7
    assert layer_mask(torch.rand(5), 0.0).all()
    big = torch.tensor([float("inf"), 1.0, 0.0])
    assert layer_mask(big, 2 / 3).tolist() == [True, False, False]


def test_negative_and_nan_scores_rejected():
    with pytest.raises(ValueError, match="must be >= 0"):
        score_keys(torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match="NaN"):
        score_keys(torch.tensor([float("nan")]))
    # -0.0 is fine
    assert score_keys(torch.tensor([-0.0])).tolist() == [0]


def test_row_masks_hand_computed():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0], [1.0, 1.0, 1.0, 5.0]])
    m = row_masks(s, 0.5)
    assert m.tolist() == [[True, False, True, False], [False, False, True, True]]


def test_nm_masks_2_4():
    s = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0, 0.0, 1.0, 1.0]])
    assert nm_masks(s, 2, 4).tolist() == [[False, True, True, False, False, False, True, True]]
    with pytest.raises(ValueError, match="divide by 4"):
        nm_masks(torch.ones(2, 6), 2, 4)
