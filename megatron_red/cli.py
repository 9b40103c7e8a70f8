"""`megatron-red`: train | compare | plan | plot | eval | export. Parses the command line and dispatches; a
`ConfigError` (a setting that cannot work) is printed as `error: ...` with exit code 2."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megatron_red.errors import ConfigError


def _train(args) -> int:
    from megatron_red.config import load_config
    from megatron_red.distributed import is_main_process, phase_named_on_failure
    from megatron_red.trainer.evaluate import describe_heldout, evaluate_before_training
    from megatron_red.trainer.red_trainer import RedTrainer
    from megatron_red.trainer.report import initial_metrics, plot_runs

    if args.resume:
        run_dir = Path(args.resume)
        config = load_config(args.config or run_dir / "config.yaml", args.overrides)
    else:
        config = load_config(args.config, args.overrides)
        run_dir = Path(config.trainer.out_dir)
        if (run_dir / "checkpoints" / "latest").exists():
            raise ConfigError(f"{run_dir} already holds a run; use --resume {run_dir} or trainer.out_dir=...")
    start = time.perf_counter()
    with phase_named_on_failure():
        trainer = RedTrainer(config, run_dir, resume=bool(args.resume))
        evaluate_before_training(trainer)
        final = trainer.train()
    if not is_main_process():
        return 0
    png = plot_runs({config.algo.method: run_dir}, run_dir / "dynamics.png")
    minutes = (time.perf_counter() - start) / 60
    print(f"\n{config.algo.method}: {trainer.step} steps in {minutes:.1f} min")
    if final:
        before = initial_metrics(run_dir)
        student = "warmed-up student" if config.data.task == "builtin" and not config.model.path else "student"
        rows = [(f"{config.algo.method}, step {trainer.step}", describe_heldout(final))]
        if before:
            rows.append((f"{student}, step 0", describe_heldout(before)))
        if "eval/teacher_length" in final:
            rows.append(("teacher traces", f"mean length {final['eval/teacher_length']:.1f} tokens"))
        print(f"held-out accuracy on {final['eval/problems']} problems "
              f"(avg@{config.trainer.eval_samples}, temperature {config.trainer.eval_temperature:g}):")
        for label, text in rows:
            print(f"  {label + ':':<28}{text}")
    print(f"metrics:    {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tensorboard'})")
    print(f"plots:      {png}")
    print(f"checkpoint: {run_dir / 'checkpoints' / (run_dir / 'checkpoints' / 'latest').read_text().strip()}")
    print(f"model:      {run_dir / 'hf'} (Hugging Face; megatron-red eval --model {run_dir})")
    return 0


def _compare(args) -> int:
    from megatron_red.trainer.compare import compare

    return compare([m for m in args.methods.split(",") if m], [int(s) for s in args.seeds.split(",") if s],
                   args.config, args.overrides, Path(args.out), args.jobs)


def _plan(args) -> int:
    from megatron_red.config import load_config
    from megatron_red.trainer.plan import describe, plan_for_config

    config = load_config(args.config, args.overrides, planning=True)
    print(describe(plan_for_config(config, args.world_size), args.gpu_memory_gib, config))
    return 0


def _plot(args) -> int:
    from megatron_red.trainer.report import plot_runs

    runs = {Path(d).name: d for d in args.run_dirs}
    png = plot_runs(runs, args.out or Path(args.run_dirs[0]) / "dynamics.png")
    print(png)
    return 0


def _export(args) -> int:
    from megatron_red.distributed import is_main_process
    from megatron_red.models.precision import DTYPES
    from megatron_red.trainer.export import export_checkpoint

    out = export_checkpoint(args.path, args.out, dtype=DTYPES.get(args.dtype), tp=args.tp, pp=args.pp)
    if is_main_process():
        print(f"Hugging Face model: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-red", description="RED: RLVR with offline teacher traces")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a student (no arguments: RED on the built-in task, CPU)")
    train.add_argument("--config", help="YAML recipe (see examples/red/); the embedded default when omitted")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run exactly from its latest checkpoint")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")
    train.set_defaults(func=_train)

    compare = sub.add_parser("compare", help="train several methods on the same task and seeds; Table-2 report")
    compare.add_argument("--methods", default="red,luffy,mixpolicy,sft_then_grpo,grpo,sft",
                         help="runs start in this order, each method over all seeds: with --jobs, list the longest "
                              "first (a long run started last makes the comparison wait for it alone)")
    compare.add_argument("--seeds", default="0")
    compare.add_argument("--config")
    compare.add_argument("--out", default="runs/compare")
    compare.add_argument("--jobs", type=int, default=1,
                         help="runs trained at once, as separate one-thread processes (e.g. 2 on a 2-core CPU)")
    compare.add_argument("overrides", nargs="*", metavar="section.key=value")
    compare.set_defaults(func=_compare)

    plan = sub.add_parser("plan", help="per-GPU memory of a Megatron run by part, and whether it fits a card")
    plan.add_argument("config", help="YAML recipe (see examples/red/)")
    plan.add_argument("--world-size", type=int, default=8, help="GPUs in the run (DP = world size / (TP x PP))")
    plan.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one card (H100: 80, H200: 141)")
    plan.add_argument("overrides", nargs="*", metavar="section.key=value")
    plan.set_defaults(func=_plan)

    plot = sub.add_parser("plot", help="Figure-6-style dynamics plot of one or more runs")
    plot.add_argument("run_dirs", nargs="+")
    plot.add_argument("--out")
    plot.set_defaults(func=_plot)

    from megatron_red.eval import command as eval_command

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint on the paper's benchmarks (Table 2 protocol)")
    eval_command.add_arguments(evaluate)
    evaluate.set_defaults(func=eval_command.run)

    export = sub.add_parser("export", help="a run's (latest checkpoint's) or a checkpoint's model as a Hugging Face "
                                           "directory: safetensors shards + index + config + tokenizer")
    export.add_argument("path", metavar="RUN_OR_CKPT", help="run directory or checkpoints/step_N directory")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dtype of the written weights (auto: the training parameters' dtype)")
    export.add_argument("--tp", type=int, default=1, help="Megatron checkpoints: tensor-parallel size to load at")
    export.add_argument("--pp", type=int, default=1, help="Megatron checkpoints: pipeline-parallel size to load at "
                                                          "(--tp x --pp = processes; torchrun for more than one)")
    export.set_defaults(func=_export)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:  # a setting that cannot work; anything else keeps its traceback
        # One write of the whole line (print writes the newline separately): under torchrun the ranks share one
        # stderr pipe, and a line written in one go is never cut by another rank's.
        sys.stderr.write(f"error: {err}\n")
        sys.stderr.flush()
        return 2


if __name__ == "__main__":
    sys.exit(main())
