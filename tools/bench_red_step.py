"""Time RED steps of the Megatron backend on one GPU, split by phase, with the peak GPU memory of each phase.

Phases (what each wraps on the trainer's policy, the actor): generate (`rollout_engine.generate`, the megatron
engine on the policy's own weights), log-probs (`get_inference_log_probs`: with K x E > 1 optimiser steps per
rollout batch, `trainer.mini_batches_per_step` / `epochs_per_step`, the forward-only pi_old pass; nothing with one,
where pi_old and H_sft come from the update's own forward), train (`get_loss_and_metrics` + `optimizer_step`),
weight-sync (`rollout_engine.sync_weights`; the megatron engine shares the weights, so this is the cost of nothing),
and the phase switches (`prepare_for_inference` / `finish_inference` / `prepare_for_training`: KV-cache release and
rebuild, CUDA-graph capture, optimiser offload).
The first step builds the engine and is reported separately.

Default workload: the built-in task with a Qwen2.5-1.5B-shaped student (28 layers, hidden 1536, 12 / 2 heads, FFN
8960; the built-in tokenizer's 256-token vocabulary, so the LM head is cheap), random init plus one warm-up SFT step,
64 prompts x 8 samples of 512 new tokens, 2 steps (about 1.5 minutes on an H200, most of it the first step's set-up).
Each step also prints the engine-vs-trainer log-prob mismatch of its on-policy tokens (mismatch/* metrics). Needs
CUDA. Overrides are `key=value` pairs as for `megatron-red train`:

    torchrun --standalone --nproc_per_node=1 tools/bench_red_step.py [--steps 3] [key=value ...]
"""
from __future__ import annotations

import tempfile
from collections import defaultdict

import torch

from harness import command_line, require_cuda, timed, with_peak_memory

DEFAULTS = [
    "model.backend=megatron", "model.hidden_size=1536", "model.num_layers=28", "model.num_heads=12",
    "model.num_kv_heads=2", "model.intermediate_size=8960", "model.max_position_embeddings=4096",
    "data.warmup_steps=1", "data.warmup_batch_size=16", "trainer.prompts_per_step=64", "rollout.n=8",
    "rollout.max_new_tokens=512", "rollout.max_batch_size=512", "rollout.kv_block_size=64",
    "rollout.max_sequence_length=1024",
    "trainer.micro_batch_size=16", "trainer.eval_every=0", "trainer.tensorboard=false", "trainer.progress=false",
]


class PhaseClock:
    """Wall time and peak allocated GPU memory per phase, for the step being measured."""

    def __init__(self):
        self.seconds, self.peak = defaultdict(float), defaultdict(float)

    def wrap(self, phase: str, fn):
        def clocked(*args, **kwargs):
            (out, seconds), peak, _ = with_peak_memory(lambda: timed(lambda: fn(*args, **kwargs)))
            self.peak[phase] = max(self.peak[phase], peak / 2**30)
            self.seconds[phase] += seconds
            return out
        return clocked


def main() -> None:
    parser = command_line(__doc__, out=None)
    parser.add_argument("--steps", type=int, default=2, help="RED steps (the first one is the warm-up)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    require_cuda("bench_red_step.py", hint="; run it under torchrun on one")

    from megatron_red.config import load_config
    from megatron_red.distributed import is_main_process
    from megatron_red.trainer.red_trainer import RedTrainer

    run_dir = tempfile.mkdtemp(prefix="bench_red_step_")
    config = load_config(None, [*DEFAULTS, f"trainer.out_dir={run_dir}", *args.overrides])
    trainer = RedTrainer(config, f"{run_dir}/run")
    policy, engine = trainer.policy, trainer.policy.rollout_engine
    clocks = []
    for step in range(args.steps):
        clock = PhaseClock()
        engine.generate = clock.wrap("generate", type(engine).generate.__get__(engine))
        engine.sync_weights = clock.wrap("weight-sync", type(engine).sync_weights.__get__(engine))
        for name, phase in (("get_inference_log_probs", "log-probs"), ("get_loss_and_metrics", "train"),
                            ("optimizer_step", "train"), ("prepare_for_inference", "phase switches"),
                            ("finish_inference", "phase switches"), ("prepare_for_training", "phase switches")):
            setattr(policy, name, clock.wrap(phase, getattr(type(policy), name).__get__(policy)))
        examples = trainer.dp.shard(trainer.stream.next_batch())
        metrics, clock.seconds["step"] = timed(lambda: trainer.red_step(examples, trainer.loss_config(trainer.step)))
        clock.tokens = metrics.get("tokens/step", 0)
        clock.length = metrics.get("response/mean_length", 0.0)
        clock.mismatch = (metrics.get("mismatch/logprob_abs_mean", float("nan")),
                          metrics.get("mismatch/logprob_abs_max", float("nan")))
        clock.clip = metrics.get("loss/clip_fraction", float("nan"))
        trainer.step += 1
        clocks.append(clock)
    if is_main_process():
        rows = ("generate", "log-probs", "train", "weight-sync", "phase switches", "step")
        print(f"\nRED step, Megatron backend, {torch.cuda.get_device_name()}: "
              f"{config.trainer.prompts_per_step} prompts x {config.rollout.n} samples, "
              f"<= {config.rollout.max_new_tokens} new tokens, {config.trainer.optimizer_steps_per_step} optimiser "
              f"step(s) per rollout batch, {config.model.dtype}")
        print(f"{'phase':16}" + "".join(f"{'step ' + str(i + 1) + ' s':>12}{'peak GiB':>10}" for i in range(len(clocks))))
        for row in rows:
            print(f"{row:16}" + "".join(f"{c.seconds[row]:12.2f}{c.peak.get(row, float('nan')):10.1f}"
                                        for c in clocks))
        for i, c in enumerate(clocks):
            print(f"step {i + 1}: {c.tokens} trained tokens, mean response length {c.length:.0f}, generate "
                  f"{100 * c.seconds['generate'] / c.seconds['step']:.0f}% of the step; |log pi_old - log "
                  f"pi_behaviour| mean {c.mismatch[0]:.2e}, max {c.mismatch[1]:.2e}; clip fraction {c.clip:.3g}")


if __name__ == "__main__":
    main()
