"""The ``artemis`` command line.

Subcommands (``artemis SUBCOMMAND --help`` for every option):

* ``artemis prune [CONFIG.yaml] [--output DIR] [overrides]`` — load the model, train
  with progressive pruning (and distillation), evaluate dense vs pruned, save the
  pruned model and write ``report.md``/``report.json``/plots. With no config: the
  embedded default (the real all-MiniLM-L6-v2 to 60% unstructured sparsity).
* ``artemis sweep [CONFIG] --sparsities 0.3,0.5,0.7,0.9`` — one-shot pruning at each
  level, evaluation, a table, a plot and the recommended sparsity for a threshold.
* ``artemis eval MODEL_DIR`` — evaluate a saved pruned model against its dense base.
* ``artemis export MODEL_DIR --output DIR`` — re-export a saved model (compressed,
  optionally int8).

Errors a user can cause (a bad config, a missing file, an unknown model) print one
line, ``artemis: error: ...``, and exit with status 2; ``--debug`` shows the traceback.

argparse (standard library) rather than click/typer: no extra dependency, and its
own usage errors already exit with status 2, the same status as our input errors.

Example:
    >>> from artemis.cli import build_parser
    >>> args = build_parser().parse_args(["prune", "--final-sparsity", "0.5", "--steps", "10"])
    >>> args.command, args.final_sparsity, args.steps
    ('prune', 0.5, 10)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = ["main", "build_parser", "run_prune", "run_sweep", "run_eval", "run_export", "OVERRIDES", "EXIT_USER_ERROR"]

logger = logging.getLogger("artemis.cli")

EXIT_USER_ERROR = 2

#: command-line flag -> (dotted config key, type, help)
OVERRIDES: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "--model": ("model.base_model", str, "Hugging Face id or local folder of the model"),
    "--tokenizer": ("model.tokenizer", str, "tokenizer id or folder (default: the model's)"),
    "--final-sparsity": ("pruning.final_sparsity", float, "final sparsity in [0, 1)"),
    "--method": ("pruning.method", str, "pruning method (magnitude_progressive, ...)"),
    "--metric": ("pruning.importance_metric", str, "importance metric (magnitude, ...)"),
    "--schedule": ("pruning.schedule", str, "cubic, cubic_decay or linear"),
    "--scope": ("pruning.scope", str, "global, layer or row"),
    "--pruning-interval": ("pruning.pruning_interval", int, "steps between pruning events"),
    "--steps": ("training.steps", int, "optimizer steps (0: one-shot pruning, no training)"),
    "--batch-size": ("training.batch_size", int, "texts per micro-batch"),
    "--grad-accum": ("training.gradient_accumulation_steps", int, "micro-batches per optimizer step"),
    "--lr": ("training.learning_rate", float, "peak learning rate"),
    "--warmup-steps": ("training.warmup_steps", int, "linear warm-up steps"),
    "--max-length": ("training.max_length", int, "tokens per text / block"),
    "--device": ("training.device", str, "auto, cpu, cuda, cuda:N"),
    "--seed": ("training.seed", int, "random seed"),
    "--checkpoint-every": ("training.checkpoint_every", int, "save a resumable checkpoint every N steps"),
    "--eval-every": ("training.eval_every", int, "measure quality every N steps (for the plot)"),
    "--train-data": ("data.train", str, "builtin, a .txt/.jsonl file or hf:NAME"),
    "--eval-data": ("data.eval", str, "held-out text source (default: the training source's eval split)"),
    "--eval-texts": ("evaluation.num_texts", int, "number of held-out texts/blocks to evaluate on"),
}


# --------------------------------------------------------------------------- parser
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or info logging")


def _add_overrides(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("config overrides")
    for flag, (key, typ, helptext) in OVERRIDES.items():
        g.add_argument(flag, dest=flag[2:].replace("-", "_"), type=typ, default=None, help=f"{helptext} [{key}]")
    g.add_argument("--distill", dest="distill", action="store_true", default=None, help="force distillation on [distillation.enabled]")
    g.add_argument("--no-distill", dest="distill", action="store_false", help="turn distillation off")
    g.add_argument("--low-resource", action="store_true", default=None, help="low_resource_mode [efficiency.low_resource_mode]")
    g.add_argument("--set", dest="set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, dotted (training.weight_decay=0.01); VALUE is parsed as YAML; repeatable")


def build_parser() -> argparse.ArgumentParser:
    """The ``artemis`` argument parser (every subcommand has ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="artemis",
        description="Prune transformer models: progressive pruning with distillation, evaluation and compressed export.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("prune", help="train with progressive pruning, evaluate, save and report",
                       description="Prune a model as CONFIG says (no CONFIG: the embedded default, all-MiniLM-L6-v2 to 60%%).")
    p.add_argument("config", nargs="?", help="YAML run config (default: the embedded MiniLM run)")
    p.add_argument("-o", "--output", help="output folder (default: config output_dir, else ./artemis-output)")
    p.add_argument("--resume", action="store_true", help="resume from OUTPUT/checkpoint if it exists")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N steps with a checkpoint (resume later with --resume)")
    p.add_argument("--no-plots", action="store_true", help="do not draw plots")
    _add_overrides(p)
    _add_common(p)
    p.set_defaults(func=_cmd_prune)

    s = sub.add_parser("sweep", help="one-shot pruning at several sparsities: quality and size table",
                       description="One-shot prune a copy of the model at each sparsity, evaluate, recommend a level.")
    s.add_argument("config", nargs="?", help="YAML run config (default: the embedded MiniLM run)")
    s.add_argument("--sparsities", default="0.3,0.5,0.7,0.9", help="comma-separated levels (default: %(default)s)")
    s.add_argument("--threshold", type=float, default=None,
                   help="quality threshold for the recommendation (default: evaluation.quality_threshold, else "
                        "cosine 0.95 for encoders, 1.1 x dense perplexity for causal LMs)")
    s.add_argument("-o", "--output", help="output folder for sweep.json/sweep.md/sweep.png")
    s.add_argument("--no-plots", action="store_true")
    _add_overrides(s)
    _add_common(s)
    s.set_defaults(func=_cmd_sweep)

    e = sub.add_parser("eval", help="evaluate a saved pruned model against its dense base",
                       description="Evaluate MODEL_DIR (written by artemis prune) against the dense reference model.")
    e.add_argument("model_dir", help="folder written by `artemis prune` (OUTPUT/model)")
    e.add_argument("--reference", help="dense reference model (default: the base model recorded in MODEL_DIR)")
    e.add_argument("--eval-texts", type=int, default=256, help="held-out texts/blocks (default: %(default)s)")
    e.add_argument("--eval-data", default=None, help="held-out text source (default: the built-in corpus, test split)")
    e.add_argument("--max-length", type=int, default=128, help="tokens per text/block (default: %(default)s)")
    e.add_argument("--device", default="auto")
    e.add_argument("-o", "--output", help="write report.json/report.md here")
    _add_common(e)
    e.set_defaults(func=_cmd_eval)

    x = sub.add_parser("export", help="re-export a saved model (compressed, optionally int8)",
                       description="Load MODEL_DIR and write it again with artemis.save_pruned.")
    x.add_argument("model_dir")
    x.add_argument("-o", "--output", required=True, help="destination folder")
    x.add_argument("--quantize", choices=["int8"], default=None, help="store int8 values")
    _add_common(x)
    x.set_defaults(func=_cmd_export)
    return parser


