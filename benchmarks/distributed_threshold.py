"""Global pruning threshold over FSDP2 shards: extra memory per rank and time per event.

Runs 2 processes on the CPU (gloo) with ``torchrun`` for three model sizes (MLP blocks
of ``d x 4d`` and ``4d x d`` Linear layers, fully_shard per block), and measures on
each rank, side by side in the same processes:

* **artemis**: ``manager.apply_magnitude_pruning(s)`` on the sharded model: local
  scores, radix histograms all-reduced, masks of the local shards;
* **gather**: what a tool without sharded support does: gather every weight
  (``full_tensor()``), concatenate the magnitudes and take ``torch.kthvalue`` on every
  rank (the memory pattern of ``torch.nn.utils.prune.global_unstructured``).

Extra memory = peak resident memory during the call (``VmHWM`` after resetting it
through ``/proc/self/clear_refs``) minus the resident memory just before it, so it
includes the masks kept afterwards (one byte per local weight). The workers run with
``MALLOC_MMAP_THRESHOLD_=131072`` so that freed tensors go back to the OS at once and
the peak counts live memory only. Usage::

    python benchmarks/distributed_threshold.py            # sizes 24M, 47M, 94M params
    python benchmarks/distributed_threshold.py --blocks 2 4 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

D = 768  # blocks of 768x3072 and 3072x768: 4.72M parameters per block


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self, blocks: int, d: int = D) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(blocks))

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return x


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    """Give freed heap memory back to the OS, so that the resident size before a call is
    what is live (otherwise a call reuses memory freed earlier and looks free)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _measure(fn):
    """(seconds, extra peak resident KiB) of fn()."""
    import gc

    import torch.distributed as dist

    gc.collect()
    _trim()
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    dist.barrier()
    seconds = time.perf_counter() - t0
    return seconds, _rss_kib("VmHWM") - before, out


def _gather_threshold(model, sparsity: float) -> float:
    """The non-sharded way: gather the full weights, concatenate, kthvalue."""
    scores = [m.weight.full_tensor().detach().abs().reshape(-1) for m in model.modules() if isinstance(m, nn.Linear)]
    flat = torch.cat(scores)
    del scores
    k = max(1, round(sparsity * flat.numel()))
    return float(torch.kthvalue(flat, k).values)


def worker(blocks: int, repeats: int, out: str, d: int = D) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from artemis import create_pruning_manager
    from artemis.core.masks import count_to_prune, kth_smallest_key

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Net(blocks, d)
    for b in model.layers:
        fully_shard(b)
    fully_shard(model)
    manager = create_pruning_manager({"pruning": {"targets": ["*"], "scope": "global"}}, model)
    params = sum(p.numel() for p in model.parameters())
    largest_shard = max(p.to_local().numel() for p in model.parameters())
    local = sum(p.to_local().numel() for p in model.parameters())
    rows = []
    hist = torch.zeros(2048, dtype=torch.int64)
    _, base_kib, _ = _measure(lambda: manager.sharding.collective.all_reduce_sum(hist))
    for i in range(repeats):
        s = 0.3 + 0.1 * i  # masks only shrink: each event prunes more
        fns = [(lambda p=p: p.to_local().detach().abs()) for p in model.parameters()]
        reduce = manager.sharding.collective.all_reduce_sum
        t_sec, t_kib, _ = _measure(lambda: kth_smallest_key(fns, count_to_prune(params, s), reduce_fn=reduce))
        a_sec, a_kib, _ = _measure(lambda: manager.apply_magnitude_pruning(s))
        g_sec, g_kib, thr = _measure(lambda: _gather_threshold(model, s))
        pruned = manager.pruning_metrics["parameters_pruned"]
        rows.append(
            {"sparsity": s, "artemis_s": a_sec, "artemis_kib": a_kib, "gather_s": g_sec, "gather_kib": g_kib,
             "threshold_s": t_sec, "threshold_kib": t_kib, "pruned": pruned, "expected": count_to_prune(params, s)}
        )  # fmt: skip
    result = {"rank": rank, "blocks": blocks, "d": d, "collective_kib": base_kib, "params": params, "local_params": local,
              "largest_shard": largest_shard, "rows": rows}  # fmt: skip
    Path(out, f"b{blocks}_r{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[5, 10, 20], help="MLP blocks per model size")
    ap.add_argument("--repeats", type=int, default=3, help="pruning events per size")
    ap.add_argument("--width", type=int, default=D, help="block width d (Linear layers d x 4d and 4d x d)")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument(
        "--json", default=None, help="raw output (default: benchmarks/results/distributed_threshold_d<width>.json)"
    )
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.worker, args.repeats, args.out, args.width)
        return
    # Every allocation over 128 KiB gets its own mmap and goes back to the OS when freed
    # (glibc otherwise raises this threshold to 32 MiB as tensors are freed, and freed
    # heap memory is reused without showing in the peak): peaks measure live memory.
    env = dict(
        os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1",
        MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072",
    )  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory() as out:
        for blocks in args.blocks:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__,
                   "--worker", str(blocks), "--repeats", str(args.repeats), "--width", str(args.width), "--out", out]  # fmt: skip
            proc = subprocess.run(cmd, env=env, timeout=900, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"torchrun failed for {blocks} blocks:\n{(proc.stdout + proc.stderr)[-4000:]}")
            results.append([json.loads(Path(out, f"b{blocks}_r{r}.json").read_text()) for r in range(2)])
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import machine, write_json

    print(f"machine: {machine()}")
    print(f"torch {torch.__version__}, 2 processes (gloo, CPU, 1 thread each), float32 weights")
    print(
        "| params | d | local params (rank 0) | largest shard | one histogram all-reduce extra peak MiB | threshold extra peak MiB (max rank) | x largest-shard fp32 "
        "| event extra peak MiB (incl. new masks) | gather extra peak MiB | gather / threshold "
        "| artemis s/event | s per 100M params | gather s/event | exact |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for pair in results:
        r0 = pair[0]
        t_mib = max(row["threshold_kib"] for rk in pair for row in rk["rows"]) / 1024
        a_mib = max(row["artemis_kib"] for rk in pair for row in rk["rows"]) / 1024
        g_mib = max(row["gather_kib"] for rk in pair for row in rk["rows"]) / 1024
        a_s = sorted(row["artemis_s"] for row in r0["rows"])[len(r0["rows"]) // 2]
        g_s = sorted(row["gather_s"] for row in r0["rows"])[len(r0["rows"]) // 2]
        shard_mib = r0["largest_shard"] * 4 / 2**20
        exact = all(row["pruned"] == row["expected"] for rk in pair for row in rk["rows"])
        print(
            f"| {r0['params'] / 1e6:.1f}M | {r0['d']} | {r0['local_params'] / 1e6:.1f}M | {r0['largest_shard'] / 1e6:.2f}M "
            f"| {max(rk['collective_kib'] for rk in pair) / 1024:.1f} "
            f"| {t_mib:.1f} | {t_mib / shard_mib:.1f} | {a_mib:.1f} | {g_mib:.1f} | {g_mib / max(t_mib, 1e-9):.1f} "
            f"| {a_s:.3f} | {a_s / r0['params'] * 1e8:.3f} | {g_s:.3f} | {exact} |"
        )

    out_json = args.json or ROOT / "benchmarks" / "results" / f"distributed_threshold_d{args.width}.json"
    write_json(out_json, {"command": " ".join(sys.argv), "machine": machine(), "per_size_per_rank": results})


if __name__ == "__main__":
    main()
