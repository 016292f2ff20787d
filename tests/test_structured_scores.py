"""structured_sparsity unit scores: structured_norm x structured_reduction, hand-computed."""

from __future__ import annotations

import pytest
import torch

from artemis import ConfigError, create_pruning_manager
from artemis.methods.structured import reduce_unit_scores
from tests.fixtures import tiny_bert


def _manager(norm: str, reduction: str):
    """A one-block BERT (4 heads of 16, 128 neurons, hidden 64) whose weights are zero except:

    * head h: query[16h, 0] = h+1; value[16h+1, 2] = 2h; its output-projection columns
      hold 3(h+1) at [0, 16h] and -4(h+1) at [1, 16h+1] (two columns of the same head).
      Per projection, l1: (h+1, 0, 2h, 7(h+1)); l2: (h+1, 0, 2h, 5(h+1)).
    * neuron j: intermediate row j = 1 in its first 4 entries (l1 4, l2 2); its output
      column holds 3j at row 0 and -4j at row 1 (l1 7j, l2 5j).
    """
    model = tiny_bert(layers=1)
    layer = model.encoder.layer[0]
    att, out = layer.attention.self, layer.attention.output.dense
    up, down = layer.intermediate.dense, layer.output.dense
    with torch.no_grad():
        for lin in (att.query, att.key, att.value, out, up, down):
            lin.weight.zero_()
        for h in range(4):
            att.query.weight[16 * h, 0] = h + 1
            att.value.weight[16 * h + 1, 2] = 2 * h
            out.weight[0, 16 * h] = 3 * (h + 1)
            out.weight[1, 16 * h + 1] = -4 * (h + 1)
        up.weight[:, :4] = 1.0
        j = torch.arange(128.0)
        down.weight[0] = 3 * j
        down.weight[1] = -4 * j
    cfg = {
        "pruning": {
            "method": "structured_sparsity",
            "final_sparsity": 0.5,
            "structured_norm": norm,
            "structured_reduction": reduction,
        }
    }
    return create_pruning_manager(cfg, model)


_h = torch.arange(4, dtype=torch.float64)
_j = torch.arange(128, dtype=torch.float64)
EXPECTED = {
    # (norm, reduction): (head scores, neuron scores)
    ("l1", "sum"): (10 * _h + 8, 4 + 7 * _j),
    ("l1", "mean"): ((10 * _h + 8) / 4, (4 + 7 * _j) / 2),
    ("l1", "max"): (7 * _h + 7, torch.clamp(7 * _j, min=4)),
    ("l2", "sum"): (8 * _h + 6, 2 + 5 * _j),
    ("l2", "mean"): ((8 * _h + 6) / 4, (2 + 5 * _j) / 2),
    ("l2", "max"): (5 * _h + 5, torch.clamp(5 * _j, min=2)),
    ("l1", "output"): (7 * _h + 7, 7 * _j),
    ("l2", "output"): (5 * _h + 5, 5 * _j),
}


@pytest.mark.parametrize("norm, reduction", sorted(EXPECTED))
def test_unit_scores_hand_computed(norm, reduction):
    mgr = _manager(norm, reduction)
    heads, neurons = mgr.method.unit_scores(mgr.metric)  # groups of block 0: attention, then MLP
    want_heads, want_neurons = EXPECTED[(norm, reduction)]
    assert heads.dtype == torch.float64
    assert torch.equal(heads, want_heads)
    assert torch.equal(neurons, want_neurons)


def test_l2_is_over_the_whole_unit_not_per_column():
    # head 0's output-projection part is two columns (3 and -4): l2 5, not 3 + 4
    mgr = _manager("l2", "max")
    heads, _ = mgr.method.unit_scores(mgr.metric)
    assert heads[0].item() == 5.0


def test_pruning_follows_the_scores():
    mgr = _manager("l1", "max")
    mgr.apply_pruning(0.5)  # 2 of 4 heads, 64 of 128 neurons: the lowest scores (heads 0, 1; neurons 0..63)
    widths = mgr.get_pruning_summary()["structured"]["layers"][0]
    assert (widths["heads_kept"], widths["neurons_kept"]) == (2, 64)
    rows = mgr.masks["encoder.layer.0.intermediate.dense.weight"].any(dim=1)
    assert rows.nonzero().flatten().tolist() == list(range(64, 128))
    query = mgr.masks["encoder.layer.0.attention.self.query.weight"].any(dim=1)
    assert query.nonzero().flatten().tolist() == list(range(32, 64))


