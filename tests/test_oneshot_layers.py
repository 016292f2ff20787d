"""Layer dropout (Block Influence, magnitude) through the one-shot block pipeline: the same
blocks dropped and the same saved weights as manager.apply_pruning + finalize + save_pruned,
in memory and streamed from a multi-shard folder."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from artemis import create_pruning_manager, oneshot, save_pruned
from artemis.core.config import load_pruning_config
from artemis.core.errors import CalibrationError, ConfigError
from artemis.data.pipeline import streaming_bytes, unsupported_setting
from tests.fixtures import lm_batch, tiny_bert, tiny_llama, tiny_qwen2_sliding


def _calib(n: int = 3, seq: int = 16, pad: bool = True) -> list[dict]:
    out = []
    for i in range(n):
        ids = lm_batch(seed=i, seq=seq)["input_ids"]
        mask = torch.ones_like(ids)
        if pad:
            mask[0, seq // 2 :] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _cfg(metric: str, sparsity: float = 0.5) -> dict:
    return {"pruning": {"method": "layer_dropout", "final_sparsity": sparsity, "importance_metric": metric}}


def _manager_path(model, cfg: dict, calib):
    mgr = create_pruning_manager(cfg, model)
    mgr.apply_pruning(cfg["pruning"]["final_sparsity"], calibration_data=calib, progress=False)
    mgr.finalize()
    return mgr


def _same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


MAKERS = {"llama": lambda: tiny_llama(layers=4), "bert": lambda: tiny_bert(layers=4), "qwen2": tiny_qwen2_sliding}


@pytest.mark.parametrize("kind", ["llama", "bert", "qwen2"])
@pytest.mark.parametrize("metric", ["activation", "magnitude"])
def test_equals_manager_in_memory(kind, metric):
    """Same scores, same blocks dropped, same model (weights, config) and summary as the manager."""
    cfg = _cfg(metric)
    calib = _calib() if metric == "activation" else None
    ref = MAKERS[kind]()
    net = copy.deepcopy(ref)
    mgr = _manager_path(ref, cfg, calib)
    s = oneshot(net, cfg, calib, progress=False)
    want = mgr.get_pruning_summary()
    assert s["layers_dropped"] == want["layers_dropped"] and len(s["layers_dropped"]) == 2
    assert s["drop_order"] == want["drop_order"]
    assert s["layers"] == want["layers"]  # the per-block table, scores included (bit for bit)
    assert s["pruning_metrics"] == want["pruning_metrics"]
    assert {k: v for k, v in s.items() if k != "pipeline"} == want
    _same_tensors(ref.state_dict(), net.state_dict())
    assert net.config.to_dict() == ref.config.to_dict()
    assert net.config.num_hidden_layers == 2
    blocks = len(calib) * 4 if calib else 0  # one pass per batch and block (the last one too: its score)
    assert s["pipeline"]["block_forwards"] == s["pipeline"]["statistics_forwards"] == blocks


def test_block_influence_is_computed_on_the_dense_inputs_with_padding_counted():
    """Each score is the mean over every token (padding included, as the method's hooks count
    it) of 1 - cos(x_in, x_out) on the dense model: checked against the hidden states of a
    plain forward pass (a Llama's last one is after the final norm: blocks 0 and 1 only)."""
    from artemis.metrics.blocks import influence_terms, token_weights

    calib = _calib(n=2)
    model = tiny_llama(layers=3)
    with torch.no_grad():
        hs = [model(**b, output_hidden_states=True).hidden_states for b in calib]
    s = oneshot(copy.deepcopy(model), _cfg("activation", 1 / 3), calib, progress=False)
    scores = [row["score"] for row in s["layers"]]
    for i in (0, 1):
        terms = [influence_terms(h[i], h[i + 1]) for h in hs]
        assert scores[i] == pytest.approx(sum(t for t, _ in terms) / sum(c for _, c in terms), rel=1e-6)
        real = [influence_terms(h[i], h[i + 1], token_weights(b["attention_mask"], h[i])) for h, b in zip(hs, calib)]
        assert scores[i] != pytest.approx(sum(t for t, _ in real) / sum(c for _, c in real), rel=1e-6)
    assert len(scores) == 3 and scores[2] > 0


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_output_loads_with_stock_transformers_as_save_pruned(kind, tmp_path):
    """The folder written block by block holds the tensors save_pruned writes after the
    manager's prune and finalize(), and stock from_pretrained loads it to the same model."""
    from transformers import AutoModelForCausalLM

    cfg = _cfg("activation")
    calib = _calib()
    ref = MAKERS[kind]()
    net = copy.deepcopy(ref)
    mgr = _manager_path(ref, cfg, calib)
    save_pruned(ref, tmp_path / "manager", manager=mgr)
    s = oneshot(net, cfg, calib, tmp_path / "pipe", progress=False)
    assert s["pipeline"]["output"]["sparse_modules"] == []
    _same_tensors(
        load_file(tmp_path / "manager" / "model.safetensors"), load_file(tmp_path / "pipe" / "model.safetensors")
    )
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "manager").eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "pipe").eval()
    _same_tensors(a.state_dict(), b.state_dict())
    _same_tensors(ref.state_dict(), b.state_dict())
    assert b.config.num_hidden_layers == 2
    assert getattr(b.config, "layer_types", None) == getattr(ref.config, "layer_types", None)
    ids = lm_batch()["input_ids"][:1, :8]
    with torch.no_grad():
        assert torch.equal(b(ids).logits, ref(ids).logits)


