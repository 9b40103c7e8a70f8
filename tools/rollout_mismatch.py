"""How far the rollout engine's behaviour log-probs are from the trainer's pi_old on this machine, step by step.

Runs a few RED steps of a config (the embedded default unless --config) at a chosen sampling temperature and prints
one row per step: mean and max |log pi_old - log pi_behaviour| over the on-policy tokens, the fraction of tokens
whose probability ratio leaves [1/2, 2], and with --tis-cap the mean truncated importance weight and the fraction at
the cap. On CPU in fp32 the local engine samples from the trained module itself and every mismatch is ~1e-7; on a GPU
the bf16 engine (optionally CUDA-graphed) and the trainer's bf16 forward with the fused LM head are two numerical
paths, and this table is their gap.

A mixture-of-experts student (e.g. the built-in student with `model.num_experts=8`) adds moe/routing_mismatch, the
share of the engine's recorded (token, layer) routings whose top-k the trainer computes differently, which routing
replay (`model.moe_routing_replay`) overrides. `--engine-dtype bfloat16` (HF backend) samples from a bf16 copy of the
policy (synchronised after every step, as a separate inference engine's weights are) while the trainer stays
fp32: engine and trainer then differ by bf16 rounding, on the CPU too.

Default workload: the embedded default config (the built-in task's tiny 4-layer student, HF backend, 8 prompts x 7
samples of up to 192 new tokens per step), 4 steps. `model.device=cuda` insists on the GPU (an error without one), and
so does `model.backend=megatron` (under torchrun; the megatron engine samples from the policy's own shards).

  python tools/rollout_mismatch.py --steps 4 --temperature 0.7 --tis-cap 2 data.warmup_steps=50
  python tools/rollout_mismatch.py --steps 3 --engine-dtype bfloat16 model.num_experts=8 model.moe_routing_replay=false
"""
from __future__ import annotations

import tempfile

from harness import command_line, require_cuda, timed


def main() -> None:
    parser = command_line(__doc__, out=None)
    parser.add_argument("--config", default=None, help="a run config YAML (default: the embedded default)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--tis-cap", type=float, default=None)
    parser.add_argument("--engine-dtype", choices=("float32", "bfloat16"), default=None,
                        help="HF backend: sample from a copy of the policy in this dtype (default: the engine "
                             "samples from the policy's own module)")
    parser.add_argument("overrides", nargs="*", help="dotted section.key=value overrides")
    args = parser.parse_args()

    from megatron_red.config import load_config
    from megatron_red.trainer.red_trainer import RedTrainer

    run_dir = tempfile.mkdtemp(prefix="rollout_mismatch_")
    overrides = [f"rollout.temperature={args.temperature}", "trainer.tensorboard=false", "trainer.progress=false",
                 f"trainer.out_dir={run_dir}", *args.overrides]
    if args.tis_cap is not None:
        overrides.append(f"algo.tis_cap={args.tis_cap}")
    config = load_config(args.config, overrides)
    if config.model.backend == "megatron":
        require_cuda("rollout_mismatch.py with model.backend=megatron")
    if config.model.device.startswith("cuda"):
        require_cuda("rollout_mismatch.py with model.device=cuda")
    trainer = RedTrainer(config, run_dir)
    if args.engine_dtype is not None:
        import torch

        from megatron_red.rollout import LocalEngine

        if config.model.backend != "hf":
            raise SystemExit("--engine-dtype copies a Hugging Face policy (model.backend=hf)")
        engine = trainer.engine
        trainer.engine = trainer.policy.rollout_engine = LocalEngine(
            trainer.policy.model, engine.eos_token_id, engine.pad_token_id, engine.max_batch_size,
            dtype=getattr(torch, args.engine_dtype))
    print(f"policy on {getattr(trainer.policy, 'device', 'megatron')}, engine {type(trainer.engine).__name__} "
          f"({args.engine_dtype or 'the policy module'}), method {config.algo.method}, temperature "
          f"{args.temperature}, tis_cap {args.tis_cap}, routing replay {config.model.moe_routing_replay}")
    columns = ("mismatch/logprob_abs_mean", "mismatch/logprob_abs_max", "mismatch/ratio_outside_half_2",
               "loss/tis_weight_mean", "loss/tis_capped_fraction", "moe/routing_mismatch")
    print("| step | " + " | ".join(c.split("/")[1] for c in columns) + " | step s |")
    print("|---" * (len(columns) + 2) + "|")
    for _ in range(args.steps):
        examples = trainer.dp.shard(trainer.stream.next_batch())
        metrics, seconds = timed(lambda: trainer.red_step(examples, trainer.loss_config(trainer.step)))
        trainer.step += 1
        cells = [f"{metrics[c]:.3g}" if isinstance(metrics.get(c), float) else "-" for c in columns]
        print(f"| {trainer.step} | " + " | ".join(cells) + f" | {seconds:.1f} |")


if __name__ == "__main__":
    main()
