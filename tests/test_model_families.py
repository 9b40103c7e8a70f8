"""Llama-3 (llama3 RoPE scaling) and Qwen3 (per-head QK-norm, no QKV bias) on the Hugging Face policy and the local
rollout engine, against transformers' own model; and the config keys that every backend refuses by name.

The Megatron side (logits, export and one training step at TP=2 against the HF model) is in tests/test_megatron.py.
"""
import copy
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from megatron_red.models.architectures import SUPPORTED_MODEL_TYPES, check_supported
from megatron_red.models.hf import HFPolicy
from megatron_red.models.megatron.model import HFArchitecture
from megatron_red.models.precision import resolve_dtype
from megatron_red.rollout import LocalEngine, SamplingParams
from megatron_red.trainer.build import build_engine

VOCAB, PAD, EOS = 64, 0, 7
PROMPTS = [[5, 9, 17, 3, 8], [11, 2], [40, 41, 42, 43, 44, 45, 46]]
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192, rope_theta=500000.0)


def tiny_config(kind: str, **overrides):
    # A wide init makes next-token distributions peaked, so greedy choices have clear margins.
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, pad_token_id=PAD)
    common.update(overrides)
    if kind == "llama3":
        return LlamaConfig(rope_scaling=dict(LLAMA3_ROPE), **common)
    if kind == "qwen3":
        return Qwen3Config(head_dim=16, **common)  # head_dim != hidden / heads, as in real Qwen3
    if kind == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common)


def perturb_norms(model, seed=0):
    """Norm gains away from 1 (Qwen3's q/k norms included), so that leaving a norm out changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.5 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", ["llama3", "qwen3"])
def test_hf_policy_and_local_engine_match_transformers(kind):
    config = tiny_config(kind)
    policy = HFPolicy.from_config(config, device="cpu", fused_kernel="off", seed=0)
    perturb_norms(policy.model)
    model = policy.model.eval()
    if kind == "llama3":  # the scaling is really on: the slow rotary frequencies are divided by up to 8
        assert not torch.allclose(model.model.rotary_emb.inv_freq, 1 / 500000.0 ** (torch.arange(0, 8, 2) / 8))
    else:
        attention = model.model.layers[0].self_attn
        assert hasattr(attention, "q_norm") and attention.q_proj.bias is None

    # Greedy decoding of the local engine (the HF backend's rollout engine) = transformers' generate.
    engine = LocalEngine(model, eos_token_id=EOS, pad_token_id=PAD, max_batch_size=8)
    out = engine.generate(PROMPTS, n=1, params=SamplingParams(top_p=1e-9, max_new_tokens=12, seed=0))
    width = max(map(len, PROMPTS))
    input_ids = torch.tensor([[PAD] * (width - len(p)) + p for p in PROMPTS])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    model.generation_config.use_cache = True
    reference = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=12,
                               eos_token_id=EOS, pad_token_id=PAD)[:, width:]
    for (completion,), expected in zip(out, reference.tolist()):
        expected = expected[:expected.index(EOS) + 1] if EOS in expected else expected
        assert completion.token_ids == expected

    # The policy's log-probs of those sequences = float64 log-softmax of transformers' logits.
    from megatron_red.batch import SequenceBatch

    ids = torch.tensor([p + c.token_ids + [PAD] * (12 - len(c.token_ids)) for p, (c,) in zip([PROMPTS[0]], out)])
    attn = (torch.arange(ids.shape[1]) < len(PROMPTS[0]) + len(out[0][0].token_ids)).long()[None]
    loss_mask = attn[:, 1:].clone()
    loss_mask[:, :len(PROMPTS[0]) - 1] = 0
    logprobs, _ = policy.get_inference_log_probs(SequenceBatch(ids, attn, loss_mask), micro_batch_size=1)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        logp = torch.log_softmax(model64(ids, attention_mask=attn).logits[:, :-1], dim=-1)
    expected = logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * loss_mask
    torch.testing.assert_close(logprobs.double(), expected, atol=1e-5, rtol=0)


def test_unsupported_configs_are_refused_with_the_key():
    assert SUPPORTED_MODEL_TYPES == ("qwen2", "llama", "qwen3", "qwen3_moe", "qwen2_moe")
    cases = [
        (MistralConfig(), "model_type='mistral'"),
        (tiny_config("qwen2", use_sliding_window=True, max_window_layers=0), "use_sliding_window=True"),
        (tiny_config("llama", mlp_bias=True), "mlp_bias=True"),
        (tiny_config("llama", hidden_act="gelu"), "hidden_act='gelu'"),
        (tiny_config("llama", attention_dropout=0.1), "attention_dropout=0.1"),
    ]
    for config, key in cases:
        with pytest.raises(ValueError, match=key.replace("(", r"\(")):
            check_supported(config)
        with pytest.raises(ValueError, match=key):
            HFArchitecture.from_hf_config(config)
    with pytest.raises(ValueError, match="use_sliding_window=True"):  # the local engine refuses it too
        build_engine("local", AutoModelForCausalLM.from_config(cases[1][0]),
                     types.SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD))


def test_megatron_accepts_only_the_rope_scaling_megatron_core_implements():
    arch = HFArchitecture.from_hf_config(tiny_config("llama3"))
    assert arch.rope_scaling_factor == 8.0 and arch.rope_theta == 500000.0 and not arch.qk_layernorm
    arch = HFArchitecture.from_hf_config(tiny_config("qwen3"))
    assert arch.qk_layernorm and not arch.qkv_bias and arch.head_dim == 16 and arch.rope_scaling_factor is None
    # Llama-3.2's factor 32 is a parameter of megatron-core; the other three llama3 numbers are hard-coded there.
    assert HFArchitecture.from_hf_config(tiny_config("llama", rope_scaling={**LLAMA3_ROPE, "factor": 32.0})
                                         ).rope_scaling_factor == 32.0
    for key, value in [("low_freq_factor", 2.0), ("high_freq_factor", 8.0), ("original_max_position_embeddings", 4096)]:
        config = tiny_config("llama", rope_scaling={**LLAMA3_ROPE, key: value})
        check_supported(config)  # the Hugging Face backend computes any llama3 RoPE itself
        with pytest.raises(ValueError, match=f"rope_scaling.{key}={value}"):
            HFArchitecture.from_hf_config(config)
    yarn = tiny_config("llama", rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32,
                                                  rope_theta=10000.0))
    check_supported(yarn)
    with pytest.raises(ValueError, match="rope_scaling.rope_type='yarn'"):
        HFArchitecture.from_hf_config(yarn)


def test_megatron_refuses_fp16_and_unknown_dtypes_are_named():
    from megatron_red.config import load_config

    with pytest.raises(ValueError, match="model.dtype=float16 is not supported by the Megatron backend"):
        load_config(None, ["model.backend=megatron", "model.dtype=float16"])
    assert load_config(None, ["model.backend=megatron", "model.dtype=bfloat16"]).model.dtype == "bfloat16"
    with pytest.raises(ValueError, match="model.dtype='fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
