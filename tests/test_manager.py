"""The core manager: the specification's loop verbatim, exactness, optimizer state, errors, resume."""

import json

import pytest
import torch
import torch.nn as nn

from artemis import CheckpointError, ConfigError, ModelError, PruningStateError, create_pruning_manager
from artemis.pruning import PruningConfig, PruningManager
from tests.fixtures import lm_batch, tiny_gpt2, tiny_llama

SEED_CONFIG = {
    "method": "magnitude_progressive",
    "initial_sparsity": 0.0,
    "final_sparsity": 0.6,
    "pruning_start": 0.2,
    "pruning_end": 0.8,
    "pruning_interval": 50,
    "importance_metric": "magnitude",
    "quantization_aware": True,
}


def _prunable_sparsity(mgr):
    zeros = sum(t.param.numel() - int(torch.count_nonzero(t.param)) for t in mgr.method.targets)
    return zeros / sum(t.param.numel() for t in mgr.method.targets)


def test_seed_loop_verbatim(capsys):
    model = tiny_llama()
    model.train()
    inputs = lm_batch()
    total_steps = 120
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    # --- the loop of the issue, verbatim ---
    from artemis.pruning import create_pruning_manager

    pruning_config = {
        "method": "magnitude_progressive",
        "initial_sparsity": 0.0,
        "final_sparsity": 0.6,
        "pruning_start": 0.2,
        "pruning_end": 0.8,
        "pruning_interval": 50,
        "importance_metric": "magnitude",
        "quantization_aware": True,
    }
    pruning_manager = create_pruning_manager({"pruning": pruning_config}, model)
    model.pruning_manager = pruning_manager
    for _step in range(total_steps):
        loss = model(**inputs).loss
        loss.backward()
        pruning_manager.step(total_steps=total_steps)
        pruning_manager.apply_mask_to_gradients()
        optimizer.step()
        optimizer.zero_grad()
    pruning_manager.prepare_for_quantization()
    summary = pruning_manager.get_pruning_summary()
    print(f"Model size reduction: {summary['pruning_metrics']['model_size_reduction']:.2%}")
    # --- checks ---
    assert "Model size reduction:" in capsys.readouterr().out
    assert abs(summary["measured_sparsity"] - 0.6) < 0.001
    assert summary["pruning_metrics"]["current_sparsity"] == pytest.approx(summary["measured_sparsity"])
    reduction = summary["pruning_metrics"]["model_size_reduction"]
    assert 0 < reduction < 0.6  # honest: embeddings and lm_head stay dense, bitmask costs bits
    json.dumps(summary)  # plain data
    assert summary["finalized"] and summary["pruning_metrics"]["pruning_events"] == 3  # steps 24, 74, 96


def test_weights_stay_zero_with_adamw_without_gradient_masking():
    model = tiny_llama()
    model.train()
    inputs = lm_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    mgr = create_pruning_manager({"pruning": {**SEED_CONFIG, "pruning_interval": 5}}, model, total_steps=40)
    for _ in range(40):
        model(**inputs).loss.backward()
        mgr.step()
        # deliberately no apply_mask_to_gradients(): the optimizer hooks must hold the zeros
        opt.step()
        opt.zero_grad()
        for key, mask in mgr.masks.items():
            assert torch.count_nonzero(mgr._params[key][~mask]) == 0, key
    assert abs(_prunable_sparsity(mgr) - 0.6) < 0.001
    # optimizer state of pruned weights was cleared when masks changed
    for key, mask in mgr.masks.items():
        st = opt.state[mgr._params[key]]
        assert torch.count_nonzero(st["exp_avg"][~mask]) == 0


