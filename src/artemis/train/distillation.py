"""Knowledge-distillation losses (pure functions of tensors).

The teacher is the dense model before pruning; the student is the model being pruned.

* Causal LMs — :func:`causal_kd_loss`: ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` per
  token, averaged over the tokens where the attention mask is 1 (Hinton et al.; the T²
  keeps gradient scale independent of the temperature).
* Encoders — :func:`embedding_cosine_loss`: ``1 − cos`` between the student's and the
  teacher's mean-pooled sentence embeddings, averaged over the batch.
* Both — :func:`hidden_state_loss`: relative squared error of each block's output,
  ``Σ‖s−t‖² / Σ‖t‖²`` over the unmasked tokens, averaged over the blocks. Relative so
  that layers with large activations do not dominate and the weight is scale-free.

Example:
    >>> import torch
    >>> t = torch.randn(2, 5, 11)
    >>> float(causal_kd_loss(t, t, temperature=2.0)) < 1e-6
    True
    >>> h = [torch.ones(1, 3, 4)]
    >>> float(hidden_state_loss([2 * x for x in h], h))
    1.0
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["causal_kd_loss", "embedding_cosine_loss", "hidden_state_loss"]


def _token_mean(values: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Mean of ``values`` (batch, tokens) over tokens where ``mask`` is 1."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def causal_kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 2.0, attention_mask: Optional[Tensor] = None
) -> Tensor:
    """``T²·KL(teacher ‖ student)`` on temperature-softened logits (batch, tokens, vocab),
    averaged over unmasked tokens."""
    t = temperature
    s_log = F.log_softmax(student_logits.float() / t, dim=-1)
    t_log = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (t_log.exp() * (t_log - s_log)).sum(-1)  # (batch, tokens)
    return _token_mean(kl, attention_mask) * (t * t)


def embedding_cosine_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``1 − cos(student, teacher)`` per row (batch, dim), averaged."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def hidden_state_loss(
    student: Sequence[Tensor], teacher: Sequence[Tensor], attention_mask: Optional[Tensor] = None
) -> Tensor:
    """Relative squared error ``Σ‖s−t‖²/Σ‖t‖²`` over unmasked tokens, averaged over the
    pairs of hidden states (each (batch, tokens, dim))."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"hidden_state_loss needs equally many hidden states, got {len(student)} and {len(teacher)}")
    losses = []
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float()
        err = ((s - t) ** 2).sum(-1)  # (batch, tokens)
        ref = (t**2).sum(-1)
        if attention_mask is not None:
            m = attention_mask.to(err.dtype)
            err, ref = err * m, ref * m
        losses.append(err.sum() / ref.sum().clamp_min(1e-12))
    return torch.stack(losses).mean()
