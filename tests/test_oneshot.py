"""The block-by-block one-shot pipeline (artemis.oneshot): masks, streaming, failures, linear cost."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch

import artemis
from artemis import create_pruning_manager, load_pruned, oneshot
from artemis.core.errors import CalibrationError, ConfigError
from artemis.data.pipeline import BlockError, parse_memory_size
from artemis.sparse import streaming
from tests.fixtures import lm_batch, tiny_bert, tiny_gpt2, tiny_llama


def _calib(n: int = 3, seq: int = 16, pad: bool = False) -> list[dict]:
    out = []
    for i in range(n):
        ids = lm_batch(seed=i, seq=seq)["input_ids"]
        mask = torch.ones_like(ids)
        if pad:
            mask[0, seq // 2 :] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("make", [lambda: tiny_llama(layers=3), lambda: tiny_bert(layers=3)])
@pytest.mark.parametrize("scope", [None, "layer"])
def test_wanda_dense_inputs_equal_apply_pruning(make, scope):
    """pipeline_inputs: dense gives exactly the masks of manager.apply_pruning(s, batches)."""
    cfg = {"pruning": {"final_sparsity": 0.5, "importance_metric": "activation", **({"scope": scope} if scope else {})}}
    calib = _calib(pad=True)
    ref = make()
    net = copy.deepcopy(ref)
    mgr = create_pruning_manager(cfg, ref)
    mgr.apply_pruning(0.5, calibration_data=calib, progress=False)
    summary = oneshot(net, cfg, calib, progress=False)
    assert summary["pipeline"]["inputs"] == "dense"
    for t in mgr.method.targets:
        assert torch.equal(ref.get_submodule(t.name).weight, net.get_submodule(t.name).weight), t.key
    ref_summary = mgr.get_pruning_summary()
    assert summary["layers"] == ref_summary["layers"]
    assert set(ref_summary) <= set(summary)
    assert set(ref_summary["pruning_metrics"]) == set(summary["pruning_metrics"])
    assert summary["pruning_metrics"]["parameters_pruned"] == ref_summary["pruning_metrics"]["parameters_pruned"]
    assert summary["pruning_metrics"]["compressed_model_size_mb"] == pytest.approx(
        ref_summary["pruning_metrics"]["compressed_model_size_mb"]
    )


@pytest.mark.parametrize(
    "extra",
    [{}, {"pattern": "2:4"}, {"scope": "global"}, {"layer_sparsity": {"*.mlp.*": 0.25}}],
)
def test_magnitude_equals_apply_magnitude_pruning(extra):
    cfg = {"pruning": {"final_sparsity": 0.5, **extra}}
    ref = tiny_llama(layers=2)
    net = copy.deepcopy(ref)
    create_pruning_manager(cfg, ref).apply_magnitude_pruning(0.5)
    summary = oneshot(net, cfg, progress=False)
    assert summary["pipeline"]["block_forwards"] == 0
    for k, v in ref.state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k


def test_sparsegpt_pruned_inputs_two_passes_and_quality():
    """Reconstruction from pruned inputs: 2 passes per block (1 for the last), exact sparsity,
    and a smaller output error than the masks alone."""
    cfg = {
        "pruning": {
            "final_sparsity": 0.5,
            "reconstruction": "sparsegpt",
            "sparsegpt_mask": "metric",
            "sparsegpt_target": "pruned",
        }
    }
    calib = _calib(n=4, seq=32)
    dense = tiny_llama(layers=3)
    plain = copy.deepcopy(dense)
    create_pruning_manager({"pruning": {"final_sparsity": 0.5}}, plain).apply_magnitude_pruning(0.5)
    net = copy.deepcopy(dense)
    s = oneshot(net, cfg, calib, progress=False)
    assert s["pipeline"]["inputs"] == "pruned"
    assert s["measured_sparsity"] == 0.5
    assert s["pipeline"]["block_forwards"] == len(calib) * (2 * 3 - 1)
    assert s["last_reconstruction"]["layers"] == 7 * 3
    # same masks as magnitude (the metric chose them), kept weights updated
    for k, v in plain.state_dict().items():
        if k.endswith("proj.weight"):
            assert torch.equal(v == 0, net.state_dict()[k] == 0), k

    def err(model):
        with torch.no_grad():
            return sum(float((model(**b).logits - dense(**b).logits).pow(2).mean()) for b in calib)

    assert err(net) < err(plain)


def test_sparsegpt_obs_and_dense_inputs_run():
    calib = _calib(n=2)
    for extra in ({"sparsegpt_mask": "obs"}, {"pattern": "2:4", "sparsegpt_mask": "obs"}, {"pipeline_inputs": "dense"}):
        net = tiny_llama(layers=2)
        s = oneshot(
            net,
            {"pruning": {"final_sparsity": 0.5, "reconstruction": "sparsegpt", "sparsegpt_target": "pruned", **extra}},
            calib,
            progress=False,
        )
        assert s["measured_sparsity"] == pytest.approx(0.5, abs=1e-3), extra
    assert s["pipeline"]["block_forwards"] == 2 * 2  # dense inputs: one pass per block


@pytest.mark.parametrize("depth", [2, 4, 8])
def test_block_forwards_linear_in_depth(depth):
    """The benchmark-style check: each block runs each batch a fixed number of times."""
    calib = _calib(n=3)
    calls = []
    for cfg, per_block in (
        ({"final_sparsity": 0.5, "importance_metric": "activation"}, 1),
        ({"final_sparsity": 0.5, "reconstruction": "sparsegpt", "sparsegpt_target": "pruned"}, 2),
    ):
        net = tiny_llama(layers=depth)
        count = [0]
        handles = [b.register_forward_hook(lambda *a, c=count: c.__setitem__(0, c[0] + 1)) for b in net.model.layers]
        s = oneshot(net, {"pruning": cfg}, calib, progress=False)
        for h in handles:
            h.remove()
        expected = len(calib) * (depth if per_block == 1 else 2 * depth - 1)
        assert count[0] == expected == s["pipeline"]["block_forwards"]
        calls.append(count[0])


def test_unsupported_settings_raise_naming_them():
    net = tiny_llama(layers=2)
    calib = _calib(n=1)
    cases = [
        ({"method": "expert_pruning"}, "expert_pruning.*removes whole routed experts"),
        (
            {"method": "structured_sparsity", "importance_metric": "gradient_sensitivity"},
            "'gradient_sensitivity' with method 'structured_sparsity' is not supported",
        ),
        (
            {"method": "layer_dropout", "importance_metric": "gradient_sensitivity"},
            "'gradient_sensitivity' with method 'layer_dropout' is not supported",
        ),
        (
            {"reconstruction": "sparsegpt", "sparsegpt_target": "dense", "pipeline_inputs": "dense"},
            "sparsegpt_target 'dense' with pipeline_inputs 'dense'.*valid: 'auto', 'pruned', 'dense'",
        ),
        ({"targets": ["lm_head"]}, "'lm_head' is outside"),
    ]
    for extra, word in cases:
        with pytest.raises(ConfigError, match=word):
            oneshot(net, {"pruning": {"final_sparsity": 0.5, **extra}}, calib, progress=False)
    with pytest.raises(CalibrationError, match="calibration"):
        oneshot(net, {"pruning": {"importance_metric": "activation"}}, None, progress=False)
    with pytest.raises(ConfigError, match="pipeline_inputs"):
        oneshot(net, {"pruning": {"pipeline_inputs": "half"}}, calib, progress=False)
    assert all(bool((p != 0).all()) for p in net.parameters() if p.dim() == 2)  # nothing pruned


def test_parse_memory_size():
    assert parse_memory_size("8GiB") == 8 * 1024**3
    assert parse_memory_size("512MB") == 512 * 10**6
    assert parse_memory_size(" 2 k") == 2048
    assert parse_memory_size(4096) == 4096
    for bad in ("", "8 parsecs", "-1G", 0, "1e3G", True, None):
        with pytest.raises(ConfigError, match="max_memory"):
            parse_memory_size(bad)


# ----------------------------------------------------------------- streaming
@pytest.fixture
def llama_folder(tmp_path):
    model = tiny_llama(layers=4)
    folder = tmp_path / "in"
    model.save_pretrained(str(folder), max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 3
    return model, folder


@pytest.mark.parametrize(
    "cfg",
    [
        {"final_sparsity": 0.5, "importance_metric": "activation"},
        {"final_sparsity": 0.5, "reconstruction": "sparsegpt"},
        {"final_sparsity": 0.5},
    ],
)
def test_streamed_equals_in_memory(llama_folder, tmp_path, cfg, monkeypatch):
    model, folder = llama_folder
    before = _folder_digest(folder)
    calib = _calib(n=2)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    outer = total - 4 * block
    budget = outer + block + 1024  # far below the whole model

    resident = []
    original = streaming.LazyCheckpoint.materialise

    def spy(self, names):
        original(self, names)
        live = [b for b in self.model.model.layers if any(p.device.type != "meta" for p in b.parameters())]
        resident.append(len(live))

    monkeypatch.setattr(streaming.LazyCheckpoint, "materialise", spy)
    mem = oneshot(copy.deepcopy(model), {"pruning": cfg}, calib, tmp_path / "mem", progress=False)
    st = oneshot(str(folder), {"pruning": cfg}, calib, tmp_path / "st", max_memory=budget, progress=False)
    assert budget < total
    assert st["pipeline"]["streamed"] and not mem["pipeline"]["streamed"]
    assert max(resident) == 1 and st["pipeline"]["max_resident_blocks"] == 1
    assert st["pipeline"]["peak_param_bytes"] <= outer + block < total
    assert st["layers"] == mem["layers"]
    assert st["pruning_metrics"] == mem["pruning_metrics"]
    a, b = load_pruned(tmp_path / "mem"), load_pruned(tmp_path / "st")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    # the same bytes: the two paths write the same tensors in the same order
    assert (tmp_path / "mem" / "model.safetensors").read_bytes() == (tmp_path / "st" / "model.safetensors").read_bytes()
    assert _folder_digest(folder) == before


def test_streamed_budget_too_small(llama_folder):
    _, folder = llama_folder
    with pytest.raises(ConfigError, match="max_memory"):
        oneshot(str(folder), {"pruning": {"final_sparsity": 0.5}}, None, max_memory="10KB", progress=False)


def test_streamed_outer_parameters_never_read_whole(llama_folder, tmp_path, monkeypatch):
    """The embeddings, final norm and head are only mapped while block 0's inputs are captured
    and copied to the output a piece at a time: never read into memory, never resident
    together with a block, so max(outer, largest block) is enough."""
    model, folder = llama_folder
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    outer = total - 4 * block
    need = max(outer, block)
    assert need < outer + block
    read = []
    original = streaming.LazyCheckpoint.read

    def spy(self, name):
        read.append(name)
        return original(self, name)

    monkeypatch.setattr(streaming.LazyCheckpoint, "read", spy)
    monkeypatch.setattr(streaming, "COPY_CHUNK", 1000)  # the head is copied in many pieces
    cfg = {"pruning": {"final_sparsity": 0.5, "importance_metric": "activation"}}
    mem = oneshot(copy.deepcopy(model), cfg, _calib(n=2), tmp_path / "mem", progress=False)
    st = oneshot(str(folder), cfg, _calib(n=2), tmp_path / "st", max_memory=need, progress=False)
    assert st["pipeline"]["peak_param_bytes"] == need
    assert read and all(n.startswith("model.layers.") for n in read), sorted(set(read))[:5]
    assert (tmp_path / "mem" / "model.safetensors").read_bytes() == (tmp_path / "st" / "model.safetensors").read_bytes()
    assert st["pruning_metrics"] == mem["pruning_metrics"]
    pattern = (
        rf"max_memory {need - 1} \({(need - 1) / 2**20:.1f} MiB\) is below what streaming needs: the parameters "
        rf"outside the blocks take {outer / 2**20:.1f} MiB \(mapped while the first block's inputs are captured\) "
        rf"and the largest block {block / 2**20:.1f} MiB"
    )
    with pytest.raises(ConfigError, match=pattern):
        oneshot(str(folder), cfg, _calib(n=2), max_memory=need - 1, progress=False)


@pytest.mark.parametrize(
    "make", [lambda: tiny_llama(layers=2, tie_word_embeddings=True, vocab_size=2048), lambda: tiny_gpt2(layers=2)]
)
def test_streamed_tied_head_equals_in_memory(make, tmp_path):
    """Tied embeddings (stored once, counted once) and GPT-2's transposed weights, streamed:
    the same bytes."""
    from artemis.arch import get_adapter
    from artemis.data.pipeline import streaming_bytes

    model = make()
    outer, largest, _ = streaming_bytes(model, get_adapter(model).blocks)
    folder = tmp_path / "in"
    model.save_pretrained(str(folder), max_shard_size="100KB")
    cfg = {"pruning": {"final_sparsity": 0.5, "importance_metric": "activation"}}
    calib = [{"input_ids": lm_batch(seed=i)["input_ids"]} for i in range(2)]
    mem = oneshot(copy.deepcopy(model), cfg, calib, tmp_path / "mem", progress=False)
    st = oneshot(str(folder), cfg, calib, tmp_path / "st", max_memory="1GiB", progress=False)
    assert st["pipeline"]["streamed"] and st["layers"] == mem["layers"]
    assert st["pipeline"]["peak_param_bytes"] == max(outer, largest)
    assert (tmp_path / "mem" / "model.safetensors").read_bytes() == (tmp_path / "st" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("make", [lambda: tiny_llama(layers=2), lambda: tiny_gpt2(layers=2)])
@pytest.mark.parametrize(
    "extra",
    [
        {"importance_metric": "activation"},
        {"importance_metric": "activation", "pattern": "2:4"},
        {"scope": "row"},
        {"pattern": "2:4"},
    ],
)
def test_rowwise_masks_chosen_a_row_at_a_time_equal_the_manager(make, extra, monkeypatch):
    """Row-wise masks are chosen a few rows at a time (bounded memory); with one row at a time
    they are still the manager's, bit for bit (GPT-2: weights stored transposed)."""
    from artemis.data import pipeline

    monkeypatch.setattr(pipeline, "_MASK_CHUNK_ELEMENTS", 1)  # one row per chunk
    calls = []
    for fn in ("row_masks", "nm_masks"):
        original = getattr(pipeline, fn)
        monkeypatch.setattr(pipeline, fn, lambda s, *a, _f=original: calls.append(s.shape[0]) or _f(s, *a))
    cfg = {"pruning": {"final_sparsity": 0.5, **extra}}
    calib = [{"input_ids": lm_batch(seed=i)["input_ids"]} for i in range(2)]
    ref = make()
    net = copy.deepcopy(ref)
    mgr = create_pruning_manager(cfg, ref)
    wanda = "importance_metric" in extra
    if wanda:
        mgr.apply_pruning(0.5, calibration_data=calib, progress=False)
    else:
        mgr.apply_magnitude_pruning(0.5)
    summary = oneshot(net, cfg, calib if wanda else None, progress=False)
    rows = sum(t.rows_view(t.param).shape[0] for t in mgr.method.targets)
    assert calls and set(calls) == {1} and len(calls) == rows
    for k, v in ref.state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k
    assert summary["layers"] == mgr.get_pruning_summary()["layers"]


