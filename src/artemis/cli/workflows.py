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

import contextlib
import dataclasses
import json
import logging
import os
import resource
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

__all__ = [
    "run_prune",
    "streams",
    "run_sweep",
    "run_eval",
    "run_export",
    "disk_mib",
    "check_output_writable",
    "distributed_run",
    "line_progress",
    "EXPORT_FORMATS",
]

#: ``artemis export --format`` values: ``compressed`` (sparse bitmask, read by
#: ``artemis.load_pruned``) and ``dense`` (stock safetensors any loader reads, vLLM included).
EXPORT_FORMATS = ("compressed", "dense")

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

    def single_latency(self, model: Any) -> float:
        """Warm, several-round forward latency of one model (warm, see :func:`forward_latency_ms`)."""
        from artemis.evaluation.quality import forward_latency_ms

        ev = self.ev
        return forward_latency_ms(
            model, self.latency_batch, repeats=ev.latency_repeats, warmup=ev.latency_warmup, rounds=ev.latency_rounds
        )

    def latency(self, dense_model: Any, pruned_model: Any) -> dict:
        """Dense and pruned latency measured fairly: warm, in interleaved rounds
        (:func:`artemis.evaluation.quality.compare_latency_ms`)."""
        from artemis.evaluation.quality import compare_latency_ms, model_device

        ev = self.ev
        res = compare_latency_ms(
            {"dense": dense_model, "pruned": pruned_model},
            self.latency_batch,
            repeats=ev.latency_repeats,
            warmup=ev.latency_warmup,
            rounds=ev.latency_rounds,
        )
        res["device"] = str(model_device(pruned_model))
        res["batch"] = {k: list(v.shape) for k, v in self.latency_batch.items() if hasattr(v, "shape")}
        return res

    def measure_dense(self, model: Any, *, latency: bool = False) -> dict:
        from artemis.evaluation.quality import encode_sentences, perplexity

        out: dict[str, Any] = {}
        if latency:
            out["latency_ms"] = self.single_latency(model)
        if self.task == "encoder":
            self.dense_emb = encode_sentences(model, self.tokenizer, self.texts, max_length=self.max_length)
            self.dense_quick = self.dense_emb[: len(self.quick_texts)]
            out["quality"] = 1.0
        else:
            out["quality"] = perplexity(model, self.blocks)
        return out

    def measure(self, model: Any, *, latency: bool = False) -> dict:
        from artemis.evaluation.quality import embedding_fidelity, encode_sentences, perplexity

        out: dict[str, Any] = {}
        if latency:
            out["latency_ms"] = self.single_latency(model)
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


#: temporary files the command line itself writes (each written, then renamed into place);
#: one left behind by a killed run is removed before the next write.
_CLI_TEMP_FILES = ("artemis_run.json.tmp", "report.json.tmp", "report.md.tmp")


def _remove_stale_temp_files(folder: Path) -> None:
    for name in _CLI_TEMP_FILES:
        p = folder / name
        if p.is_file():
            logger.info("removing %s, left by an interrupted run", p)
            p.unlink(missing_ok=True)


def _save_pruned_kwargs(export_format: str) -> dict[str, Any]:
    """``format=`` for :func:`artemis.save_pruned`, checked before anything is loaded."""
    from artemis.core.errors import ConfigError

    if export_format not in EXPORT_FORMATS:
        raise ConfigError(f"--format {export_format!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    return {"format": export_format}


def _save_model(model: Any, tokenizer: Any, path: Path, meta: dict, *, export_format: str = "compressed") -> str:
    """Save with :func:`artemis.sparse.checkpoint.save_pruned` (sparse weights compressed, the
    tokenizer alongside), then ``artemis_run.json`` (written to a temporary file and renamed;
    a temporary file left by a killed run is removed first). Returns the format written."""
    from artemis.evaluation.report import write_json
    from artemis.sparse.checkpoint import save_pruned

    kwargs = _save_pruned_kwargs(export_format)
    path.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(path)
    save_pruned(model, path, tokenizer=tokenizer, **kwargs)
    fmt = "artemis.save_pruned" if export_format == "compressed" else f"artemis.save_pruned:{export_format}"
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
    from artemis.core.errors import ModelError

    p = model_dir / "artemis_run.json"
    if not p.is_file():
        return {}
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(
            f"{str(p)!r} is corrupt (not valid JSON: {exc}); restore it, or delete it and pass --reference MODEL"
        ) from None
    if not isinstance(meta, dict):
        raise ModelError(f"{str(p)!r} is corrupt: expected a JSON object, found {type(meta).__name__}")
    return meta


def disk_mib(path: Path) -> float:
    exts = (".safetensors", ".bin", ".pt")
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name.endswith(exts)) / 2**20


