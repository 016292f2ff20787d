"""Sparsity sweeps (exact restore, table, picking a level), evaluate helpers, and the real MiniLM."""

import pytest
import torch

from artemis import CalibrationError, ConfigError
from artemis.core.schedule import round_half_up
from artemis.evaluation.analysis import best_sparsity, format_sweep_table, sparsity_sweep
from artemis.evaluation.quality import embedding_cosine, mean_pool, sentence_embeddings
from tests.fixtures import lm_batch, tiny_llama


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("metric", ["magnitude", "activation", "gradient_sensitivity"])
def test_sweep_restores_bit_for_bit_and_reports(metric):
    model = tiny_llama().to(torch.bfloat16)
    before = _state(model)
    batch = lm_batch()
    seen = []
    calib_reads = []

    def calib():
        for b in (lm_batch(seed=1), lm_batch(seed=2)):
            calib_reads.append(1)
            yield b

    def evaluate(m):
        zeros = sum(int((t == 0).sum()) for n, t in m.named_parameters() if "layers" in n and n.endswith("proj.weight"))
        seen.append(zeros)
        with torch.no_grad():
            return {"loss": float(m(**batch).loss), "zeros": zeros}

    cfg = {"pruning": {"importance_metric": metric}}
    rows = sparsity_sweep(
        model, cfg, [0.7, 0.3, 0.5], evaluate, calib() if metric != "magnitude" else None, progress=False
    )
    assert _same(model, before)
    assert _hooks(model) == 0
    if metric != "magnitude":
        assert len(calib_reads) == 2  # statistics gathered once, reused at every level
    assert [r["sparsity"] for r in rows] == [0.7, 0.3, 0.5]
    weights = [p for n, p in model.named_parameters() if "layers" in n and n.endswith("proj.weight")]
    prunable = sum(p.numel() for p in weights)

    def expected(s):  # activation defaults to scope row: round_half_up(s * in) in every row
        if metric == "activation":
            return sum(p.shape[0] * round_half_up(s * p.shape[1]) for p in weights)
        return round_half_up(s * prunable)

    assert seen == [expected(s) for s in (0.7, 0.3, 0.5)]  # each level from the dense model
    for r in rows:
        assert r["measured_sparsity"] == expected(r["sparsity"]) / prunable
        assert r["metrics"]["zeros"] == expected(r["sparsity"])
    sizes = {r["sparsity"]: r["model_size_mb"] for r in rows}
    assert sizes[0.7] < sizes[0.5] < sizes[0.3]
    assert "| 0.70 |" in format_sweep_table(rows)


def test_sweep_levels_match_one_shot_pruning():
    model = tiny_llama()
    data = [lm_batch(seed=3)]
    masks = []

    def evaluate(m):
        masks.append({n: (p != 0).clone() for n, p in m.named_parameters() if n.endswith("proj.weight")})
        return 0.0

    sparsity_sweep(model, {"pruning": {"importance_metric": "activation"}}, [0.5], evaluate, data, progress=False)
    from artemis import create_pruning_manager

    ref = tiny_llama()
    create_pruning_manager({"pruning": {"importance_metric": "activation"}}, ref).apply_pruning(
        0.5, data, progress=False
    )
    for n, p in ref.named_parameters():
        if n.endswith("proj.weight"):
            assert torch.equal(masks[0][n], p != 0), n


def test_sweep_restores_when_evaluate_raises():
    model = tiny_llama()
    before = _state(model)

    def evaluate(m):
        raise RuntimeError("eval crashed")

    with pytest.raises(RuntimeError, match="eval crashed"):
        sparsity_sweep(model, {"pruning": {}}, [0.5], evaluate)
    assert _same(model, before) and _hooks(model) == 0


def test_sweep_errors():
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(CalibrationError, match="no activation statistics yet"):
        sparsity_sweep(model, {"pruning": {"importance_metric": "activation"}}, [0.5], lambda m: 1.0)
    assert _same(model, before) and _hooks(model) == 0
    with pytest.raises(ConfigError, match=r"sparsities: each must be a number in \[0, 1\), got 1.5"):
        sparsity_sweep(model, {"pruning": {}}, [0.5, 1.5], lambda m: 1.0)
    with pytest.raises(ConfigError, match="sparsities is empty"):
        sparsity_sweep(model, {"pruning": {}}, [], lambda m: 1.0)
    with pytest.raises(TypeError, match="evaluate_fn must return a dict of metrics or a number, got str"):
        sparsity_sweep(model, {"pruning": {}}, [0.5], lambda m: "good")
    with pytest.raises(TypeError, match="evaluate_fn must be callable"):
        sparsity_sweep(model, {"pruning": {}}, [0.5], None)
    assert _same(model, before) and _hooks(model) == 0


def test_best_sparsity():
    rows = [
        {"sparsity": s, "metrics": {"acc": a, "ppl": p}}
        for s, a, p in [(0.3, 0.9, 10.0), (0.5, 0.86, 12.0), (0.7, 0.7, 30.0), (0.6, 0.84, 15.0)]
    ]
    assert best_sparsity(rows, "acc", 0.85) == 0.5
    assert best_sparsity(rows, "acc", 0.84) == 0.6  # at the threshold counts as above
    assert best_sparsity(rows, "acc", 0.95) is None
    assert best_sparsity(rows, "ppl", 20.0, higher_is_better=False) == 0.6
    with pytest.raises(KeyError, match=r"has no metric 'f1'; has \['acc', 'ppl'\]"):
        best_sparsity(rows, "f1", 0.5)


def test_evaluate_helpers():
    h = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])  # last token is padding
    assert mean_pool(h, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 1.0]]
    with pytest.raises(ValueError, match=r"embedding shapes differ: \(2, 3\) vs \(3, 3\)"):
        embedding_cosine(torch.ones(2, 3), torch.ones(3, 3))


def test_minilm_activation_at_50_percent(minilm_dir):
    """The issue's anchor, small (the full comparison is benchmarks/minilm_metrics.py):
    Wanda at 50 % keeps MiniLM's sentence embeddings close to the dense ones."""
    from transformers import AutoModel, AutoTokenizer

    from artemis.data.corpus import builtin_corpus, tokenize_batches

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir).eval()
    held_out = builtin_corpus("test", limit=32)
    dense = sentence_embeddings(model, tok, held_out)
    assert torch.allclose(dense.norm(dim=-1), torch.ones(len(held_out)), atol=1e-5)
    calib = tokenize_batches(builtin_corpus("train", limit=32), tok, batch_size=32)

    def evaluate(m):
        return {"cosine": embedding_cosine(sentence_embeddings(m, tok, held_out), dense)}

    row = sparsity_sweep(
        model, {"pruning": {"importance_metric": "activation"}}, [0.5], evaluate, calib, progress=False
    )[0]
    assert row["metrics"]["cosine"] >= 0.85, row
    assert row["measured_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert embedding_cosine(sentence_embeddings(model, tok, held_out), dense) == pytest.approx(1.0, abs=1e-6)