def test_sgd_momentum_state_cleared():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 8)
    mgr = create_pruning_manager(
        {"pruning": {"targets": ["*"], "final_sparsity": 0.5, "pruning_start": 0.5, "pruning_end": 0.5}},
        model,
        total_steps=6,
    )
    for _ in range(6):
        model(x).pow(2).mean().backward()
        mgr.step()
        opt.step()
        opt.zero_grad()
    for key, mask in mgr.masks.items():
        buf = opt.state[mgr._params[key]]["momentum_buffer"]
        assert torch.count_nonzero(buf[~mask]) == 0


def test_exact_global_count_and_default_targets(llama):
    mgr = create_pruning_manager({"pruning": SEED_CONFIG}, llama)
    names = [t.name for t in mgr.method.targets]
    assert len(names) == 2 * 7  # q,k,v,o,gate,up,down in 2 blocks
    assert all(n.startswith("model.layers.") for n in names)
    mgr.apply_magnitude_pruning(0.37)
    n = sum(t.numel for t in mgr.method.targets)
    assert mgr.pruning_metrics["parameters_pruned"] == int(0.37 * n + 0.5)
    assert mgr.pruning_metrics["parameters_prunable"] == n
    # global: per-layer sparsities differ (k/v are smaller matrices of different scale) but the
    # threshold is one: every kept weight >= every pruned one
    kept_min = min(float(t.param.detach()[t.param != 0].abs().min()) for t in mgr.method.targets)
    pruned_max = max(float(t.param.detach().abs()[~mgr.masks[t.key]].max()) for t in mgr.method.targets)
    assert kept_min >= pruned_max


def test_layer_scope_and_overrides(llama):
    cfg = {**SEED_CONFIG, "scope": "layer", "layer_sparsity": {"*.mlp.*": 0.8}}
    mgr = create_pruning_manager({"pruning": cfg}, llama)
    mgr.apply_magnitude_pruning(0.6)
    for layer in mgr.get_pruning_summary()["layers"]:
        expected = 0.8 if ".mlp." in layer["name"] else 0.6
        assert layer["zeros"] == int(expected * layer["numel"] + 0.5), layer["name"]


def test_targets_and_exclude(llama):
    mgr = create_pruning_manager(
        {"pruning": {**SEED_CONFIG, "targets": ["re:.*\\.(q|k)_proj"], "exclude": ["model.layers.0.*"]}}, llama
    )
    assert [t.name for t in mgr.method.targets] == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj",
    ]
    with pytest.raises(ModelError, match=r"pattern 'nothing\*' matches no Linear/Conv1D module"):
        create_pruning_manager({"pruning": {**SEED_CONFIG, "targets": ["nothing*"]}}, llama)
    with pytest.raises(ModelError, match="layer_sparsity: pattern 'zzz' matches none"):
        create_pruning_manager({"pruning": {**SEED_CONFIG, "layer_sparsity": {"zzz": 0.5}}}, llama)


def test_no_prunable_weights():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(ModelError, match="has no prunable weights"):
        create_pruning_manager({"pruning": SEED_CONFIG}, model)


