"""The built-in training loop: progressive pruning with optional distillation.

One optimizer step (``training.steps`` of them):

1. ``gradient_accumulation_steps`` micro-batches: forward (autocast bf16 where
   ``precision`` asks for it), loss / accumulation, backward;
2. ``manager.step()`` — advances the pruning schedule and prunes at pruning events
   (after ``backward()``, so gradient-based metrics see this step's gradients);
3. gradient clipping (``max_grad_norm``), ``AdamW.step()`` (the manager's optimizer
   hooks zero pruned gradients and optimizer state and re-apply the masks), the
   learning-rate scheduler (``transformers.get_scheduler``: linear warm-up over
   ``warmup_steps``, then ``lr_scheduler``);
4. every ``checkpoint_every`` steps a checkpoint (model, optimizer, scheduler, RNG,
   the manager's ``state_dict()`` with its masks, the history) is written atomically
   to ``OUTPUT/checkpoint/training_state.safetensors``; ``resume=True`` restarts from it
   with the same masks and the same data order.

The checkpoint is safetensors (the tensors) plus JSON in its header (everything else),
written and read by :func:`artemis.train.loading.save_state_file` /
:func:`~artemis.train.loading.load_state_file`: resuming never unpickles anything, so a
crafted checkpoint cannot run code. A ``checkpoint/training_state.pt`` of an earlier
version is still resumed when ``torch.load(weights_only=True)`` accepts it (plain tensors
and containers); otherwise resuming fails with a :class:`CheckpointError` that names it.

Losses: causal LMs train on the next-token loss, mixed with distillation when enabled
(``alpha·KD + (1−alpha)·LM + hidden_weight·hidden``). Encoders have no task loss here,
so they train on distillation only (``embedding_weight·(1−cos) + hidden_weight·hidden``)
and need it enabled. See :mod:`artemis.train.distillation` for the exact formulas.

Data order is a pure function of ``(seed, micro-batch index)``, so a resumed run sees
exactly the batches an uninterrupted run would have seen.

Dropout is off during training: the model runs in train mode (so gradient
checkpointing and metrics that gather statistics in train mode work) with the ``p`` of
every ``nn.Dropout`` and every float ``attention_dropout`` attribute set to 0 for the
run and restored afterwards. With distillation the student is asked to match the
teacher exactly, and dropout noise only blurs that target. Set
``training.dropout: true`` to keep it.

Example (what ``low_resource_mode`` changes in the plan of a run, before any training):
    >>> import torch
    >>> from artemis.train.loop import plan_runtime
    >>> from artemis.train.run_config import load_run_config
    >>> cfg = load_run_config({"training": {"batch_size": 8, "device": "cpu", "precision": "fp32"},
    ...                        "efficiency": {"low_resource_mode": True}})
    >>> plan = plan_runtime(cfg, torch.nn.Linear(2, 2), "causal_lm")
    >>> plan.batch_size, plan.gradient_accumulation_steps, plan.gradient_checkpointing, plan.distillation
    (4, 2, True, False)
    >>> plan.distillation_reason
    'off: low_resource_mode keeps no teacher copy'
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from artemis.core.errors import CheckpointError, ConfigError
from artemis.core.manager import PruningManager
from artemis.core.sizing import model_dense_bytes
from artemis.evaluation.quality import mean_pool
from artemis.train.distillation import causal_kd_loss, embedding_cosine_loss, hidden_state_loss
from artemis.train.loading import load_legacy_state_file, load_state_file, save_state_file
from artemis.train.run_config import RunConfig

__all__ = [
    "TrainResult",
    "RuntimePlan",
    "plan_runtime",
    "train_with_pruning",
    "CHECKPOINT_FILE",
    "LEGACY_CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT_VERSION",
    "read_checkpoint",
    "available_memory_bytes",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint/training_state.safetensors"
#: where earlier versions wrote the checkpoint (a torch.save pickle)
LEGACY_CHECKPOINT_FILE = "checkpoint/training_state.pt"
CHECKPOINT_FORMAT_VERSION = 1
_CHECKPOINT_KIND = "training_state"


@dataclass
class RuntimePlan:
    """What a run will actually do, after ``low_resource_mode`` and ``auto`` settings."""

    device: str
    batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    distillation: bool
    distillation_reason: str
    bf16: bool


@dataclass
class TrainResult:
    """Outcome of :func:`train_with_pruning`."""

    manager: PruningManager
    plan: RuntimePlan
    history: list[dict] = field(default_factory=list)
    steps_run: int = 0
    resumed_from: Optional[int] = None
    seconds: float = 0.0
    stopped_early: bool = False
    #: the :class:`~artemis.finetune.session.FinetuneSession` when ``model.hybrid_lora_adapter``
    #: or ``fine_tuning.method: efficiency_transformer`` is on (adapters still unmerged)
    finetune: Optional[Any] = None


def available_memory_bytes(device: torch.device) -> Optional[int]:
    """Free memory on ``device`` (CUDA: ``mem_get_info``; CPU: ``MemAvailable``), or None."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"training.device {name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"training.device {name!r}: no CUDA device is visible; use cpu or auto")
    return dev


