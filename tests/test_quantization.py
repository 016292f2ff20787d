"""int8 that keeps sparsity: exact quantized values, Int8Linear, QAT in the manager, 8-bit loading errors."""

import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from artemis import ModelError, create_pruning_manager
from artemis.sparse.quantization import (
    INT8_KERNEL_MAX_ROWS,
    Int8Linear,
    dequantize_int8,
    enable_fake_quant,
    fake_quantize_int8,
    int8_channel_scales,
    load_in_8bit,
    quantize_int8,
    quantize_weight_int8,
)
from tests.fixtures import lm_batch, tiny_gpt2, tiny_llama


def test_quantize_weight_hand_example():
    w = torch.tensor([[0.0, 1.27, -0.004, 0.6], [0.0, 0.0, 0.0, 0.0], [-2.54, 0.0, 0.01, 0.03]])
    q, s = quantize_weight_int8(w)
    assert s.tolist() == pytest.approx([0.01, 1.0, 0.02])
    # -0.004/0.01 rounds to 0 but the weight is kept: it becomes -1, so the zeros are exactly w's
    assert q.tolist() == [[0, 127, -1, 60], [0, 0, 0, 0], [-127, 0, 1, 2]]
    assert torch.equal(q == 0, w == 0)
    # HF Conv1D weights are (in, out): the scale is per column, the result is (out, in)
    qt, st = quantize_weight_int8(w.t().contiguous(), transposed=True)
    assert torch.equal(qt, q) and torch.equal(st, s)