@pytest.fixture
def qwen_folder(tmp_path):
    model = tiny_qwen2_sliding()
    folder = tmp_path / "in"
    model.save_pretrained(str(folder), max_shard_size="100KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    return model, folder


@pytest.mark.parametrize("metric", ["activation", "magnitude"])
def test_streamed_equals_in_memory_one_block_resident(qwen_folder, tmp_path, metric):
    """A streamed multi-shard checkpoint: the same summary and the same model.safetensors bytes as
    the in-memory run, at most one block resident, parameters below outer + largest block."""
    model, folder = qwen_folder
    cfg = _cfg(metric)
    calib = _calib() if metric == "activation" else None
    mem = oneshot(copy.deepcopy(model), cfg, calib, tmp_path / "mem", progress=False)
    outer, largest, total = streaming_bytes(model, model.model.layers)
    st = oneshot(str(folder), cfg, calib, tmp_path / "st", max_memory=max(outer, largest) + 1, progress=False)
    assert st["pipeline"]["streamed"] and st["pipeline"]["max_resident_blocks"] == 1
    assert st["pipeline"]["peak_param_bytes"] <= outer + largest < total
    assert {k: v for k, v in st.items() if k != "pipeline"} == {k: v for k, v in mem.items() if k != "pipeline"}
    assert st["pipeline"]["block_forwards"] == mem["pipeline"]["block_forwards"]
    assert (tmp_path / "mem" / "model.safetensors").read_bytes() == (tmp_path / "st" / "model.safetensors").read_bytes()
    assert (tmp_path / "mem" / "config.json").read_text() == (tmp_path / "st" / "config.json").read_text()
    from transformers import AutoModelForCausalLM

    ref = copy.deepcopy(model)
    _manager_path(ref, cfg, calib)
    _same_tensors(ref.state_dict(), AutoModelForCausalLM.from_pretrained(tmp_path / "st").state_dict())


# ------------------------------------------------------------------ refusals
def test_unsupported_setting_names_the_metric():
    grad = load_pruning_config(_cfg("gradient_sensitivity"))
    assert unsupported_setting(load_pruning_config(_cfg("activation"))) is None
    assert unsupported_setting(load_pruning_config(_cfg("magnitude"))) is None
    assert "importance_metric 'gradient_sensitivity' with method 'layer_dropout'" in unsupported_setting(
        grad, in_memory=True
    )
    model = tiny_llama(layers=4)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="'gradient_sensitivity' with method 'layer_dropout' is not supported"):
        oneshot(model, _cfg("gradient_sensitivity"), _calib(), progress=False)
    _same_tensors(before, model.state_dict())


@pytest.mark.parametrize(
    ("pruning", "match"),
    [
        ({"final_sparsity": 0.9}, r"final_sparsity 0.9 of 4 layers removes 4 layers, leaving none"),
        ({"final_sparsity": 0.1}, r"final_sparsity 0.1 of 4 layers rounds to 0 layers"),
        ({"final_sparsity": 0.5, "scope": "layer"}, r"pruning.scope is not used by method 'layer_dropout'"),
    ],
)
def test_bad_config_refused_before_anything_changes(pruning, match, tmp_path):
    model = tiny_llama(layers=4)
    before = copy.deepcopy(model.state_dict())
    cfg = {"pruning": {"method": "layer_dropout", "importance_metric": "activation", **pruning}}
    with pytest.raises(ConfigError, match=match):
        oneshot(model, cfg, _calib(), tmp_path / "out", progress=False)
    _same_tensors(before, model.state_dict())
    assert len(model.model.layers) == 4 and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_activation_needs_calibration_data():
    with pytest.raises(CalibrationError, match="importance_metric 'activation' needs calibration batches"):
        oneshot(tiny_llama(layers=4), _cfg("activation"), None, progress=False)