def plan_runtime(cfg: RunConfig, model: nn.Module, task: str) -> RuntimePlan:
    """Resolve ``auto`` settings and ``low_resource_mode`` into a concrete plan."""
    t = cfg.training
    device = _resolve_device(t.device)
    low = cfg.efficiency.low_resource_mode
    bs, acc = t.batch_size, t.gradient_accumulation_steps
    if low and bs > 1:
        bs, acc = bs // 2, acc * 2
    gc = t.gradient_checkpointing or low
    want = cfg.distillation.enabled
    if want == "auto":
        if low:
            distill, reason = False, "off: low_resource_mode keeps no teacher copy"
        else:
            need = model_dense_bytes(model)
            avail = available_memory_bytes(device)
            if avail is not None and need > avail // 2:
                distill, reason = False, f"off: the teacher copy ({need / 2**20:.0f} MiB) exceeds half the free memory"
            else:
                distill, reason = True, "on (auto): a dense teacher copy fits in memory"
    else:
        distill, reason = bool(want), "on (config)" if want else "off (config)"
    if task == "encoder" and not distill and t.steps > 0:
        raise ConfigError(
            "training an encoder needs distillation (it has no task loss here): set distillation.enabled: true, "
            "or training.steps: 0 for one-shot pruning"
            + (" (low_resource_mode turned distillation off)" if low and want == "auto" else "")
        )
    if t.precision == "bf16":
        bf16 = True
    elif t.precision == "fp32":
        bf16 = False
    else:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return RuntimePlan(str(device), bs, acc, gc, distill, reason, bf16)


def _fingerprint(cfg: RunConfig) -> str:
    data = cfg.to_dict()
    keep = {k: data[k] for k in ("model", "pruning", "fine_tuning", "distillation", "data")}
    keep["training"] = {
        k: v for k, v in data["training"].items() if k not in ("checkpoint_every", "eval_every", "device")
    }
    keep["efficiency"] = data["efficiency"]
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


