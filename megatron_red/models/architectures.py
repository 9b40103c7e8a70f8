"""The Hugging Face decoder families every backend reproduces, and the check that refuses anything else.

Qwen2 / Qwen2.5, Llama 2 / 3.x and Qwen3 are one architecture up to three switches: a bias on the q/k/v projections
(always for Qwen2, `attention_bias` otherwise), an RMSNorm over each query and key head before the rotary embedding
(Qwen3's QK-norm), and Llama 3.x's frequency-dependent RoPE scaling (`rope_scaling` of type `llama3`). Each is a
pre-norm decoder with RMSNorm, a SwiGLU MLP without biases, rotary position embeddings and grouped-query attention.

`check_supported(hf_config)` is called by the Hugging Face policy, the local rollout engine and the Megatron model
builder, so a checkpoint is refused the same way everywhere, with the config key that is not supported.
`megatron=True` adds what megatron-core 0.19 cannot express: its `RotaryEmbedding` applies Llama-3 scaling with
`low_freq_factor`, `high_freq_factor` and `original_max_position_embeddings` hard-coded (1, 4, 8192; only the factor
is a parameter), which are the values of every released Llama 3.1 / 3.2 / 3.3 checkpoint.
"""
from __future__ import annotations

from megatron_red.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "qwen3")
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