def _version() -> str:
    from artemis import __version__

    return __version__


# --------------------------------------------------------------------------- config
def _collect_overrides(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    from artemis.errors import ConfigError

    out: dict[str, Any] = {}
    for flag, (key, _, _) in OVERRIDES.items():
        v = getattr(args, flag[2:].replace("-", "_"), None)
        if v is not None:
            out[key] = v
    if getattr(args, "distill", None) is not None:
        out["distillation.enabled"] = args.distill
    if getattr(args, "low_resource", None):
        out["efficiency.low_resource_mode"] = True
    for item in getattr(args, "set", []) or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. training.weight_decay=0.01")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: VALUE is not valid YAML ({exc})") from None
    return out


def _load_config(args: argparse.Namespace):
    from artemis.run_config import EMBEDDED_DEFAULT, apply_overrides, load_run_config

    cfg = load_run_config(args.config if args.config else copy.deepcopy(EMBEDDED_DEFAULT))
    overrides = _collect_overrides(args)
    return apply_overrides(cfg, overrides) if overrides else cfg


# --------------------------------------------------------------------------- evaluation
class _Evaluator:
    """Held-out data and the dense reference measurements of one model/task."""

    def __init__(self, task: str, tokenizer: Any, eval_texts: Sequence[str], ev: Any, max_length: int) -> None:
        from artemis.data import token_blocks

        self.task, self.tokenizer, self.ev, self.max_length = task, tokenizer, ev, max_length
        if task == "encoder":
            self.texts = list(eval_texts[: ev.num_texts])
            if len(self.texts) < 2:
                from artemis.errors import ConfigError

                raise ConfigError(f"evaluation needs at least 2 held-out texts, the eval data holds {len(self.texts)}")
            enc = tokenizer(self.texts[: ev.latency_batch_size], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
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
        from artemis.eval_suite import encode_sentences, forward_latency_ms, perplexity

        out: dict[str, Any] = {"latency_ms": forward_latency_ms(model, self.latency_batch, repeats=self.ev.latency_repeats, warmup=self.ev.latency_warmup)}
        if self.task == "encoder":
            self.dense_emb = encode_sentences(model, self.tokenizer, self.texts, max_length=self.max_length)
            self.dense_quick = self.dense_emb[: len(self.quick_texts)]
            out["quality"] = 1.0
        else:
            out["quality"] = perplexity(model, self.blocks)
        return out

    def measure(self, model: Any) -> dict:
        from artemis.eval_suite import embedding_fidelity, encode_sentences, forward_latency_ms, perplexity

        out: dict[str, Any] = {"latency_ms": forward_latency_ms(model, self.latency_batch, repeats=self.ev.latency_repeats, warmup=self.ev.latency_warmup)}
        if self.task == "encoder":
            fid = embedding_fidelity(self.dense_emb, encode_sentences(model, self.tokenizer, self.texts, max_length=self.max_length))
            out["quality"] = fid["cosine_mean"]
            out["nn_agreement"] = fid["nn_agreement"]
            out["cosine_min"] = fid["cosine_min"]
        else:
            out["quality"] = perplexity(model, self.blocks)
        return out

    def quick(self, model: Any) -> float:
        """A cheaper quality figure for the quality-vs-step plot (64 texts / 2 batches)."""
        from artemis.eval_suite import embedding_fidelity, encode_sentences, perplexity

        if self.task == "encoder":
            emb = encode_sentences(model, self.tokenizer, self.quick_texts, max_length=self.max_length)
            return embedding_fidelity(self.dense_quick, emb)["cosine_mean"]
        return perplexity(model, self.quick_blocks)


def _texts(cfg: Any) -> tuple[list[str], list[str]]:
    """Training and held-out texts. A file source without ``data.eval`` keeps its last
    fifth (at most ``evaluation.num_texts`` texts) for evaluation."""
    from artemis.data import load_texts

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
    """Save with :func:`artemis.export.save_pruned` (sparse weights compressed, the
    tokenizer alongside). Returns the format written."""
    from artemis.export import save_pruned

    path.mkdir(parents=True, exist_ok=True)
    save_pruned(model, path, tokenizer=tokenizer)
    fmt = "artemis.save_pruned"
    from artemis.report import write_json

    write_json(path / "artemis_run.json", {**meta, "format": fmt})
    return fmt


def _load_saved(model_dir: Path, task: Optional[str]) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM

    from artemis.errors import ModelError

    if not model_dir.is_dir():
        raise ModelError(f"model folder {str(model_dir)!r} does not exist")
    if (model_dir / "artemis_export.json").is_file() or _read_meta(model_dir).get("format") == "artemis.save_pruned":
        # A compressed checkpoint: stock from_pretrained would not decompress it.
        from artemis.export import load_pruned

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


def _disk_mib(path: Path) -> float:
    exts = (".safetensors", ".bin", ".pt")
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name.endswith(exts)) / 2**20


