"""gradient_sensitivity and activation metrics: exact scores and masks, memory, options, resume."""

import pytest
import torch
import torch.nn as nn

from artemis import CalibrationError, ConfigError, PruningStateError, create_pruning_manager
from artemis.core.masks import layer_mask
from artemis.metrics import (
    METRICS,
    ActivationMetric,
    GradientSensitivityMetric,
    ImportanceMetric,
    activation_scores,
    gradient_sensitivity_scores,
)
from tests.fixtures import lm_batch, tiny_bert, tiny_gpt2, tiny_llama


def _linear(weight):
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return nn.Sequential(lin)


def _mgr(model, metric, **extra):
    return create_pruning_manager({"pruning": {"targets": ["*"], "importance_metric": metric, **extra}}, model)


def test_registered_with_defaults():
    assert {"magnitude", "gradient_sensitivity", "activation"} <= set(METRICS)
    assert METRICS.get("activation") is ActivationMetric and ActivationMetric.default_scope == "row"
    assert METRICS.get("gradient_sensitivity") is GradientSensitivityMetric
    assert GradientSensitivityMetric.default_scope == "global" and GradientSensitivityMetric.needs_gradients


# ------------------------------------------------------------------ activation (Wanda)
def test_activation_wanda_hand_computed_1x8():
    # |w_j| = j+1, ||x_j|| = 8-j  ->  scores 8, 14, 18, 20, 20, 18, 14, 8
    w = torch.arange(1.0, 9.0).unsqueeze(0) * torch.tensor([1, -1, 1, -1, 1, -1, 1, -1.0])
    net = _linear(w)
    mgr = _mgr(net, "activation")
    x = torch.arange(8.0, 0.0, -1.0).unsqueeze(0)  # one token (1, 8)
    assert mgr.calibrate([x], progress=False) == 1
    sq = mgr.metric.state_dict()["sq"]["0.weight"]
    assert sq.dtype == torch.float32 and sq.shape == (8,)  # one float per input feature
    assert mgr.metric.score(mgr.method.targets[0]).tolist() == [[8.0, 14.0, 18.0, 20.0, 20.0, 18.0, 14.0, 8.0]]
    mgr.apply_pruning(0.5)
    assert (net[0].weight != 0).int().tolist() == [[0, 0, 1, 1, 1, 1, 0, 0]]
    assert mgr.metric.state_dict() == {"sq": {}, "tokens": {}}  # statistics freed at the event
    # plain magnitude keeps the four largest instead
    net2 = _linear(w)
    create_pruning_manager({"pruning": {"targets": ["*"]}}, net2).apply_magnitude_pruning(0.5)
    assert (net2[0].weight != 0).int().tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]


def test_activation_norm_over_tokens_and_batches():
    w = torch.tensor([[1.0, 1.0, 1.0], [2.0, 1.0, 0.5]])
    net = _linear(w)
    mgr = _mgr(net, "activation", scope="layer")
    batches = [torch.tensor([[3.0, 0.0, 1.0], [4.0, 1.0, 1.0]]), torch.tensor([[[0.0, 2.0, 1.0]]])]  # 2-D and 3-D
    mgr.calibrate(batches, progress=False)
    t = mgr.method.targets[0]
    assert mgr.metric.tokens_seen(t.key) == 3
    norms = torch.tensor([5.0, 5.0**0.5, 3.0**0.5])  # sqrt(9+16), sqrt(1+4), sqrt(1+1+1)
    assert torch.allclose(mgr.metric.score(t), w.abs() * norms)
    mgr.apply_pruning(0.5)  # scores 5, 2.236, 1.732 / 10, 2.236, 0.866 -> prune the 3 lowest
    assert (net[0].weight != 0).int().tolist() == [[1, 0, 0], [1, 1, 0]]


def test_activation_scores_transposed_conv1d():
    w = torch.tensor([[1.0, -2.0], [3.0, 4.0], [0.5, 1.0]])  # (in=3, out=2) as HF Conv1D stores it
    sq = torch.tensor([4.0, 1.0, 9.0])
    assert activation_scores(w, sq, transposed=True).tolist() == [[2.0, 4.0], [3.0, 4.0], [1.5, 3.0]]
    with pytest.raises(ValueError, match=r"expected \(3,\) input features"):
        activation_scores(w, torch.ones(2), transposed=True)