# --------------------------------------------------------------------------- output folder
def check_output_writable(path: Path, option: str = "--output") -> None:
    """Fail at once, before any model is loaded, when ``path`` cannot become an output folder:
    it is a file, a parent is a file, or the folder (else its nearest existing parent) is not
    writable. Writability is tested by creating and removing a probe file there.

    Raises:
        ConfigError: one line naming the path and what is wrong.
    """
    from artemis.core.errors import ConfigError

    p = Path(path)
    try:
        if p.is_symlink() and not p.exists():
            raise ConfigError(
                f"{option} {str(p)!r} is a symbolic link to {os.readlink(p)!r}, which does not exist; "
                "remove the link or choose another folder"
            )
        if p.exists() and not p.is_dir():
            raise ConfigError(f"{option} {str(p)!r} is a file, not a folder; choose a folder path")
        probe_dir = p
        while not probe_dir.exists() and probe_dir.parent != probe_dir:
            probe_dir = probe_dir.parent
        if not probe_dir.is_dir():
            raise ConfigError(
                f"{option} {str(p)!r}: {str(probe_dir)!r} is a file, so the folder cannot be created inside it"
            )
    except OSError as exc:
        raise ConfigError(f"{option} {str(p)!r} cannot be inspected ({exc.strerror or exc})") from None
    # host, process and a random part: ranks of a multi-node run may share this folder
    probe = probe_dir / f".artemis-write-probe-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = "it" if probe_dir == p else f"its nearest existing parent {str(probe_dir)!r}"
        raise ConfigError(
            f"{option} {str(p)!r} is not writable: cannot create a file in {where} ({exc.strerror or exc})"
        ) from None