# --------------------------------------------------------------------------- commands
def _refuse_multi_process(command: str) -> None:
    """``artemis prune``/``sweep`` run in one process; under torchrun or ``accelerate launch``
    every rank would run its own copy of the whole job and write the same output folder."""
    import os

    from artemis.errors import ConfigError

    world = os.environ.get("WORLD_SIZE", "1")
    if world.strip() not in ("", "1"):
        raise ConfigError(
            f"artemis {command} runs in a single process, but it was launched as one of WORLD_SIZE={world} "
            "processes (torchrun / accelerate launch), where every process would run the whole job and write "
            "the same output. Run it as one process (one GPU), or train with the Python API under "
            "DDP/FSDP2 (docs/distributed.md)."
        )


def run_prune(cfg: Any, output: Path, *, resume: bool = False, stop_after: Optional[int] = None,
              progress: bool = True, plots: bool = True) -> dict:
    """Run ``artemis prune`` for a validated :class:`~artemis.run_config.RunConfig`;
    return the report dict (also written to ``output``)."""
    import torch

    from artemis.data import calibration_batches
    from artemis.eval_suite import parameter_stats, size_stats
    from artemis.manager import PruningManager
    from artemis.report import write_report
    from artemis.train.loading import check_supported, load_model_and_tokenizer
    from artemis.train.loop import plan_runtime, train_with_pruning

    _refuse_multi_process("prune")
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    check_supported(cfg.model, cfg.fine_tuning.method)
    if cfg.training.steps == 0 and (cfg.model.hybrid_lora_adapter or cfg.fine_tuning.method != "full"):
        from artemis.errors import ConfigError

        needs = [n for n, on in (("model.hybrid_lora_adapter: true", cfg.model.hybrid_lora_adapter),
                                 (f"fine_tuning.method: {cfg.fine_tuning.method}", cfg.fine_tuning.method != "full")) if on]
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
            model, tok, cfg, task, train_texts=train_texts, output_dir=output, resume=resume,
            eval_fn=evaluator.quick if cfg.training.eval_every else None, stop_after=stop_after, progress=progress,
        )
        manager, history, resumed_from, plan = res.manager, res.history, res.resumed_from, res.plan
        finetune = res.finetune
        if res.stopped_early:
            timing["train"] = time.perf_counter() - t1
            return {"stopped_early": True, "step": history[-1]["step"] if history else 0,
                    "checkpoint": str(output / "checkpoint"), "timing": timing}
    else:
        manager = PruningManager(model, cfg.pruning)
        calib = None
        if manager.metric.needs_activations or manager.metric.needs_gradients or manager.needs_calibration_data:
            calib = calibration_batches(task, tok, train_texts, max_length=cfg.training.max_length,
                                        n=cfg.data.calibration_texts)
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
        merge_batches = [{k: v.to(plan.device) for k, v in b.items()}
                         for b in calibration_batches(task, tok, eval_texts, max_length=cfg.training.max_length, n=16)]
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
    fmt = _save_model(model.cpu(), tok, model_dir, {"base_model": cfg.model.base_model, "task": task,
                                                     "tokenizer": cfg.model.tokenizer})
    sizes["on_disk"] = _disk_mib(model_dir)
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
        "runtime": {k: getattr(plan, k) for k in ("device", "batch_size", "gradient_accumulation_steps",
                                                   "gradient_checkpointing", "distillation", "distillation_reason", "bf16")},
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


