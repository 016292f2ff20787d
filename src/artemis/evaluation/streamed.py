"""Evaluation of a checkpoint folder block by block: a model that does not fit is measured.

:class:`StreamedModel` opens a folder lazily (:class:`~artemis.sparse.streaming.LazyCheckpoint`:
the model on ``meta``, tensors read from the safetensors shards when needed) and runs a
list of batches through it the way the one-shot pipeline prunes:

1. the parameters outside the transformer blocks (embeddings, final norm, head) are read;
2. every batch runs through the model with each block replaced by a recorder, so block 0's
   input and every block's own arguments are recorded (a sliding-window layer its windowed
   mask; :func:`artemis.data.pipeline.capture_inputs_per_block`);
3. each block in turn is read, runs every batch's inputs with its own arguments, and is freed;
4. every batch then runs through the whole model once more with each block's ``forward``
   replaced by one that returns the last block's recorded output, so the model's own
   code computes what follows the blocks (Llama's final norm and ``lm_head``, BERT's
   ``last_hidden_state``) from the hidden states of the streamed blocks.

The parameters resident at any time are those outside the blocks plus one block
(``peak_param_bytes``, ``max_resident_blocks`` count them); the hidden states of every
batch are held at once (the evaluation set's activations, as in the pipeline's calibration).
:meth:`StreamedModel.perplexity` and :meth:`StreamedModel.sentence_embeddings` give the
figures of :func:`artemis.evaluation.quality.perplexity` and
:func:`~artemis.evaluation.quality.sentence_embeddings` with the same arithmetic; each
block sees the inputs it sees inside a whole forward pass, so on CPU the figures are
bit-identical to the in-memory ones (tested for a Llama and a BERT).

Two kinds of folder are read: a Hugging Face folder (``model.safetensors`` or a sharded
``model.safetensors.index.json``) and a folder written by :func:`artemis.save_pruned` /
:func:`artemis.oneshot` (``format="compressed"``: sparse-bitmask weights, each tensor's
checksum checked as it is read). int8 folders and pickled (``.bin``) weights are refused.

Example:
    >>> import tempfile, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from artemis.evaluation.quality import perplexity
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    >>> folder = tempfile.mkdtemp()
    >>> model.save_pretrained(folder)
    >>> batches = [{"input_ids": torch.randint(0, 64, (2, 8))}]
    >>> with StreamedModel(folder) as sm:
    ...     ppl = sm.perplexity(batches)
    >>> ppl == perplexity(model, batches), sm.max_resident_blocks
    (True, 1)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from artemis.core.errors import CheckpointError, ModelError
from artemis.sparse.streaming import LazyCheckpoint

__all__ = ["StreamedModel", "open_lazy", "is_pruned_folder", "streamed_block_bytes"]


def is_pruned_folder(folder: Union[str, os.PathLike]) -> bool:
    """Whether ``folder`` was written by :func:`artemis.save_pruned` (it holds ``artemis_export.json``).

    Example:
        >>> import tempfile
        >>> is_pruned_folder(tempfile.mkdtemp())
        False
    """
    from artemis.sparse.checkpoint import META_NAME

    return (Path(folder) / META_NAME).is_file()


class _PrunedCheckpoint(LazyCheckpoint):
    """A :func:`~artemis.save_pruned` folder opened lazily: a sparse-bitmask weight is
    decompressed when read; every stored tensor's checksum is checked when read."""

    def __init__(self, folder: Union[str, os.PathLike], device: Union[str, torch.device, None] = None) -> None:
        from artemis.sparse.checkpoint import read_export_meta

        meta, algo = read_export_meta(Path(folder), verify=True)
        if meta.get("int8_modules"):
            raise CheckpointError(
                f"{folder}: int8 layers are not read block by block; load it with artemis.load_pruned"
            )
        self._sparse = set(meta.get("sparse_modules") or [])
        self._aliases = dict(meta.get("aliases") or {})  # a tied tensor's other names -> the stored one
        self._algo = algo
        self._checksums = meta.get("checksums") or {}
        super().__init__(folder, device=device)
        wanted = meta.get("model_class")
        if wanted and type(self.model).__name__ != wanted:
            # config.json may name no architecture (a config saved from a model built in code);
            # the export records the class, as load_pruned reads it
            import transformers
            from accelerate import init_empty_weights

            cls = getattr(transformers, wanted, None)
            if cls is None:
                raise CheckpointError(f"{folder}: model_class {wanted!r} is not a transformers class")
            with init_empty_weights(include_buffers=False):
                self.model = cls(self.model.config)
            if hasattr(self.model, "tie_weights"):
                self.model.tie_weights()  # outside init_empty_weights, as LazyCheckpoint does
            self.model.eval()
            self._prefix = getattr(self.model, "base_model_prefix", "") or ""
            self._persistent = self._persistent_buffers()
            self._stored_dtypes()

    def _stored_dtype(self, key: str) -> Optional[torch.dtype]:
        if key not in self._where and self._sparse_key(key) is not None:
            key = f"{self._sparse_key(key)[: -len('.weight')]}.compressed"  # the kept values' dtype
        return super()._stored_dtype(key)

    def _sparse_key(self, name: str) -> Optional[str]:
        if not name.endswith(".weight"):
            return None
        p = self._prefix
        for n in (name, f"{p}.{name}" if p else None, name[len(p) + 1 :] if p and name.startswith(p + ".") else None):
            if (
                n is not None
                and n[: -len(".weight")] in self._sparse
                and f"{n[: -len('.weight')]}.compressed" in self._where
            ):
                return n
        return None

    def key_of(self, name: str) -> Optional[str]:
        name = self._aliases.get(name, name)
        return super().key_of(name) or self._sparse_key(name)

    def _get(self, key: str) -> Tensor:
        from safetensors import safe_open

        from artemis.sparse.checkpoint import CHECKSUMS

        with safe_open(str(self.folder / self._where[key]), framework="pt", device="cpu") as h:
            t = h.get_tensor(key).clone()  # a mapping closed after the read: no pages stay resident
        want = self._checksums.get(key)
        if want is not None and CHECKSUMS[self._algo](t) != want:
            raise CheckpointError(f"{self.folder}: tensor {key!r} fails its checksum (the file was changed)")
        return t

    def read(self, name: str) -> Tensor:
        from artemis.sparse.bitmask import SPARSE_KEYS, bitmask_decompress

        name = self._aliases.get(name, name)
        key = super().key_of(name)
        if key is not None:
            return self._get(key)
        key = self._sparse_key(name)
        if key is None:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is not in the checkpoint")
        module = key[: -len(".weight")]
        parts = {k: self._get(f"{module}.{k}") for k in SPARSE_KEYS}
        return bitmask_decompress(parts, name=key, file=str(self.folder))


