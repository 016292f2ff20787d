"""Evaluation helpers: sentence-embedding fidelity of a pruned encoder.

``sentence_embeddings`` computes sentence-transformers style embeddings (mean pooling of
the last hidden state over the attention mask, then L2 normalisation), and
``embedding_cosine`` the mean cosine similarity of two sets of embeddings row by row
(pruned vs dense).

Example:
    >>> import torch
    >>> a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> b = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    >>> round(embedding_cosine(a, b), 4)   # (cos 45° + 1) / 2
    0.8536
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["sentence_embeddings", "embedding_cosine", "mean_pool"]


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``hidden`` ``(batch, tokens, dim)`` over the tokens where
    ``attention_mask`` ``(batch, tokens)`` is 1; returns ``(batch, dim)`` float32."""
    m = attention_mask.to(hidden.device, torch.float32).unsqueeze(-1)  # (batch, tokens, 1)
    summed = (hidden.to(torch.float32) * m).sum(dim=1)
    return summed / m.sum(dim=1).clamp_min(1e-9)


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
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length,
                return_tensors="pt",
            )
            enc = {k: v.to(device) for k, v in enc.items()}
            res = model(**enc)
            hidden = getattr(res, "last_hidden_state", None)
            if hidden is None:
                hidden = model(**enc, output_hidden_states=True).hidden_states[-1]
            emb = mean_pool(hidden, enc["attention_mask"])  # (batch, dim)
            if normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            out.append(emb.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def embedding_cosine(a: Tensor, b: Tensor) -> float:
    """Mean cosine similarity between the rows of ``a`` and ``b`` (same shape)."""
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean())
