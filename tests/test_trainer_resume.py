"""Exact resumption: a run killed (SIGKILL) between checkpoints, or crashed while writing one, and resumed with
`--resume` logs the same per-step metrics and ends with the same weights as an uninterrupted run; so does a run
that takes K x E = 4 optimiser steps per rollout batch (its pi_old pass, held w and learning-rate schedule)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_red.cli import main
from megatron_red.config import load_config
from megatron_red.trainer.evaluate import evaluate_before_training
from megatron_red.trainer.red_trainer import RedTrainer
from trainer_fixtures import REPO_ROOT, TINY_OVERRIDES, cli, read_lines, subprocess_env

RUN = [*TINY_OVERRIDES, "trainer.steps=6", "trainer.save_every=2"]
MINI_BATCHES = [*RUN, "trainer.mini_batches_per_step=2", "trainer.epochs_per_step=2"]


def _comparable(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if not k.startswith("time/")} for line in lines]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    state = torch.load(run_dir / "checkpoints" / latest / "policy.pt", map_location="cpu", weights_only=False)
    return state["model"] if "model" in state else state


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    got, want = _comparable(read_lines(run_dir)), _comparable(read_lines(reference))
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4, 5, 6, 6]  # step 0: the student before training
    assert got == want  # exact: a resumed run replays the same rollouts, updates and evaluation
    a, b = _final_weights(run_dir), _final_weights(reference)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    # Sibling run directories share the cached warm-up student in root/.cache.
    return tmp_path_factory.mktemp("trainer_resume")


@pytest.fixture(scope="module")
def reference(root):
    """The uninterrupted run (in this process: the resumed runs below also check that a fresh interpreter
    reproduces it bit for bit)."""
    run_dir = root / "uninterrupted"
    assert main(["train", *RUN, f"trainer.out_dir={run_dir}"]) == 0
    return run_dir


def _kill_after_step_3(root, run_dir: Path, run: list[str]) -> None:
    """Run `run` into `run_dir` and SIGKILL it once step 3 is logged: the latest checkpoint is step 2, and
    metrics.jsonl already has step 3's line."""
    marker = root / f"{run_dir.name}.paused"
    log = open(root / f"{run_dir.name}.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "pause_at_step.py"), "3", str(marker),
                             "train", *run, f"trainer.out_dir={run_dir}"],
                            cwd=REPO_ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        paused = marker.exists()
        proc.kill()  # SIGKILL
    finally:
        proc.wait()
        log.close()
    output = (root / f"{run_dir.name}.log").read_text()[-3000:]
    assert paused, f"the run never reached step 3 (rc {proc.returncode}):\n{output}"
    assert proc.returncode == -signal.SIGKILL
    assert [r["step"] for r in read_lines(run_dir)] == [0, 1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000002"


def test_sigkill_then_resume_matches_uninterrupted(root, reference):
    run_dir = root / "killed"
    _kill_after_step_3(root, run_dir, RUN)
    result = cli("train", "--resume", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"[resume] {run_dir / 'checkpoints' / 'step_000002'}" in result.stdout
    _assert_same_run(run_dir, reference)


def test_sigkill_inside_a_mini_batch_run_then_resume_matches_uninterrupted(root):
    reference = root / "uninterrupted_mini_batches"
    assert main(["train", *MINI_BATCHES, f"trainer.out_dir={reference}"]) == 0
    assert all(line["loss/on_policy_ratio_mean"] != 1.0 for line in read_lines(reference) if "loss/loss" in line)
    run_dir = root / "killed_mini_batches"
    _kill_after_step_3(root, run_dir, MINI_BATCHES)
    result = cli("train", "--resume", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(run_dir, reference)


def test_crash_while_writing_a_checkpoint_resumes_from_the_complete_one(root, reference, capsys):
    run_dir = root / "crashed"
    config = load_config(None, [*RUN, f"trainer.out_dir={run_dir}"])
    trainer = RedTrainer(config, run_dir)
    evaluate_before_training(trainer)  # as `megatron-red train` does
    save_policy = trainer.policy.save_checkpoint

    def crash_at_step_4(path):
        if trainer.step == 4:
            (Path(path) / "policy.pt").write_bytes(b"half a checkpoint")
            raise KeyboardInterrupt("simulated crash while writing the step-4 checkpoint")
        save_policy(path)

    trainer.policy.save_checkpoint = crash_at_step_4
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "step_000004.tmp").is_dir() and not (checkpoints / "step_000004").exists()
    assert (checkpoints / "latest").read_text().strip() == "step_000002"
    assert [r["step"] for r in read_lines(run_dir)] == [0, 1, 2, 3, 4]

    assert main(["train", "--resume", str(run_dir)]) == 0
    assert "step_000002 (step 2)" in capsys.readouterr().out
    assert (checkpoints / "step_000004" / "trainer.pt").exists()
    _assert_same_run(run_dir, reference)


def test_train_refuses_to_overwrite_a_run(reference, capsys):
    before = (reference / "metrics.jsonl").read_text()
    assert main(["train", *RUN, f"trainer.out_dir={reference}"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (reference / "metrics.jsonl").read_text() == before


def test_resume_needs_a_checkpoint(root, capsys):
    empty = root / "no_checkpoint"
    assert main(["train", "--resume", str(empty)]) == 2  # no config.yaml either
    empty.mkdir()
    (empty / "config.yaml").write_text(json.dumps({"trainer": {"steps": 6}}))
    assert main(["train", "--resume", str(empty), *TINY_OVERRIDES]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_latest_pointing_at_an_incomplete_checkpoint_is_an_error(tmp_path):
    from megatron_red.trainer.checkpoint import latest_checkpoint

    (tmp_path / "checkpoints" / "step_000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_000002")
    with pytest.raises(FileNotFoundError, match="trainer.pt"):
        latest_checkpoint(tmp_path)


def test_resuming_a_finished_run_changes_nothing(root, reference, capsys):
    import shutil

    run_dir = root / "finished_again"
    shutil.copytree(reference, run_dir)
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert "[resume]" in capsys.readouterr().out
    # Still one line per step and one final line: the re-evaluation replaces the old final line.
    _assert_same_run(run_dir, reference)
