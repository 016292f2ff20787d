"""The peer side of ``benchmarks/sparsegpt_minilm.py --peer-python``: llm-compressor's
one-shot SparseGPT (or Wanda) on all-MiniLM-L6-v2, on token ids written by the Artemis script.

It runs in llm-compressor's own interpreter (its pinned torch/transformers), so it imports
nothing from Artemis. Input: a safetensors file with the calibration batches
(``calib.<i>.<field>``), the evaluation batches (``test.<i>.<field>``) and the dense
model's normalised sentence embeddings of the evaluation batches (``reference``), all
written by the Artemis script from the same tokenisation. Output: one JSON object per
configuration on stdout (``{"peer": ..., "cosine": ..., "seconds": ..., "cpu_seconds": ...}``:
wall time and this process's CPU time of the ``oneshot`` call).

Run (normally started by the Artemis script)::

    /tmp/llmc/bin/python benchmarks/peers/llmcompressor_sparsegpt.py --data batches.safetensors \\
        --model /path/to/all-MiniLM-L6-v2 --run sparsegpt:0.5 --run sparsegpt:2:4 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from safetensors.torch import load_file

__all__ = ["load_batches", "embed", "run_peer", "main"]


def load_batches(tensors: dict, prefix: str) -> list[dict]:
    """The batches ``<prefix>.<i>.<field>`` of a loaded safetensors dict, in order."""
    out: dict[int, dict] = {}
    for key, value in tensors.items():
        head, _, rest = key.partition(".")
        if head != prefix:
            continue
        idx, _, field = rest.partition(".")
        out.setdefault(int(idx), {})[field] = value
    return [out[i] for i in sorted(out)]


@torch.no_grad()
def embed(model, batches) -> torch.Tensor:
    """Mean-pooled (over the attention mask), L2-normalised sentence embeddings."""
    res = []
    for b in batches:
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        e = (h * m).sum(1) / m.sum(1).clamp(min=1)
        res.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(res)


def run_peer(dense, spec: str, calib: list[dict], test: list[dict], ref: torch.Tensor) -> dict:
    """Prune a copy of ``dense`` with llm-compressor (``spec`` = ``sparsegpt:0.5``,
    ``sparsegpt:2:4``, ``wanda:0.7``, ...) and return its row."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from torch.utils.data import DataLoader

    kind, _, amount = spec.partition(":")
    if ":" in amount:
        n, m = (int(v) for v in amount.split(":"))
        kw = {"sparsity": 1.0 - n / m, "mask_structure": amount}
    else:
        kw = {"sparsity": float(amount)}
    cls = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[kind]
    # the 36 linear layers of the encoder blocks (the pooler is not part of the embedding)
    modifier = cls(targets=["Linear"], ignore=["re:.*pooler.*"], **kw)
    model = copy.deepcopy(dense)
    loader = DataLoader(calib, batch_size=None, shuffle=False)
    t0, c0 = time.perf_counter(), time.process_time()
    oneshot(
        model=model,
        recipe=modifier,
        dataset=loader,
        pipeline="sequential",
        sequential_targets=["BertLayer"],
        num_calibration_samples=sum(int(b["input_ids"].shape[0]) for b in calib),
    )
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    model.eval()
    weights = [
        mod.weight for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and "encoder" in name
    ]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    cos = float((embed(model, test) * ref).sum(-1).mean())
    return {
        "peer": f"llm-compressor {kind} {amount}",
        "sparsity": round(zeros / total, 4),
        "cosine": round(cos, 4),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="safetensors file written by benchmarks/sparsegpt_minilm.py")
    ap.add_argument("--model", required=True, help="all-MiniLM-L6-v2 directory")
    ap.add_argument("--run", action="append", required=True, help="sparsegpt:0.5, sparsegpt:2:4, wanda:0.5, ...")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import llmcompressor
    from transformers import AutoModel

    tensors = load_file(args.data)
    calib, test = load_batches(tensors, "calib"), load_batches(tensors, "test")
    dense = AutoModel.from_pretrained(args.model).eval()
    for spec in args.run:
        row = run_peer(dense, spec, calib, test, tensors["reference"])
        row["version"] = llmcompressor.__version__
        row["torch"] = torch.__version__
        print("PEER " + json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
