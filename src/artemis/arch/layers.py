"""Whole-block surgery: removing transformer blocks from a model (used by ``layer_dropout``).

Removing block ``i`` from a Hugging Face model takes more than deleting it from the
``nn.ModuleList``:

* every module inside a kept block that carries a ``layer_idx`` (the attention's index
  into the KV cache in transformers 5.x, and the cross-attention's) is renumbered to the
  block's new position, so ``DynamicCache`` slots line up again;
* the config's layer count (``num_hidden_layers``; GPT-2's ``n_layer`` is an alias of it)
  is set to the new count, so ``save_pretrained``/``from_pretrained`` rebuild the same
  model (Llama even iterates ``self.layers[: config.num_hidden_layers]``);
* per-layer config lists (``layer_types``, ``mlp_layer_types``) keep the entries of the
  kept blocks, so each kept layer keeps its attention type (sliding/full) after reload.

What cannot be expressed in a stock config is refused before anything changes
(:func:`check_block_removal`): heterogeneous ``per_layer_config`` overrides, and GPT-2's
``scale_attn_by_inverse_layer_idx`` (the scaling depends on the layer's position, so a
reloaded model would scale differently from the in-memory one).

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from artemis.arch import get_adapter
    >>> from artemis.arch.layers import remove_blocks
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg)
    >>> remove_blocks(get_adapter(model), [0, 3])
    >>> model.config.num_hidden_layers, [b.self_attn.layer_idx for b in model.model.layers]
    (2, [0, 1])
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch.nn as nn

from artemis.arch.base import ArchitectureAdapter
from artemis.core.errors import ModelError

__all__ = ["PER_LAYER_CONFIG_LISTS", "check_block_removal", "validate_keep_indices", "remove_blocks"]

logger = logging.getLogger(__name__)

#: Config attributes holding one entry per block; they are filtered to the kept blocks.
PER_LAYER_CONFIG_LISTS = ("layer_types", "mlp_layer_types")


def _configs(model: nn.Module) -> list[Any]:
    """The distinct config objects of ``model`` (the model's, and its text config if separate)."""
    out: list[Any] = []
    cfg = getattr(model, "config", None)
    if cfg is None:
        return out
    out.append(cfg)
    get_text = getattr(cfg, "get_text_config", None)
    if callable(get_text):
        try:
            text = get_text(decoder=True)
        except Exception:  # pragma: no cover - configs without a text config
            text = None
        if text is not None and text is not cfg:
            out.append(text)
    return out


def check_block_removal(adapter: ArchitectureAdapter) -> None:
    """Raise :class:`~artemis.core.errors.ModelError` if blocks of the adapter's model cannot be
    removed such that a stock ``from_pretrained`` rebuilds the result. Changes nothing.

    Raises:
        ModelError: no block list; a heterogeneous ``per_layer_config``; GPT-2's
            ``scale_attn_by_inverse_layer_idx``; a per-layer config list whose length is
            not the block count.
    """
    model = adapter.model
    if adapter.blocks is None or len(adapter.blocks) == 0:
        raise ModelError(
            f"{type(model).__name__}: no transformer block list was found (adapter {adapter.name!r}), "
            "so whole layers cannot be removed; layer_dropout needs a model whose blocks are an "
            "nn.ModuleList (Llama-family model.layers, GPT-2 transformer.h, BERT encoder.layer)"
        )
    n = len(adapter.blocks)
    for cfg in _configs(model):
        if getattr(cfg, "_heterogeneity_spec", None) is not None:
            raise ModelError(
                f"{type(model).__name__}: its config has per_layer_config overrides (a heterogeneous "
                "model); removing layers from such a model is not supported"
            )
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            raise ModelError(
                f"{type(model).__name__}: config.scale_attn_by_inverse_layer_idx is True, so each "
                "layer's attention scaling depends on its position; after removing layers a reloaded "
                "model would scale differently. Removing layers from it is not supported"
            )
        for name in PER_LAYER_CONFIG_LISTS:
            value = getattr(cfg, name, None)
            if value is not None and len(value) != n:
                raise ModelError(
                    f"{type(model).__name__}: config.{name} has {len(value)} entries but the model has "
                    f"{n} blocks; cannot tell which entries belong to which block"
                )


def validate_keep_indices(adapter: ArchitectureAdapter, keep: Sequence[int]) -> list[int]:
    """``keep`` as a sorted list of distinct block indices; at least one block must stay.

    Raises:
        ModelError: an index out of range or repeated, or nothing kept.
    """
    n = adapter.num_blocks
    out = sorted(int(i) for i in keep)
    if len(set(out)) != len(out):
        raise ModelError(f"keep indices repeat a block: {list(keep)}")
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ModelError(f"keep indices {bad} are outside the model's {n} blocks (valid: 0..{n - 1})")
    if not out:
        raise ModelError(f"removing all {n} blocks would leave no transformer layer; keep at least one")
    return out


def remove_blocks(adapter: ArchitectureAdapter, keep: Sequence[int]) -> None:
    """Keep only the blocks at indices ``keep`` (in their original order), in place.

    Renumbers ``layer_idx`` attributes inside the kept blocks, updates the config's layer
    count and per-layer lists. Everything is checked before anything changes.

    Args:
        adapter: a bound adapter (``get_adapter(model)``).
        keep: indices of the blocks to keep.

    Raises:
        ModelError: see :func:`check_block_removal` and :func:`validate_keep_indices`.
    """
    check_block_removal(adapter)
    kept = validate_keep_indices(adapter, keep)
    blocks = adapter.blocks
    assert blocks is not None
    n = len(blocks)
    # Plan everything first.
    renumber: list[tuple[nn.Module, int]] = []
    for new_idx, old_idx in enumerate(kept):
        for module in blocks[old_idx].modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                renumber.append((module, new_idx))
    config_updates: list[tuple[Any, str, Any]] = []
    for cfg in _configs(adapter.model):
        for name in PER_LAYER_CONFIG_LISTS:
            value = getattr(cfg, name, None)
            if value is not None:
                config_updates.append((cfg, name, [value[i] for i in kept]))
        if hasattr(cfg, "num_hidden_layers"):
            config_updates.append((cfg, "num_hidden_layers", len(kept)))
    # Apply.
    for idx in sorted(set(range(n)) - set(kept), reverse=True):
        del blocks[idx]
    for module, new_idx in renumber:
        module.layer_idx = new_idx
    # Per-layer lists before the count, so a config that validates on assignment agrees.
    for cfg, name, value in sorted(config_updates, key=lambda u: u[1] == "num_hidden_layers"):
        setattr(cfg, name, value)
    logger.info("removed %d of %d blocks at %s; kept %s", n - len(kept), n, adapter.blocks_path, kept)