# --------------------------------------------------------------------------- progress
@contextlib.contextmanager
def line_progress(every_s: float = 10.0, stream: Any = None) -> Iterator[None]:
    """Inside the block, progress bars made with ``tqdm.auto.tqdm`` print an occasional
    plain line (every tenth of the run or every ``every_s`` seconds, and at the end) instead
    of a carriage-return animation: for output that is not a terminal (CI, a log file)."""
    import tqdm.auto as tqdm_auto

    base = tqdm_auto.tqdm
    out = stream if stream is not None else sys.stderr

    class _LineBar(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._wanted = not kwargs.get("disable", False)
            kwargs["disable"] = True  # every tqdm method becomes a no-op; we print lines ourselves
            super().__init__(*args, **kwargs)
            self._desc = kwargs.get("desc") or ""
            self._unit = kwargs.get("unit") or "it"
            self._t0 = self._last_t = time.monotonic()
            self._start = self._last_n = self.n
            self._post = ""
            self._pending = False
            tot = self.total or 0
            self._every_n = max(1, int(tot) // 10) if tot else 0

        def update(self, n: float = 1) -> Optional[bool]:
            if self._pending:  # the previous step's line, had no set_postfix() followed it
                self._line(time.monotonic())
            self.n += n
            now = time.monotonic()
            due = (self._every_n and self.n - self._last_n >= self._every_n) or now - self._last_t >= every_s
            self._pending = bool(self._wanted and due and self.n != self.total)
            return None

        def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
            items = dict(ordered_dict or {}, **kwargs)
            self._post = ", ".join(f"{k} {v}" for k, v in items.items())
            if self._pending:  # print the line once it carries this step's figures (loss, sparsity)
                self._line(time.monotonic())

        def _line(self, now: float) -> None:
            self._pending = False
            self._last_t, self._last_n = now, self.n
            done = self.n - self._start
            elapsed = now - self._t0
            tot = self.total
            parts = [f"{self._desc}: {self._unit} {self.n:g}" + (f"/{tot:g} ({self.n / tot:.0%})" if tot else "")]
            if self._post:
                parts.append(self._post)
            parts.append(f"{elapsed:.0f} s")
            if tot and done > 0:
                parts.append(f"about {elapsed / done * (tot - self.n):.0f} s left")
            print(", ".join(parts), file=out, flush=True)

        def close(self) -> None:
            if self._wanted and self.n != self._last_n:
                self._line(time.monotonic())
            self._wanted = False
            super().close()

    tqdm_auto.tqdm = _LineBar
    try:
        yield
    finally:
        tqdm_auto.tqdm = base


# --------------------------------------------------------------------------- several processes
def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1").strip() or 1)
    except ValueError:
        return 1


def refuse_multi_process(command: str) -> None:
    """``artemis sweep`` runs in one process; under torchrun or ``accelerate launch`` every
    rank would run the same sweep and write the same output."""
    from artemis.core.errors import ConfigError

    world = os.environ.get("WORLD_SIZE", "1")
    if _env_world_size() > 1:
        raise ConfigError(
            f"artemis {command} runs in a single process, but it was launched as one of WORLD_SIZE={world} "
            "processes (torchrun / accelerate launch), where every process would run the whole job and write "
            "the same output. Run it as one process (`artemis prune` does run under torchrun)."
        )


@contextlib.contextmanager
def distributed_run(device: str = "auto") -> Iterator[tuple[int, int]]:
    """Join the process group that ``torchrun`` / ``accelerate launch`` describe in the
    environment (``WORLD_SIZE`` > 1): ``gloo`` on CPU, ``nccl`` when the run uses CUDA (each
    rank on the GPU of its ``LOCAL_RANK``). Yields ``(rank, world_size)`` and leaves the group
    afterwards; in one process it yields ``(0, 1)`` and does nothing.

    Raises:
        ConfigError: ``WORLD_SIZE`` > 1 without the other variables a launcher sets.
    """
    world = _env_world_size()
    if world <= 1:
        yield 0, 1
        return
    import torch
    import torch.distributed as dist

    from artemis.core.errors import ConfigError

    created = False
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise ConfigError(
                f"WORLD_SIZE={world} is set but {', '.join(missing)} is not: start several processes with "
                "`torchrun --nproc_per_node N -m artemis.cli prune ...` or `accelerate launch`, or unset WORLD_SIZE"
            )
        use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
        created = True
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        if created:
            dist.destroy_process_group()


def _rank_world() -> tuple[int, int]:
    from artemis.core.distributed import rank, world_size

    r, w = rank(), world_size()
    if w == 1 and _env_world_size() > 1:
        from artemis.core.errors import ConfigError

        raise ConfigError(
            f"WORLD_SIZE={_env_world_size()} but no process group is initialised: "
            "call run_prune inside artemis.cli.workflows.distributed_run()"
        )
    return r, w


def _state_digest(model: Any) -> str:
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_ranks_agree(model: Any) -> str:
    """Every rank's final weights (masks folded in) are bit for bit those of rank 0."""
    import torch.distributed as dist

    from artemis.core.errors import PruningStateError

    digest = _state_digest(model)
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        bad = [i for i, d in enumerate(digests) if d != digests[0]]
        raise PruningStateError(f"the pruned weights of rank(s) {bad} differ from rank 0's")
    return digest


# --------------------------------------------------------------------------- streaming
def streams(cfg: Any) -> bool:
    """Whether ``artemis prune`` streams the model block by block instead of loading it:
    ``efficiency.max_memory`` is set, or ``efficiency.low_resource_mode`` is on with
    ``training.steps: 0``.

    Example:
        >>> from artemis.train.run_config import load_run_config
        >>> streams(load_run_config({"efficiency": {"low_resource_mode": True}, "training": {"steps": 0}}))
        True
        >>> streams(load_run_config({"efficiency": {"low_resource_mode": True}, "training": {"steps": 5}}))
        False
    """
    eff = cfg.efficiency
    return eff.max_memory is not None or (eff.low_resource_mode and cfg.training.steps == 0)


def _streaming_setting(cfg: Any) -> str:
    if cfg.efficiency.max_memory is not None:
        return f"efficiency.max_memory {cfg.efficiency.max_memory!r} (--max-memory)"
    return "efficiency.low_resource_mode: true with training.steps: 0"


def _check_streamable(cfg: Any, world: int) -> None:
    """Refuse, naming the setting, what the streamed prune cannot do (before any work)."""
    from artemis.core.errors import ConfigError
    from artemis.data.pipeline import unsupported_setting

    setting = _streaming_setting(cfg)
    if cfg.training.steps > 0:
        raise ConfigError(
            f"{setting} streams a one-shot prune (training.steps: 0), but training.steps is {cfg.training.steps}: "
            "training needs the whole model in memory. Set training.steps: 0 (--steps 0), or remove "
            "efficiency.max_memory to train (efficiency.low_resource_mode: true saves memory while training)"
        )
    if world > 1:
        raise ConfigError(
            f"{setting} streams the model in one process, but this is one of WORLD_SIZE={world} processes; "
            "run it as one process"
        )
    reason = unsupported_setting(cfg.pruning)
    if reason is not None:
        raise ConfigError(
            f"{setting} prunes through the block-by-block pipeline, which cannot run this pruning config: {reason}. "
            "Remove efficiency.max_memory (and low_resource_mode) to prune the whole model in memory"
        )
    if cfg.model.dtype != "auto":
        raise ConfigError(
            f"{setting}: model.dtype {cfg.model.dtype!r} is not applied when streaming (each tensor is read in "
            "the dtype it is stored in); set model.dtype: auto"
        )
    if cfg.model.trust_remote_code:
        raise ConfigError(
            f"{setting}: model.trust_remote_code: true is not supported when streaming (the model is built from "
            "a transformers class named in config.json); remove one of the two"
        )


def stream_folder(base_model: str, setting: str = "efficiency.max_memory") -> Path:
    """The local folder whose safetensors weights a streamed prune reads: ``base_model`` as a
    folder, or a Hub id resolved to its local snapshot (the cache; downloaded when online).

    Raises:
        ModelError: no such folder or snapshot, or weights that are not safetensors (the
            message names ``setting`` and what would work).

    Example:
        >>> import tempfile
        >>> stream_folder(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        artemis.core.errors.ModelError: efficiency.max_memory streams the weights from safetensors files (model.safetensors or model.safetensors.index.json), and ... holds none...
    """
    from artemis.core.errors import ModelError
    from artemis.train.loading import _missing_source, resolve_model_path

    path = resolve_model_path(base_model)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        parts = path.split("/")
        hub_like = len(parts) <= 2 and all(parts) and not path.startswith((".", "~", "/"))
        if not hub_like:
            raise ModelError(f"model.base_model {base_model!r}: {_missing_source(path)}")
        try:
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.py"])
            )
        except Exception as exc:
            raise ModelError(
                f"model.base_model {base_model!r}: {setting} streams the model from a local folder, and the Hub "
                f"snapshot cannot be found or fetched ({type(exc).__name__}); download it first "
                f"(huggingface-cli download {path}) or pass its folder"
            ) from None
    if not ((folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()):
        found = sorted(p.name for p in folder.glob("*.bin")) or sorted(p.name for p in folder.glob("*.pt"))
        holds = f"holds {', '.join(found[:3])}" if found else "holds none"
        raise ModelError(
            f"{setting} streams the weights from safetensors files (model.safetensors or "
            f"model.safetensors.index.json), and {str(folder)!r} {holds}; save the model with "
            "save_pretrained(folder) (safetensors by default), or remove the setting to load the model whole"
        )
    return folder


def _load_tokenizer(section: Any, folder: Path) -> Any:
    from transformers import AutoTokenizer

    from artemis.core.errors import ModelError
    from artemis.train.loading import _first_line, resolve_model_path

    tok_path = resolve_model_path(section.tokenizer) if section.tokenizer else str(folder)
    try:
        tok = AutoTokenizer.from_pretrained(tok_path)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"model.tokenizer {tok_path!r}: cannot load the tokenizer ({_first_line(exc)})") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(f"tokenizer {tok_path!r} has neither a pad nor an eos token; add a pad token")
        tok.pad_token = tok.eos_token
    return tok


def _check_evaluation_budget(model: Any, budget: int, whole: int) -> None:
    """Stop before any weight is read when the streamed evaluations cannot keep to ``budget``:
    they hold the parameters outside the blocks (embeddings, head) and one block together
    (the prune alone needs less: ``oneshot`` checks its own bound)."""
    from artemis.arch import get_adapter
    from artemis.core.errors import ConfigError
    from artemis.core.sizing import MIB
    from artemis.data.pipeline import streaming_bytes

    blocks = get_adapter(model).blocks
    if blocks is None or len(blocks) == 0:
        return  # oneshot names the problem
    outer, largest, _ = streaming_bytes(model, blocks)
    if outer + largest > budget:
        raise ConfigError(
            f"max_memory {budget!r} ({budget / MIB:.1f} MiB) is below what streaming needs: the parameters outside "
            f"the blocks plus the largest block take {(outer + largest) / MIB:.1f} MiB (the streamed evaluations hold "
            f"both; the whole model {whole / MIB:.1f} MiB); raise efficiency.max_memory (--max-memory)"
        )


def _streamed_measure(evaluator: _Evaluator, folder: Path, device: str, *, dense: bool) -> tuple[dict, Any]:
    """The evaluator's figures for the folder, streamed block by block (same arithmetic as
    :meth:`_Evaluator.measure_dense` / :meth:`_Evaluator.measure`)."""
    from artemis.evaluation.quality import embedding_fidelity
    from artemis.evaluation.streamed import StreamedModel

    out: dict[str, Any] = {}
    with StreamedModel(folder, device=device) as sm:
        if evaluator.task == "encoder":
            emb = sm.sentence_embeddings(evaluator.tokenizer, evaluator.texts, max_length=evaluator.max_length)
            if dense:
                evaluator.dense_emb = emb
                out["quality"] = 1.0
            else:
                fid = embedding_fidelity(evaluator.dense_emb, emb)
                out.update(quality=fid["cosine_mean"], nn_agreement=fid["nn_agreement"], cosine_min=fid["cosine_min"])
        else:
            name = type(sm.model).__name__
            if not name.endswith(("ForCausalLM", "LMHeadModel")):
                from artemis.core.errors import ModelError

                raise ModelError(
                    f"{str(folder)!r}: config.json names {name}, which has no language-model head; streamed "
                    "perplexity needs a *ForCausalLM folder (set model.task: encoder for an encoder)"
                )
            out["quality"] = sm.perplexity(evaluator.blocks)
    return out, sm


def _run_prune_streamed(cfg: Any, output: Path, *, world: int, progress: bool, plots: bool) -> dict:
    """``artemis prune --steps 0`` without loading the model: the dense evaluation, the
    one-shot prune (:func:`artemis.oneshot` with ``max_memory``) and the pruned evaluation
    each stream the checkpoint block by block; the report states the peak memory."""
    from transformers import AutoConfig

    from artemis.core.sizing import MIB, model_dense_bytes
    from artemis.data.corpus import calibration_batches
    from artemis.data.pipeline import oneshot, parse_memory_size
    from artemis.evaluation.report import write_json, write_report
    from artemis.metrics import METRICS
    from artemis.sparse.streaming import LazyCheckpoint
    from artemis.train.loading import detect_task
    from artemis.train.loop import plan_runtime

    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    _check_streamable(cfg, world)
    setting = _streaming_setting(cfg)
    folder = stream_folder(cfg.model.base_model, setting.split(" ")[0])
    task = detect_task(AutoConfig.from_pretrained(str(folder)), cfg.model.task)
    tok = _load_tokenizer(cfg.model, folder)
    shell = LazyCheckpoint(folder)  # the model on meta: shapes and bytes, no weights
    plan = plan_runtime(cfg, shell.model, task)
    whole = model_dense_bytes(shell.model)
    shell.close()
    budget = parse_memory_size(cfg.efficiency.max_memory) if cfg.efficiency.max_memory is not None else whole
    _check_evaluation_budget(shell.model, budget, whole)
    train_texts, eval_texts = _texts(cfg)
    evaluator = _Evaluator(task, tok, eval_texts, cfg.evaluation, cfg.training.max_length)
    dense, dense_sm = _streamed_measure(evaluator, folder, plan.device, dense=True)
    timing["load_and_dense_eval"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    calib = None
    metric_cls = METRICS.get(cfg.pruning.importance_metric)
    if metric_cls.needs_activations or metric_cls.needs_gradients or cfg.pruning.needs_calibration_batches:
        calib = calibration_batches(
            task, tok, train_texts, max_length=cfg.training.max_length, n=cfg.data.calibration_texts
        )
    model_dir = output / "model"
    summary = oneshot(folder, cfg.pruning, calib, model_dir, max_memory=budget, device=plan.device, progress=progress)
    tok.save_pretrained(str(model_dir))
    fmt = "artemis.save_pruned"
    write_json(
        model_dir / "artemis_run.json",
        {"base_model": cfg.model.base_model, "task": task, "tokenizer": cfg.model.tokenizer, "format": fmt},
    )
    timing["prune_and_train"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    pruned, pruned_sm = _streamed_measure(evaluator, model_dir, plan.device, dense=False)
    timing["pruned_eval"] = time.perf_counter() - t2
    timing["total"] = time.perf_counter() - t0

    pm = summary["pruning_metrics"]
    pipe = summary["pipeline"]
    sizes = {
        "dense": pm["baseline_model_size_mb"],
        "compressed": pm["compressed_model_size_mb"],
        "on_disk": disk_mib(model_dir),
    }
    quality = {"metric": evaluator.metric, "dense": dense["quality"], "pruned": pruned["quality"]}
    for k in ("nn_agreement", "cosine_min"):
        if k in pruned:
            quality[k] = pruned[k]
    peaks = {
        "dense_eval": dense_sm.peak_param_bytes,
        "prune": pipe["peak_param_bytes"],
        "pruned_eval": pruned_sm.peak_param_bytes,
    }
    memory = {
        "peak_rss": _peak_rss_mib(),
        "peak_parameters": max(peaks.values()) / MIB,
        "whole_model_parameters": whole / MIB,
    }
    report = {
        "model": cfg.model.base_model,
        "task": task,
        "sparsity": summary["measured_sparsity"],
        "target_sparsity": cfg.pruning.final_sparsity,
        "quality": quality,
        "size_mb": sizes,
        "latency_ms": {
            "dense": None,
            "pruned": None,
            "skipped": "streamed run: latency needs the whole model in memory (artemis eval MODEL_DIR measures it)",
        },
        "parameters": pruned_sm.parameters,
        "saved": {"path": str(model_dir), "format": fmt},
        "runtime": {
            "device": plan.device,
            "batch_size": None,
            "gradient_accumulation_steps": None,
            "gradient_checkpointing": False,
            "distillation": False,
            "distillation_reason": "off: training.steps 0 (one-shot prune)",
            "bf16": False,
        },
        "streaming": {
            "setting": setting,
            "max_memory_bytes": parse_memory_size(cfg.efficiency.max_memory)
            if cfg.efficiency.max_memory is not None
            else None,
            "source": str(folder),
            "max_resident_blocks": max(
                dense_sm.max_resident_blocks, pipe["max_resident_blocks"], pruned_sm.max_resident_blocks
            ),
            "peak_param_bytes": peaks,
            "whole_model_bytes": whole,
            "block_forwards": {
                "dense_eval": dense_sm.block_forwards,
                "prune": pipe["block_forwards"],
                "pruned_eval": pruned_sm.block_forwards,
            },
        },
        "resumed_from_step": None,
        "timing": timing,
        "memory": memory,
        "history": [],
        "layers": summary["layers"],
        "pruning_summary": {k: v for k, v in summary.items() if k != "layers"},
        "config": cfg.to_dict(),
    }
    _remove_stale_temp_files(output)
    return write_report(output, report, plots=plots)


# --------------------------------------------------------------------------- commands
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
    return the report dict (also written to ``output``).

    Under several processes (inside :func:`distributed_run`, as ``torchrun`` or
    ``accelerate launch`` start it) every rank runs the same deterministic job on the same
    data (the pruning manager sums activation statistics over the ranks and checks at every
    pruning event that the masks agree); at the end the ranks' weights are compared bit
    for bit, rank 0 alone evaluates, saves and writes the report, and the others wait for
    it and return ``{"rank", "world_size", "follower": True}``.
    """
    import shutil
    import tempfile

    import torch

    from artemis.core.manager import PruningManager
    from artemis.core.sizing import model_dense_bytes
    from artemis.data.corpus import calibration_batches
    from artemis.evaluation.quality import parameter_stats, size_stats
    from artemis.evaluation.report import write_report
    from artemis.train.loading import check_supported, load_model_and_tokenizer
    from artemis.train.loop import CHECKPOINT_FILE, LEGACY_CHECKPOINT_FILE, plan_runtime, train_with_pruning

    rank, world = _rank_world()
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
    if streams(cfg):
        return _run_prune_streamed(cfg, output, world=world, progress=progress, plots=plots)
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
    scratch: Optional[Path] = None  # ranks other than 0 keep their checkpoints apart from rank 0's
    try:
        train_dir = output
        if rank != 0:
            scratch = train_dir = Path(tempfile.mkdtemp(prefix=f"artemis-rank{rank}-"))
            for name in (CHECKPOINT_FILE, LEGACY_CHECKPOINT_FILE) if resume else ():
                if (output / name).is_file():
                    (scratch / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(output / name, scratch / name)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # every rank has read the checkpoint before rank 0 may overwrite it
        if cfg.training.steps > 0:
            res = train_with_pruning(
                model,
                tok,
                cfg,
                task,
                train_texts=train_texts,
                output_dir=train_dir,
                resume=resume,
                eval_fn=evaluator.quick if cfg.training.eval_every else None,
                stop_after=stop_after,
                progress=progress and rank == 0,
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
                    **({"rank": rank, "world_size": world, "follower": True} if rank != 0 else {}),
                }
        else:
            manager = PruningManager(model, cfg.pruning)
            calib = None
            if manager.metric.needs_activations or manager.metric.needs_gradients or manager.needs_calibration_data:
                calib = calibration_batches(
                    task, tok, train_texts, max_length=cfg.training.max_length, n=cfg.data.calibration_texts
                )
            from artemis.data.pipeline import oneshot, unsupported_setting

            # block by block: time linear in depth (docs/oneshot.md); a structural method (layer dropout,
            # structured sparsity) stays with the manager here: the summary and finalize() below are its own
            if cfg.pruning.method == "magnitude_progressive" and unsupported_setting(cfg.pruning) is None:
                oneshot(model, cfg.pruning, calib, progress=progress and rank == 0)
            else:
                manager.apply_pruning(cfg.pruning.final_sparsity, calibration_data=calib)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
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
    distributed = None
    if world > 1:
        import torch.distributed as dist

        digest = _check_ranks_agree(model)  # a collective: every rank
        distributed = {
            "world_size": world,
            "backend": str(dist.get_backend()),
            "mode": "every rank ran the same job on the same data; rank 0 evaluated and saved",
            "ranks_identical": True,
            "weights_sha256": digest,
        }
        if rank != 0:
            dist.barrier()  # until rank 0 has written the output
            return {"rank": rank, "world_size": world, "follower": True}
    measured_sparsity = manager.get_pruning_summary()["measured_sparsity"]
    t2 = time.perf_counter()
    pruned = evaluator.measure(model)
    # latency: the dense model is loaded again and timed against the pruned one, both warm,
    # in interleaved rounds (a dense figure taken cold at the start was several times too high)
    dense_ref = load_model_and_tokenizer(cfg.model).model.to(plan.device)
    latency = evaluator.latency(dense_ref, model)
    del dense_ref
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
    memory = {"peak_rss": _peak_rss_mib(), "whole_model_parameters": model_dense_bytes(model) / 2**20}
    if torch.cuda.is_available() and plan.device.startswith("cuda"):
        memory["peak_cuda_allocated"] = torch.cuda.max_memory_allocated() / 2**20
    report = {
        "model": cfg.model.base_model,
        "task": task,
        "sparsity": measured_sparsity,
        "target_sparsity": cfg.pruning.final_sparsity,
        "quality": quality,
        "size_mb": sizes,
        "latency_ms": latency,
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
    if distributed is not None:
        report["distributed"] = distributed
    if ft_summary is not None:
        report["fine_tuning"] = ft_summary
    if lora_merge is not None:
        report["lora_merge"] = lora_merge
    _remove_stale_temp_files(output)
    report = write_report(output, report, plots=plots)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # the other ranks may exit now
    return report


def run_sweep(
    cfg: Any, sparsities: Sequence[float], threshold: Optional[float], output: Optional[Path], plots: bool = True
) -> dict:
    """One-shot prune the model at each sparsity with :func:`artemis.evaluation.analysis.sparsity_sweep`
    (statistics for activation/gradient metrics are gathered once, on the dense model; after
    each level the dense weights are restored bit for bit, so every level starts from the
    same weights and no per-level copy of the model is made), evaluate, recommend."""
    import torch

    from artemis.data.corpus import calibration_batches
    from artemis.evaluation.analysis import sparsity_sweep
    from artemis.evaluation.quality import LATENCY_STATISTIC
    from artemis.evaluation.report import plot_sweep, write_json
    from artemis.metrics import METRICS
    from artemis.train.loading import check_supported, load_model_and_tokenizer
    from artemis.train.loop import _resolve_device

    refuse_multi_process("sweep")
    if cfg.efficiency.max_memory is not None:
        from artemis.core.errors import ConfigError

        raise ConfigError(
            f"efficiency.max_memory {cfg.efficiency.max_memory!r} streams `artemis prune --steps 0`; "
            "`artemis sweep` loads the whole model: remove efficiency.max_memory"
        )
    check_supported(cfg.model, cfg.fine_tuning.method)
    loaded = load_model_and_tokenizer(cfg.model)
    model, tok, task = loaded.model, loaded.tokenizer, loaded.task
    model.to(_resolve_device(cfg.training.device)).eval()
    train_texts, eval_texts = _texts(cfg)
    evaluator = _Evaluator(task, tok, eval_texts, cfg.evaluation, cfg.training.max_length)
    dense = evaluator.measure_dense(model, latency=True)
    metric_cls = METRICS.get(cfg.pruning.importance_metric)
    calib = None
    if metric_cls.needs_activations or metric_cls.needs_gradients or cfg.pruning.needs_calibration_batches:
        calib = calibration_batches(
            task, tok, train_texts, max_length=cfg.training.max_length, n=cfg.data.calibration_texts
        )
    swept = sparsity_sweep(
        model,
        cfg.pruning,
        sparsities,
        lambda m: evaluator.measure(m, latency=True),
        calibration_data=calib,
        progress=False,
    )
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
        "latency_method": {
            "rounds": cfg.evaluation.latency_rounds,
            "repeats": cfg.evaluation.latency_repeats,
            "warmup": cfg.evaluation.latency_warmup,
            "statistic": LATENCY_STATISTIC,
            "interleaved": False,
            "threads": torch.get_num_threads(),
        },
        "recommended_sparsity": max(ok) if ok else None,
        "config": cfg.to_dict(),
    }
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        result["plots"] = plot_sweep(output, rows, evaluator.metric, threshold) if plots else []
        _remove_stale_temp_files(output)
        write_json(output / "sweep.json", result)
    return result


def _measured_weights(model: Any, model_dir: Path) -> list:
    """The weights whose sparsity ``artemis eval`` measures: every Linear/Conv1D weight inside
    the transformer blocks, and the int8 weights of an ``--quantize int8`` export (which come
    back as ``Int8Linear`` modules, not Linear)."""
    from artemis.arch import get_adapter
    from artemis.core.errors import ModelError
    from artemis.core.targets import find_targets

    try:
        from artemis.sparse.quantization import Int8Linear
    except ImportError:  # a build without the int8 path
        Int8Linear = None  # noqa: N806
    int8 = [m.weight for m in model.modules() if Int8Linear is not None and isinstance(m, Int8Linear)]
    adapter = get_adapter(model)
    try:
        targets = find_targets(model, block_prefixes=adapter.block_prefixes() if adapter.blocks is not None else None)
    except ModelError:
        if not int8:
            raise ModelError(
                f"{str(model_dir)!r}: {type(model).__name__} holds no Linear, Conv1D or int8 layer inside its "
                "transformer blocks, so there is no sparsity to measure"
            ) from None
        targets = []
    return [t.param for t in targets] + int8


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
    from artemis.core.errors import ConfigError
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
    latency = evaluator.latency(ref_loaded.model, model)
    prunable = _measured_weights(model, model_dir)
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
        "latency_ms": latency,
        "parameters": parameter_stats(model),
    }
    if output is not None:
        _remove_stale_temp_files(output)
        write_report(output, report, plots=False)
    return report


def run_export(model_dir: Path, output: Path, quantize: Optional[str] = None, export_format: str = "compressed") -> str:
    """Load ``model_dir`` and write it with ``artemis.save_pruned``: ``export_format``
    ``compressed`` (sparse bitmask; ``artemis.load_pruned``) or ``dense`` (stock safetensors
    any loader reads, vLLM included), optionally ``quantize="int8"``."""
    from transformers import AutoTokenizer

    from artemis.evaluation.report import write_json
    from artemis.sparse.checkpoint import save_pruned

    kwargs = _save_pruned_kwargs(export_format)  # before loading anything
    check_output_writable(output)
    meta = _read_meta(model_dir)
    model = _load_saved(model_dir, meta.get("task"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    output.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(output)
    save_pruned(model, output, tokenizer=tok, **kwargs, **({"quantize": quantize} if quantize else {}))
    fmt = "artemis.save_pruned" if export_format == "compressed" else f"artemis.save_pruned:{export_format}"
    write_json(output / "artemis_run.json", {**meta, "format": fmt, "quantize": quantize})
    return str(output)