def test_reduce_unit_scores_hand_computed():
    up = torch.tensor([[3.0, -4.0], [1.0, 0.0]])
    down = torch.tensor([[0.0, 2.0], [6.0, 8.0]])
    assert reduce_unit_scores([up], [down], "l2", "sum").tolist() == [7.0, 11.0]
    assert reduce_unit_scores([up], [down], "l2", "mean").tolist() == [3.5, 5.5]
    assert reduce_unit_scores([up], [down], "l2", "max").tolist() == [5.0, 10.0]
    assert reduce_unit_scores([up], [down], "l2", "output").tolist() == [2.0, 10.0]
    assert reduce_unit_scores([up], [down], "l1", "sum").tolist() == [9.0, 15.0]
    assert reduce_unit_scores([up], [down], "l1", "mean").tolist() == [4.5, 7.5]
    assert reduce_unit_scores([up], [down], "l1", "max").tolist() == [7.0, 14.0]
    assert reduce_unit_scores([up], [down], "l1", "output").tolist() == [2.0, 14.0]


def test_default_reduction_follows_the_metric():
    mag = create_pruning_manager({"pruning": {"method": "structured_sparsity"}}, tiny_bert(layers=1))
    act = create_pruning_manager(
        {"pruning": {"method": "structured_sparsity", "importance_metric": "activation"}}, tiny_bert(layers=1)
    )
    assert (mag.config.structured_norm, mag.config.structured_reduction) == ("l2", None)
    assert (mag.method.norm, mag.method.reduction) == ("l2", "sum")
    assert (act.method.norm, act.method.reduction) == ("l2", "output")
    assert mag.get_pruning_summary()["structured"]["scores"] == {"norm": "l2", "reduction": "sum"}
    given = create_pruning_manager(
        {
            "pruning": {
                "method": "structured_sparsity",
                "importance_metric": "activation",
                "structured_reduction": "max",
            }
        },
        tiny_bert(layers=1),
    )
    assert given.method.reduction == "max"


def test_activation_output_is_the_norm_of_what_a_neuron_writes():
    # l2 of activation scores over a neuron's down-projection column = ||a_j||_2 * ||W_down[:, j]||_2
    model = tiny_bert(layers=1)
    cfg = {"pruning": {"method": "structured_sparsity", "final_sparsity": 0.5, "importance_metric": "activation"}}
    mgr = create_pruning_manager(cfg, model)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    mgr.calibrate([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    seen = {}
    down = model.encoder.layer[0].output.dense
    handle = down.register_forward_pre_hook(lambda m, a: seen.setdefault("a", a[0].detach()))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    a = seen["a"].reshape(-1, 128).double()
    want = a.pow(2).sum(0).sqrt() * down.weight.detach().double().pow(2).sum(0).sqrt()
    _, neurons = mgr.method.unit_scores(mgr.metric)
    assert torch.allclose(neurons, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("structured_norm", "l3", r"unknown structured_norm 'l3'; valid: 'l1', 'l2'"),
        (
            "structured_reduction",
            "median",
            r"unknown structured_reduction 'median'; valid: 'sum', 'mean', 'max', 'output'",
        ),
    ],
)
def test_bad_values_are_named(key, value, match):
    with pytest.raises(ConfigError, match=match):
        create_pruning_manager({"pruning": {"method": "structured_sparsity", key: value}}, tiny_bert(layers=1))


def test_keys_only_apply_to_structured_sparsity():
    with pytest.raises(ConfigError, match="structured_norm only apply to method 'structured_sparsity'"):
        create_pruning_manager({"pruning": {"structured_norm": "l1"}}, tiny_bert(layers=1))


def test_reduce_unit_scores_rejects_bad_values():
    with pytest.raises(ValueError, match=r"unknown structured_norm 'fro'; valid: 'l1', 'l2'"):
        reduce_unit_scores([torch.ones(2, 2)], [], "fro", "sum")
    with pytest.raises(ValueError, match=r"unknown structured_reduction 'prod'"):
        reduce_unit_scores([torch.ones(2, 2)], [], "l1", "prod")
    with pytest.raises(ValueError, match=r"reduction 'output' got no scores to reduce"):
        reduce_unit_scores([torch.ones(2, 2)], [], "l1", "output")
