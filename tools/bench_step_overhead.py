"""RED's step overhead over GRPO at equal token counts: the same batch, updated with each loss preset.

A RED step adds, over a GRPO step of the same tokens: the offline row's policy-shift ratio, the entropy-ratio
controller with its forward-only pass over the offline rows (H_sft), and the offline/on-policy bookkeeping (the
offline rows are trained after the on-policy ones, once w is known). Both presets compute per-token entropies: the
trainer logs H_rl for every method. This times the trainer's steps 4-6 — `entropy_weight`, then forward/backward
with `red_policy_loss` and an optimiser step (`policy_update`) — on one fixed batch in which one row per group of
G+1 is flagged offline; for GRPO the same rows are all on-policy, so the token count is identical.

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
from megatron_red.trainer.update import entropy_weight, policy_update


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
              "is_offline": (torch.arange(rows) % group_size == 0)}
    return SequenceBatch(ids * attn, attn, loss_mask, fields)


def step(policy, batch, loss_cfg, controller, micro_batch_size):
    """The trainer's steps 4-6: w (H_sft from a forward-only pass over the offline rows when the preset regulates
    entropy), then the trainer's own update (`policy_update`: pi_old and H_rl from its forward)."""
    w = entropy_weight(policy, batch, loss_cfg, controller, micro_batch_size)
    policy_update(policy, batch, loss_cfg, w, micro_batch_size)


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
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    heads = max(1, args.hidden // 32)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 2), max_position_embeddings=args.length + 8)
    batch = make_batch(args.groups, args.group_size, args.length, 32, args.vocab)
    grpo_batch = SequenceBatch(batch.input_ids, batch.attention_mask, batch.loss_mask,
                               {**batch.fields, "is_offline": torch.zeros(len(batch), dtype=torch.bool)})
    presets = {"grpo": (RedLossConfig.grpo(), grpo_batch), "red": (RedLossConfig.red(), batch)}
    times = {name: [] for name in presets}
    policies = {name: HFPolicy.from_config(config, OptimConfig(lr=1e-6), device=args.device, seed=0)
                for name in presets}
    controllers = {name: EntropyRatioController(args.group_size - 1) for name in presets}
    for rep in range(args.reps + 1):  # alternate the two presets; the first round is warm-up
        for name, (cfg, b) in presets.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(policies[name], b, cfg, controllers[name], args.micro_batch_size)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if rep:
                times[name].append(time.perf_counter() - start)
    tokens = int(batch.loss_mask.sum())
    print(f"device {args.device}; {len(batch)} rows, {tokens} loss tokens per step; median of {args.reps} steps")
    print("| preset | step s (median) | tokens/s |\n|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.4f} | {tokens / median:.0f} |")
    overhead = statistics.median(times["red"]) / statistics.median(times["grpo"]) - 1
    print(f"RED over GRPO at equal tokens: {100 * overhead:+.1f}% (target <= +5%)")


if __name__ == "__main__":
    main()
