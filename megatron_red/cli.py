"""`megatron-red`: train | compare | plan | plot | eval | export."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _train(args) -> int:
    from megatron_red.config import load_config
    from megatron_red.trainer.distributed import is_main_process, phase_named_on_failure
    from megatron_red.trainer.red_trainer import RedTrainer
    from megatron_red.trainer.report import plot_runs

    if args.resume:
        run_dir = Path(args.resume)
        config = load_config(args.config or run_dir / "config.yaml", args.overrides)
    else:
        config = load_config(args.config, args.overrides)
        run_dir = Path(config.trainer.out_dir)
        if (run_dir / "checkpoints" / "latest").exists():
            print(f"error: {run_dir} already holds a run; use --resume {run_dir} or trainer.out_dir=...",
                  file=sys.stderr)
            return 2
    start = time.perf_counter()
    with phase_named_on_failure():
        trainer = RedTrainer(config, run_dir, resume=bool(args.resume))
        final = trainer.train()
    if not is_main_process():
        return 0
    png = plot_runs({config.algo.method: run_dir}, run_dir / "dynamics.png")
    minutes = (time.perf_counter() - start) / 60
    print(f"\n{config.algo.method}: {trainer.step} steps in {minutes:.1f} min")
    if final:
        print(f"held-out accuracy {100 * final['eval/accuracy']:.1f}%"
              + (f" (hard {100 * final['eval/accuracy_hard']:.1f}%, easy {100 * final['eval/accuracy_easy']:.1f}%)"
                 if "eval/accuracy_hard" in final and "eval/accuracy_easy" in final else "")
              + f", mean response length {final['eval/mean_length']:.1f} tokens")
    print(f"metrics:    {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tensorboard'})")
    print(f"plots:      {png}")
    print(f"checkpoint: {run_dir / 'checkpoints' / (run_dir / 'checkpoints' / 'latest').read_text().strip()}")
    print(f"model:      {run_dir / 'hf'} (Hugging Face; megatron-red eval --model {run_dir})")
    return 0


def _compare(args) -> int:
    from megatron_red.config import load_config
    from megatron_red.trainer.red_trainer import RedTrainer, method_names
    from megatron_red.trainer.report import comparison_table, final_metrics, plot_runs

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        print(f"error: unknown method(s) {unknown}; valid: {', '.join(method_names())}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = Path(args.out)
    results: dict[str, list[dict]] = {m: [] for m in methods}
    start = time.perf_counter()
    for seed in seeds:
        for method in methods:
            run_dir = out / f"{method}_seed{seed}"
            config = load_config(args.config, [*args.overrides, f"algo.method={method}", f"trainer.seed={seed}",
                                               f"trainer.out_dir={run_dir}"])
            if final_metrics(run_dir):
                print(f"[compare] {run_dir} already finished; reusing it")
            else:
                resume = (run_dir / "checkpoints" / "latest").exists()
                print(f"[compare] {method}, seed {seed} -> {run_dir}" + (" (resuming)" if resume else ""))
                RedTrainer(config, run_dir, resume=resume).train()
            results[method].append(final_metrics(run_dir))
    table = comparison_table(results)
    (out / "table.md").write_text(table)
    for seed in seeds:
        plot_runs({m: out / f"{m}_seed{seed}" for m in methods}, out / f"dynamics_seed{seed}.png")
    print(f"\n{table}\n{len(methods)} methods x {len(seeds)} seeds in {(time.perf_counter() - start) / 60:.1f} min")
    print(f"table: {out / 'table.md'}\nplots: {out}/dynamics_seed*.png")
    return 0


def _plan(args) -> int:
    from megatron_red.config import load_config
    from megatron_red.trainer.plan import describe, plan_for_config, run_architecture

    config = load_config(args.config, args.overrides)
    print(describe(plan_for_config(config, args.world_size), run_architecture(config), args.gpu_memory_gib, config))
    return 0


def _plot(args) -> int:
    from megatron_red.trainer.report import plot_runs

    runs = {Path(d).name: d for d in args.run_dirs}
    png = plot_runs(runs, args.out or Path(args.run_dirs[0]) / "dynamics.png")
    print(png)
    return 0


def _export(args) -> int:
    from megatron_red.trainer.distributed import is_main_process
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
    compare.add_argument("--methods", default="red,grpo,sft,sft_then_grpo,mixpolicy,luffy")
    compare.add_argument("--seeds", default="0")
    compare.add_argument("--config")
    compare.add_argument("--out", default="runs/compare")
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
    from megatron_red.trainer.checkpoint import DiskSpaceError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, DiskSpaceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
