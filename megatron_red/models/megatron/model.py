"""Build a megatron-core `GPTModel` that computes the same function as a Hugging Face Qwen2 / Llama / Qwen3 model.

The three families are one pre-norm decoder with RMSNorm, SwiGLU MLPs, rotary position embeddings and grouped-query
attention (models/architectures.py); Qwen2 adds a bias to the q/k/v projections, Qwen3 an RMSNorm over each query and
key head (megatron's `qk_layernorm`), Llama 3.x a frequency-dependent RoPE scaling (megatron's `rope_scaling`).
The Transformer Engine layer spec is used with `model.attention=te` (fused kernels on GPU, RoPE fused too);
otherwise megatron-core's local spec (`get_gpt_layer_local_spec`) with the attention named by `model.attention`: our
`SDPACoreAttention` (torch SDPA; flash / memory-efficient kernels on GPU, packed sequences; what `auto` runs, see
layout.py) or megatron's own unfused `DotProductAttention` (baddbmm + softmax + bmm) — see local_spec.py. Both run
without TE, apex or flash-attn.

The vocabulary is padded to a multiple of 128 x TP so that every tensor-parallel rank holds an equal, aligned
shard of the embedding and LM head; the padded rows are zero and excluded from log-probs via `valid_vocab_size`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_red.errors import ConfigError
from megatron_red.models.architectures import check_supported, rope_parameters
from megatron_red.models.megatron.layout import ParallelLayout, check_divides, transformer_engine_available
from megatron_red.models.precision import DTYPES

VOCAB_PAD_MULTIPLE = 128


@dataclass
class HFArchitecture:
    """The architecture fields of a Hugging Face config that the Megatron model must reproduce.

    model_type:           "qwen2", "llama" or "qwen3".
    hidden_size:          model width.
    num_layers:           number of decoder layers.
    num_attention_heads:  query heads.
    num_query_groups:     key/value heads (grouped-query attention).
    head_dim:             per-head width (kv_channels in Megatron).
    ffn_hidden_size:      SwiGLU intermediate size.
    vocab_size:           real (unpadded) vocabulary size.
    rms_norm_eps:         RMSNorm epsilon (also of Qwen3's per-head q/k norms).
    rope_theta:           rotary base.
    qkv_bias:             bias on q/k/v projections (always for Qwen2; `attention_bias` for Llama and Qwen3).
    tie_word_embeddings:  LM head shares the input embedding.
    max_position_embeddings: longest sequence the model is built for.
    qk_layernorm:         RMSNorm over each query and key head before RoPE (Qwen3).
    rope_scaling_factor:  Llama-3 RoPE scaling factor; None = plain RoPE.
    """

    model_type: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    qk_layernorm: bool = False
    rope_scaling_factor: float | None = None

    @classmethod
    def from_hf_config(cls, hf_config) -> "HFArchitecture":
        check_supported(hf_config, megatron=True)
        model_type = hf_config.model_type
        rope = rope_parameters(hf_config)
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        qkv_bias = True if model_type == "qwen2" else bool(getattr(hf_config, "attention_bias", False))
        return cls(
            model_type=model_type, hidden_size=hf_config.hidden_size, num_layers=hf_config.num_hidden_layers,
            num_attention_heads=heads,
            num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim, ffn_hidden_size=hf_config.intermediate_size, vocab_size=hf_config.vocab_size,
            rms_norm_eps=hf_config.rms_norm_eps, rope_theta=float(rope["rope_theta"]), qkv_bias=qkv_bias,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            max_position_embeddings=hf_config.max_position_embeddings,
            qk_layernorm=model_type == "qwen3",
            rope_scaling_factor=float(rope["factor"]) if rope["rope_type"] == "llama3" else None,
        )


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int) -> int:
    """Smallest multiple of 128 x TP that holds `vocab_size` (Megatron's alignment of the vocab shards)."""
    multiple = VOCAB_PAD_MULTIPLE * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def make_transformer_config(arch: HFArchitecture, layout: ParallelLayout, *, use_cpu_initialization: bool = False,
                            cuda_graph_impl: str = "none"):
    """A `TransformerConfig` for `arch` in `layout` (TP, PP, dtype, sequence parallelism, recompute, RoPE fusion)
    with dropout off and every other fusion that needs apex/TE disabled.

    `variable_seq_lengths=True` because RED micro-batches are trimmed to their longest row (or packed to a token
    budget), so pipeline stages exchange activation shapes per micro-batch.
    Activation recompute: `full` recomputes every layer in backward (megatron's full, uniform, one layer per
    checkpoint); `selective` only `layout.recompute_modules` of each layer. `cuda_graph_impl="local"` gives the
    layers megatron's CUDA-graph managers, which its inference engine uses for decode steps (training toggles them
    off: `megatron_red.rollout.megatron`).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_divides(layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size, arch.num_attention_heads,
                  arch.num_query_groups, arch.num_layers)
    if layout.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif layout.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=list(layout.recompute_modules))
    else:
        recompute = {}
    params_dtype = DTYPES[layout.dtype]
    return TransformerConfig(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups, kv_channels=arch.head_dim, ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=arch.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=arch.qkv_bias, qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=layout.rope_fusion, persist_layer_norm=False, gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        params_dtype=params_dtype, pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=use_cpu_initialization, variable_seq_lengths=True,
        sequence_parallel=layout.sequence_parallel,
        # No experts here; megatron-core rejects variable_seq_lengths with its default MoE dispatcher anyway.
        moe_token_dispatcher_type="alltoall", cuda_graph_impl=cuda_graph_impl,
        **recompute,
    )


def build_gpt_model(arch: HFArchitecture, config, *, pre_process: bool, post_process: bool, attention: str):
    """The `GPTModel` stage for this rank (`pre_process`: holds the embedding; `post_process`: holds the head).

    `attention` (resolved `model.attention`): `te` = the Transformer Engine spec; `sdpa` / `local` = megatron's local
    spec with `SDPACoreAttention` / `DotProductAttention`.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                          get_gpt_layer_with_transformer_engine_spec)

    from megatron_red.models.megatron.local_spec import local_block_spec, local_layer_spec

    if attention == "te" and not transformer_engine_available():
        raise ConfigError("model.attention=te needs Transformer Engine (pip install megatron_red[gpu]); use sdpa "
                          "without it")
    rope_scaling = {} if arch.rope_scaling_factor is None else dict(rope_scaling=True,
                                                                     rope_scaling_factor=arch.rope_scaling_factor)
    if attention == "te":
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm)
    else:
        spec = local_block_spec(local_layer_spec(get_gpt_layer_local_spec(normalization="RMSNorm",
                                                                          qk_layernorm=arch.qk_layernorm),
                                                 attention), config)
    return GPTModel(
        config=config, transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(arch.vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=arch.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        parallel_output=True, share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope", rotary_base=arch.rope_theta, **rope_scaling,
    )
