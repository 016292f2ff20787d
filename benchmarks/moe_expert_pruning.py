"""Expert pruning on a random ~1B-parameter Mixtral: size and CPU latency per token.

A randomly initialised ``MixtralForCausalLM`` (hidden 1024, 13 layers, 16 query heads / 4
KV heads, 8 experts of width 2816, top-2, vocab 32000, float32: about 1.0B parameters)
is pruned one-shot with ``method: expert_pruning`` (``reap``, calibrated on 4 random
sequences of 64 tokens) to 25% and 50% of its experts and finalized (physically smaller:
6 and 4 experts per layer, ``num_local_experts`` updated). For the dense and both pruned
models the script reports parameters and dense bytes, then CPU latency per token, all
three models in the same process, interleaved round by round (the order rotates), median
over rounds:

* decode: one new token with the KV cache of a 32-token prompt (what ``generate()`` pays
  per token), median of 8 steps per round;
* prefill: a 128-token prompt in one forward, divided by 128.

With top-2 routing a decoded token runs 2 experts per layer whatever their number, so
removing experts shrinks the model much more than it speeds up decoding; the prefill of a
long prompt touches every expert and gains more. The weights are random, so the figures
say nothing about quality.

Run:  PYTHONPATH=src python benchmarks/moe_expert_pruning.py [--threads 2] [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, peak_rss_mib, write_json  # noqa: E402
from artemis import create_pruning_manager  # noqa: E402
from artemis.core.sizing import model_dense_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "moe_expert_pruning.json"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (lscpu not available)"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def build(quick: bool):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=32000,
        hidden_size=256 if quick else 1024,
        intermediate_size=704 if quick else 2816,
        num_hidden_layers=2 if quick else 13,
        num_attention_heads=16,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # a router that spreads tokens (the default init is tiny)
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    return model


def prune(model, fraction: float, vocab: int):
    g = torch.Generator().manual_seed(1)
    calib = []
    for _ in range(4):
        ids = torch.randint(0, vocab, (1, 64), generator=g)
        calib.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    mgr = create_pruning_manager({"pruning": {"method": "expert_pruning", "final_sparsity": fraction}}, model)
    t0 = time.perf_counter()
    mgr.apply_pruning(fraction, calib)
    summary = mgr.get_pruning_summary()
    mgr.finalize()
    return time.perf_counter() - t0, summary


@torch.no_grad()
def decode_ms(model, prompt, steps: int) -> list[float]:
    out = model(prompt, use_cache=True)
    pkv = out.past_key_values
    tok = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(tok, cache=pkv, use_cache=True)
        times.append((time.perf_counter() - t0) * 1e3)
        pkv = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
    return times


@torch.no_grad()
def prefill_ms_per_token(model, prompt) -> float:
    t0 = time.perf_counter()
    model(prompt, use_cache=False, logits_to_keep=1)
    return (time.perf_counter() - t0) * 1e3 / prompt.shape[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="a tiny model (a smoke test of the script)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    dense = build(args.quick)
    vocab = dense.config.vocab_size
    models = {"dense": dense}
    prune_s = {}
    summaries = {}
    for frac in (0.25, 0.5):
        m = copy.deepcopy(dense)
        prune_s[frac], summaries[frac] = prune(m, frac, vocab)
        models[f"experts -{int(frac * 100)}%"] = m
    g = torch.Generator().manual_seed(2)
    prompt32 = torch.randint(0, vocab, (1, 32), generator=g)
    prompt128 = torch.randint(0, vocab, (1, 128), generator=g)
    names = list(models)
    for name in names:  # warm-up
        decode_ms(models[name], prompt32, 2)
        prefill_ms_per_token(models[name], prompt128)
    decode = {n: [] for n in names}
    prefill = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            decode[name].append(statistics.median(decode_ms(models[name], prompt32, 8)))
            prefill[name].append(prefill_ms_per_token(models[name], prompt128))
    rows = []
    base_params = sum(p.numel() for p in dense.parameters())
    base_bytes = model_dense_bytes(dense)
    for name in names:
        m = models[name]
        params = sum(p.numel() for p in m.parameters())
        nbytes = model_dense_bytes(m)
        rows.append(
            {
                "model": name,
                "experts_per_layer": m.config.num_local_experts,
                "parameters": params,
                "parameters_vs_dense": params / base_params,
                "bytes": nbytes,
                "bytes_vs_dense": nbytes / base_bytes,
                "decode_ms_per_token_median": statistics.median(decode[name]),
                "decode_ms_rounds": decode[name],
                "prefill128_ms_per_token_median": statistics.median(prefill[name]),
                "prefill_ms_rounds": prefill[name],
            }
        )
    print("| model | experts/layer | parameters | bytes (fp32) | decode ms/token | prefill-128 ms/token |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['model']} | {row['experts_per_layer']} | {row['parameters'] / 1e6:.1f}M "
            f"({row['parameters_vs_dense']:.3f}) | {row['bytes'] / 2**20:.0f} MiB ({row['bytes_vs_dense']:.3f}) | "
            f"{row['decode_ms_per_token_median']:.1f} | {row['prefill128_ms_per_token_median']:.2f} |"
        )
    result = {
        "machine": machine(),
        "cpu": cpu_name(),
        "threads": args.threads,
        "rounds": args.rounds,
        "quick": args.quick,
        "config": dense.config.to_diff_dict(),
        "dtype": "float32",
        "metric": "reap (4 random sequences of 64 tokens)",
        "prune_seconds": {str(k): v for k, v in prune_s.items()},
        "experts_removed_per_layer": {str(k): [len(x["removed"]) for x in s["layers"]] for k, s in summaries.items()},
        "rows": rows,
        "peak_rss_mib": peak_rss_mib(),
        "wall_seconds": time.perf_counter() - t_start,
    }
    result["config"] = {k: v for k, v in result["config"].items() if isinstance(v, (int, float, str, bool))}
    write_json(RESULTS if not args.quick else RESULTS.with_name("moe_expert_pruning_quick.json"), result)


if __name__ == "__main__":
    main()
