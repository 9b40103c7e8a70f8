"""`megatron-red`: train | compare | plan | plot | eval | export."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


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
            print(f"error: {run_dir} already holds a run; use --resume {run_dir} or trainer.out_dir=...",
                  file=sys.stderr)
            return 2
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


def _config_differences(saved: dict, wanted: dict, where: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (cosmetic trainer keys ignored)."""
    out = []
    for key in sorted(set(saved) | set(wanted)):
        name = f"{where}.{key}" if where else key
        if name in ("trainer.out_dir", "trainer.progress", "trainer.tensorboard"):
            continue
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, name)
        elif a != b:
            out.append(f"{name}: {a!r} there, {b!r} now")
    return out


def _train_processes(pending: list[tuple], args, jobs: int) -> list[Path]:
    """Train the pending runs of a comparison as `megatron-red train` processes, `jobs` at a time, one thread each,
    output in RUN_DIR/train.log. A seed's runs share its warmed-up student: the first to start builds it, the others
    wait until that run has logged (its student is then cached). Returns the run directories that failed."""
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    leaders: dict[int, tuple[Path, float]] = {}  # seed -> its first run and when it started
    running: dict[Path, tuple] = {}
    failed = []
    queue = list(pending)

    def ready(seed) -> bool:
        if seed not in leaders or leaders[seed][0] not in running:
            return True
        metrics = leaders[seed][0] / "metrics.jsonl"  # rewritten once the student is built, then step 0 is logged
        return metrics.exists() and metrics.stat().st_mtime >= leaders[seed][1] and metrics.stat().st_size > 0

    while queue or running:
        for run_dir, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[run_dir]
                print(f"[compare] {run_dir} " + ("done" if proc.returncode == 0 else f"FAILED ({proc.returncode})"))
                if proc.returncode != 0:
                    failed.append(run_dir)

        while len(running) < jobs:
            # Recomputed after each start: a seed's leader just started makes its other runs wait.
            item = next((item for item in queue if ready(item[0])), None)
            if item is None:
                break
            queue.remove(item)
            seed, method, run_dir, resume = item
            leaders.setdefault(seed, (run_dir, time.time()))
            if resume:
                cmd = ["train", "--resume", str(run_dir)]
            else:
                cmd = ["train", *(["--config", args.config] if args.config else []), *args.overrides,
                       f"algo.method={method}", f"trainer.seed={seed}", f"trainer.out_dir={run_dir}"]
            run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run_dir / "train.log", "a", encoding="utf-8")
            proc = subprocess.Popen([sys.executable, "-m", "megatron_red.cli", *cmd, "trainer.progress=false"],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
            running[run_dir] = (proc, log)
            print(f"[compare] {method}, seed {seed} -> {run_dir}" + (" (resuming)" if resume else "")
                  + f" [pid {proc.pid}, log {run_dir / 'train.log'}]")
        time.sleep(1.0)
    return failed


def _compare(args) -> int:
    from megatron_red.config import config_to_dict, load_config
    from megatron_red.trainer.evaluate import evaluate_before_training
    from megatron_red.trainer.red_trainer import RedTrainer, method_names
    from megatron_red.trainer.report import (CLAIM_BASELINES, claim_table, comparison_table, final_metrics,
                                             initial_metrics, plot_comparison, plot_runs, premises_table)

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        print(f"error: unknown method(s) {unknown}; valid: {', '.join(method_names())}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    out = Path(args.out)
    runs = {m: [out / f"{m}_seed{seed}" for seed in seeds] for m in methods}
    configs = {}
    for seed in seeds:
        for method in methods:
            run_dir = out / f"{method}_seed{seed}"
            config = load_config(args.config, [*args.overrides, f"algo.method={method}", f"trainer.seed={seed}",
                                               f"trainer.out_dir={run_dir}"])
            if (run_dir / "config.yaml").exists() and (run_dir / "checkpoints" / "latest").exists():
                # Reusing or resuming a run trained with other settings would mix two studies in one table.
                saved = config_to_dict(load_config(run_dir / "config.yaml"))
                differences = _config_differences(saved, config_to_dict(config))
                if differences:
                    raise ValueError(f"{run_dir} was trained with another config ({'; '.join(differences)}); "
                                     "use another --out or remove that run")
            configs[run_dir] = config
    start = time.perf_counter()
    pending = []  # method by method over the seeds: with --jobs, the longest runs (listed first) start first
    for method in methods:
        for seed in seeds:
            run_dir = out / f"{method}_seed{seed}"
            if final_metrics(run_dir):
                print(f"[compare] {run_dir} already finished; reusing it")
            else:
                pending.append((seed, method, run_dir, (run_dir / "checkpoints" / "latest").exists()))
    if args.jobs > 1:
        failed = _train_processes(pending, args, args.jobs)
        if failed:
            print(f"error: {len(failed)} run(s) failed; see {', '.join(str(d / 'train.log') for d in failed)}",
                  file=sys.stderr)
            return 1
    for seed, method, run_dir, resume in pending if args.jobs <= 1 else ():
        print(f"[compare] {method}, seed {seed} -> {run_dir}" + (" (resuming)" if resume else ""))
        trainer = RedTrainer(configs[run_dir], run_dir, resume=resume)
        evaluate_before_training(trainer)
        trainer.train()
    finals = {m: [final_metrics(d) for d in dirs] for m, dirs in runs.items()}
    # Every method of a seed starts from the same student: its step-0 evaluation is taken from the first run.
    initial = [next((initial_metrics(runs[m][i]) for m in methods if initial_metrics(runs[m][i])), {})
               for i in range(len(seeds))]
    initial = [r for r in initial if r]
    report = ""
    task = next(iter(configs.values())).data
    if task.task == "builtin":
        regime = task.builtin.get("regime", "new_skill")
        report += f"## Premises (regime {regime})\n\n{premises_table(regime, initial, finals)}\n"
    candidates = {m: f for m, f in finals.items() if m not in CLAIM_BASELINES}
    report += (f"## The paper's claim\n\n{claim_table(candidates, finals.get('grpo', []), finals.get('sft', []))}\n"
               f"## Held-out accuracy at the end\n\n{comparison_table(finals, initial)}")
    (out / "table.md").write_text(report)
    for i, seed in enumerate(seeds):
        plot_runs({m: runs[m][i] for m in methods}, out / f"dynamics_seed{seed}.png")
    plot_comparison(runs, out / "dynamics_mean.png")
    print(f"\n{report}\n{len(methods)} methods x {len(seeds)} seeds in {(time.perf_counter() - start) / 60:.1f} min")
    print(f"table: {out / 'table.md'}\nplots: {out / 'dynamics_mean.png'} (mean ± std over seeds), "
          f"{out}/dynamics_seed*.png")
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
    from megatron_red.trainer.checkpoint import DiskSpaceError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, DiskSpaceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
