"""Measuring a pruned model: :mod:`~artemis.evaluation.quality` (perplexity, sentence
embeddings and their fidelity, latency, parameters, size), :mod:`~artemis.evaluation.analysis`
(sparsity sweeps) and :mod:`~artemis.evaluation.report` (JSON, Markdown and plots).

Example:
    >>> import torch
    >>> from artemis.evaluation.quality import embedding_cosine
    >>> embedding_cosine(torch.eye(2), torch.eye(2))
    1.0
"""

__all__: list[str] = []
