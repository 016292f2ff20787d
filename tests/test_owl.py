"""OWL's pieces: the input norms it reads, and the direction of its allocation."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from artemis.core.errors import CalibrationError
from artemis.methods.owl import collect_input_norms, owl_sparsities


class _TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2, bias=False)
        self.b = nn.Linear(2, 2, bias=False)

    def forward(self, x, attention_mask=None):
        return self.a(x)  # self.b is never called


def _target(module: nn.Module, name: str) -> SimpleNamespace:
    return SimpleNamespace(module=module, key=f"{name}.weight", name=name)


def test_collect_input_norms_sums_over_batches_without_padding():
    model = _TwoLinears()
    batches = [
        {"x": torch.tensor([[[3.0, 0.0], [4.0, 1.0], [100.0, 100.0]]]), "attention_mask": torch.tensor([[1, 1, 0]])},
        {"x": torch.tensor([[[0.0, 2.0]], [[0.0, 2.0]]]), "attention_mask": torch.tensor([[1], [1]])},
    ]
    norms = collect_input_norms(model, [_target(model.a, "a")], batches)
    # column 0: 9 + 16 (the padded 100 left out); column 1: 1 + 4 + 4
    assert norms["a.weight"].tolist() == [5.0, 3.0]
    assert model.training  # the mode is restored
    with pytest.raises(CalibrationError, match=r"no calibration batch reached layers \['b'\]; OWL needs their inputs"):
        collect_input_norms(model, [_target(model.a, "a"), _target(model.b, "b")], batches)


def test_owl_gives_the_block_with_fewest_outliers_the_highest_sparsity():
    """The outlier ratios (M = 5) of all-MiniLM-L6-v2's six blocks, as benchmarks/owl_minilm.py
    measured them: the last block has the fewest outliers, so OWL prunes it most (0.804 at a
    0.7 target, λ = 0.08), although it is the block whose pruning costs most on that model."""
    ratios = [0.00778, 0.00756, 0.00734, 0.00756, 0.00831, 0.00557]
    s = owl_sparsities(ratios, [1] * 6, target=0.7, lam=0.08)
    assert [round(v, 3) for v in s] == [0.675, 0.688, 0.701, 0.688, 0.644, 0.804]
    assert sum(s) / 6 == pytest.approx(0.7, abs=1e-12)
