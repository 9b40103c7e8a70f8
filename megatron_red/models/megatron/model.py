"""Build a megatron-core `GPTModel` that computes the same function as a Hugging Face Qwen2 / Llama / Qwen3 model, or a
Qwen3-MoE / Qwen2-MoE mixture of experts.

The families are one pre-norm decoder with RMSNorm, SwiGLU MLPs, rotary position embeddings and grouped-query
attention (models/architectures.py); Qwen2 adds a bias to the q/k/v projections, Qwen3 an RMSNorm over each query and
key head (megatron's `qk_layernorm`), Llama 3.x a frequency-dependent RoPE scaling (megatron's `rope_scaling`).
In the MoE families every layer's MLP is megatron's `MoELayer`: its `TopKRouter` (softmax score, top-k; Hugging
Face's `norm_topk_prob` renormalises the chosen probabilities, which is megatron's softmax over the top-k logits,
while without it megatron's `moe_router_pre_softmax` keeps the probabilities of the full softmax), the experts
(megatron's `SequentialMLP` of per-expert `MLP`s in the local spec; TE's grouped GEMM, `TEGroupedMLP`, in the
Transformer Engine spec) and, for Qwen2-MoE, the gated shared expert (`SharedExpertMLP`). Experts are split over the
expert-parallel ranks; each expert's MLP is split over TP like a dense MLP (expert tensor parallelism = TP).
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
from megatron_red.models.architectures import check_supported, has_qk_norm, has_qkv_bias, is_moe, rope_parameters
from megatron_red.models.megatron.layout import ParallelLayout, check_divides, transformer_engine_available
from megatron_red.models.precision import DTYPES

VOCAB_PAD_MULTIPLE = 128


@dataclass
class HFArchitecture:
    """The architecture fields of a Hugging Face config that the Megatron model must reproduce.

    model_type:           "qwen2", "llama", "qwen3", "qwen3_moe" or "qwen2_moe".
    hidden_size:          model width.
    num_layers:           number of decoder layers.
    num_attention_heads:  query heads.
    num_query_groups:     key/value heads (grouped-query attention).
    head_dim:             per-head width (kv_channels in Megatron).
    ffn_hidden_size:      SwiGLU intermediate size (of a dense MLP).
    vocab_size:           real (unpadded) vocabulary size.
    rms_norm_eps:         RMSNorm epsilon (also of Qwen3's per-head q/k norms).
    rope_theta:           rotary base.
    qkv_bias:             bias on q/k/v projections (always for Qwen2; `qkv_bias` for Qwen2-MoE; `attention_bias`
                          for Llama and Qwen3).
    tie_word_embeddings:  LM head shares the input embedding.
    max_position_embeddings: longest sequence the model is built for.
    qk_layernorm:         RMSNorm over each query and key head before RoPE (Qwen3, Qwen3-MoE).
    rope_scaling_factor:  Llama-3 RoPE scaling factor; None = plain RoPE.
    num_experts:          experts per MoE layer; 0 = a dense model.
    moe_ffn_hidden_size:  SwiGLU intermediate size of one expert (`moe_intermediate_size`).
    moe_router_topk:      experts per token (`num_experts_per_tok`).
    moe_norm_topk_prob:   the chosen experts' probabilities are renormalised to sum to 1 (`norm_topk_prob`).
    shared_expert_ffn_hidden_size: intermediate size of Qwen2-MoE's gated shared expert; 0 = none.
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
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0
    moe_router_topk: int = 0
    moe_norm_topk_prob: bool = False
    shared_expert_ffn_hidden_size: int = 0

    @classmethod
    def from_hf_config(cls, hf_config) -> "HFArchitecture":
        check_supported(hf_config, megatron=True)
        model_type = hf_config.model_type
        rope = rope_parameters(hf_config)
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        moe = {}
        if is_moe(hf_config):
            moe = dict(num_experts=hf_config.num_experts, moe_ffn_hidden_size=hf_config.moe_intermediate_size,
                       moe_router_topk=hf_config.num_experts_per_tok,
                       moe_norm_topk_prob=bool(getattr(hf_config, "norm_topk_prob", False)),
                       shared_expert_ffn_hidden_size=getattr(hf_config, "shared_expert_intermediate_size", 0) or 0)
        return cls(
            model_type=model_type, hidden_size=hf_config.hidden_size, num_layers=hf_config.num_hidden_layers,
            num_attention_heads=heads,
            num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim, ffn_hidden_size=hf_config.intermediate_size, vocab_size=hf_config.vocab_size,
            rms_norm_eps=hf_config.rms_norm_eps, rope_theta=float(rope["rope_theta"]), qkv_bias=has_qkv_bias(hf_config),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            max_position_embeddings=hf_config.max_position_embeddings,
            qk_layernorm=has_qk_norm(hf_config),
            rope_scaling_factor=float(rope["factor"]) if rope["rope_type"] == "llama3" else None, **moe,
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
    Mixtures of experts: softmax router in `layout.moe_router_dtype`, the load-balancing loss when
    `layout.moe_aux_loss_coeff` > 0 (its weight is rescaled per training call by the policy), dropless unless
    `layout.moe_capacity_factor`, EP = `layout.expert_model_parallel_size`.
    Activation recompute: `full` recomputes every layer in backward (megatron's full, uniform, one layer per
    checkpoint); `selective` only `layout.recompute_modules` of each layer. `cuda_graph_impl="local"` gives the
    layers megatron's CUDA-graph managers, which its inference engine uses for decode steps (training toggles them
    off: `megatron_red.rollout.megatron`).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_divides(layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size, arch.num_attention_heads,
                  arch.num_query_groups, arch.num_layers, layout.expert_model_parallel_size, arch.num_experts)
    if layout.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif layout.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=list(layout.recompute_modules))
    else:
        recompute = {}
    params_dtype = DTYPES[layout.dtype]
    # The all-to-all token dispatcher (see layout.py); megatron-core refuses its default (all-gather) with
    # variable_seq_lengths, even for a dense model, which does not use it.
    moe = dict(moe_token_dispatcher_type="alltoall")
    if arch.num_experts:
        moe = dict(
            num_moe_experts=arch.num_experts, moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
            moe_router_topk=arch.moe_router_topk, moe_router_score_function="softmax",
            moe_router_pre_softmax=not arch.moe_norm_topk_prob,
            moe_router_dtype=None if layout.moe_router_dtype == "model" else layout.moe_router_dtype,
            moe_router_load_balancing_type="aux_loss" if layout.moe_aux_loss_coeff else "none",
            moe_aux_loss_coeff=layout.moe_aux_loss_coeff, moe_token_dispatcher_type="alltoall",
            moe_expert_capacity_factor=layout.moe_capacity_factor, moe_token_drop_policy="probs",
            moe_grouped_gemm=layout.attention == "te", expert_model_parallel_size=layout.expert_model_parallel_size,
            moe_shared_expert_intermediate_size=arch.shared_expert_ffn_hidden_size or None,
            moe_shared_expert_gate=bool(arch.shared_expert_ffn_hidden_size),
            # The rollout engine runs these layers with the training dispatcher; megatron's inference context still
            # sets up the dispatcher named here under EP, and its default (NVLS) allocates symmetric GPU memory.
            inference_moe_token_dispatcher_type="nccl")
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
        sequence_parallel=layout.sequence_parallel, cuda_graph_impl=cuda_graph_impl, **moe, **recompute,
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
    experts = dict(num_experts=arch.num_experts or None, moe_grouped_gemm=attention == "te" and arch.num_experts > 0)
    if attention == "te":
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm, **experts)
    else:
        spec = local_block_spec(local_layer_spec(get_gpt_layer_local_spec(normalization="RMSNorm",
                                                                          qk_layernorm=arch.qk_layernorm, **experts),
                                                 attention), config)
    return GPTModel(
        config=config, transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(arch.vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=arch.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        parallel_output=True, share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope", rotary_base=arch.rope_theta, **rope_scaling,
    )
