"""Fine-tuning a pruned model: Hybrid LoRA-Adapter, Efficiency-Transformer, distillation.

See ``docs/finetune.md``. Modules: :mod:`~artemis.finetune.config` (typed options and
backend checks), :mod:`~artemis.finetune.lora` (adapters on a sparse frozen base, the
sparsity-preserving merge), :mod:`~artemis.finetune.efficiency` (layer importance,
selection, cross-layer sharing), :mod:`~artemis.finetune.session` (the combined setup).

Example:
    >>> from artemis.finetune import FineTuningConfig
    >>> FineTuningConfig().method
    'full'
"""

from artemis.finetune.config import (
    FINETUNE_METHODS,
    DistillationConfig,
    EfficiencyTransformerConfig,
    FineTuningConfig,
    LoRAConfig,
    check_8bit_backend,
    load_finetuning_config,
    require_peft,
)
from artemis.finetune.efficiency import (
    adjacent_similarity,
    block_influence,
    choose_shared_pairs,
    freeze_layers,
    layer_importance,
    select_trainable_layers,
    share_adjacent_layers,
    untie_shared_layers,
)
from artemis.finetune.lora import MergeReport, attach_lora, count_parameters, merge_lora_preserving_sparsity
from artemis.finetune.session import (
    FinetuneSession,
    apply_finetuning,
    check_run_options,
    distillation_loss,
    prepare_finetuning,
)

__all__ = [
    "FINETUNE_METHODS",
    "DistillationConfig",
    "EfficiencyTransformerConfig",
    "FineTuningConfig",
    "LoRAConfig",
    "check_8bit_backend",
    "load_finetuning_config",
    "require_peft",
    "adjacent_similarity",
    "block_influence",
    "choose_shared_pairs",
    "freeze_layers",
    "layer_importance",
    "select_trainable_layers",
    "share_adjacent_layers",
    "untie_shared_layers",
    "MergeReport",
    "attach_lora",
    "count_parameters",
    "merge_lora_preserving_sparsity",
    "FinetuneSession",
    "apply_finetuning",
    "check_run_options",
    "distillation_loss",
    "prepare_finetuning",
]
