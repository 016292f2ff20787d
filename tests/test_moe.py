"""Mixture-of-Experts models (transformers 5 fused experts): weight pruning of the 3-D expert
weights, the coverage warning, unknown layouts, and ``method: expert_pruning``."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import artemis
from artemis import create_pruning_manager
from artemis.arch import get_adapter
from artemis.arch.moe import find_moe_layers
from artemis.core.errors import ConfigError, ModelError
from tests.fixtures import tiny_llama

VOCAB = 64
# hidden 40 and expert width 40: 0.6 of every row is a whole number of weights
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=40,
    num_hidden_layers=2,
    num_attention_heads=5,
    num_key_value_heads=1,
    max_position_embeddings=64,
    num_experts_per_tok=2,
)


def mixtral(seed: int = 0):
    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(**COMMON, intermediate_size=40, num_local_experts=8)).eval()


def qwen3(seed: int = 0, norm_topk_prob: bool = True):
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        **COMMON,
        head_dim=8,
        intermediate_size=64,
        moe_intermediate_size=40,
        num_experts=8,
        norm_topk_prob=norm_topk_prob,
    )
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # the router starts at zero: give it weights so routing is not a tie
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    return model


def qwen2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(
        **COMMON,
        intermediate_size=64,
        moe_intermediate_size=40,
        shared_expert_intermediate_size=40,
        num_experts=8,
    )
    model = Qwen2MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    return model


def olmoe(seed: int = 0):
    torch.manual_seed(seed)
    model = OlmoeForCausalLM(OlmoeConfig(**COMMON, intermediate_size=40, num_experts=8)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    return model


FAMILIES = {"mixtral": mixtral, "qwen3": qwen3, "qwen2": qwen2, "olmoe": olmoe}


def batches(n: int = 3, seed: int = 0, labels: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (2, 16), generator=g)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if labels:
            b["labels"] = ids.clone()
        out.append(b)
    return out


def block_matrix_zeros(model, skip=("mlp.gate.weight", "shared_expert_gate.weight")):
    """(zeros, total) over every matrix parameter of the blocks but the routers."""
    z = n = 0
    for name, p in model.model.layers.named_parameters():
        if p.dim() >= 2 and not name.endswith(skip):
            z += int((p == 0).sum())
            n += p.numel()
    return z, n


# ------------------------------------------------------------------ targets
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_experts_are_default_targets_router_is_not(family):
    model = FAMILIES[family]()
    mgr = create_pruning_manager({"pruning": {"final_sparsity": 0.5}}, model)
    keys = {t.key: t for t in mgr.method.targets}
    t = keys["model.layers.0.mlp.experts.gate_up_proj"]
    assert (t.experts, t.kind) == (8, "experts")
    assert "model.layers.0.mlp.experts.down_proj" in keys
    assert not any(k.endswith(("mlp.gate.weight", "shared_expert_gate.weight")) for k in keys)
    if family == "qwen2":  # the shared expert is an MLP of Linear layers: a default target
        assert "model.layers.0.mlp.shared_expert.down_proj.weight" in keys
    mgr.close()


def test_router_and_experts_selectable_by_globs():
    model = qwen2()
    mgr = create_pruning_manager({"pruning": {"targets": ["*.mlp.gate", "*.experts.down_proj"]}}, model)
    assert [t.key for t in mgr.method.targets] == [
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.mlp.experts.down_proj",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.experts.down_proj",
    ]
    mgr.close()
    mgr = create_pruning_manager({"pruning": {"exclude": ["*.experts", "*.shared_expert.*"]}}, qwen2())
    assert all(t.experts == 0 and "shared_expert" not in t.name for t in mgr.method.targets)
    mgr.close()


# ------------------------------------------------------------------ 60% over all block matrices
@pytest.mark.parametrize("family", ["mixtral", "qwen3"])
@pytest.mark.parametrize(
    "metric,scope", [("magnitude", "global"), ("magnitude", "layer"), ("magnitude", "row"), ("activation", None)]
)
def test_sixty_percent_of_all_block_matrices(family, metric, scope):
    model = FAMILIES[family]()
    cfg = {"final_sparsity": 0.6, "importance_metric": metric}
    if scope:
        cfg["scope"] = scope
    mgr = create_pruning_manager({"pruning": cfg}, model)
    mgr.apply_pruning(0.6, batches() if metric == "activation" else None)
    zeros, total = block_matrix_zeros(model)
    assert zeros / total == pytest.approx(0.6, abs=1e-6)
    m = mgr.get_pruning_summary()["pruning_metrics"]
    assert (m["parameters_pruned"], m["parameters_prunable"]) == (zeros, total)
    assert m["current_sparsity"] == pytest.approx(zeros / total)
    if scope in ("layer", "row") or metric == "activation":  # every expert matrix (every row) is a layer
        w = model.model.layers[0].mlp.experts.down_proj
        per_expert = (w == 0).float().mean(dim=(1, 2))
        assert torch.allclose(per_expert, torch.full_like(per_expert, 0.6))
        if scope == "row" or metric == "activation":
            assert torch.allclose((w == 0).float().mean(-1), torch.full(w.shape[:2], 0.6))


def test_nm_groups_run_along_each_expert_input_dim():
    model = mixtral()
    mgr = create_pruning_manager({"pruning": {"pattern": "2:4"}}, model)
    mgr.apply_magnitude_pruning(0.5)
    w = model.model.layers[1].mlp.experts.gate_up_proj  # (experts, out, in)
    groups = (w != 0).reshape(w.shape[0], w.shape[1], -1, 4).sum(-1)
    assert bool((groups == 2).all())


def test_gradient_sensitivity_on_experts():
    model = mixtral()
    mgr = create_pruning_manager(
        {"pruning": {"final_sparsity": 0.6, "importance_metric": "gradient_sensitivity"}}, model
    )
    mgr.apply_pruning(0.6, batches(labels=True))
    zeros, total = block_matrix_zeros(model)
    assert zeros / total == pytest.approx(0.6, abs=1e-6)
    assert mgr.pruning_metrics["parameters_pruned"] == zeros


# ------------------------------------------------------------------ activation statistics
def _reference_sq(model, data, weighting="router"):
    """Per-expert input sums of squares of layer 0, from the eager experts' own routing."""
    experts = model.model.layers[0].mlp.experts
    seen = {}

    def grab(mod, args, kwargs):
        seen.setdefault("calls", []).append(tuple(a.detach().clone() for a in args[:3]))

    h = experts.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        for b in data:
            model(**b)
    h.remove()
    n = experts.num_experts
    gu = torch.zeros(n, experts.gate_up_proj.shape[-1])
    dn = torch.zeros(n, experts.down_proj.shape[-1])
    for x, idx, w in seen["calls"]:
        for e in range(n):
            tok, pos = torch.where(idx == e)
            xs = x[tok]
            r = w[tok, pos].float() if weighting == "router" else torch.ones(len(tok))
            gate, up = nn.functional.linear(xs, experts.gate_up_proj[e]).chunk(2, dim=-1)
            inter = experts.act_fn(gate) * up
            gu[e] += (xs.pow(2) * r[:, None] ** 2).sum(0)
            dn[e] += (inter.pow(2) * r[:, None] ** 2).sum(0)
    return gu, dn


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_activation_statistics_per_expert_from_routed_tokens(impl):
    model = mixtral()
    model.config._experts_implementation = impl
    data = batches(2)
    gu, dn = _reference_sq(model, data)
    mgr = create_pruning_manager({"pruning": {"importance_metric": "activation", "final_sparsity": 0.5}}, model)
    mgr.calibrate(data)
    sq = mgr.metric._sq
    assert torch.allclose(sq["model.layers.0.mlp.experts.gate_up_proj"], gu, rtol=1e-4, atol=1e-6)
    assert torch.allclose(sq["model.layers.0.mlp.experts.down_proj"], dn, rtol=1e-4, atol=1e-6)
    mgr.close()