def test_gpt2_conv1d_and_tied_embeddings(gpt2):
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    mgr = create_pruning_manager({"pruning": {**SEED_CONFIG, "scope": "row"}}, gpt2)
    names = [t.name for t in mgr.method.targets]
    assert "lm_head" not in names and all(n.startswith("transformer.h.") for n in names)
    assert all(t.transposed for t in mgr.method.targets)
    mgr.apply_magnitude_pruning(0.5)
    t = mgr.method.targets[0]  # c_attn, stored (in, out): every output column half pruned
    zeros_per_out = (t.param == 0).sum(dim=0)
    assert torch.all(zeros_per_out == t.param.shape[0] // 2)
    # tied weights targeted explicitly count once
    mgr2 = create_pruning_manager({"pruning": {"targets": ["lm_head"]}}, tiny_gpt2())
    assert len(mgr2.method.targets) == 1


def test_bert_targets(bert):
    mgr = create_pruning_manager({"pruning": SEED_CONFIG}, bert)
    assert len(mgr.method.targets) == 2 * 6  # q, k, v, attn out, intermediate, output
    assert mgr.adapter.name == "bert"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    model = tiny_llama().to(dtype)
    mgr = create_pruning_manager({"pruning": SEED_CONFIG}, model)
    mgr.apply_magnitude_pruning(0.6)
    assert abs(_prunable_sparsity(mgr) - 0.6) < 0.001
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert mgr.baseline_model_size == pytest.approx(dense_bytes / 2**20)


def test_step_is_cheap_outside_events(llama, monkeypatch):
    mgr = create_pruning_manager({"pruning": SEED_CONFIG}, llama, total_steps=1000)
    calls = []
    monkeypatch.setattr(mgr.metric, "score", lambda t: calls.append(t) or t.param.abs().float())
    for _ in range(200):
        mgr.step()
    assert calls == []  # steps 0..199 are before t_s = 200
    assert mgr.should_prune(200) and mgr.step() and calls


def test_target_sparsity_at_and_should_prune(llama):
    mgr = create_pruning_manager({"pruning": SEED_CONFIG}, llama)
    assert mgr.target_sparsity_at(50, 100) == pytest.approx(0.6 * 0.5**3)
    assert [t for t in range(100) if mgr.should_prune(t, 100)] == [20, 70, 80]
    with pytest.raises(ConfigError, match="total_steps is unknown"):
        mgr.step()


def test_lifecycle_errors(llama):
    mgr = create_pruning_manager({"pruning": SEED_CONFIG}, llama, total_steps=10)
    with pytest.raises(ConfigError, match=r"sparsity must be a number in \[0, 1\), got 1.0"):
        mgr.apply_magnitude_pruning(1.0)
    with pytest.raises(ConfigError, match="total_steps changed from 10 to 20"):
        mgr.step(total_steps=20)
    mgr.finalize()
    with pytest.raises(PruningStateError, match="finalize\\(\\) was already called"):
        mgr.finalize()
    with pytest.raises(PruningStateError, match="step\\(\\) called after finalize"):
        mgr.step()


def test_finalize_removes_hooks(llama):
    mgr = create_pruning_manager({"pruning": SEED_CONFIG}, llama)
    mgr.apply_magnitude_pruning(0.5)
    mgr.finalize()
    # after finalize, optimizer steps may regrow weights: the manager is out of the loop
    w = mgr.method.targets[0].param
    opt = torch.optim.SGD([w], lr=1.0)
    w.grad = torch.ones_like(w)
    opt.step()
    assert torch.count_nonzero(w) == w.numel()


def test_disabled_manager_never_prunes(llama):
    mgr = create_pruning_manager({"pruning": {**SEED_CONFIG, "enabled": False}}, llama, total_steps=10)
    for _ in range(10):
        assert mgr.step() is False
    assert mgr.get_pruning_summary()["measured_sparsity"] == 0.0


def test_resume_gives_same_masks():
    full, _ = _train(packed=False)
    ckpt = _train(packed=False, stop_at=15)
    resumed, _ = _train(packed=False, resume=ckpt)
    assert full.masks.keys() == resumed.masks.keys()
    for k in full.masks:
        assert torch.equal(full.masks[k], resumed.masks[k]), k


def test_state_dict_errors(llama):
    mgr = create_pruning_manager({"pruning": SEED_CONFIG}, llama)
    mgr.apply_magnitude_pruning(0.5)
    state = mgr.state_dict()
    other = create_pruning_manager({"pruning": SEED_CONFIG}, tiny_llama(hidden_size=32, intermediate_size=64))
    with pytest.raises(Exception, match="has shape"):
        other.load_state_dict(state)
    with pytest.raises(Exception, match="format_version"):
        other.load_state_dict({**state, "format_version": 99})


def test_pruning_config_object_and_yaml(tmp_path, llama):
    mgr = create_pruning_manager(PruningConfig(final_sparsity=0.5), llama)
    assert isinstance(mgr, PruningManager)
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  pruning:\n    sparsity_target: 0.4\n")
    assert create_pruning_manager(str(p), tiny_llama()).config.final_sparsity == 0.4


def test_dataparallel_wrapper_unwrapped(llama):
    mgr = create_pruning_manager({"pruning": SEED_CONFIG}, nn.DataParallel(llama))
    assert mgr.model is llama


def _train(packed, steps=30, resume=None, stop_at=None, reconstruction=False):
    inputs = lm_batch()
    model = tiny_llama()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    cfg = {**SEED_CONFIG, "pruning_interval": 4, "packed_masks": packed}
    mgr = create_pruning_manager({"pruning": cfg}, model, total_steps=steps)
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["opt"])
        mgr.load_state_dict(resume["mgr"])
        start = mgr.current_step
    for step in range(start, steps):
        if step == stop_at:
            return {
                "model": {k: v.clone() for k, v in model.state_dict().items()},
                "opt": opt.state_dict(),
                "mgr": mgr.state_dict(),
            }
        model(**inputs).loss.backward()
        mgr.step()
        opt.step()
        opt.zero_grad()
    return mgr, model