class _Batches:
    """Deterministic micro-batches: batch ``i`` depends only on ``(seed, i)``."""

    def __init__(
        self, task: str, texts: Sequence[str], tokenizer: Any, batch_size: int, max_length: int, seed: int
    ) -> None:
        self.task, self.tokenizer, self.bs, self.max_length, self.seed = task, tokenizer, batch_size, max_length, seed
        self.texts = list(texts)
        if task == "causal_lm":
            from artemis.data.corpus import concatenated_token_ids

            ids = concatenated_token_ids(self.texts, tokenizer)
            n = len(ids) // max_length
            if n == 0:
                raise ConfigError(
                    f"the training text holds {len(ids)} tokens, fewer than one block of training.max_length={max_length}"
                )
            self.blocks = torch.tensor(ids[: n * max_length]).view(n, max_length)
            self.n = n
        else:
            if not self.texts:
                raise ConfigError("the training data holds no text")
            self.n = len(self.texts)

    def __call__(self, i: int) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        idx = torch.randperm(self.n, generator=g)[: self.bs]
        if self.task == "causal_lm":
            ids = self.blocks[idx]
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        enc = self.tokenizer(
            [self.texts[j] for j in idx.tolist()],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return dict(enc)


def _loss(
    task: str, model: nn.Module, teacher: Optional[nn.Module], batch: dict, cfg: RunConfig
) -> tuple[Tensor, dict]:
    d = cfg.distillation
    want_hidden = teacher is not None and d.hidden_weight > 0
    parts: dict[str, float] = {}
    if task == "causal_lm":
        out = model(**batch, output_hidden_states=want_hidden)
        loss = out.loss
        parts["lm"] = float(loss.detach())
        if teacher is not None:
            with torch.no_grad():
                tout = teacher(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    output_hidden_states=want_hidden,
                )
            kd = causal_kd_loss(
                out.logits, tout.logits, temperature=d.temperature, attention_mask=batch["attention_mask"]
            )
            parts["kd"] = float(kd.detach())
            loss = d.alpha * kd + (1.0 - d.alpha) * loss
            if want_hidden:
                h = hidden_state_loss(out.hidden_states[1:], tout.hidden_states[1:], batch["attention_mask"])
                parts["hidden"] = float(h.detach())
                loss = loss + d.hidden_weight * h
        return loss, parts
    assert teacher is not None  # plan_runtime guarantees it for encoders
    out = model(**batch, output_hidden_states=want_hidden)
    with torch.no_grad():
        tout = teacher(**batch, output_hidden_states=want_hidden)
    mask = batch["attention_mask"]
    emb = embedding_cosine_loss(
        mean_pool(out.last_hidden_state.float(), mask), mean_pool(tout.last_hidden_state.float(), mask)
    )
    parts["embedding"] = float(emb.detach())
    loss = d.embedding_weight * emb
    if want_hidden:
        h = hidden_state_loss(out.hidden_states[1:], tout.hidden_states[1:], mask)
        parts["hidden"] = float(h.detach())
        loss = loss + d.hidden_weight * h
    return loss, parts


@contextlib.contextmanager
def _dropout_off(model: nn.Module, enabled: bool):
    """Set every dropout probability of ``model`` to 0 inside the block (if ``enabled``)."""
    saved: list[tuple[Any, str, float]] = []
    if enabled:
        for m in model.modules():
            if isinstance(m, nn.Dropout) and m.p:
                saved.append((m, "p", m.p))
                m.p = 0.0
            v = getattr(m, "attention_dropout", None)
            if isinstance(v, float) and v:
                saved.append((m, "attention_dropout", v))
                m.attention_dropout = 0.0
    try:
        yield
    finally:
        for m, attr, v in saved:
            setattr(m, attr, v)


def _save_checkpoint(path: Path, state: dict) -> None:
    save_state_file(path, state, _CHECKPOINT_KIND)


def read_checkpoint(path: os.PathLike, device: Any = "cpu") -> dict:
    """The training state in checkpoint ``path`` (a :data:`CHECKPOINT_FILE`, or a
    :data:`LEGACY_CHECKPOINT_FILE` of an earlier version), tensors on ``device``.

    Nothing in the file runs: the current format is safetensors + JSON, and a legacy
    ``.pt`` file is read with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file cannot be read safely, or is not a training state; the
            message names the file and how to start afresh.
    """
    path = Path(path)
    how = "restart without --resume (resume=False), or delete the checkpoint folder, to start afresh"
    try:
        if path.suffix == ".pt":
            state = load_legacy_state_file(path, device)
        else:
            state = load_state_file(path, _CHECKPOINT_KIND, device)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {how}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a training state; {how}")
    return state


def train_with_pruning(
    model: nn.Module,
    tokenizer: Any,
    cfg: RunConfig,
    task: str,
    *,
    train_texts: Sequence[str],
    output_dir: Optional[os.PathLike] = None,
    resume: bool = False,
    eval_fn: Optional[Callable[[nn.Module], float]] = None,
    stop_after: Optional[int] = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` for ``cfg.training.steps`` steps while pruning it progressively.

    The dense teacher (for distillation) is copied before the manager is created; the
    manager is created here (its ``total_steps`` is ``training.steps``) and returned,
    not finalized, in the result. With ``model.hybrid_lora_adapter`` or
    ``fine_tuning.method: efficiency_transformer`` the setup goes through
    :func:`artemis.finetune.session.apply_finetuning` (layer scores on the first
    training batches, sharing, then the manager, then peft adapters injected into
    ``model``); the session is ``result.finetune`` and its adapters are not merged yet.

    Args:
        model: the model to prune (moved to the planned device).
        tokenizer: its tokenizer.
        cfg: the validated run config.
        task: ``causal_lm`` or ``encoder``.
        train_texts: the training texts.
        output_dir: where checkpoints go (required for ``checkpoint_every``/``resume``).
        resume: restart from ``output_dir/checkpoint/training_state.safetensors`` if it
            exists (else from the ``training_state.pt`` of an earlier version, read with
            ``torch.load(weights_only=True)``).
        eval_fn: ``eval_fn(model) -> float`` for the quality-vs-step history.
        stop_after: stop (after checkpointing) once this many steps are done in total;
            simulates an interrupted run.
        progress: show a tqdm progress bar with the loss and the current sparsity.

    Raises:
        ConfigError: inconsistent settings (an encoder without distillation, ...).
        CheckpointError: the checkpoint to resume belongs to another configuration.
    """
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    t = cfg.training
    if t.steps < 1:
        raise ConfigError("train_with_pruning needs training.steps >= 1 (0 means one-shot pruning, done by the caller)")
    if (t.checkpoint_every or resume or stop_after) and output_dir is None:
        raise ConfigError("checkpoints (checkpoint_every / resume / stop_after) need an output directory")
    plan = plan_runtime(cfg, model, task)
    device = torch.device(plan.device)
    torch.manual_seed(t.seed)
    model.to(device)
    teacher = None
    if plan.distillation:
        teacher = copy.deepcopy(model).eval()  # before the manager installs any hook
        for p in teacher.parameters():
            p.requires_grad_(False)
    if plan.gradient_checkpointing:
        # transformers 5 renamed gradient_checkpointing_enable (deprecated) to activation_checkpointing_enable
        enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
            model, "gradient_checkpointing_enable", None
        )
        if enable is None:
            raise ConfigError(
                f"gradient checkpointing needs a Hugging Face model; {type(model).__name__} has no gradient_checkpointing_enable()"
            )
        enable()
        if getattr(getattr(model, "config", None), "use_cache", None):
            model.config.use_cache = False
    batches = _Batches(task, train_texts, tokenizer, plan.batch_size, t.max_length, t.seed)
    finetune = None
    ft = cfg.fine_tuning
    if cfg.model.hybrid_lora_adapter or ft.method != "full":
        # layer scores / sharing on the dense model, the manager on the (shared) plain
        # model, then adapters injected into ``model`` itself (or unselected blocks frozen)
        from artemis.finetune.session import apply_finetuning

        section: dict[str, Any] = {"method": ft.method}
        if ft.efficiency_transformer is not None:
            section["efficiency_transformer"] = ft.efficiency_transformer.model_dump()
        if ft.lora is not None:
            section["lora"] = ft.lora.model_dump()
        n_calib = ft.efficiency_transformer.calibration_batches if ft.efficiency_transformer is not None else 4
        calib = [{k: v.to(device) for k, v in batches(i).items()} for i in range(n_calib)]
        finetune = apply_finetuning(
            model,
            section,
            hybrid_lora_adapter=cfg.model.hybrid_lora_adapter,
            calibration_data=calib,
            create_manager=lambda m: PruningManager(m, cfg.pruning, total_steps=t.steps),
        )
        manager = finetune.manager
        if (
            cfg.model.hybrid_lora_adapter
            and plan.gradient_checkpointing
            and hasattr(model, "enable_input_require_grads")
        ):
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input grad
    else:
        manager = PruningManager(model, cfg.pruning, total_steps=t.steps)
    if manager.needs_calibration_data:  # SparseGPT / OWL: the same batches at every pruning event
        from artemis.data.corpus import calibration_batches

        manager.set_calibration_data(
            calibration_batches(task, tokenizer, train_texts, max_length=t.max_length, n=cfg.data.calibration_texts)
        )

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.learning_rate,
        foreach=False if cfg.efficiency.low_resource_mode else None,
    )
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.steps)

    result = TrainResult(manager=manager, plan=plan, finetune=finetune)
    ckpt_path = Path(output_dir) / CHECKPOINT_FILE if output_dir is not None else None
    fingerprint = _fingerprint(cfg)
    start = 0
    resume_path = ckpt_path
    if resume and ckpt_path is not None and not ckpt_path.is_file():
        legacy = Path(output_dir) / LEGACY_CHECKPOINT_FILE  # type: ignore[arg-type]
        if legacy.is_file():  # written by an earlier version: read with weights_only=True
            resume_path = legacy
    if resume and resume_path is not None and resume_path.is_file():
        state = read_checkpoint(resume_path, device)
        if state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {str(resume_path)!r} has format_version {state.get('format_version')!r}; expected {CHECKPOINT_FORMAT_VERSION}"
            )
        if state.get("fingerprint") != fingerprint:
            raise CheckpointError(
                f"checkpoint {str(resume_path)!r} was written by a different configuration; "
                "use the same config to resume, or another --output folder to start afresh"
            )
        model.load_state_dict(state["model"])
        manager.load_state_dict(state["manager"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())  # the CPU generator takes a CPU ByteTensor
        result.history = list(state["history"])
        start = int(state["step"])
        result.resumed_from = start
        logger.info("resumed from step %d of %d (%s)", start, t.steps, resume_path)
    elif resume:
        logger.warning("--resume: no checkpoint at %s; starting from step 0", ckpt_path)

    def checkpoint(step: int) -> None:
        assert ckpt_path is not None
        _save_checkpoint(
            ckpt_path,
            {
                "format_version": CHECKPOINT_FORMAT_VERSION,
                "fingerprint": fingerprint,
                "step": step,
                "model": model.state_dict(),
                "manager": manager.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "history": result.history,
            },
        )

    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if plan.bf16 else contextlib.nullcontext
    )
    params = [p for p in model.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    bar = tqdm(total=t.steps, initial=start, disable=not progress, desc="pruning", unit="step", dynamic_ncols=True)
    no_dropout = _dropout_off(model, not t.dropout)
    no_dropout.__enter__()
    try:
        for step in range(start, t.steps):
            model.train(True)
            total, parts_sum = 0.0, {}
            for a in range(plan.gradient_accumulation_steps):
                batch = {k: v.to(device) for k, v in batches(step * plan.gradient_accumulation_steps + a).items()}
                with autocast():
                    loss, parts = _loss(task, model, teacher, batch, cfg)
                (loss / plan.gradient_accumulation_steps).backward()
                total += float(loss.detach()) / plan.gradient_accumulation_steps
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v / plan.gradient_accumulation_steps
            pruned = manager.step()
            manager.apply_mask_to_gradients()
            if t.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            entry: dict[str, Any] = {
                "step": done,
                "loss": total,
                "lr": scheduler.get_last_lr()[0],
                "target_sparsity": manager.target_sparsity_at(step),
                "sparsity": manager.pruning_metrics["current_sparsity"],
                **{f"loss_{k}": v for k, v in parts_sum.items()},
            }
            if pruned:
                entry["pruning_event"] = True
            if eval_fn is not None and t.eval_every and (done % t.eval_every == 0 or done == t.steps):
                # held-out forwards must not feed a metric's statistics (activation norms):
                # snapshot the metric state around the evaluation
                metric_state = copy.deepcopy(manager.metric.state_dict())
                entry["quality"] = float(eval_fn(model))
                manager.metric.load_state_dict(metric_state)
            result.history.append(entry)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", sparsity=f"{entry['sparsity']:.1%}")
            result.steps_run += 1
            if ckpt_path is not None and t.checkpoint_every and done % t.checkpoint_every == 0 and done < t.steps:
                checkpoint(done)
            if stop_after is not None and done >= stop_after and done < t.steps:
                checkpoint(done)
                result.stopped_early = True
                break
    finally:
        no_dropout.__exit__(None, None, None)
        bar.close()
        model.train(False)
    result.seconds = time.perf_counter() - t0
    if teacher is not None:
        del teacher
    return result