def _print_table(console: Any, title: str, rows: Sequence[tuple[str, str, str]], headers=("measure", "dense", "pruned")) -> None:
    from rich.table import Table

    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="right" if h != headers[0] else "left")
    for r in rows:
        table.add_row(*r)
    console.print(table)


def _report_rows(report: dict) -> list[tuple[str, str, str]]:
    q, s, lat = report["quality"], report["size_mb"], report["latency_ms"]
    rows = [
        ("sparsity (pruned layers)", "0.00%", f"{report['sparsity']:.2%}"),
        (q["metric"], f"{q['dense']:.4f}", f"{q['pruned']:.4f}"),
    ]
    if "nn_agreement" in q:
        rows.append(("nearest-neighbour agreement", "1.0000", f"{q['nn_agreement']:.4f}"))
    rows += [
        ("size, MiB (compressed accounting)", f"{s['dense']:.1f}", f"{s['compressed']:.1f}"),
        (f"latency, ms ({lat.get('device', 'cpu')})", f"{lat['dense']:.2f}", f"{lat['pruned']:.2f}"),
    ]
    if "on_disk" in s:
        rows.append(("saved on disk, MiB", "", f"{s['on_disk']:.1f}"))
    return rows


def _output_dir(args: argparse.Namespace, cfg: Any, default: str) -> Path:
    return Path(args.output or cfg.output_dir or default)


