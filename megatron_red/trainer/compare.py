"""`megatron-red compare`: the study. Every method of a comparison is trained on the same task and seeds (in this
process, or as `megatron-red train` processes several at a time), then the runs are summarised: the regime's
premises, the paper's claim and the held-out table (trainer/report.py), and the dynamics plots."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from megatron_red.config import config_to_dict, load_config
from megatron_red.errors import ConfigError
from megatron_red.trainer.evaluate import evaluate_before_training
from megatron_red.trainer.red_trainer import RedTrainer
from megatron_red.trainer.report import (CLAIM_BASELINES, claim_table, comparison_table, final_metrics,
                                         initial_metrics, plot_comparison, plot_runs, premises_table)


def config_differences(saved: dict, wanted: dict, where: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (cosmetic trainer keys ignored)."""
    out = []
    for key in sorted(set(saved) | set(wanted)):
        name = f"{where}.{key}" if where else key
        if name in ("trainer.out_dir", "trainer.progress", "trainer.tensorboard"):
            continue
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, name)
        elif a != b:
            out.append(f"{name}: {a!r} there, {b!r} now")
    return out


def _train_processes(pending: list[tuple], train_args: list[str], jobs: int) -> list[Path]:
    """Train the pending runs of a comparison as `megatron-red train` processes (`train_args`: the comparison's
    --config and overrides), `jobs` at a time, one thread each, output in RUN_DIR/train.log. A seed's runs share
    its warmed-up student: the first to start builds it, the others wait until that run has logged (its student is
    then cached). Returns the run directories that failed."""
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
                cmd = ["train", *train_args, f"algo.method={method}", f"trainer.seed={seed}",
                       f"trainer.out_dir={run_dir}"]
            run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run_dir / "train.log", "a", encoding="utf-8")
            proc = subprocess.Popen([sys.executable, "-m", "megatron_red.cli", *cmd, "trainer.progress=false"],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
            running[run_dir] = (proc, log)
            print(f"[compare] {method}, seed {seed} -> {run_dir}" + (" (resuming)" if resume else "")
                  + f" [pid {proc.pid}, log {run_dir / 'train.log'}]")
        time.sleep(1.0)
    return failed


def compare(methods: list[str], seeds: list[int], config_path: str | None, overrides: list[str], out: Path,
            jobs: int = 1) -> int:
    """`megatron-red compare`: train every method on every seed (reusing finished runs, resuming interrupted ones),
    then write the report (the regime's premises, the paper's claim, the held-out table) and the plots into `out`.
    `jobs` > 1 trains that many runs at once as separate processes."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    runs = {m: [out / f"{m}_seed{seed}" for seed in seeds] for m in methods}
    configs = {}
    for seed in seeds:
        for method in methods:
            run_dir = out / f"{method}_seed{seed}"
            config = load_config(config_path, [*overrides, f"algo.method={method}", f"trainer.seed={seed}",
                                               f"trainer.out_dir={run_dir}"])
            if (run_dir / "config.yaml").exists() and (run_dir / "checkpoints" / "latest").exists():
                # Reusing or resuming a run trained with other settings would mix two studies in one table.
                saved = config_to_dict(load_config(run_dir / "config.yaml"))
                differences = config_differences(saved, config_to_dict(config))
                if differences:
                    raise ConfigError(f"{run_dir} was trained with another config ({'; '.join(differences)}); "
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
    if jobs > 1:
        failed = _train_processes(pending, [*(["--config", config_path] if config_path else []), *overrides], jobs)
        if failed:
            print(f"error: {len(failed)} run(s) failed; see {', '.join(str(d / 'train.log') for d in failed)}",
                  file=sys.stderr)
            return 1
    for seed, method, run_dir, resume in pending if jobs <= 1 else ():
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
        regime = task.builtin["regime"]  # recorded by load_config
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