def test_activation_on_gpt2_row_scope_per_output():
    model = tiny_gpt2()
    mgr = create_pruning_manager({"pruning": {"importance_metric": "activation"}}, model)
    mgr.apply_pruning(0.5, [lm_batch(), lm_batch(seed=1)], progress=False)
    for t in mgr.method.targets:  # (in, out): every output column is half pruned
        assert torch.all((t.param == 0).sum(dim=0) == t.param.shape[0] // 2)


def test_activation_skips_padding_tokens_in_calibration():
    model = tiny_bert()
    ids = torch.randint(5, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    mgr = _mgr(model, "activation", targets=["*query"])
    mgr.calibrate([{"input_ids": ids, "attention_mask": mask}], progress=False)
    key = mgr.method.targets[0].key
    assert mgr.metric.tokens_seen(key) == 9
    padded = mgr.metric.state_dict()["sq"][key].clone()
    # same statistics as the two sentences run separately without padding (layer 0 is position-wise)
    mgr.calibrate([{"input_ids": ids[:1]}, {"input_ids": ids[1:, :3]}], progress=False)
    assert mgr.metric.tokens_seen(key) == 9
    assert torch.allclose(mgr.metric.state_dict()["sq"][key], padded, rtol=1e-5)


def test_activation_training_forward_collects_eval_forward_does_not():
    model = tiny_llama()
    mgr = create_pruning_manager({"pruning": {"importance_metric": "activation"}}, model)
    key = mgr.method.targets[0].key
    model.eval()
    model(**lm_batch())
    assert mgr.metric.tokens_seen(key) == 0
    model.train()
    model(**lm_batch())
    assert mgr.metric.tokens_seen(key) == 32
    mgr.finalize()
    model(**lm_batch())  # hooks removed
    assert mgr.metric.tokens_seen(key) == 0


def test_activation_during_training_with_schedule_frees_statistics():
    model = tiny_llama()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mgr = create_pruning_manager(
        {"pruning": {"importance_metric": "activation", "final_sparsity": 0.5, "pruning_interval": 2}},
        model,
        total_steps=10,
    )
    for _ in range(10):
        model(**lm_batch()).loss.backward()
        mgr.step()
        opt.step()
        opt.zero_grad()
    t = mgr.method.targets[0]
    assert torch.all((t.param == 0).sum(dim=1) == t.param.shape[1] // 2)
    assert mgr.get_pruning_summary()["scope"] == "row"


# ------------------------------------------------------------------ gradient_sensitivity
def test_gradient_sensitivity_hand_computed():
    w = torch.tensor([[2.0, -1.0, 0.5, 4.0]])
    net = _linear(w)
    mgr = _mgr(net, "gradient_sensitivity", scope="layer")
    p = net[0].weight
    for g in ([1.0, 2.0, -4.0, 0.0], [-3.0, 2.0, 4.0, 0.25]):
        p.grad = torch.tensor([g])
        mgr.metric.on_step()
    # |w| * mean|g| = 2*2, 1*2, 0.5*4, 4*0.125 = 4, 2, 2, 0.5
    assert mgr.metric.score(mgr.method.targets[0]).tolist() == [[4.0, 2.0, 2.0, 0.5]]
    mgr.apply_pruning(0.5)  # prune 0.5 and the first of the tied 2s
    assert (p != 0).int().tolist() == [[1, 0, 1, 0]]
    assert mgr.metric.accumulator_bytes() == 0  # freed at the event
    assert gradient_sensitivity_scores(w, torch.ones(1, 4), 2).tolist() == [[1.0, 0.5, 0.25, 2.0]]


def test_gradient_calibration_matches_manual_accumulation():
    batches = [lm_batch(seed=0), lm_batch(seed=1), lm_batch(seed=2)]
    ref = tiny_llama()
    for p in ref.parameters():
        p.requires_grad_(True)
    targets = create_pruning_manager({"pruning": {}}, ref).method.targets
    acc = {t.key: torch.zeros_like(t.param) for t in targets}
    for b in batches:
        ref.zero_grad()
        ref(**b).loss.backward()
        for t in targets:
            acc[t.key] += t.param.grad.abs()
    expected = {t.key: layer_mask(t.param.abs() * acc[t.key] / 3, 0.4) for t in targets}

    model = tiny_llama()
    mgr = create_pruning_manager({"pruning": {"importance_metric": "gradient_sensitivity", "scope": "layer"}}, model)
    model.train()
    mgr.apply_pruning(0.4, batches, progress=False)
    assert model.training  # mode restored
    for t in mgr.method.targets:
        assert torch.equal(mgr.masks[t.key], expected[t.key]), t.key
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind
    assert all(p.requires_grad for p in model.parameters())
    assert mgr.metric.accumulator_bytes() == 0


def test_gradient_calibration_with_loss_fn_and_frozen_weights():
    model = tiny_bert()
    for p in model.parameters():
        p.requires_grad_(False)  # e.g. a frozen base model
    mgr = create_pruning_manager({"pruning": {"importance_metric": "gradient_sensitivity"}}, model)
    batch = {"input_ids": torch.randint(0, 128, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    with pytest.raises(CalibrationError, match="has no 'loss': include 'labels' in each batch .* or pass loss_fn"):
        mgr.calibrate([batch], progress=False)
    mgr.apply_pruning(0.5, [batch], loss_fn=lambda out, b: out.last_hidden_state.pow(2).mean(), progress=False)
    assert abs(mgr.pruning_metrics["current_sparsity"] - 0.5) < 1e-3
    assert not any(p.requires_grad for p in model.parameters())


def test_gradient_sensitivity_during_training_and_after_the_last_event():
    model = tiny_llama()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mgr = create_pruning_manager(
        {
            "pruning": {
                "importance_metric": "gradient_sensitivity",
                "final_sparsity": 0.5,
                "pruning_interval": 3,
                "pruning_start": 0.2,
                "pruning_end": 0.6,
            }
        },
        model,
        total_steps=20,
    )  # events at 4, 7, 10, 12
    sizes = []
    for step in range(20):
        model(**lm_batch(seed=step)).loss.backward()
        mgr.step()
        sizes.append(mgr.metric.accumulator_bytes())
        opt.step()
        opt.zero_grad()
    n = sum(t.numel for t in mgr.method.targets)
    assert sizes[3] == 4 * n and sizes[4] == 0 and sizes[5] == 4 * n
    assert all(s == 0 for s in sizes[12:])  # nothing accumulated once the schedule is done
    assert mgr.get_pruning_summary()["measured_sparsity"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("name, dtype, size", [("bfloat16", torch.bfloat16, 2), ("float16", torch.float16, 2)])
def test_accumulator_dtype_option(name, dtype, size):
    net = _linear(torch.randn(4, 8))
    mgr = _mgr(net, "gradient_sensitivity", metric_options={"accumulator_dtype": name})
    net[0].weight.grad = torch.randn(4, 8)
    mgr.metric.on_step()
    assert mgr.metric._acc["0.weight"].dtype == dtype
    assert mgr.metric.accumulator_bytes() == size * 32


def test_metric_options_validated():
    with pytest.raises(
        ConfigError,
        match=r"unknown option 'dtype' for importance_metric 'gradient_sensitivity'; valid: 'accumulator_dtype'",
    ):
        _mgr(_linear(torch.ones(2, 2)), "gradient_sensitivity", metric_options={"dtype": "bfloat16"})
    with pytest.raises(
        ConfigError, match=r"accumulator_dtype: Input should be 'float32', 'bfloat16' or 'float16' \(got 'int8'\)"
    ):
        _mgr(_linear(torch.ones(2, 2)), "gradient_sensitivity", metric_options={"accumulator_dtype": "int8"})
    with pytest.raises(ConfigError, match="importance_metric 'magnitude' takes no metric_options"):
        _mgr(_linear(torch.ones(2, 2)), "magnitude", metric_options={"x": 1})
    with pytest.raises(  # activation's options concern fused MoE experts (docs/moe.md)
        ConfigError,
        match=r"unknown option 'x' for importance_metric 'activation'; valid: 'calibrate_all_experts', "
        r"'expert_weighting'",
    ):
        _mgr(_linear(torch.ones(2, 2)), "activation", metric_options={"x": 1})


# ------------------------------------------------------------------ errors
def test_activation_before_statistics():
    mgr = _mgr(_linear(torch.ones(2, 4)), "activation")
    with pytest.raises(
        CalibrationError,
        match=r"no activation statistics yet: run manager.calibrate\(batches\) or pass calibration_data",
    ):
        mgr.apply_pruning(0.5)
    assert torch.all(mgr.model[0].weight == 1)


def test_activation_unused_layer_named():
    net = nn.ModuleDict({"used": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
    net.forward = lambda x: net["used"](x)
    mgr = _mgr(net, "activation")
    mgr.calibrate([torch.randn(2, 4)], progress=False)
    with pytest.raises(
        CalibrationError, match=r"1 of 2 pruned layers saw no input tokens \(for example \['unused.weight'\]\)"
    ):
        mgr.apply_pruning(0.5)


def test_gradient_sensitivity_without_gradients():
    mgr = _mgr(_linear(torch.ones(2, 4)), "gradient_sensitivity")
    with pytest.raises(
        CalibrationError, match=r"has seen no gradients .* call manager.step\(\) after loss.backward\(\)"
    ):
        mgr.apply_pruning(0.5)
    mgr2 = create_pruning_manager(
        {"pruning": {"importance_metric": "gradient_sensitivity"}}, tiny_llama(), total_steps=10
    )
    with pytest.raises(CalibrationError, match="has seen no gradients"):
        for _ in range(10):
            mgr2.step()  # no backward() ever


def test_gradient_sensitivity_zero_gradients_refused():
    model = tiny_bert()
    mgr = create_pruning_manager({"pruning": {"importance_metric": "gradient_sensitivity"}}, model)
    batch = {"input_ids": torch.randint(0, 128, (2, 8))}
    with torch.no_grad():
        target = model(**batch).last_hidden_state
    distill_to_self = lambda out, b: (out.last_hidden_state - target).pow(2).mean()  # noqa: E731
    with pytest.raises(CalibrationError, match="every accumulated gradient is exactly zero"):
        mgr.apply_pruning(0.5, [batch], loss_fn=distill_to_self, progress=False)


def test_custom_metric_registered_without_editing_artemis():
    @METRICS.register("test_squared", overwrite=True)
    class Squared(ImportanceMetric):
        name = "test_squared"

        def score(self, target):
            return target.param.detach().float() ** 2

    net = _linear(torch.tensor([[1.0, -3.0, 2.0, 0.5]]))
    _mgr(net, "test_squared").apply_pruning(0.5)
    assert (net[0].weight != 0).int().tolist() == [[0, 1, 1, 0]]


def test_metric_state_resume_gives_same_masks():
    batches = [lm_batch(seed=0), lm_batch(seed=1)]
    for metric in ("activation", "gradient_sensitivity"):
        a = tiny_llama()
        ma = create_pruning_manager({"pruning": {"importance_metric": metric}}, a)
        ma.calibrate(batches, progress=False)
        state = ma.state_dict()
        b = tiny_llama()
        mb = create_pruning_manager({"pruning": {"importance_metric": metric}}, b)
        mb.load_state_dict(state)
        ma.apply_pruning(0.5)
        mb.apply_pruning(0.5)
        assert ma.masks.keys() == mb.masks.keys()
        assert all(torch.equal(ma.masks[k], mb.masks[k]) for k in ma.masks), metric
    bad = {"acc": {"nope.weight": torch.ones(3)}, "steps": {"nope.weight": 1}}
    with pytest.raises(CalibrationError, match="gradient_sensitivity state does not match this model's targets"):
        mb.metric.load_state_dict(bad)


def test_close_removes_hooks_without_folding():
    model = tiny_llama()
    mgr = create_pruning_manager({"pruning": {"importance_metric": "activation"}}, model)
    n_hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    assert n_hooks == len(mgr.method.targets)
    mgr.close()
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0
    with pytest.raises(PruningStateError, match=r"step\(\) called after finalize\(\).*closed with close\(\)"):
        mgr.step(total_steps=10)
