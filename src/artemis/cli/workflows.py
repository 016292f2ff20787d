"""The workflows behind the ``artemis`` subcommands: prune, sweep, eval and export.

Each ``run_*`` function takes typed arguments (a :class:`~artemis.train.run_config.RunConfig`,
paths, numbers), never an argparse namespace, so it can be called from Python as well as
from :mod:`artemis.cli.main`. Heavy packages (torch, transformers) are imported inside the
functions, so that ``artemis --help`` stays fast.

Example:
    >>> from artemis.cli.workflows import run_prune, run_sweep
    >>> run_prune.__name__, run_sweep.__name__
    ('run_prune', 'run_sweep')
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import time
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["run_prune", "run_sweep", "run_eval", "run_export", "disk_mib", "refuse_multi_process"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- evaluation
class _Evaluator:
    """Held-out data and the dense reference measurements of one model/task."""

    def __init__(self, task: str, tokenizer: Any, eval_texts: Sequence[str], ev: Any, max_length: int) -> None:
        from artemis.data.corpus import token_blocks

        self.task, self.tokenizer, self.ev, self.max_length = task, tokenizer, ev, max_length
        if task == "encoder":
            self.texts = list(eval_texts[: ev.num_texts])
            if len(self.texts) < 2:
                from artemis.core.errors import ConfigError

                raise ConfigError(f"evaluation needs at least 2 held-out texts, the eval data holds {len(self.texts)}")
            enc = tokenizer(
                self.texts[: ev.latency_batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            self.latency_batch = dict(enc)
            self.quick_texts = self.texts[:64]
        else:
            self.blocks = token_blocks(list(eval_texts), tokenizer, block_size=max_length, batch_size=8)
            n_batches = max(1, ev.num_texts // 8)
            self.blocks = self.blocks[:n_batches]
            self.latency_batch = {"input_ids": self.blocks[0]["input_ids"][: ev.latency_batch_size]}
            self.quick_blocks = self.blocks[:2]
        self.dense_emb = None
        self.dense_quick = None
        self.metric = "embedding_cosine_vs_dense" if task == "encoder" else "perplexity"

    def measure_dense(self, model: Any) -> dict:
        from artemis.evaluation.quality import encode_sentences, forward_latency_ms, perplexity

        out: dict[str, Any] = {
            "latency_ms": forward_latency_ms(
                model, self.latency_batch, repeats=self.ev.latency_repeats, warmup=self.ev.latency_warmup
            )
        }
        if self.task == "encoder":
            self.dense_emb = encode_sentences(model, self.tokenizer, self.texts, max_length=self.max_length)
            self.dense_quick = self.dense_emb[: len(self.quick_texts)]
            out["quality"] = 1.0
        else:
            out["quality"] = perplexity(model, self.blocks)
        return out

    def measure(self, model: Any) -> dict:
        from artemis.evaluation.quality import embedding_fidelity, encode_sentences, forward_latency_ms, perplexity

        out: dict[str, Any] = {
            "latency_ms": forward_latency_ms(
                model, self.latency_batch, repeats=self.ev.latency_repeats, warmup=self.ev.latency_warmup
            )
        }
        if self.task == "encoder":
            fid = embedding_fidelity(
                self.dense_emb, encode_sentences(model, self.tokenizer, self.texts, max_length=self.max_length)
            )
            out["quality"] = fid["cosine_mean"]
            out["nn_agreement"] = fid["nn_agreement"]
            out["cosine_min"] = fid["cosine_min"]
        else:
            out["quality"] = perplexity(model, self.blocks)
        return out

    def quick(self, model: Any) -> float:
        """A cheaper quality figure for the quality-vs-step plot (64 texts / 2 batches)."""
        from artemis.evaluation.quality import embedding_fidelity, encode_sentences, perplexity

        if self.task == "encoder":
            emb = encode_sentences(model, self.tokenizer, self.quick_texts, max_length=self.max_length)
            return embedding_fidelity(self.dense_quick, emb)["cosine_mean"]
        return perplexity(model, self.quick_blocks)


def _texts(cfg: Any) -> tuple[list[str], list[str]]:
    """Training and held-out texts. A file source without ``data.eval`` keeps its last
    fifth (at most ``evaluation.num_texts`` texts) for evaluation."""
    from artemis.data.corpus import load_texts

    d = cfg.data
    is_split_source = d.train == "builtin" or d.train.startswith("hf:")
    train = load_texts(d.train, split=d.train_split, text_field=d.text_field)
    if d.eval is not None:
        ev = load_texts(d.eval, split=d.eval_split, text_field=d.text_field)
    elif is_split_source:
        ev = load_texts(d.train, split=d.eval_split, text_field=d.text_field)
    else:
        k = min(cfg.evaluation.num_texts, max(2, len(train) // 5))
        train, ev = train[:-k], train[-k:]
    if d.train_limit is not None:
        train = train[: d.train_limit]
    return train, ev


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _save_model(model: Any, tokenizer: Any, path: Path, meta: dict) -> str:
    """Save with :func:`artemis.sparse.checkpoint.save_pruned` (sparse weights compressed, the
    tokenizer alongside). Returns the format written."""
    from artemis.sparse.checkpoint import save_pruned

    path.mkdir(parents=True, exist_ok=True)
    save_pruned(model, path, tokenizer=tokenizer)
    fmt = "artemis.save_pruned"
    from artemis.evaluation.report import write_json

    write_json(path / "artemis_run.json", {**meta, "format": fmt})
    return fmt


def _load_saved(model_dir: Path, task: Optional[str]) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM

    from artemis.core.errors import ModelError

    if not model_dir.is_dir():
        raise ModelError(f"model folder {str(model_dir)!r} does not exist")
    if (model_dir / "artemis_export.json").is_file() or _read_meta(model_dir).get("format") == "artemis.save_pruned":
        # A compressed checkpoint: stock from_pretrained would not decompress it.
        from artemis.sparse.checkpoint import load_pruned

        return load_pruned(model_dir)
    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModel
    try:
        return cls.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a model from {str(model_dir)!r}: {str(exc).splitlines()[0]}") from None


def _read_meta(model_dir: Path) -> dict:
    p = model_dir / "artemis_run.json"
    if not p.is_file():
        return {}
    return json.loads(p.read_text(encoding="utf-8"))


def disk_mib(path: Path) -> float:
    exts = (".safetensors", ".bin", ".pt")
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name.endswith(exts)) / 2**20


# --------------------------------------------------------------------------- commands
def refuse_multi_process(command: str) -> None:
    """``artemis prune``/``sweep`` run in one process; under torchrun or ``accelerate launch``
    every rank would run its own copy of the whole job and write the same output folder."""
    import os

    from artemis.core.errors import ConfigError

    world = os.environ.get("WORLD_SIZE", "1")
    if world.strip() not in ("", "1"):
        raise ConfigError(
            f"artemis {command} runs in a single process, but it was launched as one of WORLD_SIZE={world} "
            "processes (torchrun / accelerate launch), where every process would run the whole job and write "
            "the same output. Run it as one process (one GPU), or train with the Python API under "
            "DDP/FSDP2 (docs/distributed.md)."
        )


def run_prune(
    cfg: Any,
    output: Path,
    *,
    resume: bool = False,
    stop_after: Optional[int] = None,
    progress: bool = True,
    plots: bool = True,
) -> dict:
    """Run ``artemis prune`` for a validated :class:`~artemis.train.run_config.RunConfig`;
    return the report dict (also written to ``output``)."""
    import torch

    from artemis.core.manager import PruningManager
    from artemis.data.corpus import calibration_batches
    from artemis.evaluation.quality import parameter_stats, size_stats
    from artemis.evaluation.report import write_report
    from artemis.train.loading import check_supported, load_model_and_tokenizer
    from artemis.train.loop import plan_runtime, train_with_pruning

    refuse_multi_process("prune")
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    check_supported(cfg.model, cfg.fine_tuning.method)
    if cfg.training.steps == 0 and (cfg.model.hybrid_lora_adapter or cfg.fine_tuning.method != "full"):
        from artemis.core.errors import ConfigError

        needs = [
            n
            for n, on in (
                ("model.hybrid_lora_adapter: true", cfg.model.hybrid_lora_adapter),
                (f"fine_tuning.method: {cfg.fine_tuning.method}", cfg.fine_tuning.method != "full"),
            )
            if on
        ]
        raise ConfigError(
            f"training.steps: 0 is one-shot pruning and trains nothing, but {' and '.join(needs)} needs training; "
            "set training.steps >= 1"
        )
    loaded = load_model_and_tokenizer(cfg.model)
    model, tok, task = loaded.model, loaded.tokenizer, loaded.task
    train_texts, eval_texts = _texts(cfg)
    plan = plan_runtime(cfg, model, task)  # validates before any long work
    model.to(plan.device)
    evaluator = _Evaluator(task, tok, eval_texts, cfg.evaluation, cfg.training.max_length)
    dense = evaluator.measure_dense(model)
    timing["load_and_dense_eval"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    history: list[dict] = []
    resumed_from = None
    finetune = None
    if cfg.training.steps > 0:
        res = train_with_pruning(
            model,
            tok,
            cfg,
            task,
            train_texts=train_texts,
            output_dir=output,
            resume=resume,
            eval_fn=evaluator.quick if cfg.training.eval_every else None,
            stop_after=stop_after,
            progress=progress,
        )
        manager, history, resumed_from, plan = res.manager, res.history, res.resumed_from, res.plan
        finetune = res.finetune
        if res.stopped_early:
            timing["train"] = time.perf_counter() - t1
            return {
                "stopped_early": True,
                "step": history[-1]["step"] if history else 0,
                "checkpoint": str(output / "checkpoint"),
                "timing": timing,
            }
    else:
        manager = PruningManager(model, cfg.pruning)
        calib = None
        if manager.metric.needs_activations or manager.metric.needs_gradients or manager.needs_calibration_data:
            calib = calibration_batches(
                task, tok, train_texts, max_length=cfg.training.max_length, n=cfg.data.calibration_texts
            )
        manager.apply_pruning(cfg.pruning.final_sparsity, calibration_data=calib)
    timing["prune_and_train"] = time.perf_counter() - t1

    summary = manager.get_pruning_summary()  # per-layer table before any structural surgery
    lora_merge = None
    ft_summary = None
    if finetune is not None:
        ft_summary = finetune.summary()  # trainable counts before the merge
        ft_summary["distillation"] = plan.distillation  # the loop owns the teacher, not the session
    if finetune is not None and finetune.hybrid_lora:
        # fold the adapters in and re-apply the masks (W ← (W + ΔW) ⊙ M) while the manager still holds them
        merge_batches = [
            {k: v.to(plan.device) for k, v in b.items()}
            for b in calibration_batches(task, tok, eval_texts, max_length=cfg.training.max_length, n=16)
        ]
        if task == "causal_lm":
            merge_batches = [{**b, "labels": b["input_ids"]} for b in merge_batches]
        model, merge_report = finetune.merge(merge_batches)
        lora_merge = dataclasses.asdict(merge_report)
    manager.finalize()
    measured_sparsity = manager.get_pruning_summary()["measured_sparsity"]
    t2 = time.perf_counter()
    pruned = evaluator.measure(model)
    timing["pruned_eval"] = time.perf_counter() - t2
    sparse = manager.sparse_params()
    sizes = size_stats(model, sparse)
    sizes["dense"] = manager.baseline_model_size
    t3 = time.perf_counter()
    model_dir = output / "model"
    if finetune is not None and finetune.shared_pairs:
        # safetensors keeps one copy of a shared tensor; give each block its own storage (values unchanged)
        from artemis.finetune.efficiency import untie_shared_layers

        untie_shared_layers(model, finetune.shared_pairs)
    fmt = _save_model(
        model.cpu(),
        tok,
        model_dir,
        {"base_model": cfg.model.base_model, "task": task, "tokenizer": cfg.model.tokenizer},
    )
    sizes["on_disk"] = disk_mib(model_dir)
    timing["save"] = time.perf_counter() - t3
    timing["total"] = time.perf_counter() - t0

    quality = {"metric": evaluator.metric, "dense": dense["quality"], "pruned": pruned["quality"]}
    for k in ("nn_agreement", "cosine_min"):
        if k in pruned:
            quality[k] = pruned[k]
    memory = {"peak_rss": _peak_rss_mib()}
    if torch.cuda.is_available() and plan.device.startswith("cuda"):
        memory["peak_cuda_allocated"] = torch.cuda.max_memory_allocated() / 2**20
    report = {
        "model": cfg.model.base_model,
        "task": task,
        "sparsity": measured_sparsity,
        "target_sparsity": cfg.pruning.final_sparsity,
        "quality": quality,
        "size_mb": sizes,
        "latency_ms": {"dense": dense["latency_ms"], "pruned": pruned["latency_ms"], "device": plan.device},
        "parameters": parameter_stats(model),
        "saved": {"path": str(model_dir), "format": fmt},
        "runtime": {
            k: getattr(plan, k)
            for k in (
                "device",
                "batch_size",
                "gradient_accumulation_steps",
                "gradient_checkpointing",
                "distillation",
                "distillation_reason",
                "bf16",
            )
        },
        "resumed_from_step": resumed_from,
        "timing": timing,
        "memory": memory,
        "history": history,
        "layers": summary["layers"],
        "pruning_summary": {k: v for k, v in summary.items() if k != "layers"},
        "config": cfg.to_dict(),
    }
    if ft_summary is not None:
        report["fine_tuning"] = ft_summary
    if lora_merge is not None:
        report["lora_merge"] = lora_merge
    return write_report(output, report, plots=plots)


def run_sweep(
    cfg: Any, sparsities: Sequence[float], threshold: Optional[float], output: Optional[Path], plots: bool = True
) -> dict:
    """One-shot prune the model at each sparsity with :func:`artemis.evaluation.analysis.sparsity_sweep`
    (statistics for activation/gradient metrics are gathered once, on the dense model; after
    each level the dense weights are restored bit for bit, so every level starts from the
    same weights and no per-level copy of the model is made), evaluate, recommend."""
    from artemis.data.corpus import calibration_batches
    from artemis.evaluation.analysis import sparsity_sweep
    from artemis.evaluation.report import plot_sweep, write_json
    from artemis.metrics import METRICS
    from artemis.train.loading import check_supported, load_model_and_tokenizer
    from artemis.train.loop import _resolve_device

    refuse_multi_process("sweep")
    check_supported(cfg.model, cfg.fine_tuning.method)
    loaded = load_model_and_tokenizer(cfg.model)
    model, tok, task = loaded.model, loaded.tokenizer, loaded.task
    model.to(_resolve_device(cfg.training.device)).eval()
    train_texts, eval_texts = _texts(cfg)
    evaluator = _Evaluator(task, tok, eval_texts, cfg.evaluation, cfg.training.max_length)
    dense = evaluator.measure_dense(model)
    metric_cls = METRICS.get(cfg.pruning.importance_metric)
    calib = None
    if metric_cls.needs_activations or metric_cls.needs_gradients or cfg.pruning.needs_calibration_batches:
        calib = calibration_batches(
            task, tok, train_texts, max_length=cfg.training.max_length, n=cfg.data.calibration_texts
        )
    swept = sparsity_sweep(model, cfg.pruning, sparsities, evaluator.measure, calibration_data=calib, progress=False)
    rows = []
    for r in swept:
        m = r["metrics"]
        rows.append(
            {
                "sparsity": r["sparsity"],
                "measured_sparsity": r["measured_sparsity"],
                "quality": m["quality"],
                "size_mb": r["model_size_mb"],
                "latency_ms": m["latency_ms"],
                **({"nn_agreement": m["nn_agreement"]} if "nn_agreement" in m else {}),
            }
        )
    higher_better = task == "encoder"
    if threshold is None:
        threshold = cfg.evaluation.quality_threshold
    if threshold is None:
        threshold = 0.95 if higher_better else 1.1 * dense["quality"]
    ok = [r["sparsity"] for r in rows if (r["quality"] >= threshold if higher_better else r["quality"] <= threshold)]
    result = {
        "model": cfg.model.base_model,
        "task": task,
        "metric": evaluator.metric,
        "dense": dense,
        "threshold": threshold,
        "higher_is_better": higher_better,
        "rows": rows,
        "recommended_sparsity": max(ok) if ok else None,
        "config": cfg.to_dict(),
    }
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        result["plots"] = plot_sweep(output, rows, evaluator.metric, threshold) if plots else []
        write_json(output / "sweep.json", result)
    return result


def run_eval(
    model_dir: Path,
    reference: Optional[str],
    *,
    num_texts: int = 256,
    eval_data: Optional[str] = None,
    max_length: int = 128,
    device: str = "auto",
    output: Optional[Path] = None,
) -> dict:
    """Evaluate a saved model against its dense reference; return (and optionally write) a report."""
    from artemis.arch import get_adapter
    from artemis.core.errors import ConfigError
    from artemis.core.targets import find_targets
    from artemis.data.corpus import load_texts
    from artemis.evaluation.quality import parameter_stats, size_stats
    from artemis.evaluation.report import write_report
    from artemis.train.loading import load_model_and_tokenizer
    from artemis.train.loop import _resolve_device
    from artemis.train.run_config import EvaluationSection, ModelSection

    ev = EvaluationSection(num_texts=num_texts)  # validate flags before loading anything
    meta = _read_meta(model_dir)
    ref = reference or meta.get("base_model")
    if ref is None:
        raise ConfigError(f"{str(model_dir)!r} records no base model (no artemis_run.json); pass --reference MODEL")
    ref_loaded = load_model_and_tokenizer(ModelSection(base_model=ref, tokenizer=meta.get("tokenizer")))
    task = ref_loaded.task
    model = _load_saved(model_dir, task)
    dev = _resolve_device(device)
    model.to(dev).eval()
    ref_loaded.model.to(dev).eval()
    texts = load_texts(eval_data or "builtin", split="test")
    evaluator = _Evaluator(task, ref_loaded.tokenizer, texts, ev, max_length)
    dense = evaluator.measure_dense(ref_loaded.model)
    pruned = evaluator.measure(model)
    adapter = get_adapter(model)
    targets = find_targets(model, block_prefixes=adapter.block_prefixes() if adapter.blocks is not None else None)
    prunable = [t.param for t in targets]
    sizes = size_stats(model, prunable)
    sizes["dense"] = size_stats(ref_loaded.model, [])["dense"]
    sizes["on_disk"] = disk_mib(model_dir)
    quality = {"metric": evaluator.metric, "dense": dense["quality"], "pruned": pruned["quality"]}
    for k in ("nn_agreement", "cosine_min"):
        if k in pruned:
            quality[k] = pruned[k]
    report = {
        "model": str(model_dir),
        "reference": ref,
        "task": task,
        "sparsity": parameter_stats(model, prunable)["sparsity"],
        "quality": quality,
        "size_mb": sizes,
        "latency_ms": {"dense": dense["latency_ms"], "pruned": pruned["latency_ms"], "device": str(dev)},
        "parameters": parameter_stats(model),
    }
    if output is not None:
        write_report(output, report, plots=False)
    return report


def run_export(model_dir: Path, output: Path, quantize: Optional[str] = None) -> str:
    """Load ``model_dir`` and write it with ``artemis.save_pruned`` (compressed)."""
    from transformers import AutoTokenizer

    from artemis.evaluation.report import write_json
    from artemis.sparse.checkpoint import save_pruned

    meta = _read_meta(model_dir)
    model = _load_saved(model_dir, meta.get("task"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    output.mkdir(parents=True, exist_ok=True)
    save_pruned(model, output, tokenizer=tok, **({"quantize": quantize} if quantize else {}))
    write_json(output / "artemis_run.json", {**meta, "format": "artemis.save_pruned", "quantize": quantize})
    return str(output)
