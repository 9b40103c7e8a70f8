"""Benchmark the Hugging Face backend on one GPU: rollout (HF `generate` vs `LocalEngine`) and one training step
(`HFPolicy`, fused LM-head kernel on vs off).

Default shapes are the anchors of docs/targets.md: a randomly initialised Qwen2.5-1.5B-shaped model in bf16 with
sdpa attention; batch 64, 128-token prompts, 512 new tokens, sampling at temperature 1; a training step on
4 x 4096 tokens. Every row decodes all its new tokens (EOS is disabled) so both engines do the same work.
`--quick` shrinks everything to a small model (and `--device cpu --quick` is a smoke test).

    python tools/bench_rollout.py                      # H100 / H200, about 2-3 minutes
    python tools/bench_rollout.py --device cpu --quick # smoke test
"""
from __future__ import annotations

import argparse
import gc
import time

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from megatron_red.models import HFPolicy, OptimConfig, SequenceBatch
from megatron_red.rollout import LocalEngine, SamplingParams


def model_config(quick: bool) -> Qwen2Config:
    if quick:
        return Qwen2Config(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                           tie_word_embeddings=True)
    return Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1e6, tie_word_embeddings=True, rms_norm_eps=1e-6)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def bench_rollout(args, config, device, dtype, rows: list) -> None:
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, config.vocab_size, (args.batch, args.prompt_len), generator=g)
    new_tokens = args.batch * args.new_tokens
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens, seed=0)

    if not args.skip_hf_generate:
        print(f"HF generate: batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens ...",
              flush=True)
        ids = prompts.to(device)
        with torch.no_grad():
            out, seconds = timed(lambda: model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0,
                top_k=0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0), device)
        assert out.shape[1] == args.prompt_len + args.new_tokens
        rows.append(("rollout", "HF generate", seconds, new_tokens / seconds, ""))

    graph_modes = [False, True] if device.type == "cuda" else [False]
    tokens = {}
    for cuda_graph in graph_modes:
        engine = LocalEngine(model, eos_token_id=-1, pad_token_id=0, max_batch_size=args.batch, cuda_graph=cuda_graph)
        name = "LocalEngine" + (" + CUDA graph" if cuda_graph else " (eager)")
        print(f"{name} ...", flush=True)
        prompt_lists = prompts.tolist()
        engine.generate(prompt_lists[:2], 1, SamplingParams(max_new_tokens=4, seed=0))  # warm-up
        out, seconds = timed(lambda: engine.generate(prompt_lists, 1, params), device)
        tokens[cuda_graph] = [c.token_ids for cs in out for c in cs]
        assert all(len(t) == args.new_tokens for t in tokens[cuda_graph])
        rows.append(("rollout", name, seconds, new_tokens / seconds, ""))
        del engine
    if len(tokens) == 2:
        same = sum(a == b for a, b in zip(tokens[False], tokens[True]))
        print(f"eager vs CUDA graph: {same}/{len(tokens[False])} rows identical (same seed)", flush=True)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_train(args, config, device, rows: list) -> None:
    g = torch.Generator().manual_seed(1)
    b, length = args.train_batch, args.train_len
    input_ids = torch.randint(1, config.vocab_size, (b, length), generator=g)
    loss_mask = torch.ones(b, length - 1)
    loss_mask[:, : args.train_prompt_len - 1] = 0  # prompt tokens carry no loss
    batch = SequenceBatch(input_ids, torch.ones_like(input_ids), loss_mask,
                          {"advantages": torch.randn(b, generator=g)})
    total = loss_mask.sum()

    def loss_fn(logprobs, entropy, mb):  # a policy-gradient-shaped loss with global token normalisation
        loss = -((mb.fields["advantages"][:, None] * logprobs + 1e-3 * entropy) * mb.loss_mask).sum() / total
        return loss, {}

    reference = None
    for fused in ("off", "on"):
        print(f"HFPolicy step, {b} x {length} tokens, fused_kernel={fused} ...", flush=True)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
        policy = HFPolicy(model, OptimConfig(lr=1e-6), device=device, fused_kernel=fused,
                          gradient_checkpointing=args.grad_ckpt)
        logprobs, _ = policy.logprobs_entropy(batch, args.micro_batch)
        if reference is None:
            reference = logprobs
        else:
            diff = (logprobs - reference).abs().max().item()
            print(f"  max |logprob(fused on) - logprob(fused off)| = {diff:.2e}", flush=True)
        def step():
            policy.forward_backward(batch, args.micro_batch, loss_fn)
            policy.optimizer_step()
        step()  # warm-up: kernel compilation, allocator growth
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _, seconds = timed(lambda: [step() for _ in range(args.train_steps)], device)
        seconds /= args.train_steps
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB peak" if device.type == "cuda" else ""
        rows.append(("train", f"HFPolicy fused={fused}", seconds, b * length / seconds, peak))
        del policy, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small model and shapes")
    parser.add_argument("--batch", type=int, help="rollout rows (default 64; quick 8)")
    parser.add_argument("--prompt-len", type=int, help="rollout prompt tokens (default 128; quick 16)")
    parser.add_argument("--new-tokens", type=int, help="new tokens per row (default 512; quick 32)")
    parser.add_argument("--skip-hf-generate", action="store_true", help="skip the (slow) HF generate baseline")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--train-batch", type=int, help="training sequences (default 4; quick 2)")
    parser.add_argument("--train-len", type=int, help="tokens per training sequence (default 4096; quick 128)")
    parser.add_argument("--train-prompt-len", type=int, default=16, help="leading tokens without loss")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per forward/backward")
    parser.add_argument("--train-steps", type=int, default=2, help="timed steps after one warm-up step (>= 1)")
    parser.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing")
    args = parser.parse_args()
    for name, full, quick in (("batch", 64, 8), ("prompt_len", 128, 16), ("new_tokens", 512, 32),
                              ("train_batch", 4, 2), ("train_len", 4096, 128)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)

    if args.train_steps < 1 or args.micro_batch < 1:
        parser.error("--train-steps and --micro-batch must be >= 1")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = model_config(args.quick)
    if device.type == "cpu":
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; model: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"vocab {config.vocab_size}; activations {dtype}", flush=True)

    rows: list = []
    bench_rollout(args, config, device, dtype, rows)
    if not args.skip_train:
        bench_train(args, config, device, rows)

    print(f"\n{'work':8} {'implementation':34} {'seconds':>9} {'tokens/s':>11}  notes")
    for work, impl, seconds, rate, note in rows:
        print(f"{work:8} {impl:34} {seconds:9.3f} {rate:11.0f}  {note}")
    hf = next((r[3] for r in rows if r[1] == "HF generate"), None)
    if hf:
        for work, impl, _, rate, _ in rows:
            if impl.startswith("LocalEngine"):
                print(f"{impl}: {rate / hf:.1f}x HF generate (target >= 10x)")


if __name__ == "__main__":
    main()