def test_failing_block_names_it_and_writes_nothing(llama_folder, tmp_path, monkeypatch):
    model, folder = llama_folder
    before = _folder_digest(folder)
    calib = _calib(n=2)
    out = tmp_path / "out"
    from artemis.data import pipeline

    calls = {"n": 0}

    class NaNAfterTwoBlocks(pipeline.HessianAccumulator):
        def hessian(self):
            calls["n"] += 1
            h = super().hessian()
            if calls["n"] > 7 * 2:  # block 2's first layer
                h[0, 0] = float("nan")
            return h

    monkeypatch.setattr(pipeline, "HessianAccumulator", NaNAfterTwoBlocks)
    cfg = {"pruning": {"final_sparsity": 0.5, "reconstruction": "sparsegpt"}}
    with pytest.raises(BlockError, match=r"block 2 \(model\.layers\.2\).*NaN") as info:
        oneshot(str(folder), cfg, calib, out, max_memory="1GiB", progress=False)
    assert info.value.block_index == 2
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "artemis-tmp" in p.name]
    assert _folder_digest(folder) == before


def test_nan_calibration_batch_names_block(tmp_path):
    net = tiny_llama(layers=3)
    with torch.no_grad():
        net.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    out = tmp_path / "o"
    with pytest.raises(BlockError, match=r"block 1 .*NaN"):
        oneshot(net, {"pruning": {"importance_metric": "activation"}}, _calib(n=1), out, progress=False)
    assert not out.exists()


def test_bad_batch_is_a_calibration_error():
    net = tiny_llama(layers=2)
    with pytest.raises(CalibrationError, match="batch 0"):
        oneshot(
            net, {"pruning": {"importance_metric": "activation"}}, [{"input_ids": torch.zeros(2, 3)}], progress=False
        )


def test_oneshot_exported():
    assert "oneshot" in artemis.__all__ and artemis.oneshot is oneshot
