"""Shared tiny run configurations for the trainer and CLI tests.

Every test run uses the built-in task at a toy size (a 2-layer, 32-wide student, 64 training problems, 3 rollouts
of at most 24 tokens, 2 prompts per step) so that a step takes a fraction of a second on one CPU thread. The
warmed-up student is cached under `<parent of the run dir>/.cache`, so tests of one module put their run
directories side by side under one temporary root and pay for the warm-up once.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

TINY_OVERRIDES = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.intermediate_size=64",
    "data.builtin={regime: new_skill, num_train: 64, num_test: 16}",  # the task the toy tests were written on
    "data.warmup_steps=3",
    "rollout.n=3",
    "rollout.max_new_tokens=24",
    "trainer.prompts_per_step=2",
    "trainer.eval_problems=8",
    "trainer.eval_samples=1",
    "trainer.tensorboard=false",
    "trainer.progress=false",
    # The built-in study's SFT rate (20x) is calibrated for its 128-wide student. After one SFT step at 20x this toy
    # ran every rollout of sft_then_grpo's GRPO step to the length limit with reward 0 even under test_trainer_e2e's
    # even-length reward (no reward variance, no gradient), so that test could not see the stage train. It keeps 10x.
    "algo.sft_lr_multiplier=10",
    # No overlong shaping (the default: a quarter of the 24-token limit would shape nearly every toy rollout, and a
    # test of a group without reward variance would see advantages); tests/test_rewards_overlong.py turns it on.
    "rewards.overlong_buffer=0",
]


def tiny_config(run_dir: Path, *extra: str):
    """The tiny `RunConfig` writing to `run_dir`, with `extra` dotted overrides applied last."""
    from megatron_red.config import load_config

    return load_config(None, [*TINY_OVERRIDES, f"trainer.out_dir={run_dir}", *extra])


def read_lines(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_lines(run_dir: Path) -> list[dict]:
    return [r for r in read_lines(run_dir) if not r.get("final")]


def parameters(policy) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in policy.model.named_parameters()}


def subprocess_env() -> dict:
    """Environment for `python -m megatron_red.cli` children: one thread, the repository importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def cli(*args: str, timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m megatron_red.cli ARGS` to completion, capturing its output."""
    return subprocess.run([sys.executable, "-m", "megatron_red.cli", *args], cwd=REPO_ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout, **kwargs)
