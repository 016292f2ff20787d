"""artemis.oneshot with the calibrated methods that need more than one block's statistics:
SparseGPT with dense targets, OWL, and one global threshold over calibrated scores. Each is
compared with manager.apply_pruning where the two have the same semantics, and its block
forward passes are counted."""

from __future__ import annotations

import copy

import pytest
import torch

from artemis import create_pruning_manager, oneshot
from artemis.core.errors import CalibrationError, ConfigError
from tests.fixtures import lm_batch, tiny_bert, tiny_llama, tiny_qwen2_sliding

#: one target per block: the pipeline's Hessians (gathered in one pass from the block's
#: input) are then those of the manager's layer-by-layer passes
ONE_PER_BLOCK = {"llama": ["*.down_proj"], "bert": [r"re:.*\.\d+\.output\.dense$"]}
MAKERS = {"llama": lambda layers=3: tiny_llama(layers=layers), "bert": lambda layers=3: tiny_bert(layers=layers)}


def _calib(n: int = 3, seq: int = 16) -> list[dict]:
    out = []
    for i in range(n):
        ids = lm_batch(seed=i, seq=seq)["input_ids"]
        mask = torch.ones_like(ids)
        mask[0, seq // 2 :] = 0  # padding: left out of every statistic
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _both(kind: str, cfg: dict, calib: list, layers: int = 3):
    """(manager, its model, pipeline summary, pipeline model, block forward passes counted by
    pre-hooks: partial passes, stopped at a layer's input, count too)."""
    ref = MAKERS[kind](layers)
    net = copy.deepcopy(ref)
    mgr = create_pruning_manager(cfg, ref)
    mgr.apply_pruning(cfg["pruning"]["final_sparsity"], calibration_data=calib, progress=False)
    blocks = net.model.layers if kind == "llama" else net.encoder.layer
    count = [0]
    handles = [b.register_forward_pre_hook(lambda *a: count.__setitem__(0, count[0] + 1)) for b in blocks]
    try:
        s = oneshot(net, cfg, calib, progress=False)
    finally:
        for h in handles:
            h.remove()
    # the capture passes run no block (recorders take the blocks' places): not counted; one
    # capture per batch for each sweep over the blocks (a statistics pass adds a second)
    assert count[0] == s["pipeline"]["block_forwards"]
    assert s["pipeline"]["capture_forwards"] in (len(calib), 2 * len(calib))
    return mgr, ref, s, net, s["pipeline"]["block_forwards"]


def _weights(mgr, model):
    return {t.key: model.get_submodule(t.name).weight.detach() for t in mgr.method.targets}


def _output_error(model, dense, calib) -> float:
    with torch.no_grad():
        return sum(float((model(**b)[0] - dense(**b)[0]).pow(2).mean()) for b in calib)


# ------------------------------------------------------------ sparsegpt_target: dense
#: the SparseGPT settings compared: the defaults (OBS mask per row, Ledoit-Wolf shrinkage,
#: bias refit) and the metric's mask with neither shrinkage nor bias refit
SPARSEGPT_SETTINGS = {
    "defaults": {},
    "plain": {"sparsegpt_mask": "metric", "sparsegpt_shrinkage": "none", "sparsegpt_bias_correction": False},
}


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("settings", sorted(SPARSEGPT_SETTINGS))
@pytest.mark.parametrize("target,metric", [("dense", "magnitude"), ("dense", "activation"), ("pruned", "magnitude")])
def test_reconstruction_equals_manager_one_target_per_block(kind, metric, settings, target):
    """With one target per block the pipeline's reconstruction gives the manager's weights
    (and refitted biases) bit for bit, for both targets: with dense targets in 2 block
    passes per batch (the dense pass, the pruned pass paused at the target's input), with
    pruned targets in 2 (1 for the last block). (Pruned targets
    with ``activation`` are left out: the pipeline's pruned inputs then also feed the mask
    statistics, the manager's come from the dense model.)"""
    cfg = {
        "pruning": {
            "final_sparsity": 0.5,
            "importance_metric": metric,
            "reconstruction": "sparsegpt",
            "sparsegpt_target": target,
            "targets": ONE_PER_BLOCK[kind],
            **SPARSEGPT_SETTINGS[settings],
        }
    }
    calib = _calib()
    mgr, ref, s, net, passes = _both(kind, cfg, calib)
    # dense: the dense pass, then the pruned pass paused at the target's input
    assert passes == len(calib) * ((2 * 3) if target == "dense" else (2 * 3 - 1))
    assert s["pipeline"]["inputs"] == "pruned"
    assert s["last_reconstruction"]["target"] == target and s["last_reconstruction"]["layers"] == 3
    a, b = _weights(mgr, ref), _weights(mgr, net)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for name, p in ref.named_parameters():
        if name.endswith(".bias"):
            assert torch.equal(p, net.get_parameter(name)), name
    assert s["measured_sparsity"] == 0.5


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("settings", sorted(SPARSEGPT_SETTINGS))
def test_dense_target_all_layers_equals_manager(kind, settings):
    """Every layer a target: the block is reconstructed layer after layer (q/k/v together,
    then the attention output, gate/up (BERT: the intermediate), down), as the manager
    does: the same weights and biases bit for bit, in 2 block passes per batch (the dense
    pass, then the pruned pass paused before each group), and a smaller output error than
    the masks alone."""
    cfg = {
        "pruning": {
            "final_sparsity": 0.5,
            "reconstruction": "sparsegpt",
            "sparsegpt_target": "dense",
            **SPARSEGPT_SETTINGS[settings],
        }
    }
    calib = _calib(n=4, seq=32)
    mgr, ref, s, net, passes = _both(kind, cfg, calib)
    assert passes == len(calib) * 2 * 3
    for k, v in ref.state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k
    assert s["last_reconstruction"]["dense_copy_bytes"] > 0
    dense = MAKERS[kind]()
    plain = MAKERS[kind]()
    create_pruning_manager({"pruning": {"final_sparsity": 0.5}}, plain).apply_magnitude_pruning(0.5)
    assert _output_error(net, dense, calib) < _output_error(plain, dense, calib)


def test_dense_target_targets_called_out_of_order_restart_and_equal_manager(caplog):
    """A block whose targets are registered in another order than it calls them (here the
    MLP's down projection before gate and up): the paused passes reach gate_proj while the
    update waits for down_proj, so the block is redone with restarted passes (the weights
    put back first), and the result is still the manager's, bit for bit. Passes per batch
    and block: the dense pass, the paused pass given up, 2 per group of targets (q/k/v,
    o, down, gate/up: 4) and the pruned pass (the last block: none)."""
    ref = tiny_llama(layers=3)
    for layer in ref.model.layers:  # register down_proj first: the targets' order becomes o, down, gate, up
        mods = dict(layer.mlp._modules)
        layer.mlp._modules.clear()
        for name in ("down_proj", "gate_proj", "up_proj", "act_fn"):
            layer.mlp._modules[name] = mods[name]
    net = copy.deepcopy(ref)
    cfg = {"pruning": {"final_sparsity": 0.5, "reconstruction": "sparsegpt", "sparsegpt_target": "dense"}}
    calib = _calib(n=2)
    mgr = create_pruning_manager(cfg, ref)
    mgr.apply_pruning(0.5, calibration_data=calib, progress=False)
    with caplog.at_level("INFO", logger="artemis.data.pipeline"):
        s = oneshot(net, cfg, calib, progress=False)
    assert sum("redone with restarted passes" in r.getMessage() for r in caplog.records) == 3
    assert s["pipeline"]["block_forwards"] == len(calib) * ((1 + 1 + 2 * 4 + 1) * 3 - 1)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k


@pytest.mark.parametrize("depth", [2, 5])
def test_dense_target_passes_linear_in_depth(depth):
    calib = _calib(n=2)
    net = tiny_llama(layers=depth)
    cfg = {"pruning": {"final_sparsity": 0.5, "reconstruction": "sparsegpt", "sparsegpt_target": "dense"}}
    s = oneshot(net, cfg, calib, progress=False)
    assert s["pipeline"]["block_forwards"] == len(calib) * 2 * depth
    assert s["pipeline"]["statistics_forwards"] == 0


# ------------------------------------------------------------------------ OWL
@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("metric", ["magnitude", "activation"])
def test_owl_equals_manager(kind, metric):
    """OWL: the same outlier ratios, per-layer sparsities and masks as the manager; one
    statistics pass per block and none after it (the statistics give the scores too)."""
    cfg = {
        "pruning": {"final_sparsity": 0.5, "importance_metric": metric, "scope": "owl", "owl_lambda": 0.1, "owl_m": 3}
    }
    calib = _calib()
    mgr, ref, s, net, passes = _both(kind, cfg, calib)
    assert passes == s["pipeline"]["statistics_forwards"] == len(calib) * 3
    ms = mgr.get_pruning_summary()
    assert s["owl_outlier_ratios"] == ms["owl_outlier_ratios"]
    assert s["owl_layer_sparsity"] == ms["owl_layer_sparsity"]
    assert len(set(s["owl_layer_sparsity"].values())) > 1  # the blocks really differ
    a, b = _weights(mgr, ref), _weights(mgr, net)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert s["layers"] == ms["layers"]
    assert s["pruning_metrics"]["parameters_pruned"] == ms["pruning_metrics"]["parameters_pruned"]


def test_owl_with_reconstruction_keeps_the_manager_masks():
    """OWL + SparseGPT (pruned targets): the statistics pass, then the reconstruction's two
    passes per block; the OWL masks are the manager's."""
    cfg = {
        "pruning": {
            "final_sparsity": 0.5,
            "importance_metric": "activation",
            "scope": "owl",
            "owl_lambda": 0.1,
            "owl_m": 3,
            "reconstruction": "sparsegpt",
            "sparsegpt_mask": "metric",
            "sparsegpt_target": "pruned",
        }
    }
    calib = _calib()
    mgr, ref, s, net, passes = _both("llama", cfg, calib)
    assert s["pipeline"]["statistics_forwards"] == len(calib) * 3
    assert passes == len(calib) * 3 + len(calib) * (2 * 3 - 1)
    a, b = _weights(mgr, ref), _weights(mgr, net)
    for k in a:
        assert torch.equal(a[k] == 0, b[k] == 0), k
    assert s["owl_layer_sparsity"] == mgr.get_pruning_summary()["owl_layer_sparsity"]


def test_owl_errors():
    net = tiny_llama(layers=2)
    with pytest.raises(CalibrationError, match="scope 'owl' needs calibration batches"):
        oneshot(net, {"pruning": {"final_sparsity": 0.5, "scope": "owl"}}, None, progress=False)
    cfg = {"pruning": {"final_sparsity": 0.9, "scope": "owl", "owl_lambda": 0.5, "owl_m": 1}}
    with pytest.raises(ConfigError, match="owl_lambda"):
        oneshot(net, cfg, _calib(n=1), progress=False)
    assert all(bool((p != 0).all()) for p in net.parameters() if p.dim() == 2)  # nothing pruned


# ------------------------------------------------------------- global, calibrated
@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("groups", [False, True])
def test_global_activation_equals_manager(kind, groups):
    """One threshold over the activation scores of all blocks (per sparsity group)."""
    cfg = {"pruning": {"final_sparsity": 0.5, "importance_metric": "activation", "scope": "global"}}
    if groups:  # a layer_sparsity override forms its own group with its own threshold
        cfg["pruning"]["layer_sparsity"] = {"*.mlp.*" if kind == "llama" else "*.intermediate.*": 0.25}
    calib = _calib()
    mgr, ref, s, net, passes = _both(kind, cfg, calib)
    assert passes == s["pipeline"]["statistics_forwards"] == len(calib) * 3
    a, b = _weights(mgr, ref), _weights(mgr, net)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert s["layers"] == mgr.get_pruning_summary()["layers"]
    # one threshold: the layers' sparsities differ, their total is the target
    assert len({row["sparsity"] for row in s["layers"]}) > 2


def test_global_activation_dense_target_equals_manager():
    """Global Wanda masks with a dense-target reconstruction: the statistics pass, then
    2 passes per block; the manager's weights."""
    cfg = {
        "pruning": {
            "final_sparsity": 0.5,
            "importance_metric": "activation",
            "scope": "global",
            "reconstruction": "sparsegpt",
            "sparsegpt_target": "dense",
            "sparsegpt_mask": "metric",
        }
    }
    calib = _calib(n=2)
    mgr, ref, s, net, passes = _both("llama", cfg, calib, layers=2)
    assert passes == len(calib) * 2 + len(calib) * 2 * 2
    a, b = _weights(mgr, ref), _weights(mgr, net)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------- gradient_sensitivity
def _labelled(n: int = 3) -> list[dict]:
    return [{**b, "labels": lm_batch(seed=i, seq=16)["labels"]} for i, b in enumerate(_calib(n))]


@pytest.mark.parametrize(
    "extra",
    [{}, {"scope": "row"}, {"scope": "layer"}, {"scope": "owl", "owl_lambda": 0.1, "owl_m": 3}, {"pattern": "2:4"}],
)
def test_gradient_sensitivity_equals_manager(extra):
    """The block-by-block backward sweep gives the gradients of the manager's whole-model
    backward passes: the same weights bit for bit, in 2 block passes per batch (the forward
    sweep and the recomputation with gradients)."""
    cfg = {"pruning": {"final_sparsity": 0.5, "importance_metric": "gradient_sensitivity", **extra}}
    calib = _labelled()
    mgr, ref, s, net, passes = _both("llama", cfg, calib)
    assert passes == s["pipeline"]["statistics_forwards"] == len(calib) * 2 * 3
    a, b = _weights(mgr, ref), _weights(mgr, net)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert s["layers"] == mgr.get_pruning_summary()["layers"]
    assert all(p.grad is None and p.requires_grad for p in net.parameters())  # left as found


def test_gradient_sensitivity_with_reconstruction_and_errors(tmp_path):
    cfg = {
        "pruning": {
            "final_sparsity": 0.5,
            "importance_metric": "gradient_sensitivity",
            "scope": "row",
            "reconstruction": "sparsegpt",
            "sparsegpt_mask": "metric",
            "sparsegpt_target": "pruned",
        }
    }
    calib = _labelled(2)
    mgr, ref, s, net, passes = _both("llama", cfg, calib, layers=2)
    assert passes == len(calib) * 2 * 2 + len(calib) * (2 * 2 - 1)
    a, b = _weights(mgr, ref), _weights(mgr, net)
    for k in a:
        assert torch.equal(a[k] == 0, b[k] == 0), k
    # BertModel has no loss: the same error as the manager's
    with pytest.raises(CalibrationError, match="needs a loss"):
        oneshot(tiny_bert(), {"pruning": {"importance_metric": "gradient_sensitivity"}}, _calib(1), progress=False)
    folder = tmp_path / "in"
    tiny_llama().save_pretrained(str(folder))
    with pytest.raises(ConfigError, match="'gradient_sensitivity' is not supported by the one-shot pipeline when it"):
        oneshot(str(folder), cfg, calib, max_memory="1GiB", progress=False)


# -------------------------------------------------------------------- streamed
@pytest.fixture
def llama_folder(tmp_path):
    model = tiny_llama(layers=3)
    folder = tmp_path / "in"
    model.save_pretrained(str(folder), max_shard_size="100KB")
    return model, folder


@pytest.mark.parametrize(
    "cfg",
    [
        {"final_sparsity": 0.5, "importance_metric": "activation", "scope": "owl", "owl_lambda": 0.1},
        {"final_sparsity": 0.5, "importance_metric": "activation", "scope": "global"},
        {"final_sparsity": 0.5, "reconstruction": "sparsegpt", "sparsegpt_target": "dense"},
    ],
)
def test_streamed_equals_in_memory(llama_folder, tmp_path, cfg):
    model, folder = llama_folder
    calib = _calib(n=2)
    mem = oneshot(copy.deepcopy(model), {"pruning": cfg}, calib, tmp_path / "mem", progress=False)
    st = oneshot(str(folder), {"pruning": cfg}, calib, tmp_path / "st", max_memory="1GiB", progress=False)
    assert st["pipeline"]["streamed"] and st["pipeline"]["max_resident_blocks"] == 1
    assert st["layers"] == mem["layers"]
    assert st["pipeline"]["block_forwards"] == mem["pipeline"]["block_forwards"]
    assert (tmp_path / "mem" / "model.safetensors").read_bytes() == (tmp_path / "st" / "model.safetensors").read_bytes()


def test_gradient_sensitivity_targets_in_later_blocks_only():
    """The backward sweep stops at the first block with a target; the blocks before it run
    once (the forward sweep)."""
    cfg = {
        "pruning": {
            "final_sparsity": 0.5,
            "importance_metric": "gradient_sensitivity",
            "scope": "layer",
            "targets": ["model.layers.2.*"],
        }
    }
    calib = _labelled(2)
    mgr, ref, s, net, passes = _both("llama", cfg, calib)
    assert passes == len(calib) * (3 + 1)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k


# ------------------------------------------------------------ layer types with their own masks
@pytest.mark.parametrize(
    "extra",
    [
        {"importance_metric": "activation", "scope": "row"},
        {"importance_metric": "activation", "scope": "owl"},
        {"importance_metric": "gradient_sensitivity", "scope": "layer"},
        {"reconstruction": "sparsegpt", "targets": ONE_PER_BLOCK["llama"]},
    ],
    ids=["wanda", "owl", "gradient", "sparsegpt"],
)
def test_sliding_window_layers_get_their_own_mask(extra):
    """Each block runs with the arguments the model gives it (a sliding-window layer its
    windowed mask, not block 0's full one): the masks equal the manager's, which runs the
    whole model."""
    ref = tiny_qwen2_sliding()
    assert ref.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    net = copy.deepcopy(ref)
    cfg = {"pruning": {"method": "magnitude_progressive", "final_sparsity": 0.5, **extra}}
    calib = [{**b, "labels": b["input_ids"]} for b in _calib(n=3, seq=16)]
    mgr = create_pruning_manager(cfg, ref)
    mgr.apply_pruning(0.5, calibration_data=calib, progress=False)
    oneshot(net, cfg, calib, progress=False)
    got, want = _weights(mgr, net), _weights(mgr, ref)
    assert len(want) == (4 if "targets" in extra else 28)  # 7 linear layers in each of the 4 blocks
    for key in want:
        assert torch.equal(got[key] == 0, want[key] == 0), key
        if "reconstruction" in extra:  # the reconstructed weights too, bit for bit
            assert torch.equal(got[key], want[key]), key
