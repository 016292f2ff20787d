"""Peak memory of a streamed one-shot prune (`artemis.oneshot(..., max_memory=...)`), measured.

For each model: a random bf16 ``LlamaForCausalLM`` is saved as a sharded safetensors folder
in a temporary directory; then, in a **fresh subprocess** that first imports the libraries
(torch, transformers' Llama, accelerate, safetensors, artemis), runs one tiny bf16 matmul
and records its resident set (``VmRSS``), the prune runs::

    artemis.oneshot(folder, {"pruning": {"final_sparsity": 0.5, "importance_metric": "activation"}},
                    calib, output_dir=..., max_memory="256MiB")

and the subprocess reports its peak resident set (``VmHWM`` from ``/proc/self/status``)
minus the post-import figure, as a fraction of the model's parameter bytes. The same
subprocess run without ``max_memory`` (the folder loaded whole with ``from_pretrained``)
is the baseline, where asked. Calibration: 8 sequences of 64 random token ids (2 batches).

Models: ``290m`` (hidden 1024, 14 blocks, 16 heads / 8 KV heads, MLP 4096, vocabulary
32000, untied head: 285.8M parameters, 572 MB in bf16) and ``1b`` (Llama-3.2-1B's shape:
hidden 2048, 16 blocks, 32 heads / 8 KV heads, MLP 8192, vocabulary 128256, tied
embeddings: 1.236B parameters, 2.47 GB).

    PYTHONPATH=src python benchmarks/oneshot_memory.py --models 290m --methods wanda --baseline 290m \\
        --json benchmarks/results/oneshot_memory.json
    PYTHONPATH=src python benchmarks/oneshot_memory.py --models 290m --methods sparsegpt --baseline "" \\
        --json benchmarks/results/oneshot_memory_sparsegpt.json
    PYTHONPATH=src python benchmarks/oneshot_memory.py --models 1b --methods wanda --baseline "" \\
        --max-memory 512MiB --json benchmarks/results/oneshot_memory_1b.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODELS = {
    "290m": dict(hidden=1024, layers=14, heads=16, kv_heads=8, intermediate=4096, vocab=32000, tied=False),
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, tied=True),
}
METHODS = {
    "wanda": {"final_sparsity": 0.5, "importance_metric": "activation"},
    "sparsegpt": {"final_sparsity": 0.5, "importance_metric": "activation", "reconstruction": "sparsegpt"},
}


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out


# ------------------------------------------------------------------ the measured process
def child(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    import accelerate  # noqa: F401
    import safetensors  # noqa: F401
    import transformers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import artemis
    from artemis.data import pipeline  # noqa: F401
    from artemis.sparse import streaming  # noqa: F401

    lin = torch.nn.Linear(64, 64).to(torch.bfloat16)
    lin(torch.randn(4, 64, dtype=torch.bfloat16))  # one-off kernel setup, not part of the prune
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, spec["vocab"], (4, 64), generator=g)} for _ in range(2)]
    before = _status()
    t0 = time.perf_counter()
    s = artemis.oneshot(
        spec["folder"], {"pruning": spec["pruning"]}, calib, spec["out"], max_memory=spec["max_memory"], progress=False
    )
    seconds = time.perf_counter() - t0
    after = _status()
    p = s["pipeline"]
    print(
        "RESULT "
        + json.dumps(
            {
                "post_import_rss_bytes": before["VmRSS"],
                "peak_rss_bytes": after["VmHWM"],
                "peak_minus_import_bytes": after["VmHWM"] - before["VmRSS"],
                "end_rss_anon_bytes": after.get("RssAnon"),
                "end_rss_file_bytes": after.get("RssFile"),
                "seconds": seconds,
                "pipeline_seconds": p["seconds"],
                "block_seconds": p["block_seconds"],
                "streamed": p["streamed"],
                "peak_param_bytes": p["peak_param_bytes"],
                "max_resident_blocks": p["max_resident_blocks"],
                "activation_bytes": p["activation_bytes"],
                "measured_sparsity": s["measured_sparsity"],
                "output_bytes_on_disk": (p.get("output") or {}).get("bytes_on_disk"),
                "reconstruction_peak_extra_bytes": (s.get("last_reconstruction") or {}).get("peak_extra_bytes"),
            }
        ),
        flush=True,
    )


# ------------------------------------------------------------------ the driver
def build(name: str, root: Path) -> tuple[Path, int, int]:
    """Save the random model ``name`` under ``root``; return (folder, parameters, bytes)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import llama_config, random_llama

    m = MODELS[name]
    cfg = llama_config(
        hidden=m["hidden"],
        layers=m["layers"],
        intermediate=m["intermediate"],
        vocab=m["vocab"],
        heads=m["heads"],
        kv_heads=m["kv_heads"],
    )
    cfg.tie_word_embeddings = m["tied"]
    model = random_llama(cfg, dtype=torch.bfloat16)
    if m["tied"]:
        model.tie_weights()
    params = dict.fromkeys(model.parameters())
    n = sum(p.numel() for p in params)
    nbytes = sum(p.numel() * p.element_size() for p in params)
    folder = root / name
    model.save_pretrained(str(folder), max_shard_size="100MB" if name == "290m" else "500MB")
    del model, params
    return folder, n, nbytes


def run_child(spec: dict, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONPATH": os.environ.get("PYTHONPATH", "src")}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"child failed (status {proc.returncode}): {proc.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="290m,1b")
    ap.add_argument("--methods", default="wanda", help="comma-separated: wanda, sparsegpt")
    ap.add_argument("--baseline", default="290m", help="models also pruned in memory (no max_memory); '' for none")
    ap.add_argument(
        "--max-memory", default="256MiB", help="the bound (the 1b model's tied embeddings take 501 MiB: 512MiB there)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--tmp", default=None, help="folder for the checkpoints (default: a temporary folder)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch

    torch.set_num_threads(args.threads)
    from _common import RESULTS, machine, write_json

    root = Path(tempfile.mkdtemp(prefix="artemis-oneshot-mem-", dir=args.tmp))
    rows: list[dict] = []

    def save() -> None:  # after every row: a run cut short keeps what it measured
        write_json(
            args.json or RESULTS / "oneshot_memory.json",
            {
                "command": "PYTHONPATH=src python benchmarks/oneshot_memory.py " + " ".join(sys.argv[1:]),
                "machine": machine(),
                "torch": torch.__version__,
                "threads": args.threads,
                "calibration": "8 sequences x 64 random token ids (2 batches of 4)",
                "rows": rows,
            },
        )

    try:
        for name in [m for m in args.models.split(",") if m]:
            folder, n, nbytes = build(name, root)
            shards = sorted(p.name for p in folder.glob("*.safetensors"))
            print(f"{name}: {n / 1e6:.1f}M parameters, {nbytes / 2**20:.0f} MiB, {len(shards)} shards", flush=True)
            runs = [(meth, args.max_memory) for meth in args.methods.split(",") if meth]
            if name in args.baseline.split(","):
                runs.append(("wanda", None))
            for meth, mm in runs:
                out = root / f"{name}-{meth}-{'st' if mm else 'mem'}"
                spec = {
                    "folder": str(folder),
                    "out": str(out),
                    "pruning": METHODS[meth],
                    "max_memory": mm,
                    "vocab": MODELS[name]["vocab"],
                    "threads": args.threads,
                }
                load0 = os.getloadavg()[0]
                r = run_child(spec, timeout=7200)
                shutil.rmtree(out, ignore_errors=True)
                row = {
                    "model": name,
                    "shape": MODELS[name],
                    "parameters": n,
                    "model_bytes": nbytes,
                    "shards": len(shards),
                    "method": meth,
                    "pruning": METHODS[meth],
                    "max_memory": mm,
                    "load_average_start": load0,
                    "load_average_end": os.getloadavg()[0],
                    **r,
                    "peak_over_model": r["peak_minus_import_bytes"] / nbytes,
                    "mean_block_seconds": sum(r["block_seconds"]) / len(r["block_seconds"]),
                }
                rows.append(row)
                save()
                print(
                    f"  {meth:9s} max_memory={mm}: peak RSS - post-import = {r['peak_minus_import_bytes'] / 2**20:.0f} "
                    f"MiB = {row['peak_over_model']:.3f}x the model; parameter bytes counted at most "
                    f"{r['peak_param_bytes'] / 2**20:.0f} MiB; {r['seconds']:.1f} s, "
                    f"{row['mean_block_seconds']:.2f} s/block (load {load0:.1f})",
                    flush=True,
                )
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(json.loads(sys.argv[2]))
    else:
        main()
