"""Measurements for reports: perplexity, embedding fidelity, latency, parameters, size.

Everything here measures; nothing changes the model (each function restores the
model's train/eval mode). Quality metrics:

* causal LMs — :func:`perplexity`: ``exp`` of the mean next-token cross-entropy over
  every predicted token of held-out blocks (token-weighted, not block-weighted);
* encoders / sentence-transformers — :func:`embedding_fidelity`: the mean (and minimum)
  cosine similarity between each held-out sentence's pruned and dense embedding, and
  the nearest-neighbour agreement: the fraction of sentences whose nearest other
  sentence (by cosine, among the held-out set) is the same under both models.

Sentence embeddings are mean-pooled over the attention mask, then L2-normalised
(the all-MiniLM-L6-v2 recipe).

Example:
    >>> import torch
    >>> from artemis.evaluation.quality import embedding_fidelity
    >>> dense = torch.nn.functional.normalize(torch.eye(3) + 0.1, dim=-1)
    >>> r = embedding_fidelity(dense, dense)
    >>> round(r["cosine_mean"], 6), r["nn_agreement"]
    (1.0, 1.0)
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from artemis.core.sizing import MIB, model_compressed_bytes, model_dense_bytes
from artemis.data.calibration import model_device

__all__ = [
    "mean_pool",
    "pooled_embeddings",
    "batch_nll",
    "sentence_embeddings",
    "encode_sentences",
    "embedding_cosine",
    "embedding_fidelity",
    "perplexity",
    "forward_latency_ms",
    "compare_latency_ms",
    "parameter_stats",
    "size_stats",
    "model_device",
]

logger = logging.getLogger(__name__)


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``hidden`` (batch, tokens, dim) over the tokens where ``attention_mask`` is 1.

    Example:
        >>> import torch
        >>> h = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]]])
        >>> mean_pool(h, torch.tensor([[1, 1, 0]])).tolist()
        [[2.0, 1.0]]
    """
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (batch, tokens, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def pooled_embeddings(hidden: Tensor, attention_mask: Tensor, normalize: bool = True) -> Tensor:
    """One batch's sentence embeddings from its last hidden state: :func:`mean_pool` in
    float32, then (``normalize``) L2-normalised; on the CPU.

    Example:
        >>> import torch
        >>> pooled_embeddings(torch.tensor([[[3.0, 4.0], [9.0, 9.0]]]), torch.tensor([[1, 0]])).tolist()
        [[0.6000000238418579, 0.800000011920929]]
    """
    emb = mean_pool(hidden.float(), attention_mask)  # (batch, dim)
    if normalize:
        emb = torch.nn.functional.normalize(emb, dim=-1)
    return emb.cpu()


def batch_nll(logits: Tensor, labels: Tensor) -> tuple[float, int]:
    """``(summed next-token cross-entropy, predicted tokens)`` of one causal-LM batch:
    ``logits`` (batch, tokens, vocab) predict ``labels`` shifted by one; -100 is ignored.

    Example:
        >>> import torch
        >>> nll, n = batch_nll(torch.zeros(1, 3, 4), torch.tensor([[0, 1, -100]]))
        >>> round(nll, 4), n
        (1.3863, 1)
    """
    logits = logits.float()
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    nll = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return float(nll), int((shift_labels != -100).sum())


@torch.no_grad()
def sentence_embeddings(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 128,
    normalize: bool = True,
) -> Tensor:
    """Embeddings of ``texts``: mean pooling over the attention mask, then L2-normalised.

    Args:
        model: an encoder (``AutoModel``) whose output has ``last_hidden_state``; other
            models are run with ``output_hidden_states=True`` and their last hidden
            state is used.
        tokenizer: the model's tokenizer.
        texts: the sentences.
        batch_size: sentences per forward pass.
        max_length: truncation length in tokens.
        normalize: L2-normalise each embedding (as all-MiniLM-L6-v2 does).

    Returns:
        ``(len(texts), hidden)`` float32 tensor on the CPU. The model's train/eval mode
        is restored afterwards.
    """
    if isinstance(texts, str) or not len(texts):
        raise ValueError("texts must be a non-empty list of strings")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = model_device(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            enc = {k: v.to(device) for k, v in enc.items()}
            res = model(**enc)
            hidden = getattr(res, "last_hidden_state", None)
            if hidden is None:
                hidden = model(**enc, output_hidden_states=True).hidden_states[-1]
            out.append(pooled_embeddings(hidden, enc["attention_mask"], normalize))
    finally:
        model.train(was_training)
    return torch.cat(out)


def encode_sentences(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 128
) -> Tensor:
    """L2-normalised mean-pooled sentence embeddings (float32, on CPU), one row per text:
    :func:`sentence_embeddings` with its defaults."""
    return sentence_embeddings(model, tokenizer, list(texts), batch_size=batch_size, max_length=max_length)


def embedding_fidelity(dense: Tensor, pruned: Tensor) -> dict[str, float]:
    """Compare two sets of L2-normalised embeddings of the same texts (rows).

    Returns:
        ``cosine_mean``, ``cosine_min`` (per-text cosine pruned vs dense) and
        ``nn_agreement`` (fraction of texts whose nearest *other* text is the same under
        both embeddings; needs at least 2 texts).

    Raises:
        ValueError: the shapes differ or there are fewer than 2 texts.
    """
    if dense.shape != pruned.shape or dense.dim() != 2:
        raise ValueError(
            f"embeddings must be two (texts, dim) tensors of one shape, got {tuple(dense.shape)} and {tuple(pruned.shape)}"
        )
    if dense.shape[0] < 2:
        raise ValueError("nearest-neighbour agreement needs at least 2 texts")
    d = torch.nn.functional.normalize(dense.float(), dim=-1)
    p = torch.nn.functional.normalize(pruned.float(), dim=-1)
    cos = (d * p).sum(-1)
    eye = torch.eye(d.shape[0], dtype=torch.bool)
    nn_d = (d @ d.T).masked_fill(eye, -2.0).argmax(-1)
    nn_p = (p @ p.T).masked_fill(eye, -2.0).argmax(-1)
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "nn_agreement": float((nn_d == nn_p).float().mean()),
    }


@torch.no_grad()
def perplexity(model: nn.Module, blocks: Iterable[dict]) -> float:
    """Token-weighted perplexity of a causal LM over batches with ``input_ids`` (and
    optional ``attention_mask``/``labels``; labels default to the inputs, -100 ignored)."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for batch in blocks:
            ids = batch["input_ids"].to(device)
            labels = batch.get("labels", ids).to(device)
            kwargs = {"input_ids": ids}
            if "attention_mask" in batch:
                kwargs["attention_mask"] = batch["attention_mask"].to(device)
            nll, tokens = batch_nll(model(**kwargs).logits, labels)
            total_nll += nll
            total_tokens += tokens
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("perplexity: the evaluation batches hold no predicted tokens")
    return math.exp(total_nll / total_tokens)


def _prepare_latency(model: nn.Module, batch: dict) -> tuple[dict, Any]:
    device = model_device(model)
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    batch.pop("labels", None)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return batch, sync


def _timed_forwards(model: nn.Module, batch: dict, sync: Any, n: int) -> list[float]:
    times = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        model(**batch)
        sync()
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


#: how :func:`forward_latency_ms` and :func:`compare_latency_ms` turn timings into one figure
LATENCY_STATISTIC = "median over rounds of each round's fastest forward"


@torch.no_grad()
def forward_latency_ms(model: nn.Module, batch: dict, *, repeats: int = 20, warmup: int = 3, rounds: int = 1) -> float:
    """Wall-clock milliseconds of one forward pass of ``model(**batch)`` on the model's
    device (CUDA is synchronised around each pass): after ``warmup`` untimed passes,
    ``rounds`` rounds of ``repeats`` timed passes; the median over the rounds of each
    round's fastest pass (:data:`LATENCY_STATISTIC`). To compare two models, use
    :func:`compare_latency_ms`, which interleaves their rounds."""
    if repeats < 1 or rounds < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1, rounds >= 1, warmup >= 0; got {repeats}, {rounds}, {warmup}")
    batch, sync = _prepare_latency(model, batch)
    was_training = model.training
    model.eval()
    try:
        _timed_forwards(model, batch, sync, warmup)
        per_round = [min(_timed_forwards(model, batch, sync, repeats)) for _ in range(rounds)]
    finally:
        model.train(was_training)
    return statistics.median(per_round)


@torch.no_grad()
def compare_latency_ms(
    models: Mapping[str, nn.Module], batch: dict, *, repeats: int = 20, warmup: int = 3, rounds: int = 5
) -> dict[str, Any]:
    """Forward latency of several models on the same ``batch``, measured fairly.

    Every model first runs ``warmup`` untimed passes (one-off costs: allocator, kernel
    selection, caches), then the models take turns: ``rounds`` rounds, in each of which
    every model in turn runs ``repeats`` timed passes (``dense, pruned, dense, pruned,
    ...``), so drift of the machine (other processes, clock changes) hits every model
    alike. Each round's figure is the median of its passes; a model's latency is its
    best (minimum) round, the figure least disturbed by other load.

    Args:
        models: ``name -> model``, e.g. ``{"dense": ..., "pruned": ...}`` (each on its device).
        batch: the inputs (``labels`` are dropped); moved to each model's device.

    Returns:
        ``{name: ms, ..., "rounds": {name: [ms per round]}, "spread": {name: (max - min) /
        min over the rounds}, "method": {"rounds", "repeats", "warmup", "statistic",
        "interleaved", "threads"}}``; ``threads`` is ``torch.get_num_threads()``.
    """
    if repeats < 1 or rounds < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1, rounds >= 1, warmup >= 0; got {repeats}, {rounds}, {warmup}")
    if not models:
        raise ValueError("compare_latency_ms needs at least one model")
    prepared = {name: _prepare_latency(m, batch) for name, m in models.items()}
    modes = {name: m.training for name, m in models.items()}
    per_round: dict[str, list[float]] = {name: [] for name in models}
    try:
        for m in models.values():
            m.eval()
        for name, m in models.items():
            _timed_forwards(m, *prepared[name], warmup)
        for _ in range(rounds):
            for name, m in models.items():
                per_round[name].append(min(_timed_forwards(m, *prepared[name], repeats)))
    finally:
        for name, m in models.items():
            m.train(modes[name])
    out: dict[str, Any] = {name: statistics.median(v) for name, v in per_round.items()}
    out["rounds"] = per_round
    out["spread"] = {name: (max(v) - min(v)) / min(v) if min(v) > 0 else 0.0 for name, v in per_round.items()}
    out["method"] = {
        "rounds": rounds,
        "repeats": repeats,
        "warmup": warmup,
        "statistic": LATENCY_STATISTIC,
        "interleaved": len(models) > 1,
        "threads": torch.get_num_threads(),
    }
    return out


@torch.no_grad()
def parameter_stats(model: nn.Module, prunable: Optional[Sequence[Tensor]] = None) -> dict[str, Any]:
    """Parameter counts: ``parameters`` (unique), ``nonzero_parameters``, and over the
    ``prunable`` tensors (if given): ``prunable_parameters`` and ``sparsity`` (their
    fraction of exact zeros)."""
    seen: set[int] = set()
    total = nonzero = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        nonzero += int(torch.count_nonzero(p))
    out: dict[str, Any] = {"parameters": total, "nonzero_parameters": nonzero}
    if prunable is not None:
        n = sum(t.numel() for t in prunable)
        z = n - sum(int(torch.count_nonzero(t)) for t in prunable)
        out.update({"prunable_parameters": n, "sparsity": z / n if n else 0.0})
    return out


def size_stats(model: nn.Module, sparse_params: Sequence[Tensor]) -> dict[str, float]:
    """``dense`` and ``compressed`` size in MiB from the shared size accounting
    (:mod:`artemis.core.sizing`; the compressed size stores ``sparse_params`` as
    values + bitmask)."""
    return {
        "dense": model_dense_bytes(model) / MIB,
        "compressed": model_compressed_bytes(model, list(sparse_params)) / MIB,
    }


def embedding_cosine(a: Tensor, b: Tensor) -> float:
    """Mean cosine similarity between the rows of ``a`` and ``b`` (same shape)."""
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean())
