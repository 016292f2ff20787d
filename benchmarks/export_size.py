"""Checkpoint size and load time of ``artemis.save_pruned`` vs a dense ``save_pretrained``.

Model: a Llama-shaped model of ~100M parameters in bfloat16 (random weights; sizes do
not depend on the values), its prunable weights (every Linear in the blocks) pruned to
60% by global magnitude with the Artemis manager. Compared side by side, same process:

* dense ``model.save_pretrained`` (what every tool writes today);
* ``save_pruned`` (sparse-bitmask, bf16 values) and ``save_pruned(quantize="int8")``;
* the bitmask bound of the issue: 40% of the pruned layers' value bytes + 1 bit per
  pruned-layer weight + everything else dense (int8: one byte per kept value);
* compressed-tensors' own sparse-bitmask compressor, when the installed version has it.

Then the load time of the compressed checkpoint (``load_pruned``) vs the dense one
(``from_pretrained``), best of 3 each.

Run: ``PYTHONPATH=src python benchmarks/export_size.py`` (about 2–4 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

torch.set_num_threads(2)

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.initialization import no_init_weights  # noqa: E402

from artemis import create_pruning_manager, load_pruned, save_pruned  # noqa: E402


def folder_bytes(path: Path, names=None) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and (names is None or f.name in names))


def build(seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=8000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    with no_init_weights():
        model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 if p.dim() > 1 else torch.ones(p.shape))
    return model.to(torch.bfloat16).eval()


def evict(folder: Path) -> None:
    """Drop a folder's files from the page cache (``posix_fadvise(DONTNEED)``; Linux)."""
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def interleaved(fns: dict, rounds: int = 9) -> dict:
    """{name: (min, median) seconds}, the functions taking turns every round."""
    times: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: (min(v), sorted(v)[len(v) // 2]) for k, v in times.items()}


_FRESH = """
import os, sys, time, warnings
os.environ["HF_HUB_OFFLINE"] = "1"
warnings.filterwarnings("ignore")
import torch, transformers
from transformers import LlamaForCausalLM
from artemis import load_pruned
kind, folder = sys.argv[1], sys.argv[2]
t = time.perf_counter()
if kind == "dense":
    LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
else:
    load_pruned(folder)
print(time.perf_counter() - t)
"""


def fresh_process_loads(tmp: Path, rounds: int = 5) -> dict:
    """{kind: (min, median)} seconds of one load in a new Python process, taking turns."""
    import subprocess

    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            p for p in [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")] if p
        ),
    )
    times: dict = {"dense": [], "artemis": []}
    for _ in range(rounds):
        for kind, folder in (("dense", tmp / "dense"), ("artemis", tmp / "sparse")):
            res = subprocess.run(
                [sys.executable, "-c", _FRESH, kind, str(folder)], capture_output=True, text=True, env=env, check=True
            )
            times[kind].append(float(res.stdout.strip().splitlines()[-1]))
    return {k: (min(v), sorted(v)[len(v) // 2]) for k, v in times.items()}


def best_of(fn, n=3) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> dict:
    out: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    model = build()
    n_params = sum(p.numel() for p in model.parameters())
    out["parameters"] = n_params
    mgr = create_pruning_manager({"pruning": {"final_sparsity": 0.6}}, model)
    t = time.perf_counter()
    mgr.apply_magnitude_pruning(0.6)
    out["prune_s"] = time.perf_counter() - t
    mgr.finalize()
    targets = [tg.param for tg in mgr.method.targets]
    n_pruned_layers = sum(p.numel() for p in targets)
    out["prunable_fraction"] = n_pruned_layers / n_params
    summary = mgr.get_pruning_summary()["pruning_metrics"]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        model.save_pretrained(tmp / "dense")
        out["save_dense_s"] = time.perf_counter() - t
        dense = folder_bytes(tmp / "dense")
        t = time.perf_counter()
        info = save_pruned(model, tmp / "sparse", manager=mgr)
        out["save_sparse_s"] = time.perf_counter() - t
        info8 = save_pruned(model, tmp / "int8", manager=mgr, quantize="int8")
        rest = info["dense_bytes"] - sum(p.numel() * p.element_size() for p in targets)
        bound = 0.4 * n_pruned_layers * 2 + n_pruned_layers / 8 + rest
        bound8 = 0.4 * n_pruned_layers * 1 + n_pruned_layers / 8 + rest
        out.update(
            dense_save_pretrained_bytes=dense,
            dense_tensor_bytes=info["dense_bytes"],
            artemis_bytes=info["bytes_on_disk"],
            artemis_int8_bytes=info8["bytes_on_disk"],
            bitmask_bound_bytes=int(bound),
            bitmask_bound_int8_bytes=int(bound8),
            summary_model_size_reduction=summary["model_size_reduction"],
            disk_model_size_reduction=1 - info["bytes_on_disk"] / info["dense_bytes"],
        )
        out["ratio_artemis_vs_dense"] = info["bytes_on_disk"] / dense
        out["ratio_int8_vs_dense"] = info8["bytes_on_disk"] / dense
        out["ratio_bound_vs_dense"] = bound / dense
        out["ratio_bound_int8_vs_dense"] = bound8 / dense
        out["excess_over_bound_pct_of_dense"] = 100 * (info["bytes_on_disk"] - bound) / dense
        out["excess_over_int8_bound_pct_of_dense"] = 100 * (info8["bytes_on_disk"] - bound8) / dense
        try:
            from compressed_tensors.compressors import sparse_compressors  # noqa: F401

            out["compressed_tensors"] = "sparse compressor present (not benchmarked)"
        except Exception as exc:
            import compressed_tensors

            out["compressed_tensors"] = (
                f"compressed-tensors {compressed_tensors.__version__}: no sparse-bitmask compressor "
                f"({type(exc).__name__}); nothing to compare"
            )

        # load time, best of 3, after one warm-up each (file cache warm for both)
        load_dense = lambda: LlamaForCausalLM.from_pretrained(tmp / "dense", dtype=torch.bfloat16)  # noqa: E731
        load_sparse = lambda: load_pruned(tmp / "sparse")  # noqa: E731
        load_sparse_noverify = lambda: load_pruned(tmp / "sparse", verify=False)  # noqa: E731
        load_int8 = lambda: load_pruned(tmp / "int8")  # noqa: E731

        def touched(fn):
            def run():
                m = fn()
                # read one byte of every 4 KiB page of every tensor: the cheapest way to make a
                # lazy (mmap) load bring its data in, as the first forward pass would
                for t in m.state_dict().values():
                    int(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()[::4096].sum())
                return m

            return run

        for fn in (load_dense, load_sparse, load_int8):
            fn()
        # warm: the loads take turns, 9 rounds; min and median of each
        warm = interleaved(
            {
                "dense": load_dense,
                "artemis": load_sparse,
                "dense_touched": touched(load_dense),
                "artemis_touched": touched(load_sparse),
                "artemis_noverify": load_sparse_noverify,
                "artemis_int8": load_int8,
                "artemis_1worker": lambda: load_pruned(tmp / "sparse", workers=1),
            }
        )
        for k, (lo, med) in warm.items():
            out[f"load_{k}_s"] = lo
            out[f"load_{k}_median_s"] = med
        out["load_ratio"] = warm["artemis"][0] / warm["dense"][0]
        out["load_ratio_median"] = warm["artemis"][1] / warm["dense"][1]
        out["load_ratio_touched"] = warm["artemis_touched"][0] / warm["dense_touched"][0]
        out["load_ratio_touched_median"] = warm["artemis_touched"][1] / warm["dense_touched"][1]
        # a fresh process per load (imports done before the clock starts): the first load
        # in a process, which for Artemis includes importing llvmlite and compiling the kernels
        fresh = fresh_process_loads(tmp)
        for k, (lo, med) in fresh.items():
            out[f"load_{k}_fresh_process_s"] = lo
            out[f"load_{k}_fresh_process_median_s"] = med
        out["load_ratio_fresh_process_median"] = fresh["artemis"][1] / fresh["dense"][1]

        # cold page cache: both folders evicted before every load (posix_fadvise), and the
        # dense model's pages touched, so both loads read their files from the disk
        def cold(fn, folder):
            def run():
                evict(folder)
                return fn()

            return run

        cold_dense, cold_sparse = [], []
        for _ in range(3):  # interleaved
            cold_dense.append(best_of(cold(touched(load_dense), tmp / "dense"), 1))
            cold_sparse.append(best_of(cold(load_sparse, tmp / "sparse"), 1))
        out["load_dense_cold_touched_s"] = min(cold_dense)
        out["load_artemis_cold_s"] = min(cold_sparse)
        out["load_ratio_cold"] = out["load_artemis_cold_s"] / out["load_dense_cold_touched_s"]
        back = load_sparse()
        out["bit_identical"] = all(
            torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values())
        )
    return out


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
        raise SystemExit(0)
    res = main()
    print(json.dumps(res, indent=1))
    # raw output: the path given as the only argument, else benchmarks/results/export_size.json
    out_path = (
        Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "export_size.json"
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"(raw output: {out_path})")
