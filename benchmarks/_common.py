"""Helpers shared by the benchmark scripts (not part of the library)."""

from __future__ import annotations

import json
import os
import platform
import resource
from pathlib import Path

import torch


def machine() -> str:
    """One line describing the machine and library versions."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def llama_config(
    hidden: int = 768,
    layers: int = 10,
    intermediate: int = 2048,
    vocab: int = 16000,
    heads: int = 12,
    kv_heads: int = 12,
):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


@torch.no_grad()
def random_llama(cfg, dtype=torch.float32, seed: int = 0):
    """A randomly initialised LlamaForCausalLM built without temporary copies (meta device,
    then materialised in place), so peak-memory deltas measured afterwards are clean."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=g)
    for name, b in model.named_buffers():
        if "inv_freq" in name:
            base = getattr(cfg, "rope_theta", None) or 10000.0
            dim = cfg.hidden_size // cfg.num_attention_heads
            b.copy_(1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)))
    return model.eval()


RESULTS = Path(__file__).resolve().parent / "results"
"""Where the scripts write their raw JSON output (linked from BENCHMARKS.md)."""


def write_json(path, data) -> None:
    """Write ``data`` as indented JSON to ``path`` (parent folders created) and say where."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"(raw output: {p})")


class TeeStdout:
    """Copy everything printed to stdout into ``self.lines`` as well (for the raw JSON of the
    scripts whose results are the tables they print)."""

    def __init__(self):
        import sys

        self._sys = sys
        self._buf = []
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        self._buf.append(text)
        return self._real.write(text)

    def flush(self) -> None:
        self._real.flush()

    def __enter__(self) -> TeeStdout:
        self._real = self._sys.stdout
        self._sys.stdout = self
        return self

    def __exit__(self, *exc) -> None:
        self._sys.stdout = self._real
        self.lines = "".join(self._buf).splitlines()
