"""One-GPU smoke benchmark of the Megatron backend against the Hugging Face backend.

Builds a random Qwen2.5-0.5B-shaped model (`--model-type qwen3 | llama3`: Qwen3-0.6B or Llama-3.2-1B shaped), then
for each backend (same weights, same inputs): forward-only log-probs + entropies of 8 x 4096 tokens, and one RED-like
training step (policy-gradient loss on the log-probs, normalised by the global token count). Prints tokens/s, peak
memory, the max |log-prob| difference between the backends, and the card. Run: `python tools/megatron_smoke.py` (needs CUDA and megatron-core; no TE required:
the local layer spec is used when Transformer Engine is absent).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist


def qwen2_05b_config(vocab_size: int, max_len: int):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=max_len,
                       rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)


def family_config(model_type: str, vocab_size: int, max_len: int):
    """Qwen2.5-0.5B, Qwen3-0.6B (QK-norm, head_dim 128 != hidden / heads) or Llama-3.2-1B (llama3 RoPE scaling)
    shapes."""
    from transformers import LlamaConfig, Qwen3Config

    if model_type == "qwen2":
        return qwen2_05b_config(vocab_size, max_len)
    if model_type == "qwen3":
        return Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                           num_key_value_heads=8, head_dim=128, vocab_size=vocab_size, max_position_embeddings=max_len,
                           rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=vocab_size, max_position_embeddings=max(max_len, 8193),
                       rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0,
                       rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=8192))


def make_batch(batch: int, length: int, vocab: int, prompt: int = 256):
    from megatron_red.models.base import SequenceBatch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    lengths = torch.linspace(length // 2, length, batch).long()  # variable lengths, right-padded
    attn = (torch.arange(length)[None] < lengths[:, None]).long()
    loss_mask = attn[:, 1:].clone()
    loss_mask[:, :prompt] = 0
    return SequenceBatch(ids * attn, attn, loss_mask, {"advantages": torch.randn(batch, generator=g)})


def pg_loss(total_tokens: float):
    def loss_fn(logprobs, entropy, mb):
        mask = mb.loss_mask.to(logprobs.device, logprobs.dtype)
        adv = mb.fields["advantages"].to(logprobs.device, logprobs.dtype)[:, None]
        loss = -(logprobs * adv * mask).sum() / total_tokens
        return loss, {"loss": loss.item()}
    return loss_fn


def timed(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


def run_backend(name, policy, batch, mbs, rows):
    tokens = int(batch.attention_mask.sum())
    # Untimed warm-up on one micro-batch: Triton autotuning, cuBLAS handles, optimiser state allocation.
    warm = batch.select(slice(0, mbs))
    policy.logprobs_entropy(warm, mbs)
    policy.forward_backward(warm, mbs, pg_loss(float(warm.loss_mask.sum())))
    policy.optimizer_step()
    (lp, _), t_fwd, m_fwd = timed(lambda: policy.logprobs_entropy(batch, mbs))
    loss_fn = pg_loss(float(batch.loss_mask.sum()))
    _, t_step, m_step = timed(lambda: (policy.forward_backward(batch, mbs, loss_fn), policy.optimizer_step()))
    rows.append((name, tokens / t_fwd, m_fwd, tokens / t_step, m_step))
    return lp


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--skip-hf", action="store_true", help="only the Megatron backend")
    parser.add_argument("--fused-kernel", action="store_true", help="fused LM-head log-prob kernel in Megatron")
    parser.add_argument("--model-type", default="qwen2", choices=("qwen2", "qwen3", "llama3"),
                        help="model family (random weights): Qwen2.5-0.5B, Qwen3-0.6B or Llama-3.2-1B shaped")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("megatron_smoke needs a CUDA GPU")

    from transformers import AutoModelForCausalLM

    from megatron_red.models.megatron import MegatronConfig, MegatronPolicy
    from megatron_red.models.optim import OptimConfig

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    config = family_config(args.model_type, args.vocab, args.length)
    hf_model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()
    state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    batch = make_batch(args.batch, args.length, args.vocab)
    optim = OptimConfig(lr=1e-6)
    n_params = sum(p.numel() for p in hf_model.parameters()) / 1e9
    print(f"card: {torch.cuda.get_device_name()} | model: {args.model_type}-shaped {n_params:.2f}B random | "
          f"batch {args.batch} x {args.length} | micro-batch {args.micro_batch_size}", flush=True)

    rows = []
    policy = MegatronPolicy(config, state, MegatronConfig(dtype="bfloat16", fused_kernel=args.fused_kernel), optim)
    lp_megatron = run_backend("megatron", policy, batch, args.micro_batch_size, rows)
    del policy
    torch.cuda.empty_cache()
    lp_hf = None
    if not args.skip_hf:
        from megatron_red.models.hf import HFPolicy

        hf_policy = HFPolicy(hf_model, optim, device="cuda")
        lp_hf = run_backend("hf", hf_policy, batch, args.micro_batch_size, rows)

    print(f"{'backend':<10}{'fwd tok/s':>12}{'fwd GiB':>10}{'step tok/s':>12}{'step GiB':>10}")
    for name, fwd, m_fwd, step, m_step in rows:
        print(f"{name:<10}{fwd:>12.0f}{m_fwd:>10.1f}{step:>12.0f}{m_step:>10.1f}")
    if lp_hf is not None:
        mask = batch.loss_mask.bool()
        diff = (lp_megatron - lp_hf)[mask].abs()
        print(f"log-prob |megatron - hf| on response tokens: max {diff.max():.3e}, mean {diff.mean():.3e} (bf16)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
