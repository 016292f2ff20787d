"""Adapters for the supported Hugging Face families.

* ``llama``: Llama, Mistral, Qwen2/Qwen3, Gemma, Phi-3 and other Llama-shaped decoders
  (``model.layers``; attention ``self_attn.{q,k,v,o}_proj``; gated MLP
  ``mlp.{gate,up,down}_proj``).
* ``gpt2``: GPT-2 (``transformer.h``; fused ``attn.c_attn`` Conv1D).
* ``bert``: BERT-family encoders, including sentence-transformers' MiniLM
  (``encoder.layer``; ``attention.self.{query,key,value}``).
* Mixture-of-Experts decoders with transformers 5's fused experts (``model.layers``;
  ``mlp.experts.{gate_up_proj,down_proj}`` 3-D, router ``mlp.gate``; see
  :mod:`artemis.arch.moe`): ``mixtral`` (Mixtral), ``qwen_moe`` (Qwen2-MoE with its shared
  expert, Qwen3-MoE, OLMoE), ``gpt_oss`` (GPT-OSS: transposed experts with biases, router
  ``mlp.router``) and ``deepseek_v3`` (weight pruning only: its grouped, biased routing is
  not supported by ``expert_pruning``).

Example:
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from artemis.arch.families import BertAdapter, GPT2Adapter
    >>> cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0)
    >>> model = GPT2LMHeadModel(cfg)
    >>> GPT2Adapter.matches(model), BertAdapter.matches(model)
    (True, False)
    >>> GPT2Adapter().bind(model).block_prefixes()
    ['transformer.h.0', 'transformer.h.1']
"""

from __future__ import annotations

from artemis.arch.base import ADAPTERS, ArchitectureAdapter

__all__ = [
    "LlamaAdapter",
    "GPT2Adapter",
    "BertAdapter",
    "MixtralAdapter",
    "QwenMoeAdapter",
    "GptOssAdapter",
    "DeepseekV3Adapter",
]


@ADAPTERS.register("llama")
class LlamaAdapter(ArchitectureAdapter):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "granite")
    block_paths = ("model.layers", "layers")


@ADAPTERS.register("gpt2")
class GPT2Adapter(ArchitectureAdapter):
    name = "gpt2"
    model_types = ("gpt2",)
    block_paths = ("transformer.h", "h")


@ADAPTERS.register("bert")
class BertAdapter(ArchitectureAdapter):
    name = "bert"
    model_types = ("bert", "roberta", "xlm-roberta")
    block_paths = ("encoder.layer",)


@ADAPTERS.register("mixtral")
class MixtralAdapter(ArchitectureAdapter):
    name = "mixtral"
    model_types = ("mixtral",)
    block_paths = ("model.layers", "layers")
    moe_routing = "softmax_topk_norm"


@ADAPTERS.register("qwen_moe")
class QwenMoeAdapter(ArchitectureAdapter):
    name = "qwen_moe"
    model_types = ("qwen2_moe", "qwen3_moe", "olmoe")
    block_paths = ("model.layers", "layers")
    moe_routing = "softmax_topk"


@ADAPTERS.register("gpt_oss")
class GptOssAdapter(ArchitectureAdapter):
    name = "gpt_oss"
    model_types = ("gpt_oss",)
    block_paths = ("model.layers", "layers")
    moe_routing = "topk_softmax"


@ADAPTERS.register("deepseek_v3")
class DeepseekV3Adapter(ArchitectureAdapter):
    name = "deepseek_v3"
    model_types = ("deepseek_v3",)
    block_paths = ("model.layers", "layers")
    moe_routing = None  # grouped routing with a score-correction bias: no expert removal yet
