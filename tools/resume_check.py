"""A short `megatron-red train` run on GPUs, stopped at its checkpoint and resumed, against the same run
uninterrupted: the check a Megatron layout must pass before a recipe relies on it (tools/gpu_checks.sh's `te_red`
step runs it with Transformer Engine's spec: `model.attention=te`, packed micro-batches, fused RoPE, TE's checkpoint
extra state).

Three runs of the built-in task with the tiny student (warmed up once; the Megatron backend under torchrun,
`--nproc` GPUs), the given overrides on top of `--steps` steps with a checkpoint every `--save-at` steps:
uninterrupted; stopped after `--save-at` steps; resumed from that checkpoint (`megatron-red train --resume`) to
`--steps`. The report is a table of every logged number of the resumed steps in both runs. It passes when the
first resumed step sampled and graded the same (rewards, lengths, tokens: the loaded weights are the saved ones
and the rollout seeds are per step) and its loss and gradient norm agree to `--rtol` (GPU kernels such as
attention backward may add their atomics in another order; every later step inherits that).

Run: `python tools/resume_check.py [--steps 4 --save-at 2 --nproc 1] [OVERRIDES...]` (CUDA; megatron-core; with
`model.attention=te`, Transformer Engine). Exit code 0 = passed, 1 = a difference, 3 = Transformer Engine missing.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import Report, command_line, require_cuda

ROOT = Path(__file__).resolve().parents[1]
SAME = ("reward/accuracy", "reward/mean", "response/mean_length", "tokens/step")  # sampled and graded: equal
CLOSE = ("loss/loss", "train/grad_norm")  # the first resumed step's update: to --rtol


def run_overrides(save_at: int, steps: int, extra: list[str]) -> list[str]:
    """The overrides of all three runs (each adds trainer.steps): the Megatron backend, the tiny student, one
    learning-rate schedule over `steps` optimiser steps, a checkpoint every `save_at` steps, then `extra`."""
    return ["model.backend=megatron", "data.warmup_steps=20", "trainer.eval_problems=16", "trainer.tensorboard=false",
            "trainer.progress=false", f"trainer.save_every={save_at}", f"optim.total_steps={steps}",
            "optim.warmup_steps=1", *extra]


def train(run_dir: Path, nproc: int, overrides: list[str], resume: bool = False) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "megatron_red.cli", "train"]
    command += ["--resume", str(run_dir), *overrides] if resume else [*overrides, f"trainer.out_dir={run_dir}"]
    env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stdout[-4000:]}\n"
                         f"{done.stderr[-8000:]}")


def step_lines(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {line["step"]: line for line in lines if not line.get("final")}


def compare(whole: dict[int, dict], resumed: dict[int, dict], first: int, rtol: float) -> tuple[list[str], bool]:
    """Table rows (step, key, uninterrupted, resumed, relative difference) and whether the check passed."""
    rows, ok = [], True
    for step in sorted(s for s in whole if s >= first):
        for key in sorted(k for k in whole[step] if not k.startswith("time/") and k in resumed.get(step, {})):
            a, b = whole[step][key], resumed[step][key]
            if not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
                continue
            diff = abs(a - b) / max(abs(a), 1e-12) if math.isfinite(a) and math.isfinite(b) else float("nan")
            if step == first and key in SAME and a != b:
                ok = False
            if step == first and key in CLOSE and not diff <= rtol:
                ok = False
            rows.append(f"| {step} | {key} | {a:.6g} | {b:.6g} | {diff:.2e} |")
    missing = sorted(set(whole) - set(resumed))
    if missing:
        ok = False
        rows.append(f"| {missing} | (steps missing from the resumed run) | | | |")
    return rows, ok


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-at", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--rtol", type=float, default=1e-2)
    parser.add_argument("--scratch", default=None, help="parent of the three run directories (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args()
    require_cuda("tools/resume_check.py")
    if "model.attention=te" in args.overrides:
        from megatron_red.models.megatron.layout import transformer_engine_available

        if not transformer_engine_available():
            print("tools/resume_check.py: model.attention=te needs Transformer Engine (import transformer_engine "
                  "failed); nothing was run")
            raise SystemExit(3)
    common = run_overrides(args.save_at, args.steps, args.overrides)
    report = Report(args.out)
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        whole, stopped = Path(scratch) / "whole", Path(scratch) / "resumed"
        train(whole, args.nproc, [*common, f"trainer.steps={args.steps}"])
        train(stopped, args.nproc, [*common, f"trainer.steps={args.save_at}"])
        train(stopped, args.nproc, [f"trainer.steps={args.steps}"], resume=True)
        rows, ok = compare(step_lines(whole), step_lines(stopped), args.save_at + 1, args.rtol)
    report(f"Resume check: {args.steps} steps, checkpoint at {args.save_at}, {args.nproc} GPU(s), overrides "
           f"{' '.join(args.overrides) or '(none)'}")
    report()
    report("| step | key | uninterrupted | resumed | relative difference |")
    report("|---|---|---|---|---|")
    for row in rows:
        report(row)
    report()
    report(f"{'PASSED' if ok else 'FAILED'}: step {args.save_at + 1} after the resume sampled the same "
           f"({', '.join(SAME)}) and {', '.join(CLOSE)} agree to {args.rtol:g}" if ok else
           f"FAILED: step {args.save_at + 1} after the resume differs (see the table)")
    report.write()
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
