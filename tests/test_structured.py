"""method: structured_sparsity — masks, finalize surgery, save/load, generate, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from artemis import ConfigError, ModelError, create_pruning_manager
from artemis.methods.structured import load_pruned_model, plan_unit_counts
from tests.fixtures import lm_batch, tiny_bert, tiny_gpt2, tiny_llama


def structured(final=0.5, **extra):
    return {"pruning": {"method": "structured_sparsity", "final_sparsity": final, **extra}}


def _out(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def _same_params(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------- planning
def test_plan_counts_hand_computed():
    # attention: 2 units of 100 params; mlp: 10 units of 20 params; total 400
    assert plan_unit_counts(0.5, [(2, 100, 1), (10, 20, 9)]) == [1, 5]  # 100 + 5·20 = 200
    assert plan_unit_counts(0.3, [(2, 100, 1), (10, 20, 9)]) == [1, 1]  # 120 = 100 + 1·20
    assert plan_unit_counts(0.1, [(2, 100, 1), (10, 20, 9)]) == [0, 2]  # round(0.2)=0 heads, 40/20
    assert plan_unit_counts(0.0, [(2, 100, 1), (10, 20, 9)], minimum=[1, 3]) == [1, 3]  # never shrink back
    assert plan_unit_counts(0.5, [(12, 7, 11)]) == [6]


def test_plan_counts_rejects_removing_every_unit():
    with pytest.raises(ConfigError, match=r"sparsity 0.75 would remove 2 of 2 heads, leaving a block with none"):
        plan_unit_counts(0.75, [(2, 100, 1), (10, 20, 9)], names=["heads", "neurons"])


# ---------------------------------------------------------- exact masks
def test_masks_hand_computed_llama():
    model = tiny_llama(layers=1)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.weight.fill_(1.0)
        # KV group 0 = KV head 0 (k/v rows 0..15) + query heads 0,1 (q rows 0..31, o cols 0..31)
        attn.q_proj.weight[:32] = 0.5
        attn.k_proj.weight[:16] = 0.5
        # neuron j has gate-row magnitude 128 - j: neurons 64..127 are the weakest
        mlp.gate_proj.weight.copy_((128 - torch.arange(128.0)).unsqueeze(1).expand(128, 64))
    mgr = create_pruning_manager(structured(), model)
    mgr.apply_pruning(0.5)
    m = mgr.masks
    p = "model.layers.0"
    q = torch.ones(64, 64, dtype=torch.bool)
    q[:32] = False
    kv = torch.ones(32, 64, dtype=torch.bool)
    kv[:16] = False
    o = torch.ones(64, 64, dtype=torch.bool)
    o[:, :32] = False
    assert torch.equal(m[f"{p}.self_attn.q_proj.weight"], q)
    assert torch.equal(m[f"{p}.self_attn.k_proj.weight"], kv)
    assert torch.equal(m[f"{p}.self_attn.v_proj.weight"], kv)
    assert torch.equal(m[f"{p}.self_attn.o_proj.weight"], o)
    rows = torch.ones(128, 64, dtype=torch.bool)
    rows[64:] = False
    assert torch.equal(m[f"{p}.mlp.gate_proj.weight"], rows)
    assert torch.equal(m[f"{p}.mlp.up_proj.weight"], rows)
    assert torch.equal(m[f"{p}.mlp.down_proj.weight"], rows.t())
    assert torch.count_nonzero(mlp.down_proj.weight[:, 64:]) == 0
    # 6144 attention + 64 neurons · 192 = 18432 of 36864 structure parameters
    assert mgr.pruning_metrics["parameters_pruned"] == 18432
    assert mgr.pruning_metrics["parameters_prunable"] == 36864


def test_masks_gpt2_fused_qkv_and_biases():
    model = tiny_gpt2(layers=1)
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        attn.c_attn.weight.fill_(1.0)
        attn.c_proj.weight.fill_(1.0)
        for h in (1, 3):  # heads 1 and 3 weak in q, k and v
            for off in (0, 64, 128):
                attn.c_attn.weight[:, off + 16 * h : off + 16 * (h + 1)] = 0.1
    mgr = create_pruning_manager(structured(structured_units=["attention_heads"]), model)
    mgr.apply_pruning(0.5)
    cols = torch.ones(192, dtype=torch.bool)
    for h in (1, 3):
        for off in (0, 64, 128):
            cols[off + 16 * h : off + 16 * (h + 1)] = False
    w = mgr.masks["transformer.h.0.attn.c_attn.weight"]
    assert torch.equal(w, cols.unsqueeze(0).expand(64, 192))
    assert torch.equal(mgr.masks["transformer.h.0.attn.c_attn.bias"], cols)
    proj = torch.ones(64, 64, dtype=torch.bool)
    proj[16:32] = False
    proj[48:64] = False
    assert torch.equal(mgr.masks["transformer.h.0.attn.c_proj.weight"], proj)
    assert "transformer.h.0.attn.c_proj.bias" not in mgr.masks  # output bias is not per head
    mgr.finalize()
    assert attn.num_heads == 2 and attn.split_size == 32 and tuple(attn.c_attn.weight.shape) == (64, 96)


# --------------------------------------------- masked == finalized, sizes
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_bert], ids=["llama", "gpt2", "bert"])
def test_finalize_is_exact_and_halves_blocks(make, tmp_path):
    model = make()
    ids = lm_batch()["input_ids"]
    dense = _out(model, ids)
    mgr = create_pruning_manager(structured(), model)
    mgr.apply_pruning(0.5)
    masked = _out(model, ids)
    assert not torch.equal(masked, dense)
    before = mgr.get_pruning_summary()["structured"]
    mgr.finalize()
    final = _out(model, ids)
    assert torch.allclose(final, masked, atol=1e-5, rtol=0)
    s = mgr.get_pruning_summary()["structured"]
    assert s["physically_removed"] and s["block_parameters_after"] <= 0.52 * s["block_parameters_before"]
    assert s["parameters_after"] == sum(p.numel() for p in model.parameters())
    assert s["parameters_after"] == before["parameters_after"]  # the prediction before finalize was exact
    assert all(layer["heads_kept"] == 2 and layer["heads_total"] == 4 for layer in s["layers"])
    assert mgr.pruning_metrics["model_size_reduction"] > 0.3  # the model really is smaller
    model.save_pretrained(tmp_path)
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModel if make is tiny_bert else AutoModelForCausalLM
    loaded = load_pruned_model(tmp_path, cls)
    assert torch.equal(_out(loaded, ids), final)
    assert _same_params(loaded, model)


def test_llama_summary_counts_hand_computed():
    model = tiny_llama()
    mgr = create_pruning_manager(structured(), model)
    mgr.apply_pruning(0.5)
    s = mgr.get_pruning_summary()["structured"]
    # per layer: attention 4096+2048+2048+4096, mlp 3·64·128, norms 128 → 36992; embeddings 2·8192 + 64
    assert s["parameters_before"] == 90432 and s["block_parameters_before"] == 73984
    assert s["layers"][0] == {
        "block": 0,
        "heads_kept": 2,
        "heads_total": 4,
        "kv_heads_kept": 1,
        "kv_heads_total": 2,
        "neurons_kept": 64,
        "neurons_total": 128,
    }
    mgr.finalize()
    s = mgr.get_pruning_summary()["structured"]
    assert s["parameters_after"] == 16448 + 2 * 18560 and s["loads_with_from_pretrained"] is True
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 1, 16)
    assert model.config.intermediate_size == 64


# ---------------------------------------- plain HF round trip and generate
def test_llama_plain_save_load_and_generate(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    mgr = create_pruning_manager(structured(0.3), model)
    mgr.apply_pruning(0.3)
    ids = lm_batch(batch=1)["input_ids"][:, :6]
    masked_gen = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    mgr.finalize()
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert "artemis_structure" not in loaded.config.to_dict()
    assert _same_params(loaded, model)
    full = lm_batch()["input_ids"]
    assert torch.equal(_out(loaded, full), _out(model, full))
    with_cache = loaded.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    no_cache = loaded.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(with_cache, no_cache) and torch.equal(with_cache, masked_gen)


def test_gpt2_generate_with_cache_after_finalize():
    model = tiny_gpt2()
    mgr = create_pruning_manager(structured(), model)
    mgr.apply_pruning(0.5)
    ids = lm_batch(batch=1)["input_ids"][:, :6]
    masked_gen = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    mgr.finalize()
    gen = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(gen, masked_gen)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_llama_family_members(family, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        family,
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = lm_batch()["input_ids"]
    mgr = create_pruning_manager(structured(), model)
    mgr.apply_pruning(0.5)
    if family == "qwen2":  # q/k/v biases are masked with their rows
        assert "model.layers.0.self_attn.q_proj.bias" in mgr.masks
    masked = _out(model, ids)
    mgr.finalize()
    assert torch.allclose(_out(model, ids), masked, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_out(loaded, ids), _out(model, ids))


def test_bert_mlp_only_is_plain_hf(tmp_path):
    from transformers import AutoModel

    model = tiny_bert()
    mgr = create_pruning_manager(structured(structured_units=["mlp_neurons"]), model)
    mgr.apply_pruning(0.5)
    mgr.finalize()
    assert model.config.intermediate_size == 64
    model.save_pretrained(tmp_path)
    ids = lm_batch()["input_ids"]
    loaded = AutoModel.from_pretrained(tmp_path)
    assert torch.equal(_out(loaded, ids), _out(model, ids))


def test_bert_heads_need_artemis_loader(tmp_path):
    from transformers import AutoModel

    model = tiny_bert()
    mgr = create_pruning_manager(structured(), model)
    mgr.apply_pruning(0.5)
    mgr.finalize()
    assert mgr.get_pruning_summary()["structured"]["loads_with_from_pretrained"] is False
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="mismatched"):
        AutoModel.from_pretrained(tmp_path)  # loud, never silently re-initialised


# ------------------------------------------------------------ per_layer
def test_per_layer_widths_and_loader(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(num_attention_heads=8, num_key_value_heads=4)
    with torch.no_grad():  # block 1's MLP much weaker than block 0's
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(model.model.layers[1].mlp, name).weight.mul_(0.1)
    mgr = create_pruning_manager(structured(structured_widths="per_layer"), model)
    mgr.apply_pruning(0.5)
    layers = mgr.get_pruning_summary()["structured"]["layers"]
    assert layers[1]["neurons_kept"] < layers[0]["neurons_kept"]
    assert layers[1]["neurons_kept"] >= 1
    ids = lm_batch()["input_ids"]
    masked = _out(model, ids)
    mgr.finalize()
    final = _out(model, ids)
    assert torch.allclose(final, masked, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path)
    assert "artemis_structure" in model.config.to_dict()
    with pytest.raises(RuntimeError, match="mismatched"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded = load_pruned_model(tmp_path, AutoModelForCausalLM)
    assert torch.equal(_out(loaded, ids), final) and _same_params(loaded, model)
    gen = loaded.generate(ids[:1, :5], max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    assert gen.shape == (1, 10)


# ------------------------------------------------------- progressive run
def test_progressive_training_masks_grads_and_optimizer_state():
    model = tiny_llama()
    model.train()
    cfg = structured(0.5, pruning_start=0.0, pruning_end=0.5, pruning_interval=2)
    mgr = create_pruning_manager(cfg, model, total_steps=12)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = lm_batch()
    prev: dict = {}
    for _ in range(12):
        loss = model(**batch).loss
        loss.backward()
        for key, mask in prev.items():
            # units pruned at earlier events get exactly zero gradient by themselves
            assert float(mgr._params[key].grad[~mask].abs().sum()) == 0.0
        mgr.step()
        for key, mask in mgr.masks.items():  # masks only shrink
            if key in prev:
                assert not bool((mask & ~prev[key]).any())
        prev = {k: v.clone() for k, v in mgr.masks.items()}
        opt.step()
        opt.zero_grad()
        for key, mask in mgr.masks.items():
            p = mgr._params[key]
            assert float(p.detach()[~mask].abs().sum()) == 0.0
            assert float(opt.state[p]["exp_avg"][~mask].abs().sum()) == 0.0
    assert mgr.pruning_metrics["current_sparsity"] == pytest.approx(0.5, abs=0.01)
    mgr.finalize()
    model.eval()
    assert model.config.num_key_value_heads == 1


def test_resume_from_state_dict():
    model = tiny_llama()
    cfg = structured(0.5, pruning_start=0.0, pruning_end=1.0, pruning_interval=1)
    mgr = create_pruning_manager(cfg, model, total_steps=10)
    for _ in range(6):
        mgr.step()
    state = mgr.state_dict()
    twin = copy.deepcopy(model)
    mgr2 = create_pruning_manager(cfg, twin, total_steps=10)
    mgr2.load_state_dict(state)
    for _ in range(4):
        mgr.step()
        mgr2.step()
    assert all(torch.equal(mgr.masks[k], mgr2.masks[k]) for k in mgr.masks)
    assert _same_params(model, twin)


# --------------------------------------------------------------- errors
def test_sparsity_removing_every_head_fails_at_creation():
    with pytest.raises(ConfigError, match=r"would remove 2 of 2 attention units \(KV head groups\) of every block"):
        create_pruning_manager(structured(0.8), tiny_llama())


def test_one_shot_removing_every_head_leaves_model_untouched():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    mgr = create_pruning_manager(structured(0.5), model)
    with pytest.raises(ConfigError, match="would remove 2 of 2 attention units"):
        mgr.apply_pruning(0.8)
    assert _same_params(model, ref) and not mgr.masks


def test_non_dividing_head_count():
    model = tiny_llama()
    model.model.layers[1].self_attn.k_proj = nn.Linear(64, 24, bias=False)
    with pytest.raises(ModelError, match=r"block 1 .*k_proj output features \(24\) is not a multiple of 16"):
        create_pruning_manager(structured(), model)
    model = tiny_llama()
    model.model.layers[0].self_attn.k_proj = nn.Linear(64, 48, bias=False)  # 3 KV heads for 4 query heads
    model.model.layers[0].self_attn.v_proj = nn.Linear(64, 48, bias=False)
    with pytest.raises(ModelError, match=r"query heads \(4\) is not a multiple of 3"):
        create_pruning_manager(structured(), model)


def test_unrecognised_model_lists_supported():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(
        ModelError,
        match=r"no recognised attention/MLP blocks.*Supported: bert \(bert.*gpt2.*llama \(llama, mistral, qwen2",
    ):
        create_pruning_manager(structured(), net)


def test_llama_family_member_with_fused_projections_is_rejected():
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    model = Phi3ForCausalLM(cfg)
    with pytest.raises(
        ModelError, match=r"does not support Phi3ForCausalLM \(architecture 'llama', model_type 'phi3'\)"
    ):
        create_pruning_manager(structured(), model)


def test_config_keys_are_checked():
    with pytest.raises(ConfigError, match="structured_widths only apply to method 'structured_sparsity'"):
        create_pruning_manager({"pruning": {"structured_widths": "per_layer"}}, tiny_llama())
    with pytest.raises(ConfigError, match="unknown structured unit 'heads'; valid: 'attention_heads', 'mlp_neurons'"):
        create_pruning_manager(structured(structured_units=["heads"]), tiny_llama())
    with pytest.raises(ConfigError, match=r"unknown structured_widths 'ragged'"):
        create_pruning_manager(structured(structured_widths="ragged"), tiny_llama())
    with pytest.raises(
        ConfigError, match=r"pruning.targets \(\['\*.mlp.\*'\]\) is not supported by method 'structured_sparsity'"
    ):
        create_pruning_manager(structured(targets=["*.mlp.*"]), tiny_llama())


# -------------------------------------------------------- real MiniLM
def test_minilm_half_structured(minilm_dir, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir).eval()
    enc = tok(["Structured pruning removes whole heads.", "The cat sat on the mat."], padding=True, return_tensors="pt")

    def embed(m):
        with torch.no_grad():
            h = m(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    mgr = create_pruning_manager(structured(), model)
    mgr.apply_pruning(0.5)
    masked = embed(model)
    mgr.finalize()
    s = mgr.get_pruning_summary()["structured"]
    assert s["block_parameters_after"] <= 0.52 * s["block_parameters_before"]
    assert all(layer["heads_kept"] == 6 and layer["neurons_kept"] == 768 for layer in s["layers"])
    final = embed(model)
    assert torch.allclose(final, masked, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = load_pruned_model(tmp_path, AutoModel)
    assert torch.equal(embed(loaded), final)


@pytest.mark.parametrize("metric", ["activation", "gradient_sensitivity"])
def test_data_driven_metrics_score_units(metric):
    model = tiny_llama()
    cfg = structured(0.5, importance_metric=metric, pruning_start=0.0, pruning_end=0.5, pruning_interval=1)
    mgr = create_pruning_manager(cfg, model, total_steps=4)
    if metric == "activation":
        mgr.apply_pruning(0.5, calibration_data=[lm_batch()])
    else:
        model.train()
        for _ in range(4):
            model(**lm_batch()).loss.backward()
            mgr.step()
        model.eval()
    ids = lm_batch()["input_ids"]
    masked = _out(model, ids)
    mgr.finalize()
    assert torch.allclose(_out(model, ids), masked, atol=1e-5, rtol=0)
    assert model.config.num_key_value_heads == 1 and model.config.intermediate_size == 64