def _cmd_prune(args: argparse.Namespace) -> int:
    from rich.console import Console

    cfg = _load_config(args)
    _refuse_multi_process("prune")
    out = _output_dir(args, cfg, "artemis-output")
    out.mkdir(parents=True, exist_ok=True)
    report = run_prune(cfg, out, resume=args.resume, stop_after=args.stop_after, progress=not args.quiet, plots=not args.no_plots)
    console = Console()
    if report.get("stopped_early"):
        console.print(f"stopped after step {report['step']}; checkpoint in {report['checkpoint']} (resume with --resume)")
        return 0
    _print_table(console, f"Artemis: {report['model']} pruned ({report['task']})", _report_rows(report))
    console.print(f"model: {report['saved']['path']}   report: {out / 'report.md'}   time: {report['timing']['total']:.0f} s")
    return 0


def run_sweep(cfg: Any, sparsities: Sequence[float], threshold: Optional[float], output: Optional[Path],
              plots: bool = True) -> dict:
    """One-shot prune the model at each sparsity with :func:`artemis.analysis.sparsity_sweep`
    (statistics for activation/gradient metrics are gathered once, on the dense model; after
    each level the dense weights are restored bit for bit, so every level starts from the
    same weights and no per-level copy of the model is made), evaluate, recommend."""
    from artemis.analysis import sparsity_sweep
    from artemis.data import calibration_batches
    from artemis.metrics import METRICS
    from artemis.report import plot_sweep, write_json
    from artemis.train.loading import check_supported, load_model_and_tokenizer
    from artemis.train.loop import _resolve_device

    _refuse_multi_process("sweep")
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
        calib = calibration_batches(task, tok, train_texts, max_length=cfg.training.max_length, n=cfg.data.calibration_texts)
    swept = sparsity_sweep(model, cfg.pruning, sparsities, evaluator.measure, calibration_data=calib, progress=False)
    rows = []
    for r in swept:
        m = r["metrics"]
        rows.append({"sparsity": r["sparsity"], "measured_sparsity": r["measured_sparsity"], "quality": m["quality"],
                     "size_mb": r["model_size_mb"], "latency_ms": m["latency_ms"],
                     **({"nn_agreement": m["nn_agreement"]} if "nn_agreement" in m else {})})
    higher_better = task == "encoder"
    if threshold is None:
        threshold = cfg.evaluation.quality_threshold
    if threshold is None:
        threshold = 0.95 if higher_better else 1.1 * dense["quality"]
    ok = [r["sparsity"] for r in rows if (r["quality"] >= threshold if higher_better else r["quality"] <= threshold)]
    result = {"model": cfg.model.base_model, "task": task, "metric": evaluator.metric, "dense": dense,
              "threshold": threshold, "higher_is_better": higher_better, "rows": rows,
              "recommended_sparsity": max(ok) if ok else None, "config": cfg.to_dict()}
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        result["plots"] = plot_sweep(output, rows, evaluator.metric, threshold) if plots else []
        write_json(output / "sweep.json", result)
    return result


def _parse_sparsities(text: str) -> list[float]:
    from artemis.errors import ConfigError

    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--sparsities {text!r}: expected comma-separated numbers like 0.3,0.5,0.7") from None
    bad = [v for v in vals if not 0.0 <= v < 1.0]
    if not vals or bad:
        raise ConfigError(f"--sparsities {text!r}: every level must be in [0, 1); bad: {bad or 'none given'}")
    return sorted(set(vals))


def _cmd_sweep(args: argparse.Namespace) -> int:
    from rich.console import Console

    cfg = _load_config(args)
    levels = _parse_sparsities(args.sparsities)
    out = Path(args.output) if args.output else None
    res = run_sweep(cfg, levels, args.threshold, out, plots=not args.no_plots)
    rows = [("0 (dense)", f"{res['dense']['quality']:.4f}", "", f"{res['dense']['latency_ms']:.2f}")]
    rows += [(f"{r['sparsity']:.2f}", f"{r['quality']:.4f}", f"{r['size_mb']:.1f}", f"{r['latency_ms']:.2f}") for r in res["rows"]]
    console = Console()
    _print_table(console, f"Sweep: {res['model']} ({res['metric']})", rows, headers=("sparsity", res["metric"], "size MiB", "latency ms"))
    rec = res["recommended_sparsity"]
    cmp = ">=" if res["higher_is_better"] else "<="
    console.print(f"recommended sparsity ({res['metric']} {cmp} {res['threshold']:.4f}): "
                  + (f"{rec:.2f}" if rec is not None else "none of the levels meets the threshold"))
    return 0


