"""One-GPU benchmark of the Megatron training step (padded vs packed rows, local-spec vs SDPA attention) and the HF
backend, on a random Qwen2.5-1.5B-shaped model (`--model-type qwen3 | llama3`: Qwen3-0.6B or Llama-3.2-1B shaped)
with the same weights and the same rows.

Workloads: `var4k` = 8 rows of variable length up to 4096 tokens (256-token prompts); `red` = RED-shaped groups,
each one 8192-token offline trace + seven rollouts of ~2k tokens. For every (backend, workload): one forward-only
log-prob pass and one training step (forward + backward of a policy-gradient loss normalised by the global token
count, then the optimiser step), each timed after an untimed warm-up on the same rows (Triton autotuning, cuBLAS
handles, optimiser state). Rows that do not fit the card are reported as OOM.

MFU counts model FLOPs of real tokens only (padding is not work): 6 x (decoder matmul parameters) per token, plus
6 x hidden x vocab per loss-mask token (the LM head runs there only, in both backends), plus causal attention
6 x s^2 x heads x head_dim per layer and sequence of length s (half of the full s x s product); divided by the
step's wall time and the bf16 dense peak (`--peak-tflops`, 989 for H100 / H200 SXM).
"Planned" is `megatron-red plan`'s activation + LM-head term for the largest micro-batch of the run;
"measured" is the step's peak allocation minus what was allocated before it (weights, gradients, optimiser state).

Default workload: both workloads with `--groups 2` RED-shaped groups, for Megatron SDPA padded (2 rows per
micro-batch) and packed (16k-token budget), Megatron local-spec attention padded, and the HF backend (about 2.5
minutes on an H200; tools/gpu_checks.sh runs `--groups 1`, about 1.2 minutes).

Run: `python tools/megatron_smoke.py [--out FILE.md]` (CUDA; megatron-core; no Transformer Engine needed).
"""
from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist

from harness import Report, command_line, require_cuda, timed, with_peak_memory

GIB = 2**30


def qwen25_15b_config(vocab_size: int, max_len: int):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=max_len,
                       rope_theta=40000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def family_config(model_type: str, vocab_size: int, max_len: int):
    """Qwen2.5-1.5B (default), Qwen3-0.6B (QK-norm, head_dim 128 != hidden / heads) or Llama-3.2-1B (llama3 RoPE
    scaling) shapes."""
    from transformers import LlamaConfig, Qwen3Config

    if model_type == "qwen2":
        return qwen25_15b_config(vocab_size, max_len)
    if model_type == "qwen3":
        return Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                           num_key_value_heads=8, head_dim=128, vocab_size=vocab_size, max_position_embeddings=max_len,
                           rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=vocab_size, max_position_embeddings=max(max_len, 8193),
                       rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0,
                       rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=8192))


def make_rows(lengths: list[int], prompts: list[int], vocab: int, seed: int):
    from megatron_red.batch import SequenceBatch

    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), width), generator=g)
    attn = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    loss_mask = attn[:, 1:].clone()
    for i, p in enumerate(prompts):
        loss_mask[i, : p - 1] = 0
    return SequenceBatch(ids * attn, attn, loss_mask, {"advantages": torch.randn(len(lengths), generator=g)})


def workloads(vocab: int, groups: int) -> dict:
    g = torch.Generator().manual_seed(1)
    var4k = torch.randint(1024, 4097, (8,), generator=g).tolist()
    red = []
    for _ in range(groups):  # one 8192-token trace + seven ~2k rollouts (256-token prompt each)
        red += [8192] + torch.randint(1536, 2561, (7,), generator=g).tolist()
    return {"var4k": make_rows(var4k, [256] * len(var4k), vocab, 2),
            "red": make_rows(red, [256] * len(red), vocab, 3)}


def model_flops(config, batch) -> float:
    """Training FLOPs of the real tokens (see the module docstring)."""
    h, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // heads
    matmul_params = layers * (h * (heads + 2 * kv) * d + heads * d * h + 3 * h * f)
    lengths = batch.attention_mask.sum(1).double()
    tokens, loss_tokens = float(lengths.sum()), float(batch.loss_mask.sum())
    attention = 6 * layers * heads * d * float((lengths ** 2).sum())
    return 6 * matmul_params * tokens + 6 * h * config.vocab_size * loss_tokens + attention