def test_packed_masks_train_bit_identical_to_bool_masks_in_an_eighth_of_the_memory():
    mgr_b, model_b = _train(packed=False)
    mgr_p, model_p = _train(packed=True)
    assert not mgr_b.masks.packed and mgr_p.masks.packed
    for k in mgr_b.masks:
        assert torch.equal(mgr_b.masks[k], mgr_p.masks[k]), k
    for (n, a), (_, b) in zip(model_b.state_dict().items(), model_p.state_dict().items()):
        assert torch.equal(a, b), n
    n_masked = sum(m.numel() for m in mgr_b.masks.values())
    assert mgr_b.masks.nbytes() == n_masked
    assert mgr_p.masks.nbytes() == sum((m.numel() + 7) // 8 for m in mgr_b.masks.values())
    mb = mgr_p.get_pruning_summary()["pruning_metrics"]["mask_memory_mb"]
    assert mb == pytest.approx(mgr_p.masks.nbytes() / 2**20)


def test_packed_masks_resume_and_state_dict_are_interchangeable():
    full, _ = _train(packed=True)
    ckpt = _train(packed=True, stop_at=15)
    assert all(v.dtype == torch.bool for v in ckpt["mgr"]["masks"].values())  # checkpoints hold plain masks
    resumed, _ = _train(packed=True, resume=ckpt)
    ckpt_bool = _train(packed=False, stop_at=15)
    resumed_from_bool, _ = _train(packed=True, resume=ckpt_bool)  # a bool-mask checkpoint resumes packed
    for k in full.masks:
        assert torch.equal(full.masks[k], resumed.masks[k]), k
        assert torch.equal(full.masks[k], resumed_from_bool.masks[k]), k


def test_mask_store_rejects_non_bool_and_bad_packed_sizes():
    from artemis.core.masks import MaskStore, unpack_mask

    store = MaskStore(packed=True)
    with pytest.raises(ValueError, match="mask for 'w' must be bool, got torch.float32"):
        store["w"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"shape \(3, 5\) needs 2 uint8 bytes, got \(1,\)/torch.uint8"):
        unpack_mask(torch.zeros(1, dtype=torch.uint8), (3, 5))
    m = torch.rand(7, 9) > 0.5
    store["w"] = m
    copy = store.copy()
    store["w"] = ~m
    assert torch.equal(copy["w"], m) and torch.equal(store["w"], ~m)  # a copy is independent


def test_packed_masks_with_progressive_sparsegpt_match_bool_masks():
    calib = [lm_batch(seed=s) for s in range(2)]
    out = {}
    for packed in (False, True):
        model = tiny_llama()
        mgr = create_pruning_manager(
            {
                "pruning": {
                    "reconstruction": "sparsegpt",
                    "pruning_start": 0.0,
                    "pruning_end": 1.0,
                    "pruning_interval": 2,
                    "final_sparsity": 0.5,
                    "sparsegpt_mask": "obs",
                    "packed_masks": packed,
                }
            },
            model,
            total_steps=5,
        )
        mgr.set_calibration_data(calib)
        for _ in range(5):
            mgr.step()  # events at 0, 2, 4: each one keeps the earlier masks (priors) pruned
        out[packed] = (mgr, model)
    (mb, model_b), (mp, model_p) = out[False], out[True]
    for k in mb.masks:
        assert torch.equal(mb.masks[k], mp.masks[k]), k
    for (n, a), (_, b) in zip(model_b.state_dict().items(), model_p.state_dict().items()):
        assert torch.equal(a, b), n


def test_mask_store_copies_and_pickles_without_unpacking():
    import copy
    import pickle

    from artemis.core.masks import MaskStore

    store = MaskStore(packed=True)
    m = torch.rand(5, 13) > 0.3
    store["w"] = m
    for clone in (copy.deepcopy(store), pickle.loads(pickle.dumps(store))):
        assert clone.packed and clone.nbytes() == store.nbytes() == (65 + 7) // 8
        assert torch.equal(clone["w"], m)


def test_sparsegpt_with_magnitude_reads_the_batches_without_a_false_warning(caplog):
    import logging

    mgr = create_pruning_manager({"pruning": {"reconstruction": "sparsegpt"}}, tiny_llama())
    with caplog.at_level(logging.WARNING):
        mgr.apply_pruning(0.5, calibration_data=[lm_batch(seed=s) for s in range(2)])
    assert "gathers no statistics" not in caplog.text  # the batches were used, by the reconstruction
    assert mgr.last_reconstruction["layers"] == len(mgr.method.targets)


def test_load_state_dict_refuses_another_config_naming_the_fields():
    import torch.nn as nn

    def make(final, packed=False):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        cfg = {"pruning": {"final_sparsity": final, "targets": ["*"], "pruning_interval": 1, "packed_masks": packed}}
        return create_pruning_manager(cfg, net, total_steps=10), net

    saved, saved_net = make(0.9)
    for _ in range(6):
        saved.step()
    state = saved.state_dict()
    other, net = make(0.3, packed=True)  # packed_masks differs too, but only in storage: not named
    before = {k: p.detach().clone() for k, p in net.named_parameters()}
    with pytest.raises(
        CheckpointError,
        match=r"another configuration \(final_sparsity: 0\.9 \(saved\) vs 0\.3 \(this manager\)\); resume with",
    ):
        other.load_state_dict(state)
    assert all(torch.equal(before[k], p) for k, p in net.named_parameters())  # nothing changed
    other.load_state_dict(state, strict_config=False)  # asked to override: the saved masks are applied
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), saved_net.parameters()))


def test_nan_weights_name_the_layer():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        net[2].weight[0, 3] = float("nan")
    before = [p.detach().clone() for p in net.parameters()]
    mgr = create_pruning_manager({"pruning": {"targets": ["*"]}}, net)
    with pytest.raises(ModelError, match=r"importance scores of 2\.weight contain NaN \(its weight holds 1 NaN"):
        mgr.apply_magnitude_pruning(0.5)
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(before, net.parameters()))


def test_load_state_dict_accepts_a_state_from_before_a_field_existed():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    mgr = create_pruning_manager({"pruning": {"targets": ["*"], "pruning_interval": 1}}, net, total_steps=10)
    for _ in range(5):
        mgr.step()
    state = mgr.state_dict()
    state["config"] = {k: v for k, v in state["config"].items() if k != "pipeline_inputs"}  # an older Artemis
    create_pruning_manager({"pruning": {"targets": ["*"], "pruning_interval": 1}}, net, total_steps=10).load_state_dict(
        state
    )