def run_eval(model_dir: Path, reference: Optional[str], *, num_texts: int = 256, eval_data: Optional[str] = None,
             max_length: int = 128, device: str = "auto", output: Optional[Path] = None) -> dict:
    """Evaluate a saved model against its dense reference; return (and optionally write) a report."""
    from artemis.data import load_texts
    from artemis.errors import ConfigError
    from artemis.eval_suite import parameter_stats, size_stats
    from artemis.report import write_report
    from artemis.run_config import EvaluationSection, ModelSection
    from artemis.targets import find_targets
    from artemis.arch import get_adapter
    from artemis.train.loading import load_model_and_tokenizer
    from artemis.train.loop import _resolve_device

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
    sizes["on_disk"] = _disk_mib(model_dir)
    quality = {"metric": evaluator.metric, "dense": dense["quality"], "pruned": pruned["quality"]}
    for k in ("nn_agreement", "cosine_min"):
        if k in pruned:
            quality[k] = pruned[k]
    report = {"model": str(model_dir), "reference": ref, "task": task,
              "sparsity": parameter_stats(model, prunable)["sparsity"], "quality": quality, "size_mb": sizes,
              "latency_ms": {"dense": dense["latency_ms"], "pruned": pruned["latency_ms"], "device": str(dev)},
              "parameters": parameter_stats(model)}
    if output is not None:
        write_report(output, report, plots=False)
    return report


def _cmd_eval(args: argparse.Namespace) -> int:
    from rich.console import Console

    report = run_eval(Path(args.model_dir), args.reference, num_texts=args.eval_texts, eval_data=args.eval_data,
                      max_length=args.max_length, device=args.device, output=Path(args.output) if args.output else None)
    _print_table(Console(), f"Artemis eval: {report['model']} vs {report['reference']}", _report_rows(report))
    return 0


def run_export(model_dir: Path, output: Path, quantize: Optional[str] = None) -> str:
    """Load ``model_dir`` and write it with ``artemis.save_pruned`` (compressed)."""
    from transformers import AutoTokenizer

    from artemis.errors import ConfigError

    try:
        from artemis.export import save_pruned  # issue 4
    except ImportError:
        raise ConfigError("artemis export needs the compressed exporter (artemis.export), which this build lacks") from None
    meta = _read_meta(model_dir)
    model = _load_saved(model_dir, meta.get("task"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    output.mkdir(parents=True, exist_ok=True)
    import inspect

    params = inspect.signature(save_pruned).parameters
    kw: dict[str, Any] = {}
    if quantize:
        kw["quantize"] = quantize
    if "tokenizer" in params:
        kw["tokenizer"] = tok
    save_pruned(model, output, **kw)
    if "tokenizer" not in params:
        tok.save_pretrained(output)
    from artemis.report import write_json

    write_json(output / "artemis_run.json", {**meta, "format": "artemis.save_pruned", "quantize": quantize})
    return str(output)


def _cmd_export(args: argparse.Namespace) -> int:
    path = run_export(Path(args.model_dir), Path(args.output), args.quantize)
    print(f"exported to {path} ({_disk_mib(Path(path)):.1f} MiB of weights)")
    return 0


# --------------------------------------------------------------------------- entry point
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``artemis`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not args.debug else logging.DEBUG)
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pydantic import ValidationError

    from artemis.errors import ArtemisError

    try:
        return int(args.func(args) or 0)
    except (ArtemisError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        if args.debug:
            raise
        msg = " ".join(str(exc).split())
        print(f"artemis: error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ValidationError as exc:  # a typed value built from a command-line flag
        if args.debug:
            raise
        from artemis.config import format_validation_error

        print(f"artemis: error: {format_validation_error(exc, args.command)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("artemis: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
