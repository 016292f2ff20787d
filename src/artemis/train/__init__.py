"""Training with pruning: model loading, the built-in loop, distillation losses.

Example:
    >>> from artemis.train import distillation_losses
    >>> sorted(distillation_losses.__all__)[:2]
    ['causal_kd_loss', 'embedding_cosine_loss']
"""

from artemis.train import distillation as distillation_losses
from artemis.train.loading import LoadedModel, load_model_and_tokenizer
from artemis.train.loop import TrainResult, train_with_pruning

__all__ = ["distillation_losses", "LoadedModel", "load_model_and_tokenizer", "TrainResult", "train_with_pruning"]
