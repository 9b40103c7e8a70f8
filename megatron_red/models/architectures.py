"""The Hugging Face decoder families every backend reproduces, and the check that refuses anything else.

Qwen2 / Qwen2.5, Llama 2 / 3.x and Qwen3 are one architecture up to three switches: a bias on the q/k/v projections
(always for Qwen2, `attention_bias` otherwise), an RMSNorm over each query and key head before the rotary embedding
(Qwen3's QK-norm), and Llama 3.x's frequency-dependent RoPE scaling (`rope_scaling` of type `llama3`). Each is a
pre-norm decoder with RMSNorm, a SwiGLU MLP without biases, rotary position embeddings and grouped-query attention.

The mixtures of experts Qwen3-MoE (`Qwen3MoeForCausalLM`, e.g. Qwen3-30B-A3B) and Qwen2-MoE (`Qwen2MoeForCausalLM`)
are those decoders with the MLP of every layer replaced by `num_experts` SwiGLU experts of width
`moe_intermediate_size` and a linear router (`mlp.gate`, no bias): each token goes to the `num_experts_per_tok`
experts of highest softmax probability, weighted by those probabilities (renormalised over the chosen ones when
`norm_topk_prob`). Qwen3-MoE has Qwen3's attention (QK-norm, `attention_bias`); Qwen2-MoE has Qwen2's (q/k/v bias,
`qkv_bias`) and adds a shared expert (width `shared_expert_intermediate_size`) that every token passes through,
scaled by sigmoid(`shared_expert_gate`). Layers without experts (`mlp_only_layers`, `decoder_sparse_step` > 1) are
refused.

`check_supported(hf_config)` is called by the Hugging Face policy, the local rollout engine and the Megatron model
builder, so a checkpoint is refused the same way everywhere, with the config key that is not supported.
`megatron=True` adds what megatron-core 0.19 cannot express: its `RotaryEmbedding` applies Llama-3 scaling with
`low_freq_factor`, `high_freq_factor` and `original_max_position_embeddings` hard-coded (1, 4, 8192; only the factor
is a parameter), which are the values of every released Llama 3.1 / 3.2 / 3.3 checkpoint.
"""
from __future__ import annotations

from megatron_red.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "qwen3", "qwen3_moe", "qwen2_moe")
MOE_MODEL_TYPES = ("qwen3_moe", "qwen2_moe")
"""The mixture-of-experts families (module docstring)."""
# megatron-core's RotaryEmbedding._apply_scaling defaults, which GPTModel gives no way to change.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rope_parameters(hf_config) -> dict:
    """The rotary settings of a config as one dict with `rope_type` and `rope_theta`, whether transformers stored
    them as `rope_parameters` (5.x) or as `rope_scaling` + `rope_theta` (4.x; older files say `type`)."""
    params = {**(getattr(hf_config, "rope_scaling", None) or {}), **(getattr(hf_config, "rope_parameters", None) or {})}
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    return params


def check_supported(hf_config, megatron: bool = False) -> None:
    """Raise ValueError naming the first config key (and its value) that a backend would not reproduce."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model_type={model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
    unsupported = [
        ("hidden_act", getattr(hf_config, "hidden_act", "silu"), lambda v: v == "silu", "silu (SwiGLU)"),
        ("mlp_bias", getattr(hf_config, "mlp_bias", False), lambda v: not v, "false"),
        ("use_sliding_window", getattr(hf_config, "use_sliding_window", False), lambda v: not v, "false"),
        ("layer_types", getattr(hf_config, "layer_types", None),
         lambda v: not v or all(t == "full_attention" for t in v), "full_attention on every layer"),
        ("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None) or
         rope_parameters(hf_config).get("partial_rotary_factor", 1.0), lambda v: v == 1.0, "1.0"),
        # pi / pi_old must compare one deterministic function; dropout would make the ratio noise.
        ("attention_dropout", getattr(hf_config, "attention_dropout", 0.0), lambda v: not v, "0"),
    ]
    if model_type in MOE_MODEL_TYPES:
        unsupported += [
            ("num_experts", getattr(hf_config, "num_experts", 0), lambda v: v >= 1, ">= 1"),
            ("num_experts_per_tok", getattr(hf_config, "num_experts_per_tok", 0),
             lambda v: 1 <= v <= getattr(hf_config, "num_experts", 0), "between 1 and num_experts"),
            # every layer a mixture of experts: megatron_red maps and plans uniform layers
            ("decoder_sparse_step", getattr(hf_config, "decoder_sparse_step", 1), lambda v: v == 1, "1"),
            ("mlp_only_layers", getattr(hf_config, "mlp_only_layers", None), lambda v: not v, "[]"),
        ]
    for key, value, ok, expected in unsupported:
        if not ok(value):
            raise ConfigError(f"{model_type} config: {key}={value!r} is not supported (expected {expected})")
    if megatron:
        _check_megatron_rope(model_type, rope_parameters(hf_config))


def _check_megatron_rope(model_type: str, rope: dict) -> None:
    rope_type = rope["rope_type"]
    if rope_type == "default":
        return
    if rope_type != "llama3":
        raise ConfigError(f"{model_type} config: rope_scaling.rope_type={rope_type!r} is not supported by the Megatron "
                          "backend (plain RoPE or llama3 only)")
    for key, value in MEGATRON_LLAMA3_ROPE.items():
        if float(rope.get(key, value)) != value:
            raise ConfigError(f"{model_type} config: rope_scaling.{key}={rope[key]!r} is not supported by the Megatron "
                              f"backend: megatron-core 0.19 hard-codes {key}={value} for llama3 RoPE scaling")


def is_moe(hf_config) -> bool:
    """Whether the config is one of the mixture-of-experts families (`MOE_MODEL_TYPES`)."""
    return getattr(hf_config, "model_type", None) in MOE_MODEL_TYPES


def num_experts(hf_config) -> int:
    """Experts per MoE layer; 0 for a dense model."""
    return int(hf_config.num_experts) if is_moe(hf_config) else 0


def has_qk_norm(hf_config) -> bool:
    """Qwen3's RMSNorm over each query and key head before RoPE (Qwen3 and Qwen3-MoE)."""
    return getattr(hf_config, "model_type", None) in ("qwen3", "qwen3_moe")


def has_qkv_bias(hf_config) -> bool:
    """A bias on the q/k/v projections: always for Qwen2, `qkv_bias` for Qwen2-MoE, `attention_bias` otherwise."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "qwen2":
        return True
    if model_type == "qwen2_moe":
        return bool(getattr(hf_config, "qkv_bias", True))
    return bool(getattr(hf_config, "attention_bias", False))