def open_lazy(folder: Union[str, os.PathLike], device: Union[str, torch.device, None] = None) -> LazyCheckpoint:
    """Open a Hugging Face safetensors folder, or a :func:`artemis.save_pruned` one, lazily.

    Raises:
        CheckpointError: no ``config.json``, no safetensors weights, an int8 folder, or a
            model class transformers does not have.

    Example:
        >>> import tempfile, torch.nn as nn
        >>> from transformers import BertConfig, BertModel
        >>> folder = tempfile.mkdtemp()
        >>> BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...     intermediate_size=32)).save_pretrained(folder)
        >>> lazy = open_lazy(folder)
        >>> type(lazy.model).__name__, lazy.live_bytes
        ('BertModel', 0)
    """
    if is_pruned_folder(folder):
        return _PrunedCheckpoint(folder, device=device)
    return LazyCheckpoint(folder, device=device)


def streamed_block_bytes(model: nn.Module) -> tuple[int, int]:
    """``(bytes outside the transformer blocks, bytes of the largest block)`` of a model's
    parameters (on ``meta`` or not; tied parameters counted once): what streaming keeps resident.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> outer, block = streamed_block_bytes(BertModel(BertConfig(vocab_size=32, hidden_size=16,
        ...     num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)))
        >>> outer > 0, block > 0
        (True, True)
    """
    from artemis.arch import get_adapter

    blocks = get_adapter(model).blocks
    if blocks is None or len(blocks) == 0:
        raise ModelError(f"{type(model).__name__} has no transformer blocks to stream")
    inside = {id(p) for b in blocks for p in b.parameters()}
    outer = sum(p.numel() * p.element_size() for p in dict.fromkeys(model.parameters()) if id(p) not in inside)
    largest = max(sum(p.numel() * p.element_size() for p in dict.fromkeys(b.parameters())) for b in blocks)
    return outer, largest


