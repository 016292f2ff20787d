"""Structured sparsity (heads and neurons, activation or magnitude scores) through the one-shot
block pipeline: the same units removed, the same model, summary and saved folder as
manager.apply_pruning + finalize + save_pruned, in memory and streamed."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from artemis import create_pruning_manager, oneshot, save_pruned
from artemis.core.config import load_pruning_config
from artemis.core.errors import ConfigError
from artemis.data.pipeline import streaming_bytes, unsupported_setting
from artemis.methods.structured import load_pruned_model
from tests.fixtures import lm_batch, tiny_bert, tiny_llama, tiny_qwen2_sliding
from tests.test_oneshot_layers import _calib, _same_tensors

MAKERS = {"llama": lambda: tiny_llama(layers=3), "bert": lambda: tiny_bert(layers=3), "qwen2": tiny_qwen2_sliding}


def _cfg(metric: str, widths: str = "uniform", sparsity: float = 0.3, **extra) -> dict:
    return {
        "pruning": {
            "method": "structured_sparsity",
            "final_sparsity": sparsity,
            "importance_metric": metric,
            "structured_widths": widths,
            **extra,
        }
    }


def _manager_path(model, cfg: dict, calib):
    mgr = create_pruning_manager(cfg, model)
    mgr.apply_pruning(cfg["pruning"]["final_sparsity"], calibration_data=calib, progress=False)
    mgr.finalize()
    return mgr


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["llama", "bert", "qwen2"])
@pytest.mark.parametrize("metric", ["activation", "magnitude"])
@pytest.mark.parametrize("widths", ["uniform", "per_layer"])
def test_equals_manager_in_memory(kind, metric, widths):
    """Same units removed (same shapes and weights, bit for bit), same config and summary."""
    cfg = _cfg(metric, widths)
    calib = _calib() if metric == "activation" else None
    ref = MAKERS[kind]()
    net = copy.deepcopy(ref)
    mgr = _manager_path(ref, cfg, calib)
    s = oneshot(net, cfg, calib, progress=False)
    _same_tensors(ref.state_dict(), net.state_dict())
    assert net.config.to_dict() == ref.config.to_dict()
    assert {k: v for k, v in s.items() if k != "pipeline"} == mgr.get_pruning_summary()
    assert s["structured"]["structure_parameters_removed"] > 0
    blocks = len(s["structured"]["layers"])
    n = len(calib) * blocks if calib else 0  # one pass per batch and block (its output: the next block's input)
    assert s["pipeline"]["block_forwards"] == n
    assert s["pipeline"]["statistics_forwards"] == (0 if widths == "uniform" else n)


def test_a_unit_is_chosen_by_its_own_block_scores():
    """A hand-made case: the MLP neurons of block 1 whose down-projection columns are zero
    have activation score 0 (the default reduction 'output') and are the ones removed."""
    net = tiny_llama(layers=2)
    with torch.no_grad():
        net.model.layers[1].mlp.down_proj.weight[:, 5:10] = 0.0
    # 0.3 of a block's 36864 structure parameters: 1 of 2 KV groups (6144) and 26 of 128 neurons
    # (192 each: 4915.2 / 192 = 25.6, rounded), as plan_unit_counts gives
    s = oneshot(net, _cfg("activation", sparsity=0.3), _calib(), progress=False)
    assert s["structured"]["layers"][1]["neurons_kept"] == 128 - 26
    assert net.model.layers[1].mlp.down_proj.weight.shape == (64, 102)
    assert bool((net.model.layers[1].mlp.down_proj.weight != 0).all())  # the five zero columns went


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("widths", ["uniform", "per_layer"])
def test_output_is_save_pruned_folder_and_loads_back(widths, tmp_path):
    """The folder written block by block holds the tensors and config save_pruned writes after
    the manager's prune and finalize(); it loads back (stock from_pretrained for uniform widths,
    load_pruned_model for per-layer widths) to the same weights and outputs."""
    from transformers import AutoModelForCausalLM

    cfg = _cfg("activation", widths)
    calib = _calib()
    ref = tiny_llama(layers=3)
    net = copy.deepcopy(ref)
    mgr = _manager_path(ref, cfg, calib)
    save_pruned(ref, tmp_path / "manager", manager=mgr)
    s = oneshot(net, cfg, calib, tmp_path / "pipe", progress=False)
    assert s["pipeline"]["output"]["sparse_modules"] == []
    _same_tensors(
        load_file(tmp_path / "manager" / "model.safetensors"), load_file(tmp_path / "pipe" / "model.safetensors")
    )
    assert (tmp_path / "manager" / "config.json").read_text() == (tmp_path / "pipe" / "config.json").read_text()
    if widths == "uniform":
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "pipe").eval()
    else:
        assert "artemis_structure" in (tmp_path / "pipe" / "config.json").read_text()
        back = load_pruned_model(tmp_path / "pipe", AutoModelForCausalLM).eval()
    _same_tensors(ref.state_dict(), back.state_dict())
    ids = lm_batch()["input_ids"][:1, :8]
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)


@pytest.fixture
def llama_folder(tmp_path):
    model = tiny_llama(layers=3)
    folder = tmp_path / "in"
    model.save_pretrained(str(folder), max_shard_size="100KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    return model, folder


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("metric", "widths"), [("activation", "uniform"), ("magnitude", "per_layer")])
def test_streamed_equals_in_memory_one_block_resident(llama_folder, tmp_path, metric, widths):
    model, folder = llama_folder
    cfg = _cfg(metric, widths)
    calib = _calib() if metric == "activation" else None
    mem = oneshot(copy.deepcopy(model), cfg, calib, tmp_path / "mem", progress=False)
    outer, largest, total = streaming_bytes(model, model.model.layers)
    st = oneshot(str(folder), cfg, calib, tmp_path / "st", max_memory=max(outer, largest) + 1, progress=False)
    assert st["pipeline"]["streamed"] and st["pipeline"]["max_resident_blocks"] == 1
    assert st["pipeline"]["peak_param_bytes"] <= outer + largest < total
    assert {k: v for k, v in st.items() if k != "pipeline"} == {k: v for k, v in mem.items() if k != "pipeline"}
    assert (tmp_path / "mem" / "model.safetensors").read_bytes() == (tmp_path / "st" / "model.safetensors").read_bytes()
    assert (tmp_path / "mem" / "config.json").read_text() == (tmp_path / "st" / "config.json").read_text()


# ------------------------------------------------------------------ refusals
def test_gradient_sensitivity_refused_naming_it():
    assert unsupported_setting(load_pruning_config(_cfg("activation", "per_layer"))) is None
    why = unsupported_setting(load_pruning_config(_cfg("gradient_sensitivity")), in_memory=True)
    assert why.startswith("importance_metric 'gradient_sensitivity' with method 'structured_sparsity' is not")
    net = tiny_llama(layers=2)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ConfigError, match="'gradient_sensitivity' with method 'structured_sparsity'"):
        oneshot(net, _cfg("gradient_sensitivity"), _calib(), progress=False)
    _same_tensors(before, net.state_dict())


def test_impossible_sparsity_refused_before_anything_changes(tmp_path):
    net = tiny_llama(layers=2)
    before = copy.deepcopy(net.state_dict())
    cfg = _cfg("activation", sparsity=0.9, structured_units=["attention_heads"])
    with pytest.raises(ConfigError, match=r"would remove 2 of 2 attention units \(KV head groups\) of every block"):
        oneshot(net, cfg, _calib(), tmp_path / "out", progress=False)
    _same_tensors(before, net.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == []
