"""Where the peak of a streamed one-shot prune comes from: the resident set step by step.

Runs ``artemis.oneshot(folder, pruning, calib, output_dir, max_memory=...)`` as
``benchmarks/oneshot_memory.py`` does (same imports first, same calibration: 8 sequences
of 64 random token ids in 2 batches, 1 thread), with the pipeline's steps wrapped: before
and after each (capture of block 0's inputs, loading a block, each forward pass over the
calibration batches, each layer's masks, writing, releasing) it prints the resident set
(``VmRSS``) and the peak since the previous line (``VmHWM``, reset through
``/proc/self/clear_refs``), both in MiB above the post-import resident set, then a table
of the largest peak per step. Linux only.

    PYTHONPATH=src python benchmarks/oneshot_memory_phases.py --model 290m
    PYTHONPATH=src python benchmarks/oneshot_memory_phases.py --folder path/to/llama --max-memory 1GiB --quiet
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = {
    "wanda": {"final_sparsity": 0.5, "importance_metric": "activation"},
    "sparsegpt": {"final_sparsity": 0.5, "importance_metric": "activation", "reconstruction": "sparsegpt"},
}


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) // 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default="290m", help="a model of benchmarks/oneshot_memory.py, built in a temporary folder"
    )
    ap.add_argument("--folder", default=None, help="a Llama checkpoint folder instead of --model")
    ap.add_argument("--method", default="wanda", choices=sorted(METHODS))
    ap.add_argument("--max-memory", default="256MiB")
    ap.add_argument("--quiet", action="store_true", help="only the table")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    import accelerate  # noqa: F401
    import safetensors  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import artemis
    from artemis.data import pipeline
    from artemis.sparse import streaming

    root = Path(tempfile.mkdtemp(prefix="artemis-phases-"))
    try:
        if args.folder:
            folder = Path(args.folder)
        else:  # built in another process: this one's resident set starts clean
            here = str(Path(__file__).resolve().parent)
            code = f"import sys; sys.path.insert(0, {here!r}); from pathlib import Path; from oneshot_memory import build; "
            code += f"build({args.model!r}, Path({str(root)!r}))"
            subprocess.run([sys.executable, "-c", code], check=True)
            folder = root / args.model
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        lin = torch.nn.Linear(64, 64).to(torch.bfloat16)
        lin(torch.randn(4, 64, dtype=torch.bfloat16))
        g = torch.Generator().manual_seed(0)
        calib = [{"input_ids": torch.randint(0, vocab, (4, 64), generator=g)} for _ in range(2)]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak counts from here
        base = _status()["VmRSS"]
        peaks: dict[str, int] = {}

        def mark(label: str) -> None:
            s = _status()
            when, step = label.split(" ", 1)
            step = step if when in ("after", "end") else "between the steps"  # "before": since the last step ended
            peaks[step] = max(peaks.get(step, 0), s["VmHWM"] - base)
            if not args.quiet:
                print(
                    f"{label:32s} resident {s['VmRSS'] - base:6d}  peak since last {s['VmHWM'] - base:6d}", flush=True
                )
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

        def wrap(owner: object, name: str, label: str) -> None:
            fn = getattr(owner, name)

            def wrapped(*a, **k):
                mark(f"before {label}")
                try:
                    return fn(*a, **k)
                finally:
                    mark(f"after {label}")

            setattr(owner, name, wrapped)

        mark("start start")
        wrap(pipeline, "capture_block_inputs", "capture of block 0's inputs")
        wrap(pipeline._Streamed, "load_block", "load a block")
        wrap(pipeline._Streamed, "release_block", "release a block")
        wrap(pipeline._Pipeline, "_run", "forward passes of a block")
        wrap(pipeline._Pipeline, "_block_masks", "masks of a layer")
        wrap(streaming.StreamingWriter, "add", "write a tensor")
        wrap(streaming.StreamingWriter, "add_stored", "copy an outer tensor")
        wrap(streaming.StreamingWriter, "close", "close the output")
        out = root / "out"
        artemis.oneshot(
            folder, {"pruning": METHODS[args.method]}, calib, out, max_memory=args.max_memory, progress=False
        )
        mark("end end")
        print(f"\n{folder.name}, {args.method}, max_memory={args.max_memory}: MiB above the post-import resident set")
        print("| step | peak MiB |\n|---|---|")
        for step, mib in sorted(peaks.items(), key=lambda kv: -kv[1]):
            print(f"| {step} | {mib} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