class StreamedModel:
    """A checkpoint folder evaluated block by block (see the module docstring).

    Args:
        folder: a Hugging Face safetensors folder or a :func:`artemis.save_pruned` folder.
        device: where the blocks run (default CPU).

    Attributes:
        model: the model (on ``meta`` outside a pass).
        peak_param_bytes: the most parameter bytes on a real device at once, over every pass.
        max_resident_blocks: the most blocks with real parameters at once (1).
        block_forwards: block forward passes run (one per batch and block).
        parameters: after the first pass, ``{"parameters", "nonzero_parameters"}`` of the
            whole model, counted as each tensor was read (as
            :func:`artemis.evaluation.quality.parameter_stats`).
    """

    def __init__(self, folder: Union[str, os.PathLike], device: Union[str, torch.device, None] = None) -> None:
        from artemis.arch import get_adapter

        self.lazy = open_lazy(folder, device=device)
        self.model = self.lazy.model
        self.device = self.lazy.device
        adapter = get_adapter(self.model)
        if adapter.blocks is None or len(adapter.blocks) == 0:
            raise ModelError(f"{type(self.model).__name__} has no transformer blocks; it cannot be streamed")
        self.blocks = adapter.blocks
        self._prefixes = prefixes = adapter.block_prefixes()
        names = [n for n, _ in self.model.named_parameters(remove_duplicate=False)]
        names += [n for n, _ in self.model.named_buffers()]
        self._block_names = [[n for n in names if n.startswith(p + ".")] for p in prefixes]
        inside = {n for group in self._block_names for n in group}
        self._outer_names = [n for n in names if n not in inside]
        self.max_resident_blocks = 0
        self.block_forwards = 0
        self.parameters: Optional[dict[str, int]] = None
        self._counting: Optional[dict[str, tuple[int, int]]] = None

    @property
    def peak_param_bytes(self) -> int:
        return self.lazy.peak_bytes

    def close(self) -> None:
        """Free every parameter and close the shards."""
        self.lazy.release(self._outer_names)
        for names in self._block_names:
            self.lazy.release(names)
        self.lazy.close()

    def __enter__(self) -> "StreamedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ passes
    def _count(self, named: Any) -> None:
        """Count the real parameters of ``named`` (name, parameter) once each; a tied
        parameter (the same tensor under two names) counts once."""
        if self._counting is None:
            return
        for name, p in named:
            if p.device.type != "meta" and name not in self._counting:
                self._counting[name] = (p.numel(), int(torch.count_nonzero(p)))

    def _resident(self) -> int:
        return sum(1 for b in self.blocks if any(p.device.type != "meta" for p in b.parameters()))

    @torch.no_grad()
    def run(self, batches: Sequence[dict], consume: Callable[[int, dict, Any], None]) -> None:
        """Run every batch through the model block by block; ``consume(i, batch, output)``
        receives ``model(**batch)``'s output for each batch ``i``, in order.

        Raises:
            CalibrationError: a batch fails before the first block.
        """
        from artemis.data.pipeline import _block_output, _with_hidden, capture_inputs_per_block

        if not batches:
            raise ValueError("StreamedModel.run needs at least one batch")
        lazy, model = self.lazy, self.model
        was_training = model.training
        model.eval()
        first = self.parameters is None
        self._counting = {} if first else None
        lazy.materialise(self._outer_names)
        try:
            self._count(model.named_parameters())
            # every block's own arguments: layer types (sliding-window, full) get their own masks
            hidden, records = capture_inputs_per_block(model, self.blocks, batches, self.device)
            stream = [_with_hidden(*rec[0], h) for rec, h in zip(records, hidden)]
            outs: list[Any] = []
            last = len(self.blocks) - 1
            for i, block in enumerate(self.blocks):
                lazy.materialise(self._block_names[i])
                try:
                    self.max_resident_blocks = max(self.max_resident_blocks, self._resident())
                    self._count(block.named_parameters(prefix=self._prefixes[i]))
                    outs = []
                    for args, kwargs in stream:
                        outs.append(block(*args, **kwargs))
                        self.block_forwards += 1
                finally:
                    lazy.release(self._block_names[i])
                if i < last:
                    stream = [_with_hidden(*rec[i + 1], _block_output(y)) for rec, y in zip(records, outs)]
                    del outs
            del stream, records
            if first:
                counts = self._counting.values()
                self.parameters = {
                    "parameters": sum(c[0] for c in counts),
                    "nonzero_parameters": sum(c[1] for c in counts),
                }
            self._counting = None
            current: dict[str, Any] = {}

            def replay(*args: Any, **kwargs: Any) -> Any:
                return current["out"]

            for block in self.blocks:
                block.forward = replay
            try:
                for b, batch in enumerate(batches):
                    current["out"] = outs[b]
                    kw = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                    consume(b, batch, model(**kw))
                    outs[b] = None
            finally:
                for block in self.blocks:
                    del block.forward
        finally:
            self._counting = None
            lazy.release(self._outer_names)
            model.train(was_training)

    # ------------------------------------------------------------------ figures
    def perplexity(self, blocks: Sequence[dict]) -> float:
        """Token-weighted perplexity over batches with ``input_ids`` (optional
        ``attention_mask``/``labels``): :func:`artemis.evaluation.quality.perplexity`'s figure.

        Raises:
            ValueError: the batches hold no predicted token.
        """
        from artemis.evaluation.quality import batch_nll

        batches = []
        for batch in blocks:
            kw = {"input_ids": batch["input_ids"]}
            if "attention_mask" in batch:
                kw["attention_mask"] = batch["attention_mask"]
            batches.append(kw)
        totals = [0.0, 0]

        def consume(i: int, batch: dict, out: Any) -> None:
            ids = blocks[i]["input_ids"].to(self.device)
            labels = blocks[i].get("labels", ids).to(self.device)
            nll, tokens = batch_nll(out.logits, labels)
            totals[0] += nll
            totals[1] += tokens

        self.run(batches, consume)
        if totals[1] == 0:
            raise ValueError("perplexity: the evaluation batches hold no predicted tokens")
        return math.exp(totals[0] / totals[1])

    def sentence_embeddings(
        self,
        tokenizer: Any,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        max_length: int = 128,
        normalize: bool = True,
    ) -> Tensor:
        """Mean-pooled (and L2-normalised) embeddings of ``texts``:
        :func:`artemis.evaluation.quality.sentence_embeddings`' figure, one row per text."""
        from artemis.evaluation.quality import pooled_embeddings

        if isinstance(texts, str) or not len(texts):
            raise ValueError("texts must be a non-empty list of strings")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        batches = []
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            batches.append(dict(enc))
        rows: list[Tensor] = []

        def consume(i: int, batch: dict, out: Any) -> None:
            hidden = getattr(out, "last_hidden_state", None)
            if hidden is None:
                raise ModelError(
                    f"{type(self.model).__name__} returns no last_hidden_state; streamed sentence embeddings "
                    "need an encoder (AutoModel) folder"
                )
            rows.append(pooled_embeddings(hidden, batch["attention_mask"].to(hidden.device), normalize))

        self.run(batches, consume)
        return torch.cat(rows)
