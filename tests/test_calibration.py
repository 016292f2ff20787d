"""Calibration runner: batch formats, bad input, restoring the model when a batch raises."""

import logging

import pytest
import torch
import torch.nn as nn

from artemis import CalibrationError, create_pruning_manager
from artemis.data.calibration import describe_batch
from tests.fixtures import lm_batch, tiny_llama


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _mgr(model, metric="activation"):
    return create_pruning_manager({"pruning": {"targets": ["*"], "importance_metric": metric}}, model)


@pytest.mark.parametrize(
    "data, pattern",
    [
        ([], r"calibration data is empty: the iterable yielded no batches"),
        (iter(()), r"calibration data is empty"),
        ({"input_ids": torch.ones(1, 4)}, r"got a single dict \(wrap a single batch in a list\)"),
        (torch.ones(2, 4), r"got a single Tensor \(wrap a single batch in a list\)"),
        ("some text", r"got a single str"),
        (None, r"got a NoneType, which is not iterable"),
        ([[1, 2, 3, 4]], r"calibration batch 0 is a list; calibration data must be an iterable of batches"),
        ([torch.ones(2, 4), "x"], r"calibration batch 1 is a str"),
        ([torch.tensor(1.0)], r"calibration batch 0 is a tensor of shape \(\); it needs a batch dimension"),
        ([torch.ones(0, 4)], r"calibration batch 0 is a tensor of shape \(0, 4\)"),
        ([{}], r"calibration batch 0 is an empty dict"),
        ([{"input_ids": [[1, 2]]}], r"'input_ids' is a Python list, not a tensor; tokenize with return_tensors='pt'"),
        ([{"flag": True}], r"calibration batch 0 \(dict\{flag: bool\}\) holds no tensor"),
        (
            [torch.ones(2, 4), torch.ones(2, 5)],
            r"calibration batch 1 \(float32\(2, 5\)\) failed in the model: RuntimeError",
        ),
    ],
)
def test_bad_calibration_data(data, pattern):
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    mgr = _mgr(net)
    with pytest.raises(CalibrationError, match=pattern):
        mgr.calibrate(data, progress=False)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    for t in mgr.method.targets:  # nothing half-gathered is left behind
        assert mgr.metric.tokens_seen(t.key) == 0


def test_model_restored_when_a_batch_raises():
    model = tiny_llama()
    model.train()
    for p in model.model.embed_tokens.parameters():
        p.requires_grad_(False)
    marker = torch.zeros_like(model.lm_head.weight)
    model.lm_head.weight.grad = marker
    mgr = create_pruning_manager({"pruning": {"importance_metric": "gradient_sensitivity"}}, model)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    requires = [p.requires_grad for p in model.parameters()]

    def batches():
        yield lm_batch()
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        mgr.calibrate(batches(), progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == requires
    assert model.lm_head.weight.grad is marker
    assert all(p.grad is None for n, p in model.named_parameters() if n != "lm_head.weight")
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert mgr.metric.accumulator_bytes() == 0 and mgr.metric.steps_seen == 0
    # a model error mid-way is wrapped with the batch index and shapes, and the model is restored too
    bad = {"input_ids": torch.full((2, 4), 10_000)}
    with pytest.raises(
        CalibrationError,
        match=r"calibration batch 1 \(dict\{input_ids: int64\(2, 4\)\}\) failed in the model: IndexError",
    ):
        mgr.calibrate([lm_batch(), bad], progress=False)
    assert model.training and mgr.metric.steps_seen == 0


def test_iterable_kinds_and_progress_bar(capsys):
    net = _net()
    mgr = _mgr(net)
    gen = (torch.randn(3, 4) for _ in range(2))
    assert mgr.calibrate(gen, progress=False) == 2
    loader = torch.utils.data.DataLoader(torch.randn(10, 4), batch_size=4)
    assert mgr.calibrate(loader, progress=True) == 3
    err = capsys.readouterr().err
    assert "calibrating (activation)" in err and "/3 " in err
    assert mgr.metric.tokens_seen("0.weight") == 10  # statistics replaced, not added


def test_batch_encoding_is_accepted(minilm_dir):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir)
    mgr = create_pruning_manager(
        {"pruning": {"importance_metric": "activation", "targets": ["*layer.0.attention.self.query"]}}, model
    )
    enc = tok(["A first sentence.", "And a somewhat longer second sentence here."], padding=True, return_tensors="pt")
    assert type(enc).__name__ == "BatchEncoding"
    mgr.calibrate([enc], progress=False)
    assert mgr.metric.tokens_seen(mgr.method.targets[0].key) == int(enc["attention_mask"].sum())


def test_magnitude_needs_no_calibration(caplog):
    mgr = _mgr(_net(), "magnitude")
    with caplog.at_level(logging.WARNING, logger="artemis.data.calibration"):
        assert mgr.calibrate([torch.ones(1, 4)], progress=False) == 0
    assert "gathers no statistics" in caplog.text


def test_loss_errors():
    net = _net()
    mgr = _mgr(net, "gradient_sensitivity")
    with pytest.raises(CalibrationError, match=r"has no 'loss'"):
        mgr.calibrate([torch.ones(2, 4)], progress=False)
    with pytest.raises(
        CalibrationError,
        match=r"loss_fn\(outputs, batch\) for calibration batch 0 must be a scalar tensor, got \(2, 2\)",
    ):
        mgr.calibrate([torch.ones(2, 4)], loss_fn=lambda out, b: out, progress=False)
    with pytest.raises(CalibrationError, match="does not depend on any pruned weight"):
        mgr.calibrate([torch.ones(2, 4)], loss_fn=lambda out, b: torch.tensor(1.0), progress=False)
    with pytest.raises(CalibrationError, match="loss_fn must be callable"):
        mgr.calibrate([torch.ones(2, 4)], loss_fn=3, progress=False)
    assert mgr.calibrate([torch.ones(2, 4)], loss_fn=lambda out, b: out.sum(), progress=False) == 1


def test_describe_batch():
    assert describe_batch(torch.ones(2, 3)) == "float32(2, 3)"
    assert describe_batch([1]) == "list"