# ---------------------------------------------------------------- command line
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["layer_dropout", "structured_sparsity"])
def test_cli_streamed_equals_in_memory(method, tmp_path, monkeypatch, capsys):
    """`artemis prune --steps 0 --max-memory` streams layer dropout and structured sparsity
    through the pipeline; the in-memory command prunes with the manager: the same blocks or
    units, weights and figures."""
    import json

    from artemis import load_pruned
    from artemis.cli import main
    from tests.test_cli import _tokenizer
    from tests.test_cli_streaming import FAST

    tok = _tokenizer()
    folder = tmp_path / "llama"
    tiny_llama(layers=4, vocab_size=len(tok)).save_pretrained(folder, max_shard_size="100KB")
    tok.save_pretrained(folder)
    base = ["prune", "--model", str(folder), "--steps", "0", "--final-sparsity", "0.5", "--metric", "activation"]
    base += ["--set", f"pruning.method={method}"] + FAST
    assert main(base + ["-o", str(tmp_path / "mem")]) == 0
    assert main(base + ["-o", str(tmp_path / "st"), "--max-memory", "300KB"]) == 0
    capsys.readouterr()
    mem = json.loads((tmp_path / "mem" / "report.json").read_text())
    st = json.loads((tmp_path / "st" / "report.json").read_text())
    assert st["streaming"]["max_resident_blocks"] == 1
    if method == "layer_dropout":
        assert st["layers"] == mem["layers"]
    else:  # the in-memory report's table is the manager's before finalize(): masked, not yet removed
        assert [r["name"] for r in st["layers"]] == [r["name"] for r in mem["layers"]]
        assert [r["numel"] for r in st["layers"]] == [r["numel"] - r["zeros"] for r in mem["layers"]]
    assert st["sparsity"] == mem["sparsity"]
    assert st["quality"] == mem["quality"]
    assert st["size_mb"]["compressed"] == pytest.approx(mem["size_mb"]["compressed"], rel=1e-12)
    a, b = load_pruned(tmp_path / "mem" / "model"), load_pruned(tmp_path / "st" / "model")
    _same_tensors(a.state_dict(), b.state_dict())
    if method == "structured_sparsity":
        assert b.config.intermediate_size < 128 and st["sparsity"] == pytest.approx(0.5, abs=0.01)
        return
    assert st["sparsity"] == 0.5 and [r["status"] for r in st["layers"]].count("dropped") == 2
    assert b.config.num_hidden_layers == 2
    for run in ("mem", "st"):  # the report's table has one row per block
        md = (tmp_path / run / "report.md").read_text()
        assert "| block | parameters | status | score |" in md and md.count("| dropped |") == 2


def test_capture_inputs_per_block_gives_each_block_its_own_mask():
    """A Qwen2 with two full-attention and two sliding-window layers: blocks 0 and 2 get
    different attention masks; block 0's arguments are capture_block_inputs' own."""
    from artemis.data.pipeline import capture_block_inputs
    from artemis.data.pipeline_layers import capture_inputs_per_block

    model = tiny_qwen2_sliding()
    calib = _calib(n=2, seq=16)
    hidden, records = capture_inputs_per_block(model, model.model.layers, calib, torch.device("cpu"))
    first = capture_block_inputs(model, model.model.layers[0], calib, torch.device("cpu"))
    assert len(hidden) == len(records) == 2 and all(len(r) == 4 for r in records)
    assert [type(m).__name__ for m in model.model.layers] == ["Qwen2DecoderLayer"] * 4  # the blocks are back
    for b in range(2):
        args, kwargs = first[b]
        assert torch.equal(hidden[b], args[0] if args else kwargs["hidden_states"])
        masks = [r[1]["attention_mask"] for r in records[b]]
        assert torch.equal(masks[0], kwargs["attention_mask"]) and torch.equal(masks[0], masks[1])
        assert torch.equal(masks[2], masks[3]) and not torch.equal(masks[0], masks[2])