def pg_loss(total_tokens: float):
    def loss_fn(logprobs, entropy, mb):
        mask = mb.loss_mask.to(logprobs.device, logprobs.dtype)
        adv = mb.fields["advantages"].to(logprobs.device, logprobs.dtype)[:, None]
        loss = -(logprobs * adv * mask).sum() / total_tokens
        return loss, {"loss": loss.item()}
    return loss_fn


def largest_micro_batch(batch, micro_batch_size: int, max_tokens: int) -> tuple[int, int]:
    """(tokens of the largest micro-batch as the model runs it, longest row)."""
    from megatron_red.parallel.packing import micro_batch_rows

    lengths = batch.attention_mask.sum(1)
    groups = micro_batch_rows(batch, micro_batch_size, max_tokens)
    if max_tokens:
        return max(int(lengths[g].sum()) for g in groups), int(lengths.max())
    return max(len(g) * int(lengths[g].max()) for g in groups), int(lengths.max())


def planned_activation_bytes(config, attention: str, fused: bool, tokens: int, longest: int) -> float:
    from megatron_red.models.megatron.layout import ParallelLayout
    from megatron_red.models.megatron.memory import Workload, memory_plan
    from megatron_red.models.megatron.model import HFArchitecture

    plan = memory_plan(HFArchitecture.from_hf_config(config),
                       ParallelLayout(attention=attention, fused_kernel=fused, dtype="bfloat16"),
                       Workload(tokens_per_micro_batch=tokens, max_sequence_length=longest), reserve_bytes=0)
    return plan.parts[0]["activations"] + plan.parts[0]["LM head"]


def run(name, policy, batch, mbs, config, peak_tflops, plan=None):
    """One row of the table (or an OOM row)."""
    tokens = int(batch.attention_mask.sum())
    loss_fn = pg_loss(float(batch.loss_mask.sum()))
    try:
        policy.get_inference_log_probs(batch, mbs)  # warm-up on the same rows: autotuning, allocator, optimiser state
        policy.get_loss_and_metrics(batch, mbs, loss_fn)
        policy.optimizer_step()

        def forward():
            return policy.get_inference_log_probs(batch, mbs)

        def step():
            return policy.get_loss_and_metrics(batch, mbs, loss_fn), policy.optimizer_step()

        ((lp, _), t_fwd), m_fwd, _ = with_peak_memory(lambda: timed(forward))
        (_, t_step), m_step, base = with_peak_memory(lambda: timed(step))
    except torch.cuda.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return dict(name=name, oom=True), None
    mfu = model_flops(config, batch) / t_step / (peak_tflops * 1e12)
    row = dict(name=name, oom=False, fwd_tps=tokens / t_fwd, fwd_gib=m_fwd / GIB, step_tps=tokens / t_step,
               step_s=t_step, mfu=mfu, step_gib=m_step / GIB, measured_act_gib=(m_step - base) / GIB)
    if plan is not None:
        row["planned_act_gib"] = plan / GIB
    return row, lp


