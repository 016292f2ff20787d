"""method: layer_dropout — layer importance, progressive dropping, fade-out, removal."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from artemis import create_pruning_manager
from artemis.arch.gates import BlockGate
from artemis.core.errors import CalibrationError, CheckpointError, ConfigError, ModelError, PruningStateError
from artemis.core.sizing import MIB, model_dense_bytes
from artemis.methods.layer_dropout import choose_layers_to_drop, layers_for_sparsity
from artemis.metrics.blocks import influence_terms, layer_gradient_sensitivity, layer_magnitude
from tests.fixtures import lm_batch, tiny_bert, tiny_gpt2, tiny_llama


def _cfg(**kw):
    base = {"method": "layer_dropout", "final_sparsity": 0.5}
    base.update(kw)
    return {"pruning": base}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _silence_llama_layers(model, layers):
    """Zero o_proj and down_proj: those layers add nothing to the residual stream."""
    with torch.no_grad():
        for i in layers:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()


# ----------------------------------------------------------------- pure functions
def test_layer_count_rounding():
    assert [layers_for_sparsity(s, 32) for s in (0.0, 0.4, 0.25, 0.5)] == [0, 13, 8, 16]
    assert layers_for_sparsity(0.5, 8) == 4
    assert layers_for_sparsity(0.0625, 8) == 1  # half rounds up
    assert layers_for_sparsity(0.0624, 8) == 0


def test_old_block_influence_name_warns_and_is_the_per_batch_term():
    import artemis.methods.layer_dropout as ld

    with pytest.warns(DeprecationWarning, match=r"now artemis\.metrics\.blocks\.influence_terms"):
        assert ld.block_influence is influence_terms


def test_influence_terms_hand_computed():
    x = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    y = torch.tensor([[[-2.0, 0.0], [1.0, 1.0]]])  # cos = -1 and 1
    assert influence_terms(x, y) == (2.0, 2)
    # padding (weight 0) counts for nothing: the shared measure of layer dropout and finetune
    assert influence_terms(x, y, torch.tensor([[0.0, 1.0]])) == (pytest.approx(0.0, abs=1e-6), 1.0)
    assert influence_terms(x, y, torch.tensor([[1.0, 0.0]])) == (pytest.approx(2.0), 1.0)
    with pytest.raises(ValueError, match="token_weights has 3 entries for 2 tokens"):
        influence_terms(x, y, torch.ones(3))


def test_layer_magnitude_and_gradient_sensitivity():
    w = nn.Parameter(torch.tensor([[1.0, -2.0], [2.0, 0.0]]))
    b = nn.Parameter(torch.tensor([4.0]))
    assert layer_magnitude([w, b]) == 5.0
    w.grad = torch.tensor([[2.0, 1.0], [-1.0, 7.0]])
    assert layer_gradient_sensitivity([w, b]) == 2.0 + 2.0 + 2.0 + 0.0


def test_choose_layers_lowest_first_ties_by_index():
    assert choose_layers_to_drop({3: 0.1, 1: 0.1, 0: 0.05, 2: 9.0}, 3) == [0, 1, 3]
    with pytest.raises(ValueError, match="cannot drop 5 layers out of 4"):
        choose_layers_to_drop({0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}, 5)


# ------------------------------------------------------- the main example
def test_llama_8_layers_half_dropped_save_load_generate(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(layers=8)
    mgr = create_pruning_manager(_cfg(importance_metric="activation"), model)
    batch = lm_batch()
    mgr.apply_pruning(0.5, calibration_data=[batch])
    dropped = mgr.get_pruning_summary()["layers_dropped"]
    assert len(dropped) == 4
    ids = batch["input_ids"][:1, :6]
    with torch.no_grad():
        gated_logits = model(batch["input_ids"]).logits
    gated_gen = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True)

    out = mgr.finalize()
    assert out is model
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    with torch.no_grad():
        assert torch.equal(model(batch["input_ids"]).logits, gated_logits)
    gen = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True)
    assert torch.equal(gen, gated_gen)
    no_cache = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(gen, no_cache)

    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 4 and len(loaded.model.layers) == 4
    assert _same_state(model.state_dict(), loaded.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(batch["input_ids"]).logits, gated_logits)
    assert torch.equal(loaded.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True), gen)


def test_finalized_size_matches_summary():
    model = tiny_llama(layers=8)
    mgr = create_pruning_manager(_cfg(), model)
    mgr.apply_pruning(0.5)
    before = mgr.get_pruning_summary()["pruning_metrics"]
    mgr.finalize()
    after = mgr.get_pruning_summary()
    assert after["pruning_metrics"]["compressed_model_size_mb"] == pytest.approx(model_dense_bytes(model) / MIB)
    assert before["compressed_model_size_mb"] == pytest.approx(after["pruning_metrics"]["compressed_model_size_mb"])
    assert after["measured_sparsity"] == 0.5
    assert after["pruning_metrics"]["parameters_pruned"] == 4 * sum(
        p.numel() for p in model.model.layers[0].parameters()
    )


# ---------------------------------------------------------------- metric choices
def test_magnitude_drops_the_smallest_layers():
    model = tiny_llama(layers=8)
    with torch.no_grad():
        for i, scale in ((5, 0.01), (2, 0.1)):
            for p in model.model.layers[i].parameters():
                p.mul_(scale)
    mgr = create_pruning_manager(_cfg(final_sparsity=0.25), model)
    mgr.apply_pruning(0.25)
    assert mgr.method.drop_order == [5, 2]


def test_activation_drops_layers_that_do_nothing():
    model = tiny_llama(layers=8)
    _silence_llama_layers(model, [1, 6])
    mgr = create_pruning_manager(_cfg(final_sparsity=0.25, importance_metric="activation"), model)
    mgr.apply_pruning(0.25, calibration_data=[lm_batch()])
    assert sorted(mgr.method.drop_order) == [1, 6]
    assert mgr.method.last_scores[1] < 1e-6 and mgr.method.last_scores[6] < 1e-6  # cos = 1 up to rounding
    assert min(v for k, v in mgr.method.last_scores.items() if k not in (1, 6)) > 1e-3


def test_gradient_sensitivity_calibration_uses_loss_and_restores_grads():
    model = tiny_llama(layers=8)
    _silence_llama_layers(model, [0, 4])
    sentinel = torch.full_like(model.model.embed_tokens.weight, 3.0)
    model.model.embed_tokens.weight.grad = sentinel.clone()
    mgr = create_pruning_manager(_cfg(final_sparsity=0.25, importance_metric="gradient_sensitivity"), model)
    mgr.apply_pruning(0.25, calibration_data=[lm_batch(), lm_batch(seed=1)])
    assert sorted(mgr.method.drop_order) == [0, 4]
    assert mgr.method.last_scores[0] == 0.0
    assert torch.equal(model.model.embed_tokens.weight.grad, sentinel)
    assert model.model.layers[1].self_attn.q_proj.weight.grad is None


def test_gradient_sensitivity_without_loss_is_a_clear_error():
    model = tiny_bert(layers=4)
    before = _state(model)
    mgr = create_pruning_manager(_cfg(importance_metric="gradient_sensitivity"), model)
    with pytest.raises(CalibrationError, match="returned none for a calibration batch; pass batches with labels"):
        mgr.apply_pruning(0.5, calibration_data=[{"input_ids": lm_batch()["input_ids"]}])
    assert mgr.method.drop_order == [] and _same_state(before, model.state_dict())


def test_activation_without_statistics_is_a_clear_error():
    model = tiny_llama(layers=4)
    mgr = create_pruning_manager(_cfg(importance_metric="activation"), model)
    with pytest.raises(CalibrationError, match=r"'activation' has no statistics for layers \[0, 1, 2, 3\]"):
        mgr.apply_pruning(0.5)
    assert mgr.method.drop_order == []


def test_unknown_metric_for_layer_dropout():
    with pytest.raises(
        ConfigError, match="for method 'layer_dropout'; valid: 'magnitude', 'gradient_sensitivity', 'activation'"
    ):
        create_pruning_manager(_cfg(importance_metric="wanda"), tiny_llama())


# ---------------------------------------------------------------- progressive
def _train(model, mgr, steps, lr=1e-3, seed=0):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    history = []
    model.train()
    for t in range(steps):
        batch = lm_batch(seed=seed + t)
        loss = model(**batch).loss
        loss.backward()
        mgr.step()
        opt.step()
        opt.zero_grad()
        history.append(list(mgr.method.drop_order))
    model.eval()
    return history


@pytest.mark.parametrize("metric", ["activation", "gradient_sensitivity"])
def test_progressive_one_layer_at_a_time_reestimated(metric):
    model = tiny_llama(layers=4)
    cfg = _cfg(importance_metric=metric, pruning_start=0.1, pruning_end=0.9, pruning_interval=1)
    mgr = create_pruning_manager(cfg, model, total_steps=10)
    scored = []
    orig = mgr.method.compute_masks

    def spy(target_fn, m, **event):
        n_before = len(mgr.method.drop_order)
        out = orig(target_fn, m, **event)
        if len(mgr.method.drop_order) > n_before:
            scored.append(sorted(mgr.method.last_scores))
        return out

    mgr.method.compute_masks = spy
    history = _train(model, mgr, 10)
    counts = [len(h) for h in history]
    assert counts[-1] == 2
    assert all(0 <= b - a <= 1 for a, b in zip(counts, counts[1:]))  # one layer at a time
    assert len(scored) == 2
    for k, keys in enumerate(scored):  # each event scores only the layers that remain
        assert len(keys) == 4 - k
        assert not set(keys) & set(history[-1][:k])
    mgr.finalize()
    assert len(model.model.layers) == 2


def test_progressive_magnitude_without_training():
    model = tiny_llama(layers=8)
    cfg = _cfg(pruning_start=0.2, pruning_end=0.8, pruning_interval=1)
    mgr = create_pruning_manager(cfg, model, total_steps=20)
    counts = []
    for _ in range(20):
        mgr.step()
        counts.append(len(mgr.method.drop_order))
    assert counts[-1] == 4 and counts[3] == 0
    assert all(0 <= b - a <= 1 for a, b in zip(counts, counts[1:]))


def test_fade_out_schedule_and_identity():
    model = tiny_llama(layers=4)
    cfg = _cfg(
        final_sparsity=0.25, pruning_start=0.0, pruning_end=0.0, pruning_interval=1, layer_dropout={"fade_steps": 4}
    )
    mgr = create_pruning_manager(cfg, model, total_steps=10)
    batch = lm_batch()
    calls = []
    handles = [
        layer.mlp.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
        for i, layer in enumerate(model.model.layers)
    ]
    alphas = []
    for _ in range(6):
        mgr.step()
        index = mgr.method.drop_order[0]
        alphas.append(mgr.method.gates[index].alpha)
    assert alphas == [0.75, 0.5, 0.25, 0.0, 0.0, 0.0]
    # After the fade the block is not run at all; its output is its input.
    calls.clear()
    with torch.no_grad():
        gated = model(batch["input_ids"], use_cache=False).logits
    assert index not in calls and len(calls) == 3
    calls.clear()
    model.train()
    model(**batch).loss.backward()  # training mode: never run, even with the model's cache
    model.eval()
    assert index not in calls and len(calls) == 3
    assert all(p.grad is None for p in model.model.layers[index].parameters())
    for h in handles:
        h.remove()
    mgr.finalize()
    with torch.no_grad():
        assert torch.equal(model(batch["input_ids"]).logits, gated)


def test_fade_mixes_the_block_output():
    block = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    full = block(x)
    gate = BlockGate(block, alpha=0.25)
    gate.install()
    assert torch.allclose(block(x), x + 0.25 * (full - x))
    gate.alpha = 0.0
    assert block(x) is x
    gate.remove()
    assert "forward" not in block.__dict__ and torch.equal(block(x), full)


class _TupleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, hidden_states, extra=None):
        return (hidden_states + self.lin(hidden_states), "attn")


class _TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_TupleBlock() for _ in range(4)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)[0]
        return x


def test_tuple_returning_blocks_on_a_plain_module():
    torch.manual_seed(0)
    net = _TupleNet()
    x = torch.randn(2, 5, 8)
    mgr = create_pruning_manager(_cfg(), net)
    mgr.apply_pruning(0.5)
    kept = [i for i in range(4) if i not in mgr.method.dropped]
    out = net.blocks[mgr.method.drop_order[0]](x)
    assert isinstance(out, tuple) and out[0] is x and len(out) == 2
    expected = x
    blocks = list(net.blocks)
    for i in kept:
        expected = blocks[i](expected)[0]
    gated = net(x)
    mgr.finalize()
    assert len(net.blocks) == 2 and torch.equal(net(x), gated) and torch.equal(gated, expected)


# ------------------------------------------------------------------- families
def test_gpt2_save_load_and_generate(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_gpt2(layers=4)
    mgr = create_pruning_manager(_cfg(importance_metric="activation"), model)
    mgr.apply_pruning(0.5, [lm_batch()])
    ids = lm_batch()["input_ids"][:1, :5]
    gated = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    mgr.finalize()
    assert model.config.n_layer == 2 and len(model.transformer.h) == 2
    assert [b.attn.layer_idx for b in model.transformer.h] == [0, 1]
    gen = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    assert torch.equal(gen, gated)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert _same_state(model.state_dict(), loaded.state_dict())
    assert torch.equal(loaded.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True), gen)


def test_bert_save_load(tmp_path):
    from transformers import AutoModel

    model = tiny_bert(layers=4)
    mgr = create_pruning_manager(_cfg(importance_metric="activation", final_sparsity=0.25), model)
    batch = {"input_ids": lm_batch()["input_ids"], "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    mgr.apply_pruning(0.25, [batch])
    with torch.no_grad():
        gated = model(**batch).last_hidden_state
    mgr.finalize()
    assert model.config.num_hidden_layers == 3 and len(model.encoder.layer) == 3
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert _same_state(model.state_dict(), loaded.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, gated)


def test_qwen2_layer_types_follow_the_kept_layers(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    mgr = create_pruning_manager(_cfg(), model)
    with torch.no_grad():  # make layers 0 and 2 the least important by magnitude
        for i in (0, 2):
            for p in model.model.layers[i].parameters():
                p.mul_(0.01)
    mgr.apply_pruning(0.5)
    ids = lm_batch()["input_ids"][:1, :8]
    gated = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    mgr.finalize()
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.layer_types == ["full_attention", "sliding_attention"]
    assert torch.equal(loaded.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True), gated)


# ---------------------------------------------------------------- bad input
def test_sparsity_removing_every_layer_is_refused():
    model = tiny_llama(layers=4)
    before = _state(model)
    with pytest.raises(ConfigError, match=r"final_sparsity 0.9 of 4 layers removes 4 layers, leaving none"):
        create_pruning_manager(_cfg(final_sparsity=0.9), model)
    mgr = create_pruning_manager(_cfg(), model)
    with pytest.raises(ConfigError, match=r"sparsity 0.95 of 4 layers removes 4 layers, leaving none"):
        mgr.apply_pruning(0.95)
    assert mgr.method.drop_order == [] and _same_state(before, model.state_dict())
    assert all("forward" not in b.__dict__ for b in model.model.layers)


def test_sparsity_removing_no_layer_is_refused():
    with pytest.raises(ConfigError, match=r"final_sparsity 0.05 of 8 layers rounds to 0 layers removed"):
        create_pruning_manager(_cfg(final_sparsity=0.05), tiny_llama(layers=8))


def test_finalize_twice_leaves_the_model_alone():
    model = tiny_llama(layers=4)
    mgr = create_pruning_manager(_cfg(), model)
    mgr.apply_pruning(0.5)
    mgr.finalize()
    state = _state(model)
    with pytest.raises(PruningStateError, match="finalize\\(\\) was already called"):
        mgr.finalize()
    assert len(model.model.layers) == 2 and _same_state(state, model.state_dict())


def test_model_without_layers():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = _state(net)
    with pytest.raises(ModelError, match="no transformer block list was found"):
        create_pruning_manager(_cfg(), net)
    assert _same_state(before, net.state_dict())


def test_gpt2_inverse_layer_idx_scaling_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, scale_attn_by_inverse_layer_idx=True)
    )
    with pytest.raises(ModelError, match="scale_attn_by_inverse_layer_idx is True"):
        create_pruning_manager(_cfg(), model)


def test_config_keys_that_layer_dropout_does_not_use():
    with pytest.raises(ConfigError, match="pruning.targets is not used by method 'layer_dropout'"):
        create_pruning_manager(_cfg(targets=["*"]), tiny_llama())
    with pytest.raises(ConfigError, match="layer_dropout section is only used by method 'layer_dropout'"):
        create_pruning_manager({"pruning": {"layer_dropout": {"fade_steps": 2}}}, tiny_llama())
    with pytest.raises(ConfigError, match="fade_steps must be >= 0 steps, got -1"):
        create_pruning_manager(_cfg(layer_dropout={"fade_steps": -1}), tiny_llama())


# ---------------------------------------------------------------- checkpoints
def test_state_dict_resume_restores_the_dropped_layers():
    model = tiny_llama(layers=8)
    twin = copy.deepcopy(model)
    cfg = _cfg(pruning_start=0.0, pruning_end=0.5, pruning_interval=1, layer_dropout={"fade_steps": 3})
    mgr = create_pruning_manager(cfg, model, total_steps=10)
    for _ in range(4):
        mgr.step()
    state = mgr.state_dict()
    assert state["method"]["drop_order"] == mgr.method.drop_order and mgr.method.drop_order
    mgr2 = create_pruning_manager(cfg, twin, total_steps=10)
    mgr2.load_state_dict(state)
    assert mgr2.method.drop_order == mgr.method.drop_order
    assert {i: g.alpha for i, g in mgr2.method.gates.items()} == {i: g.alpha for i, g in mgr.method.gates.items()}
    ids = lm_batch()["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, twin(ids).logits)
    bad = copy.deepcopy(state)
    bad["method"]["num_layers"] = 6
    with pytest.raises(CheckpointError, match="model with 6 layers; this model has 8"):
        create_pruning_manager(cfg, tiny_llama(layers=8), total_steps=10).load_state_dict(bad)


def test_summary_lists_each_layer():
    model = tiny_llama(layers=4)
    mgr = create_pruning_manager(_cfg(final_sparsity=0.25), model)
    mgr.apply_pruning(0.25)
    s = mgr.get_pruning_summary()
    assert s["method"] == "layer_dropout" and s["layers_total"] == 4 and s["layers_remaining"] == 3
    assert [layer["status"] for layer in s["layers"]].count("dropped") == 1
    assert s["layers"][0]["name"] == "model.layers.0"
    assert s["measured_sparsity"] == 0.25


def test_apply_pruning_works_with_pruning_disabled():
    model = tiny_llama(layers=4)
    mgr = create_pruning_manager(_cfg(enabled=False), model)
    assert mgr.step(total_steps=4) is False and mgr.method.drop_order == []
    mgr.apply_pruning(0.5)
    assert len(mgr.method.drop_order) == 2
    assert all("forward" in model.model.layers[i].__dict__ for i in mgr.method.drop_order)
    mgr.finalize()
    assert len(model.model.layers) == 2
    assert all("forward" not in b.__dict__ for b in model.model.layers)
