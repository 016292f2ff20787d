"""Data for calibration and training: :mod:`~artemis.data.corpus` (the built-in corpus from
the standard library's docstrings, text loaders, tokenised batches) and
:mod:`~artemis.data.calibration` (calibration passes over a model).

The corpus names are re-exported here (``from artemis.data import load_texts`` keeps
working).

Example:
    >>> from artemis.data import builtin_corpus
    >>> len(builtin_corpus("train")) > 1000
    True
"""

from artemis.data.corpus import (
    STDLIB_MODULES,
    builtin_corpus,
    calibration_batches,
    concatenated_token_ids,
    load_texts,
    stdlib_sentences,
    token_blocks,
    tokenize_batches,
)

__all__ = [
    "STDLIB_MODULES",
    "stdlib_sentences",
    "builtin_corpus",
    "load_texts",
    "tokenize_batches",
    "token_blocks",
    "concatenated_token_ids",
    "calibration_batches",
]
