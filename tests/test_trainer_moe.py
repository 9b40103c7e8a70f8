"""RED with a mixture-of-experts student (the built-in task's tiny Qwen3-MoE, `model.num_experts=4`), end to end.

- Hugging Face backend (local engine, routing replay on): a run killed (SIGKILL) after step 3 and resumed with
  `--resume` logs the same per-step metrics (moe/routing_mismatch and moe/aux_loss among them) and ends with the
  same weights as an uninterrupted run (the resume machinery of tests/test_trainer_resume.py).
- Megatron backend at EP 2 (two gloo processes: two data-parallel replicas, each holding 2 of every layer's 4
  experts; megatron's engine records the routing, the trainer replays it, also in the backward's recomputation
  of every layer, `model.gradient_checkpointing`): stopped after step 1 and resumed from its
  dist_checkpointing checkpoint, it must log what the single-process Hugging Face run logs and end with its
  weights (as tests/test_trainer_megatron.py checks a dense data-parallel run), but for moe/aux_loss, a mean over
  micro-batches whose composition differs between one process and two replicas; its Hugging Face export and
  `megatron-red export` of its checkpoint (one process, EP 1) hold those weights.
megatron-core's unconditional CUDA calls are redirected by tests/megatron_compat.py (no GPU here).
"""
from __future__ import annotations

import math

import pytest
import torch

from dist_utils import run_distributed
from megatron_red.cli import main
from megatron_red.models.hf_checkpoint import checkpoint_tensors
from test_megatron import read_hf_weights
from test_trainer_resume import RUN, _assert_same_run, _kill_after_step_3
from trainer_fixtures import cli, read_lines, tiny_config

MOE = ["model.num_experts=4", "model.num_experts_per_tok=2", "model.moe_intermediate_size=16"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("trainer_moe")


def test_hf_backend_run_killed_and_resumed_matches_uninterrupted(root):
    reference = root / "uninterrupted"
    assert main(["train", *RUN, *MOE, f"trainer.out_dir={reference}"]) == 0
    lines = [line for line in read_lines(reference) if "loss/loss" in line]
    assert lines and all(line["moe/routing_mismatch"] == 0.0 and math.isfinite(line["moe/aux_loss"])
                         for line in lines)  # every rollout token replayed; fp32 engine and trainer agree anyway
    run_dir = root / "killed"
    _kill_after_step_3(root, run_dir, [*RUN, *MOE])
    result = cli("train", "--resume", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(run_dir, reference)


@pytest.fixture(scope="module")
def student(root) -> str:
    """The warmed-up tiny MoE student as a Hugging Face checkpoint directory (per-expert tensors)."""
    from megatron_red.trainer.build import build_task, warmed_up_student

    config = tiny_config(root / "student", *MOE)
    return str(warmed_up_student(config, build_task(config), root / ".cache"))


def test_megatron_ep2_run_with_resume_matches_hf(root, student):
    from test_trainer_megatron import _assert_runs_match, _hf_run, _megatron_worker

    hf_lines, hf_weights = _hf_run(root / "hf", student, True)
    hf_weights = checkpoint_tensors(hf_weights)  # the per-expert layout the Megatron export writes
    run_dir = root / "megatron_ep2"
    # Full recompute with two micro-batches per pass: the backward recomputes every router (replaying each
    # micro-batch's records in order); the update does not depend on either.
    overrides = ["model.backend=megatron", f"model.path={student}", "model.expert_model_parallel_size=2",
                 "model.gradient_checkpointing=true", "trainer.micro_batch_size=2"]
    pinned_w = [line["entropy/w"] for line in hf_lines[:-1]]
    (weights, prompts, computed_w, _), (_, prompts_1, _, _) = run_distributed(
        _megatron_worker, 2, str(run_dir), overrides, 1, True, pinned_w)
    assert [len(p) for p in prompts] == [len(p) for p in prompts_1] == [1]  # the resumed step: one prompt each
    mg_lines = read_lines(run_dir)
    for hf, mg in zip(hf_lines[:-1], mg_lines[:-1]):
        assert mg["moe/routing_mismatch"] == hf["moe/routing_mismatch"] == 0.0
        assert 1.0 <= mg["moe/aux_loss"] < 4 and 1.0 <= hf["moe/aux_loss"] < 4  # E sum f P: 1 when balanced
    _assert_runs_match(hf_lines, hf_weights, mg_lines, weights, computed_w, student, ignore=("moe/aux_loss",))
    # The run's own export (every EP rank's experts streamed to one writer), and its last checkpoint exported by one
    # process (dist_checkpointing resharded from EP 2 to EP 1), are those weights.
    checkpoint = run_dir / "checkpoints" / "step_000002"
    run_distributed(_export_worker, 1, str(checkpoint), str(root / "export"))
    for directory in (run_dir / "hf", root / "export"):
        written = read_hf_weights(directory)
        assert set(written) == set(weights)
        assert all(torch.equal(written[k], torch.from_numpy(weights[k])) for k in weights), directory
    # `megatron-red export` on this machine, without the tests' CPU stand-ins: a clear refusal (MoE layers need CUDA).
    refused = cli("export", str(checkpoint), "--out", str(root / "refused"))
    assert refused.returncode == 2 and refused.stderr.startswith(f"error: {checkpoint} holds a mixture of experts")


def _export_worker(rank, world_size, checkpoint, out):
    import megatron_compat
    megatron_compat.install()
    from megatron.core import parallel_state as ps

    from megatron_red.trainer.export import export_checkpoint

    export_checkpoint(checkpoint, out)
    ps.destroy_model_parallel()