def test_fake_quant_matches_int8_round_trip_and_passes_gradients_straight():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    w[w.abs() < 0.5] = 0
    q, s = quantize_weight_int8(w)
    wq = w.clone().requires_grad_(True)
    y = fake_quantize_int8(wq)
    assert torch.equal(y, dequantize_int8(q, s))
    assert torch.equal(y == 0, w == 0)
    (y * torch.arange(60.0).view(6, 10)).sum().backward()
    assert torch.equal(wq.grad, torch.arange(60.0).view(6, 10))  # straight-through
    wb = w.to(torch.bfloat16)
    assert fake_quantize_int8(wb).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_uses_aten_kernel_on_cpu(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(32, 16).to(dtype)
    with torch.no_grad():
        lin.weight[:, ::2] = 0
    q = Int8Linear.from_float(lin)
    x = torch.randn(3, 5, 32, dtype=dtype)
    y = q(x)
    assert q.backend == "aten._weight_int8pack_mm" and y.dtype == dtype and y.shape == (3, 5, 16)
    ref = F.linear(x.float(), q.dequantized_weight(), lin.bias.float())
    tol = 1e-5 if dtype == torch.float32 else 0.05
    assert (y.float() - ref).abs().max() < tol
    big = torch.randn(INT8_KERNEL_MAX_ROWS + 1, 32, dtype=dtype)  # many rows: dequantize + F.linear
    yb = q(big)
    assert q.backend == "dequantize+F.linear"
    assert (yb.float() - F.linear(big.float(), q.dequantized_weight(), lin.bias.float())).abs().max() < tol
    assert torch.equal(q.weight == 0, lin.weight == 0)


def test_int8_linear_falls_back_for_other_dtypes():
    lin = nn.Linear(8, 4).double()
    q = Int8Linear.from_float(lin)
    y = q(torch.randn(2, 8, dtype=torch.float64))
    assert q.backend == "dequantize+F.linear" and y.dtype == torch.float64


def test_quantize_int8_keeps_every_zero_and_converts_only_pruned_layers():
    model = tiny_llama()
    mgr = create_pruning_manager({"pruning": {"final_sparsity": 0.5}}, model)
    mgr.apply_magnitude_pruning(0.5)
    mgr.prepare_for_quantization()
    zeros_before = {t.name: int((t.param == 0).sum()) for t in mgr.method.targets}
    scales = {t.name: t.module.int8_scale.clone() for t in mgr.method.targets}
    batch = lm_batch()
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"]).logits
    quantize_int8(model)
    converted = {n for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert converted == set(zeros_before)  # lm_head and embeddings stay float
    assert isinstance(model.lm_head, nn.Linear)
    for name, zeros in zeros_before.items():
        m = model.get_submodule(name)
        assert int((m.weight == 0).sum()) == zeros, name
        assert torch.equal(m.weight_scale.view(-1), scales[name])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"]).logits
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_quantize_int8_gpt2_conv1d_matches_float_layer():
    model = tiny_gpt2()
    conv = model.transformer.h[0].mlp.c_fc
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        ref = F.linear(x, fake_quantize_int8(conv.weight, True).t(), conv.bias)
    quantize_int8(model)
    q = model.transformer.h[0].mlp.c_fc
    assert isinstance(q, Int8Linear) and tuple(q.weight.shape) == (256, 64)
    assert torch.allclose(q(x), ref, atol=1e-5)


def test_quantize_int8_bad_names_change_nothing():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ModelError, match=r"module 'nope' does not exist"):
        quantize_int8(net, ["0", "nope"])
    with pytest.raises(ModelError, match=r"module '1' is a ReLU; only nn.Linear and Conv1D"):
        quantize_int8(net, ["0", "1"])
    assert isinstance(net[0], nn.Linear)


def test_int8_channel_scales_ignore_pruned_weights():
    w = torch.tensor([[0.0, -2.54, 0.0], [0.0, 0.0, 0.0]])
    assert int8_channel_scales(w).tolist() == pytest.approx([0.02, 1.0])


def test_quantization_aware_training_after_pruning_end():
    model = tiny_llama()
    model.train()
    batch = lm_batch()
    cfg = {
        "pruning": {
            "final_sparsity": 0.5,
            "pruning_start": 0.0,
            "pruning_end": 0.5,
            "pruning_interval": 2,
            "quantization_aware": True,
        }
    }
    mgr = create_pruning_manager(cfg, model, total_steps=12)  # t_e = 6
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    layer = model.model.layers[0].mlp.up_proj
    masks_at_te = None
    for step in range(12):
        x = torch.randn(3, 64)
        if step <= 6:
            assert not mgr.quantization_aware_active
            assert torch.equal(layer(x), F.linear(x, layer.weight))
        else:
            assert mgr.quantization_aware_active
            # the forward uses the fake-quantized weight; the stored weight stays float
            assert torch.equal(layer(x), F.linear(x, fake_quantize_int8(layer.weight)))
            assert not torch.equal(fake_quantize_int8(layer.weight), layer.weight)
        model(**batch).loss.backward()
        if step > 6:
            grad = layer.weight.grad
            assert grad is not None and torch.count_nonzero(grad) > 0  # straight-through
        pruned = mgr.step()
        assert pruned == (step in (0, 2, 4, 6))
        opt.step()
        opt.zero_grad()
        if step == 6:
            masks_at_te = {k: m.clone() for k, m in mgr.masks.items()}
    for k, m in mgr.masks.items():  # masks fixed from pruning_end on, pruned weights still zero
        assert torch.equal(m, masks_at_te[k])
        assert torch.count_nonzero(mgr._params[k][~m]) == 0
    assert "forward" in layer.__dict__
    mgr.finalize()
    assert not mgr.quantization_aware_active and "forward" not in layer.__dict__
    assert torch.equal(layer(x), F.linear(x, layer.weight))


def test_quantization_aware_off_by_default(llama):
    mgr = create_pruning_manager({"pruning": {"pruning_interval": 1}}, llama, total_steps=4)
    for _ in range(4):
        mgr.step()
    assert not mgr.quantization_aware_active
    assert all("forward" not in m.__dict__ for m in llama.modules())


def test_quantization_aware_resumes_after_pruning_end():
    cfg = {
        "pruning": {
            "final_sparsity": 0.5,
            "pruning_start": 0.0,
            "pruning_end": 0.5,
            "pruning_interval": 2,
            "quantization_aware": True,
        }
    }
    a = tiny_llama()
    mgr = create_pruning_manager(cfg, a, total_steps=12)
    for _ in range(8):
        mgr.step()
    state = mgr.state_dict()
    b = tiny_llama()
    mgr2 = create_pruning_manager(cfg, b, total_steps=12)
    mgr2.load_state_dict(state)
    assert mgr2.quantization_aware_active


def test_fake_quant_rejects_non_plain_layers():
    q = Int8Linear.from_float(nn.Linear(4, 4))
    with pytest.raises(ModelError, match="cannot fake-quantize a Int8Linear"):
        enable_fake_quant([q])


def test_load_in_8bit_errors_name_the_missing_piece(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(ModelError, match=r"needs the 'bitsandbytes' package.*pip install bitsandbytes"):
        load_in_8bit("some/model")
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match=r"needs a CUDA GPU.*no CUDA device is available"):
        load_in_8bit("some/model")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int8_linear_on_cuda():
    lin = nn.Linear(64, 32).cuda().to(torch.bfloat16)
    q = Int8Linear.from_float(lin)
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    y = q(x)
    ref = F.linear(x.float(), q.dequantized_weight(), lin.bias.float())
    assert (y.float() - ref).abs().max() < 0.05
    assert q.backend in ("aten._weight_int8pack_mm", "dequantize+F.linear")