def main():
    parser = command_line(__doc__, out="also write the table to this Markdown file")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--groups", type=int, default=2, help="RED-shaped groups in the `red` workload")
    parser.add_argument("--padded-rows", type=int, default=2, help="rows per padded micro-batch")
    parser.add_argument("--max-tokens", type=int, default=16384, help="token budget per packed micro-batch")
    parser.add_argument("--no-fused-kernel", action="store_true", help="Megatron: unfused vocab-parallel LM head")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-local", action="store_true", help="skip megatron's unfused local-spec attention")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--model-type", default="qwen2", choices=("qwen2", "qwen3", "llama3"),
                        help="model family (random weights): Qwen2.5-1.5B, Qwen3-0.6B or Llama-3.2-1B shaped")
    args = parser.parse_args()
    require_cuda("megatron_smoke.py")

    from transformers import AutoModelForCausalLM

    from megatron_red.models.hf import HFPolicy
    from megatron_red.models.megatron import MegatronConfig, MegatronPolicy
    from megatron_red.models.megatron.local_spec import _varlen_attn
    from megatron_red.models.megatron.layout import transformer_engine_available
    from megatron_red.models.optim import OptimConfig

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    config = family_config(args.model_type, args.vocab, 16384)
    with torch.device("cuda"):  # random init on the GPU (seconds, not a minute of CPU), then kept on the host
        state = {k: v.detach().cpu() for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    torch.cuda.empty_cache()
    batches = workloads(args.vocab, args.groups)
    optim = OptimConfig(lr=1e-6)
    fused = not args.no_fused_kernel
    n_params = sum(v.numel() for v in state.values()) / 1e9
    header = (f"card: {torch.cuda.get_device_name()} | {args.model_type}-shaped, {n_params:.2f}B random | "
              f"torch {torch.__version__} | TE {'yes' if transformer_engine_available() else 'no'} | packed varlen "
              f"kernel: {'torch varlen_attn' if _varlen_attn is not None else 'SDPA per sequence'} | "
              f"Megatron fused LM head {fused} | padded micro-batch {args.padded_rows} rows, packed "
              f"{args.max_tokens} tokens | " + " | ".join(
                  f"{k}: {len(b)} rows, {int(b.attention_mask.sum())} tokens" for k, b in batches.items()))
    print(header, flush=True)

    rows, logprobs = [], {}
    for attention in ("sdpa",) + (() if args.skip_local else ("local",)):
        policy = MegatronPolicy(config, state, MegatronConfig(dtype="bfloat16", fused_kernel=fused,
                                                              attention=attention), optim)
        for wl, batch in batches.items():
            for packed in ((False, True) if attention == "sdpa" else (False,)):
                policy.config.max_tokens_per_micro_batch = args.max_tokens if packed else 0
                tokens, longest = largest_micro_batch(batch, args.padded_rows, policy.config.max_tokens_per_micro_batch)
                plan = planned_activation_bytes(config, attention, fused, tokens, longest)
                name = f"megatron {attention} {'packed' if packed else 'padded'} | {wl}"
                row, lp = run(name, policy, batch, args.padded_rows, config, args.peak_tflops, plan)
                rows.append(row)
                logprobs[name] = lp
                print(row, flush=True)
        del policy
        gc.collect()
        torch.cuda.empty_cache()
    if not args.skip_hf:
        hf_model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        hf_model.load_state_dict(state)
        policy = HFPolicy(hf_model.float(), optim, device="cuda")
        for wl, batch in batches.items():
            row, lp = run(f"hf sdpa padded | {wl}", policy, batch, args.padded_rows, config, args.peak_tflops)
            rows.append(row)
            logprobs[row["name"]] = lp
            print(row, flush=True)

    lines = [header, "", "| backend, attention, rows | workload | fwd tok/s | fwd GiB | step tok/s | step s | MFU | "
             "step GiB | act. measured GiB | act. planned GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        what, wl = r["name"].split(" | ")
        if r["oom"]:
            lines.append(f"| {what} | {wl} | OOM | | | | | | | |")
            continue
        lines.append(f"| {what} | {wl} | {r['fwd_tps']:.0f} | {r['fwd_gib']:.1f} | {r['step_tps']:.0f} | "
                     f"{r['step_s']:.3f} | {100 * r['mfu']:.1f}% | {r['step_gib']:.1f} | "
                     f"{r['measured_act_gib']:.1f} | {r.get('planned_act_gib', float('nan')):.1f} |")
    for wl, batch in batches.items():
        ref = logprobs.get(f"megatron sdpa padded | {wl}")
        mask = batch.loss_mask.bool()
        for name, lp in logprobs.items():
            if lp is not None and ref is not None and name.endswith(wl) and name != f"megatron sdpa padded | {wl}":
                diff = (lp - ref)[mask].abs()
                lines.append(f"\n{name} vs megatron sdpa padded: log-prob |diff| max {diff.max():.2e}, "
                             f"mean {diff.mean():.2e} (bf16)")
    print()
    report = Report(args.out)
    for line in lines:
        report(line)
    report.write()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