def test_calibrate_all_experts_sends_every_token_through_every_expert():
    model = mixtral()
    data = batches(1)
    with torch.no_grad():
        ref = model(**data[0]).logits
    mgr = create_pruning_manager(
        {"pruning": {"importance_metric": "activation", "metric_options": {"calibrate_all_experts": True}}}, model
    )
    captured = {}

    def grab(module, args):
        captured.setdefault("x", args[0].detach().clone())

    h = model.model.layers[0].mlp.experts.register_forward_pre_hook(grab)
    mgr.calibrate(data)
    h.remove()
    x = captured["x"]
    sq = mgr.metric._sq["model.layers.0.mlp.experts.gate_up_proj"]
    assert torch.allclose(sq, x.pow(2).sum(0).expand_as(sq), rtol=1e-5)  # every expert saw every token
    with torch.no_grad():
        assert torch.equal(model(**data[0]).logits, ref)  # the model's output is unchanged
    mgr.close()


# ------------------------------------------------------------------ masks under training and resume
def test_masks_hold_under_adamw_and_resume():
    model = mixtral()
    cfg = {"pruning": {"final_sparsity": 0.6, "pruning_start": 0.0, "pruning_end": 0.4, "pruning_interval": 1}}
    mgr = create_pruning_manager(cfg, model, total_steps=6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    data = batches(6, labels=True)
    state = None
    for i, b in enumerate(data):
        model(**b).loss.backward()
        mgr.step()
        opt.step()
        opt.zero_grad()
        if i == 3:
            state = mgr.state_dict()
    key = "model.layers.0.mlp.experts.gate_up_proj"
    w = model.model.layers[0].mlp.experts.gate_up_proj
    assert bool((w[~mgr.masks[key]] == 0).all())  # still zero after AdamW steps
    zeros, total = block_matrix_zeros(model)
    assert zeros / total == pytest.approx(0.6, abs=1e-6)
    assert mgr.get_pruning_summary()["pruning_metrics"]["parameters_pruned"] == zeros
    fresh = mixtral()
    mgr2 = create_pruning_manager(cfg, fresh, total_steps=6)
    mgr2.load_state_dict(state)
    assert torch.equal(mgr2.masks[key], mgr.masks[key])
    assert bool((fresh.model.layers[0].mlp.experts.gate_up_proj[~mgr2.masks[key]] == 0).all())


# ------------------------------------------------------------------ export
def test_save_pruned_load_pruned_round_trips_fused_experts(tmp_path):
    model = mixtral()
    mgr = create_pruning_manager({"pruning": {"final_sparsity": 0.6}}, model)
    mgr.apply_magnitude_pruning(0.6)
    info = artemis.save_pruned(model, tmp_path / "out", manager=mgr)
    assert "model.layers.0.mlp.experts.gate_up_proj" in info["sparse_tensors"]
    back = artemis.load_pruned(tmp_path / "out")
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert mgr.pruning_metrics["model_size_reduction"] > 0.3  # the experts count as sparse


# ------------------------------------------------------------------ options that do not support experts
@pytest.mark.parametrize(
    "extra,option",
    [({"scope": "owl"}, "scope: owl"), ({"reconstruction": "sparsegpt"}, "reconstruction: sparsegpt")],
)
def test_owl_and_sparsegpt_refuse_experts(extra, option):
    with pytest.raises(ConfigError, match=f"{option} does not support fused Mixture-of-Experts weights yet"):
        create_pruning_manager({"pruning": {"importance_metric": "activation", **extra}}, mixtral())


# ------------------------------------------------------------------ coverage warning and unknown layouts
def test_coverage_warning_names_what_was_left_out(caplog):
    with caplog.at_level(logging.WARNING, logger="artemis"):
        create_pruning_manager({"pruning": {"exclude": ["*.experts"]}}, mixtral()).close()
    text = caplog.text
    assert "leave out" in text and "model.layers.0.mlp.experts.gate_up_proj" in text


class _OddExperts(nn.Module):
    """Experts stored as one 3-D tensor without ``num_experts``: a layout no adapter knows."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, hidden, hidden))

    def forward(self, x):
        return x


def _odd_model():
    model = tiny_llama()
    model.model.layers[0].mlp.odd = _OddExperts(model.config.hidden_size)
    return model


def test_unknown_moe_layout_is_a_clear_error():
    model = _odd_model()
    h = model.config.hidden_size
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ModelError,
        match=rf"unknown Mixture-of-Experts layout: module 'model.layers.0.mlp.odd' \(_OddExperts\) has parameters "
        rf"of 3 or more dimensions \(w \[4, {h}, {h}\]\) that no architecture adapter recognises",
    ):
        create_pruning_manager({"pruning": {"final_sparsity": 0.5}}, model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    moe = mixtral()
    moe.model.layers[1].mlp.odd = _OddExperts(40)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    with pytest.raises(ModelError, match=r"unknown Mixture-of-Experts layout: module 'model.layers.1.mlp.odd'"):
        create_pruning_manager({"pruning": {"method": "expert_pruning", "final_sparsity": 0.5}}, moe)
    assert all(torch.equal(v, before[k]) for k, v in moe.state_dict().items())
    create_pruning_manager({"pruning": {"exclude": ["*.odd"]}}, _odd_model()).close()  # the way out


def test_minilm_unchanged_no_experts_no_warning(minilm_dir, caplog):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(minilm_dir)).eval()
    with caplog.at_level(logging.WARNING, logger="artemis"):
        mgr = create_pruning_manager({"pruning": {"final_sparsity": 0.5}}, model)
    assert "leave out" not in caplog.text
    assert all(t.experts == 0 and t.kind == "linear" and isinstance(t.module, nn.Linear) for t in mgr.method.targets)
    assert len(mgr.method.targets) == 6 * 6
    mgr.close()


# ------------------------------------------------------------------ expert_pruning
ZEROED = [1, 3, 5, 6]


def _zero_experts(model):
    with torch.no_grad():
        for layer in model.model.layers:
            for e in ZEROED:
                layer.mlp.experts.down_proj[e].zero_()
    return model


@pytest.mark.parametrize("family", ["mixtral", "qwen3"])
def test_reap_removes_the_dead_experts_and_round_trips(family, tmp_path):
    model = _zero_experts(FAMILIES[family]())
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    mgr = create_pruning_manager({"pruning": {"method": "expert_pruning", "final_sparsity": 0.5}}, model)
    assert mgr.config.importance_metric == "reap"
    mgr.apply_pruning(0.5, batches())
    summary = mgr.get_pruning_summary()
    assert [layer["removed"] for layer in summary["layers"]] == [ZEROED, ZEROED]
    m = summary["pruning_metrics"]
    assert (m["current_sparsity"], m["experts_removed"], m["experts_total"]) == (0.5, 8, 16)
    with torch.no_grad():
        masked = model(x).logits
    mgr.finalize()
    keep = [0, 2, 4, 7]
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}.mlp."
        assert torch.equal(layer.mlp.experts.gate_up_proj, orig[p + "experts.gate_up_proj"][keep])
        assert torch.equal(layer.mlp.experts.down_proj, orig[p + "experts.down_proj"][keep])
        assert torch.equal(layer.mlp.gate.weight, orig[p + "gate.weight"][keep])
    assert model.config.num_experts == 4 and model.config.num_experts_per_tok == 2
    with torch.no_grad():
        out = model(x).logits
    assert torch.allclose(out, masked, atol=1e-6)
    model.save_pretrained(tmp_path / "stock")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()
    with torch.no_grad():
        assert torch.equal(back(x).logits, out)
    gen = back.generate(x, max_new_tokens=4, do_sample=False, use_cache=True)
    assert gen.shape == (1, 16)
    assert torch.equal(gen, back.generate(x, max_new_tokens=4, do_sample=False, use_cache=False))


@pytest.mark.parametrize("norm", [True, False])
def test_pruned_output_equals_original_with_removed_logits_minus_inf(norm):
    model = qwen3(norm_topk_prob=norm)
    ref_model = qwen3(norm_topk_prob=norm)
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    mgr = create_pruning_manager(
        {"pruning": {"method": "expert_pruning", "final_sparsity": 0.5, "importance_metric": "magnitude"}}, model
    )
    mgr.apply_pruning(0.5)
    removed = [layer["removed"] for layer in mgr.get_pruning_summary()["layers"]]
    mgr.finalize()
    with torch.no_grad():
        out = model(x).logits
    # by hand: the original routers with the removed experts' logits at -inf
    hooks = []
    for layer, rem in zip(ref_model.model.layers, removed):
        router = layer.mlp.gate

        def fwd(mod, args, out_, r=router, rem=rem):
            h = args[0].reshape(-1, r.hidden_dim)
            logits = nn.functional.linear(h, r.weight)
            logits[:, rem] = float("-inf")
            probs = torch.softmax(logits.float(), dim=-1)
            top, idx = torch.topk(probs, r.top_k, dim=-1)
            if r.norm_topk_prob:
                top = top / top.sum(-1, keepdim=True)
            return logits, top.to(logits.dtype), idx

        hooks.append(router.register_forward_hook(fwd))
    with torch.no_grad():
        ref = ref_model(x).logits
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


def test_expert_pruning_bad_input_is_refused_before_anything_changes():
    dense = tiny_llama()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    with pytest.raises(ModelError, match="method 'expert_pruning' needs a Mixture-of-Experts model; LlamaForCausalLM"):
        create_pruning_manager({"pruning": {"method": "expert_pruning", "final_sparsity": 0.5}}, dense)
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())
    model = mixtral()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ConfigError,
        match=r"sparsity 0.9 removes 7 of the 8 experts of model.layers.0.mlp, leaving 1, fewer than "
        r"num_experts_per_tok=2; use at most 0.75",
    ):
        create_pruning_manager({"pruning": {"method": "expert_pruning", "final_sparsity": 0.9}}, model)
    mgr = create_pruning_manager(
        {"pruning": {"method": "expert_pruning", "final_sparsity": 0.5, "importance_metric": "magnitude"}}, model
    )
    with pytest.raises(ConfigError, match="leaving 1, fewer than num_experts_per_tok=2"):
        mgr.apply_pruning(0.9)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert mgr.get_pruning_summary()["experts_removed"] == 0


def test_progressive_expert_pruning_masks_router_then_removes():
    model = olmoe()
    cfg = {
        "pruning": {
            "method": "expert_pruning",
            "final_sparsity": 0.5,
            "importance_metric": "frequency",
            "pruning_start": 0.2,
            "pruning_end": 0.6,
            "pruning_interval": 1,
        }
    }
    mgr = create_pruning_manager(cfg, model, total_steps=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    routed = []
    hook = model.model.layers[0].mlp.experts.register_forward_pre_hook(lambda m, a: routed.append(a[1].clone()))
    state = None
    for i, b in enumerate(batches(5, labels=True)):
        routed.clear()
        model(**b).loss.backward()
        removed = set(mgr.method.removed[0])
        assert not removed & set(torch.cat([r.reshape(-1) for r in routed]).tolist())  # never routed to
        mgr.step()
        opt.step()
        opt.zero_grad()
        if i == 2:
            state = mgr.state_dict()
    hook.remove()
    assert len(mgr.method.removed[0]) == 4
    fresh = olmoe()
    mgr2 = create_pruning_manager(cfg, fresh, total_steps=5)
    mgr2.load_state_dict(state)
    assert mgr2.method.removed == [set(r) for r in state["method"]["removed"]]
    mgr.finalize()
    assert model.config.num_experts == 4 and model.model.layers[0].mlp.experts.num_experts == 4


def test_per_layer_counts_use_expert_sparsity_config_and_load_pruned(tmp_path):
    model = mixtral()
    x = torch.randint(0, VOCAB, (1, 8))
    cfg = {
        "pruning": {
            "method": "expert_pruning",
            "final_sparsity": 0.5,
            "importance_metric": "magnitude",
            "layer_sparsity": {"model.layers.1.mlp": 0.25},
        }
    }
    mgr = create_pruning_manager(cfg, model)
    mgr.apply_pruning(0.5)
    mgr.finalize()
    assert [layer.mlp.experts.num_experts for layer in model.model.layers] == [4, 6]
    assert model.config.moe_sparsity_config == {"method": "prune", "num_experts": [4, 6]}
    with torch.no_grad():
        out = model(x).logits
    artemis.save_pruned(model, tmp_path / "out")
    back = artemis.load_pruned(tmp_path / "out")
    assert back.config.moe_sparsity_config == {"method": "prune", "num_experts": [4, 6]}
    assert [layer.mlp.experts.num_experts for layer in back.model.layers] == [4, 6]
    with torch.no_grad():
        assert torch.equal(back(x).logits, out)


def test_global_budget_and_shared_experts_kept():
    model = qwen2()
    cfg = {
        "pruning": {
            "method": "expert_pruning",
            "final_sparsity": 0.5,
            "importance_metric": "magnitude",
            "expert_pruning": {"budget": "global"},
        }
    }
    shared = model.model.layers[0].mlp.shared_expert.down_proj.weight.clone()
    mgr = create_pruning_manager(cfg, model)
    mgr.apply_pruning(0.5)
    s = mgr.get_pruning_summary()
    assert s["experts_removed"] == 8 and s["scope"] == "global"
    assert all(layer["kept"] >= 2 for layer in s["layers"])
    assert s["layers"][0]["shared_experts"] == [
        "model.layers.0.mlp.shared_expert",
        "model.layers.0.mlp.shared_expert_gate",
    ]
    mgr.finalize()
    assert torch.equal(model.model.layers[0].mlp.shared_expert.down_proj.weight, shared)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 6)))


def test_find_moe_layers_families():
    for fn in FAMILIES.values():
        model = fn()
        layers = find_moe_layers(model, get_adapter(model))
        assert [(layer.block_index, layer.num_experts, layer.top_k) for layer in layers] == [(0, 8, 2), (1, 8, 2)]
