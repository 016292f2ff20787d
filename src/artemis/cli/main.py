"""The ``artemis`` command line: the argument parser and the entry point.

The work of each subcommand is in :mod:`artemis.cli.workflows`.

Subcommands (``artemis SUBCOMMAND --help`` for every option):

* ``artemis prune [CONFIG.yaml] [--output DIR] [overrides]`` — load the model, train
  with progressive pruning (and distillation), evaluate dense vs pruned, save the
  pruned model and write ``report.md``/``report.json``/plots. With no config: the
  embedded default (the real all-MiniLM-L6-v2 to 60% unstructured sparsity). With
  ``--steps 0 --max-memory SIZE`` (or ``efficiency.low_resource_mode``) the model is
  streamed block by block and never loaded whole.
* ``artemis sweep [CONFIG] --sparsities 0.3,0.5,0.7,0.9`` — one-shot pruning at each
  level, evaluation, a table, a plot and the recommended sparsity for a threshold.
* ``artemis eval MODEL_DIR`` — evaluate a saved pruned model against its dense base.
* ``artemis export MODEL_DIR --output DIR [--format compressed|dense]`` — re-export a
  saved model (compressed or dense, optionally int8).

``artemis prune`` also runs under ``torchrun --nproc_per_node N -m artemis.cli prune ...``
and ``accelerate launch``: every rank runs the same job, rank 0 writes the output.

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
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from artemis.cli import workflows

__all__ = ["main", "build_parser", "memory_line", "OVERRIDES", "EXIT_USER_ERROR", "LOADERS_HINT"]

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
    g.add_argument(
        "--distill",
        dest="distill",
        action="store_true",
        default=None,
        help="force distillation on [distillation.enabled]",
    )
    g.add_argument("--no-distill", dest="distill", action="store_false", help="turn distillation off")
    g.add_argument(
        "--low-resource", action="store_true", default=None, help="low_resource_mode [efficiency.low_resource_mode]"
    )
    g.add_argument(
        "--set",
        dest="set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, dotted (training.weight_decay=0.01); VALUE is parsed as YAML; repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``artemis`` argument parser (every subcommand has ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="artemis",
        description="Prune transformer models: progressive pruning with distillation, evaluation and compressed export.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "prune",
        help="train with progressive pruning, evaluate, save and report",
        description="Prune a model as CONFIG says (no CONFIG: the embedded default, all-MiniLM-L6-v2 to 60%).",
    )
    p.add_argument("config", nargs="?", help="YAML run config (default: the embedded MiniLM run)")
    p.add_argument("-o", "--output", help="output folder (default: config output_dir, else ./artemis-output)")
    p.add_argument("--resume", action="store_true", help="resume from OUTPUT/checkpoint if it exists")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="stop after N steps with a checkpoint (resume later with --resume)",
    )
    p.add_argument("--no-plots", action="store_true", help="do not draw plots")
    _add_overrides(p)
    p.add_argument(
        "--max-memory",
        dest="max_memory",
        default=None,
        metavar="SIZE",
        help="with --steps 0: stream the model block by block from its safetensors folder, never loading it "
        "whole; SIZE (8GiB, 512MB, bytes) bounds the parameters resident [efficiency.max_memory]",
    )
    _add_common(p)
    p.set_defaults(func=_cmd_prune)

    s = sub.add_parser(
        "sweep",
        help="one-shot pruning at several sparsities: quality and size table",
        description="One-shot prune a copy of the model at each sparsity, evaluate, recommend a level.",
    )
    s.add_argument("config", nargs="?", help="YAML run config (default: the embedded MiniLM run)")
    s.add_argument("--sparsities", default="0.3,0.5,0.7,0.9", help="comma-separated levels (default: %(default)s)")
    s.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="quality threshold for the recommendation (default: evaluation.quality_threshold, else "
        "cosine 0.95 for encoders, 1.1 x dense perplexity for causal LMs)",
    )
    s.add_argument("-o", "--output", help="output folder for sweep.json/sweep.md/sweep.png")
    s.add_argument("--no-plots", action="store_true")
    _add_overrides(s)
    _add_common(s)
    s.set_defaults(func=_cmd_sweep)

    e = sub.add_parser(
        "eval",
        help="evaluate a saved pruned model against its dense base",
        description="Evaluate MODEL_DIR (written by artemis prune) against the dense reference model.",
    )
    e.add_argument("model_dir", help="folder written by `artemis prune` (OUTPUT/model)")
    e.add_argument("--reference", help="dense reference model (default: the base model recorded in MODEL_DIR)")
    e.add_argument("--eval-texts", type=int, default=256, help="held-out texts/blocks (default: %(default)s)")
    e.add_argument("--eval-data", default=None, help="held-out text source (default: the built-in corpus, test split)")
    e.add_argument("--max-length", type=int, default=128, help="tokens per text/block (default: %(default)s)")
    e.add_argument("--device", default="auto")
    e.add_argument("-o", "--output", help="write report.json/report.md here")
    _add_common(e)
    e.set_defaults(func=_cmd_eval)

    x = sub.add_parser(
        "export",
        help="re-export a saved model (compressed or dense, optionally int8)",
        description="Load MODEL_DIR and write it again with artemis.save_pruned.",
    )
    x.add_argument("model_dir")
    x.add_argument("-o", "--output", required=True, help="destination folder")
    x.add_argument("--quantize", choices=["int8"], default=None, help="store int8 values")
    x.add_argument(
        "--format",
        dest="export_format",
        choices=list(workflows.EXPORT_FORMATS),
        default="compressed",
        help="compressed: sparse bitmask, read by artemis.load_pruned (or AutoModel.from_pretrained after "
        "`import artemis`); dense: stock safetensors for any loader, vLLM included (default: %(default)s)",
    )
    _add_common(x)
    x.set_defaults(func=_cmd_export)
    return parser


def _version() -> str:
    from artemis import __version__

    return __version__


# --------------------------------------------------------------------------- config
def _collect_overrides(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    from artemis.core.config import load_yaml
    from artemis.core.errors import ConfigError

    out: dict[str, Any] = {}
    for flag, (key, _, _) in OVERRIDES.items():
        v = getattr(args, flag[2:].replace("-", "_"), None)
        if v is not None:
            out[key] = v
    if getattr(args, "distill", None) is not None:
        out["distillation.enabled"] = args.distill
    if getattr(args, "low_resource", None):
        out["efficiency.low_resource_mode"] = True
    if getattr(args, "max_memory", None) is not None:
        out["efficiency.max_memory"] = args.max_memory
    for item in getattr(args, "set", []) or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. training.weight_decay=0.01")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = load_yaml(v)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: VALUE is not valid YAML ({exc})") from None
    return out


def _load_config(args: argparse.Namespace):
    from artemis.train.run_config import EMBEDDED_DEFAULT, apply_overrides, load_run_config

    overrides = _collect_overrides(args)
    if args.config:
        cfg = load_run_config(args.config)
    else:
        default = copy.deepcopy(EMBEDDED_DEFAULT)
        method = overrides.get("pruning.method", default["pruning"]["method"])
        if method != default["pruning"]["method"] and "pruning.scope" not in overrides:
            # the default's `scope: row` is tuned for its own method; another method (structured
            # ones refuse any scope) starts from that method's default scope unless --scope says otherwise
            default["pruning"].pop("scope", None)
        if overrides.get("pruning.pattern") is not None:
            # an N:M pattern fixes the sparsity and chooses within each group: the default's
            # 60% and `scope: row` give way unless the command line sets them too
            for key in ("scope", "final_sparsity"):
                if f"pruning.{key}" not in overrides:
                    default["pruning"].pop(key, None)
        cfg = load_run_config(default)
    return apply_overrides(cfg, overrides) if overrides else cfg


def _print_table(
    console: Any, title: str, rows: Sequence[tuple[str, str, str]], headers=("measure", "dense", "pruned")
) -> None:
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
    if lat.get("dense") is None:  # a streamed run: no latency (it needs the whole model in memory)
        rows.append(("size, MiB (compressed accounting)", f"{s['dense']:.1f}", f"{s['compressed']:.1f}"))
        rows.append(("latency, ms (not measured: streamed)", "—", "—"))
        if "on_disk" in s:
            rows.append(("saved on disk, MiB", "", f"{s['on_disk']:.1f}"))
        return rows
    how = ""
    m = lat.get("method")
    if m:
        how = f", {m['rounds']}{' interleaved' if m.get('interleaved') else ''} rounds, {m['threads']} thr"
    spread = lat.get("spread") or {}
    rows += [
        ("size, MiB (compressed accounting)", f"{s['dense']:.1f}", f"{s['compressed']:.1f}"),
        (
            f"latency, ms ({lat.get('device', 'cpu')}{how})",
            f"{lat['dense']:.2f}" + (f" ±{spread['dense']:.0%}" if "dense" in spread else ""),
            f"{lat['pruned']:.2f}" + (f" ±{spread['pruned']:.0%}" if "pruned" in spread else ""),
        ),
    ]
    if "on_disk" in s:
        rows.append(("saved on disk, MiB", "", f"{s['on_disk']:.1f}"))
    return rows


def _output_dir(args: argparse.Namespace, cfg: Any, default: str) -> Path:
    return Path(args.output or cfg.output_dir or default)


#: printed at the end of ``artemis prune``: which loaders read the saved folder
LOADERS_HINT = (
    "load with artemis.load_pruned(path), or AutoModel.from_pretrained(path) after `import artemis`; "
    "for vLLM or other stock loaders use `artemis export {path} --format dense -o DIR`"
)


def _disable_hf_progress_bars() -> None:
    """Turn off transformers' and huggingface_hub's progress bars without importing
    transformers when it is not loaded yet (its import costs seconds; an early error
    should not wait for it): the environment variable both read when imported."""
    if "transformers.utils.logging" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    elif "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    else:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def memory_line(report: dict) -> str:
    """The peak-memory line ``artemis prune`` prints under its table.

    Example:
        >>> print(memory_line({"memory": {"peak_rss": 812.4, "peak_parameters": 90.0, "whole_model_parameters": 540.0},
        ...                    "streaming": {"max_resident_blocks": 1}}))
        peak memory: 812 MiB resident (process); parameters resident at most 90.0 MiB of the whole model's 540.0 MiB
        (streamed, 1 block at a time)
    """
    mem = report.get("memory") or {}
    text = f"peak memory: {mem.get('peak_rss', 0.0):.0f} MiB resident (process)"
    if "peak_parameters" in mem:
        blocks = (report.get("streaming") or {}).get("max_resident_blocks")
        text += (
            f"; parameters resident at most {mem['peak_parameters']:.1f} MiB of the whole model's "
            f"{mem.get('whole_model_parameters', 0.0):.1f} MiB (streamed, {blocks} block at a time)"
        )
    elif "whole_model_parameters" in mem:
        text += f"; the whole model's parameters: {mem['whole_model_parameters']:.1f} MiB"
    return text


def _cmd_prune(args: argparse.Namespace) -> int:
    import contextlib

    from rich.console import Console

    if args.output:  # before the config is read (which imports torch): a bad path fails at once
        workflows.check_output_writable(Path(args.output))
    cfg = _load_config(args)
    out = _output_dir(args, cfg, "artemis-output")
    workflows.check_output_writable(out)  # before the model loads: fail in a second, not after training
    progress = not args.quiet
    with workflows.distributed_run(cfg.training.device) as (rank, _world):
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        # not a terminal (CI, a log file): occasional plain lines instead of a carriage-return bar
        lines = workflows.line_progress() if progress and not _stderr_is_tty() else contextlib.nullcontext()
        with lines:
            report = workflows.run_prune(
                cfg, out, resume=args.resume, stop_after=args.stop_after, progress=progress, plots=not args.no_plots
            )
    if report.get("follower"):  # another rank of a torchrun / accelerate launch job; rank 0 reports
        return 0
    console = Console()
    if report.get("stopped_early"):
        console.print(
            f"stopped after step {report['step']}; checkpoint in {report['checkpoint']} (resume with --resume)"
        )
        return 0
    _print_table(console, f"Artemis: {report['model']} pruned ({report['task']})", _report_rows(report))
    console.print(
        f"model: {report['saved']['path']}   report: {out / 'report.md'}   time: {report['timing']['total']:.0f} s"
    )
    console.print(memory_line(report), highlight=False)
    console.print(LOADERS_HINT.format(path=report["saved"]["path"]), highlight=False, soft_wrap=True)
    return 0


def _parse_sparsities(text: str) -> list[float]:
    from artemis.core.errors import ConfigError

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

    out = Path(args.output) if args.output else None
    if out is not None:  # before the config is read (which imports torch)
        workflows.check_output_writable(out)
    cfg = _load_config(args)
    levels = _parse_sparsities(args.sparsities)
    res = workflows.run_sweep(cfg, levels, args.threshold, out, plots=not args.no_plots)
    rows = [("0 (dense)", f"{res['dense']['quality']:.4f}", "", f"{res['dense']['latency_ms']:.2f}")]
    rows += [
        (f"{r['sparsity']:.2f}", f"{r['quality']:.4f}", f"{r['size_mb']:.1f}", f"{r['latency_ms']:.2f}")
        for r in res["rows"]
    ]
    console = Console()
    _print_table(
        console,
        f"Sweep: {res['model']} ({res['metric']})",
        rows,
        headers=("sparsity", res["metric"], "size MiB", "latency ms"),
    )
    rec = res["recommended_sparsity"]
    cmp = ">=" if res["higher_is_better"] else "<="
    console.print(
        f"recommended sparsity ({res['metric']} {cmp} {res['threshold']:.4f}): "
        + (f"{rec:.2f}" if rec is not None else "none of the levels meets the threshold")
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from rich.console import Console

    if args.output:
        workflows.check_output_writable(Path(args.output))
    report = workflows.run_eval(
        Path(args.model_dir),
        args.reference,
        num_texts=args.eval_texts,
        eval_data=args.eval_data,
        max_length=args.max_length,
        device=args.device,
        output=Path(args.output) if args.output else None,
    )
    _print_table(Console(), f"Artemis eval: {report['model']} vs {report['reference']}", _report_rows(report))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    workflows.check_output_writable(Path(args.output))  # before anything is imported or loaded
    path = workflows.run_export(Path(args.model_dir), Path(args.output), args.quantize, args.export_format)
    print(f"exported to {path} ({workflows.disk_mib(Path(path)):.1f} MiB of weights)")
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
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.quiet or not _stderr_is_tty() or os.environ.get("RANK", "0") not in ("", "0"):
        # transformers' "Loading weights" bars: not under -q, not into a log file, not from every rank
        _disable_hf_progress_bars()
    from pydantic import ValidationError

    from artemis.core.errors import ArtemisError

    try:
        return int(args.func(args) or 0)
    except (ArtemisError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        if args.debug:
            raise
        msg = " ".join(str(exc).split())
        print(f"artemis: error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ValidationError as exc:  # a typed value built from a command-line flag
        if args.debug:
            raise
        from artemis.core.config import format_validation_error

        print(f"artemis: error: {format_validation_error(exc, args.command)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("artemis: interrupted", file=sys.stderr)
        return 130
