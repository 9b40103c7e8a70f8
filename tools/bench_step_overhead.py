"""RED's step overhead over GRPO at equal token counts: the same batch, updated with each loss preset.

A RED step adds, over a GRPO step of the same tokens: the offline row's policy-shift ratio, the entropy-ratio
controller, and the offline/on-policy bookkeeping: the offline rows are trained first with w factored out (their
forward gives H_sft), the accumulated gradient is scaled by w, then the on-policy rows add theirs (two
forward/backward calls, so one more partial micro-batch). H_rl is the engine's (`rollout_entropy`, computed while
sampling; random numbers here). This times the trainer's steps 4-6 — `prepare_update`, then forward/backward with
`red_policy_loss` and the optimiser step(s) (`rollout_update`) — on one fixed batch in which one row per group of
G+1 is flagged offline; for GRPO the same rows are all on-policy, so the token count is identical. (With
`rollout.engine=vllm` H_rl costs the engine the entropy recorder's time instead: tools/bench_rollout.py reports its
share of each generation call.) `--mini-batches`
K > 1 times the K-optimiser-step update instead (a forward-only pass for pi_old first, then K steps), for both.

On a shared CPU machine wall time moves with the other processes' load; the table also gives this process's CPU
time (one thread: OMP_NUM_THREADS=1), which moves much less, and the ratio of both.

    python tools/bench_step_overhead.py                       # CPU, the embedded default's student shape
    python tools/bench_step_overhead.py --device cuda --hidden 1536 --layers 28 --vocab 151936 --length 2048
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Qwen2Config

from megatron_red.batch import SequenceBatch
from megatron_red.models import HFPolicy, OptimConfig
from megatron_red.objectives import EntropyRatioController, RedLossConfig
from megatron_red.distributed import DataParallel
from megatron_red.trainer.update import prepare_update, rollout_update


def make_batch(groups: int, group_size: int, length: int, prompt: int, vocab: int, seed: int = 0) -> SequenceBatch:
    g = torch.Generator().manual_seed(seed)
    rows = groups * group_size
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=g)
    attn = (torch.arange(length)[None] < lengths[:, None]).long()
    loss_mask = torch.zeros(rows, length - 1)
    for i, n in enumerate(lengths.tolist()):
        loss_mask[i, prompt - 1: n - 1] = 1
    rewards = torch.randint(0, 2, (groups, group_size), generator=g).float()
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).flatten()
    fields = {"advantages": adv, "group_accuracy": rewards.mean(1).repeat_interleave(group_size),
              "is_offline": (torch.arange(rows) % group_size == 0),
              "group": torch.arange(groups).repeat_interleave(group_size),
              "rollout_entropy": loss_mask * (1 + torch.rand(rows, length - 1, generator=g))}
    return SequenceBatch(ids * attn, attn, loss_mask, fields)


def step(policy, batch, loss_cfg, controller, micro_batch_size, mini_batches):
    """The trainer's steps 4-6 (`RedTrainer.red_step`): `prepare_update` (with K > 1 the pi_old pass), then
    `rollout_update` (K optimiser steps)."""
    dp = DataParallel()
    batch, w, _ = prepare_update(policy, batch, loss_cfg, controller, micro_batch_size, dp, 1.0, mini_batches)
    rollout_update(policy, batch, loss_cfg, w, micro_batch_size, dp, mini_batches_per_step=mini_batches)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8, help="G + 1 rows per group")
    parser.add_argument("--length", type=int, default=160)
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument("--mini-batches", type=int, default=1, help="K optimiser steps per batch")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_step_overhead.py --device cuda needs a CUDA GPU (none is visible to torch)")
    heads = max(1, args.hidden // 32)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 2), max_position_embeddings=args.length + 8)
    batch = make_batch(args.groups, args.group_size, args.length, 32, args.vocab)
    grpo_batch = SequenceBatch(batch.input_ids, batch.attention_mask, batch.loss_mask,
                               {**batch.fields, "is_offline": torch.zeros(len(batch), dtype=torch.bool)})
    presets = {"grpo": (RedLossConfig.grpo(), grpo_batch), "red": (RedLossConfig.red(), batch)}
    times = {name: [] for name in presets}
    cpu_times = {name: [] for name in presets}
    policies = {name: HFPolicy.from_config(config, OptimConfig(lr=1e-6), device=args.device, seed=0)
                for name in presets}
    controllers = {name: EntropyRatioController(args.group_size - 1) for name in presets}
    for rep in range(args.reps + 1):  # alternate the two presets, each first every other round; round 0 warms up
        for name, (cfg, b) in (list(presets.items()) if rep % 2 else list(presets.items())[::-1]):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            step(policies[name], b, cfg, controllers[name], args.micro_batch_size, args.mini_batches)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if rep:
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
    tokens = int(batch.loss_mask.sum())
    print(f"device {args.device}; {len(batch)} rows, {tokens} loss tokens per step, {args.mini_batches} optimiser "
          f"step(s); median of {args.reps} steps")
    print("| preset | step s (median) | tokens/s | process CPU s (median) |\n|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.4f} | {tokens / median:.0f} | {statistics.median(cpu_times[name]):.4f} |")
    # Each round's RED step against its GRPO neighbour: the median of these pairs follows a drifting load better
    # than the ratio of the two medians.
    overhead = statistics.median(r / g for r, g in zip(times["red"], times["grpo"])) - 1
    cpu = statistics.median(r / g for r, g in zip(cpu_times["red"], cpu_times["grpo"])) - 1
    print(f"RED over GRPO at equal tokens (median of the rounds' ratios): {100 * overhead:+.1f}% wall, "
          f"{100 * cpu:+.1f}% process CPU time (target <= +2%)")


if __name__ == "__main__":
    main()
