"""`RedTrainer` on the Megatron backend under torch.distributed (CPU, gloo, fp32) against the single-process
Hugging Face backend, on the built-in task at toy size (RED: rollouts + offline trace, entropy-ratio weight w).

The Megatron runs sample with the megatron engine on the policy's own shards (rollout/megatron.py; the HF run with
the local engine); both draw row r's t-th token with the seed's uniform u[r, t], so equal logits give equal samples.

- TP = 2 (DP = 1): the same seeds give the same rollouts, so every logged number of every step (loss, H_rl,
  H_sft, w, rewards, grad norm, token counts) and the final weights must match the HF run; the Megatron run is
  stopped after step 1 and resumed from its dist_checkpointing checkpoint, which must not change anything.
- DP = 2 (TP = 1, distributed optimiser), with dynamic sampling: each replica rolls out and trains on half of the
  step's prompts, and counts / entropies / metrics are reduced over the replicas, so the step must equal the
  full-batch step; dynamic sampling's drops and extra rounds must be decided alike on both replicas and give the
  single-process run's batch. The production engine seeds a replica's whole batch (seed per step and DP rank), so
  both runs here sample through `PerPromptSeeds`, which seeds each prompt by its tokens: a prompt's rollouts then do
  not depend on which replica drew it, and the HF run is the reference again.

w = clip(|dH_sft / dH_rl|, 1, G) divides two relative entropy changes of ~1e-4 (a near-uniform toy student), which
turns the ~1e-7 float32 differences between the backends' entropies into ~1% differences of w. So the Megatron run
records the w its controller computes from the all-reduced entropies (checked against the HF run's to 2%, and
exactly against the controller fed the H_rl / H_sft it logged, which match to 1e-5) but trains with the HF run's w,
which keeps every other number comparable at 1e-5.

megatron-core's unconditional CUDA calls are redirected by tests/megatron_compat.py (no GPU here); everything
else is the real code path of `megatron-red train model.backend=megatron` under torchrun.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from megatron_red.rollout.base import RolloutEngine
from test_megatron import hf_weights, read_hf_weights
from trainer_fixtures import read_lines, step_lines, tiny_config

pytest.importorskip("megatron.core")

STEPS = 2
# (H_rl, H_sft) of a previous step for the controller: dH_rl ~ 1, dH_sft ~ 4.5, so w = clip(4.5, 1, G = 3) = 3.
PRESET_ENTROPIES = (1e6, 1.0)
# The same learning-rate schedule for a run stopped after step 1 and for the uninterrupted runs.
COMMON = [f"trainer.steps={STEPS}", "optim.total_steps=2", "optim.warmup_steps=1", "trainer.save_every=100"]


class PerPromptSeeds(RolloutEngine):
    """Test-only engine wrapper: each prompt is sampled alone, with a seed taken from its tokens."""

    def __init__(self, engine: RolloutEngine):
        self.engine = engine

    def generate(self, prompts, n, params):
        return [self.engine.generate([p], n, dataclasses.replace(params, seed=zlib.crc32(str(p).encode()),
                                                                 prompt_seeds=None))[0]
                for p in prompts]

    def sync_weights(self, policy) -> None:
        self.engine.sync_weights(policy)

    def suspend(self) -> None:
        self.engine.suspend()


def _prepare(trainer, per_prompt_seeds: bool, pinned_w: list[float] | None = None, computed_w: list | None = None):
    """At this size the student never solves a problem, so every GRPO group would be uniform; "the text has an
    even number of characters" or'ed into the verifier's reward gives the groups signal (as in test_trainer_e2e).
    With dynamic sampling, "a length not divisible by 4" pays more often, so that more groups (whose correct trace
    is a member) are paid throughout and get dropped. A fresh run starts from a controller that has seen other
    entropies (`PRESET_ENTROPIES`): w = G = 3 from the first step, so the w-scaled gradient of the traces
    (`scale_gradients`) counts in every update."""
    if trainer.step == 0:
        trainer.controller.prev_h_rl, trainer.controller.prev_h_sft = PRESET_ENTROPIES
    verify = trainer.task.reward_fn
    dynamic = trainer.config.rollout.dynamic_sampling
    paid = (lambda t: len(t) % 4 != 0) if dynamic else (lambda t: len(t) % 2 == 0)
    trainer.task.reward_fn = lambda texts, answers: [max(float(r), float(paid(t)))
                                                     for r, t in zip(verify(texts, answers), texts)]
    if per_prompt_seeds:
        trainer.engine = trainer.policy.rollout_engine = PerPromptSeeds(trainer.engine)
    if pinned_w is not None:  # see the module docstring
        update = trainer.controller.update

        def pinned_update(h_rl, h_sft):
            computed_w.append(update(h_rl, h_sft))
            return pinned_w[trainer.step]

        trainer.controller.update = pinned_update
    return trainer


def _hf_run(run_dir: Path, student: str, per_prompt_seeds: bool, *extra: str):
    from megatron_red.trainer.red_trainer import RedTrainer

    trainer = _prepare(RedTrainer(tiny_config(run_dir, *COMMON, f"model.path={student}", *extra), run_dir),
                       per_prompt_seeds)
    trainer.train()
    return read_lines(run_dir), {k: v.detach().clone() for k, v in trainer.policy.model.state_dict().items()}


def _own_parameters(policy, reference: dict[str, torch.Tensor]):
    """Per Megatron parameter, max |this rank's own copy - `reference` (HF weights) laid out as this rank's shard|,
    and the rank's own copies of the replicated (not TP-split) parameters.

    Read from the rank's local parameters, not through the export's all-gather. The layout is the import path's,
    which test_megatron.py checks against the HF model's forward. The run is over, so the model is overwritten to
    lay the reference out.
    """
    from megatron_red.models.hf_checkpoint import StateDictWeights
    from megatron_red.models.megatron.weights import load_hf_weights, unwrap_model

    model = unwrap_model(policy.model)
    own = {name: p.detach().clone() for name, p in model.named_parameters()}
    replicated = {name: own[name].numpy() for name, p in model.named_parameters()
                  if not getattr(p, "tensor_model_parallel", False)}
    load_hf_weights(model, StateDictWeights(reference), policy.arch, policy.tp_group)
    errors = {name: (own[name] - p.detach()).abs().max().item() for name, p in model.named_parameters()}
    return errors, replicated


def _megatron_worker(rank, world_size, run_dir, overrides, stop_at, per_prompt_seeds, pinned_w, reference=None):
    import megatron_compat
    megatron_compat.install()
    from megatron.core import parallel_state as ps

    from megatron_red.trainer.red_trainer import RedTrainer

    run_dir, computed_w = Path(run_dir), []
    if stop_at is not None:  # a first run that checkpoints at `stop_at`, then a resumed one
        first = tiny_config(run_dir, *COMMON, *overrides, f"trainer.steps={stop_at}")
        _prepare(RedTrainer(first, run_dir), per_prompt_seeds, pinned_w, computed_w).train()
    trainer = _prepare(RedTrainer(tiny_config(run_dir, *COMMON, *overrides), run_dir, resume=stop_at is not None),
                       per_prompt_seeds, pinned_w, computed_w)
    prompts, red_step = [], trainer.red_step

    def recording_step(examples, loss_cfg):
        prompts.append([ex.uid for ex in examples])
        return red_step(examples, loss_cfg)

    trainer.red_step = recording_step
    from megatron_red.rollout.megatron import MegatronEngine

    engine = trainer.policy.rollout_engine
    assert isinstance(getattr(engine, "engine", engine), MegatronEngine)  # sampling from the policy's own shards
    trainer.train()
    weights = {k: v.numpy() for k, v in hf_weights(trainer.policy).items()}
    own = _own_parameters(trainer.policy, reference) if reference is not None else None
    ps.destroy_model_parallel()
    return weights, prompts, computed_w, own


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("trainer_megatron")


@pytest.fixture(scope="module")
def student(root) -> str:
    """The warmed-up tiny built-in student as a Hugging Face checkpoint directory (tied embeddings)."""
    from megatron_red.trainer.build import build_task, warmed_up_student

    config = tiny_config(root / "student")
    return str(warmed_up_student(config, build_task(config), root / ".cache"))


def _assert_runs_match(hf_lines, hf_weights, mg_lines, mg_weights, computed_w, student, ignore=()):
    """Every logged number (but the `ignore`d keys) and the final weights of the Megatron run equal the HF run's."""
    assert [r["step"] for r in mg_lines] == [*range(1, STEPS + 1), STEPS]  # one line per step (rank 0 only)
    assert [r["step"] for r in hf_lines] == [r["step"] for r in mg_lines]
    for hf, mg in zip(hf_lines, mg_lines):
        keys = {k for k in hf if not k.startswith("time/") and k not in ignore}
        assert keys == {k for k in mg if not k.startswith("time/") and k not in ignore}
        for key in sorted(keys):
            if isinstance(hf[key], float) and math.isfinite(hf[key]):
                assert mg[key] == pytest.approx(hf[key], rel=1e-5, abs=1e-5), (hf["step"], key)
            else:
                assert mg[key] == hf[key], (hf["step"], key)
    assert all(line["train/grad_norm"] > 0 and 1.0 <= line["entropy/w"] <= 3.0 for line in hf_lines[:-1])
    assert hf_lines[0]["entropy/w"] == 3.0  # PRESET_ENTROPIES

    from megatron_red.objectives import EntropyRatioController

    controller = EntropyRatioController(3)  # G = rollout.n = 3
    controller.prev_h_rl, controller.prev_h_sft = PRESET_ENTROPIES
    recomputed = [controller.update(line["entropy/H_rl"], line["entropy/H_sft"]) for line in mg_lines[:-1]]
    assert computed_w == pytest.approx(recomputed, rel=1e-12)
    assert computed_w == pytest.approx([line["entropy/w"] for line in hf_lines[:-1]], rel=2e-2)

    start = read_hf_weights(student)
    assert set(mg_weights) == set(start) and "lm_head.weight" not in start  # tied head, exported once
    for key in start:
        torch.testing.assert_close(torch.from_numpy(mg_weights[key]), hf_weights[key], atol=1e-5, rtol=0, msg=key)
    # The two steps moved the weights by far more than the tolerance.
    assert max((hf_weights[k] - start[k]).abs().max().item() for k in start) > 1e-4


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_tensor_parallel_run_with_resume_matches_hf(root, student, mini_batches):
    """K = 2: each step's two groups are two optimiser steps, with pi_old from the forward-only pass, and the run
    is stopped after step 1 and resumed inside it."""
    k = f"trainer.mini_batches_per_step={mini_batches}"
    hf_lines, hf_weights = _hf_run(root / f"hf_k{mini_batches}", student, False, k)
    run_dir = root / f"megatron_tp2_k{mini_batches}"
    overrides = ["model.backend=megatron", f"model.path={student}", "model.tensor_model_parallel_size=2",
                 "model.use_distributed_optimizer=false", k]
    pinned_w = [line["entropy/w"] for line in hf_lines[:-1]]
    (weights, prompts, computed_w, (errors, replicated)), (_, prompts_1, _, (errors_1, replicated_1)) = \
        run_distributed(_megatron_worker, 2, str(run_dir), overrides, 1, False, pinned_w, hf_weights)
    assert prompts == prompts_1 and [len(p) for p in prompts] == [2]  # both TP ranks: the resumed step's 2 prompts
    # Each TP rank's own shards and replicated copies (rank 1's are not in rank 0's export) equal the HF run's,
    # and the replicated copies, each rank updating its own from the same gradients, stay bitwise equal.
    assert errors.keys() == errors_1.keys() and 0 < len(replicated) < len(errors)
    assert {(r, k): e for r, rank in enumerate((errors, errors_1)) for k, e in rank.items() if e > 1e-5} == {}
    assert replicated.keys() == replicated_1.keys()
    assert [k for k in replicated if not (replicated[k] == replicated_1[k]).all()] == []
    _assert_runs_match(hf_lines, hf_weights, read_lines(run_dir), weights, computed_w, student)
    if mini_batches == 2:  # the second optimiser step of each batch sees a moved policy: pi / pi_old != 1
        assert all(line["loss/on_policy_ratio_mean"] != 1.0 for line in step_lines(run_dir))
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step_000001", "step_000002"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000002"
    assert (run_dir / "checkpoints" / "step_000002" / "rng_rank1.pt").exists()  # every rank's RNG state


def test_data_parallel_step_matches_full_batch(root, student):
    dynamic = ["rollout.dynamic_sampling=true"]
    hf_lines, hf_weights = _hf_run(root / "hf_per_prompt", student, True, *dynamic)
    assert any(line["dynamic/extra_rounds"] for line in hf_lines[:-1]), "nothing dropped: pick another reward"
    run_dir = root / "megatron_dp2"
    overrides = ["model.backend=megatron", f"model.path={student}", "model.use_distributed_optimizer=true", *dynamic]
    pinned_w = [line["entropy/w"] for line in hf_lines[:-1]]
    (weights, prompts, computed_w, _), (_, prompts_1, computed_w_1, _) = run_distributed(
        _megatron_worker, 2, str(run_dir), overrides, None, True, pinned_w)
    assert computed_w == computed_w_1  # the replicas agree on w: it comes from the all-reduced entropies
    _assert_runs_match(hf_lines, hf_weights, read_lines(run_dir), weights, computed_w, student)
    # The replicas split each step's two prompts: one each, together the step's batch (the first sampling round;
    # dynamic sampling's extra prompts are drawn inside the step).
    assert [len(p) for p in prompts] == [len(p) for p in prompts_1] == [1] * STEPS
    assert all(set(a).isdisjoint(b) for a, b in zip(prompts, prompts_1))
    assert len(step_lines(run_dir)) == STEPS and (run_dir / "config.yaml").exists()


def test_data_parallel_mini_batches_match_one_replica(root, student):
    """K = 2 optimiser steps per rollout batch of 6 prompts: each of two replicas holds 3 groups, and mini-batch k
    is the k-th block of the step's 6 groups (3 + 3) whichever replica holds them, as with one replica. (Each
    replica splitting its own 3 groups made the steps 2 + 2 = 4 groups, then 1 + 1 = 2: issue 33.)"""
    extra = ["trainer.mini_batches_per_step=2", "trainer.prompts_per_step=6"]
    hf_lines, hf_weights = _hf_run(root / "hf_k2_p6", student, True, *extra)
    run_dir = root / "megatron_dp2_k2_p6"
    overrides = ["model.backend=megatron", f"model.path={student}", "model.use_distributed_optimizer=true", *extra]
    pinned_w = [line["entropy/w"] for line in hf_lines[:-1]]
    (weights, prompts, computed_w, _), (_, prompts_1, _, _) = run_distributed(
        _megatron_worker, 2, str(run_dir), overrides, None, True, pinned_w)
    assert [len(p) for p in prompts] == [len(p) for p in prompts_1] == [3] * STEPS
    assert all(line["loss/on_policy_ratio_mean"] != 1.0 for line in step_lines(run_dir))  # two optimiser steps
    _assert_runs_match(hf_lines, hf_weights, read_lines(run_dir), weights, computed_w, student)


def _evaluation_worker(rank, world_size, run_dir, student):
    import megatron_compat
    megatron_compat.install()
    from megatron.core import parallel_state as ps

    from megatron_red.trainer.red_trainer import RedTrainer

    trainer = _prepare(RedTrainer(tiny_config(Path(run_dir), *EVALUATION, "model.backend=megatron",
                                              f"model.path={student}"), Path(run_dir)), per_prompt_seeds=False)
    asked, infer = [], trainer.policy.infer
    trainer.policy.infer = lambda prompts, n, params: asked.append(len(prompts)) or infer(prompts, n, params)
    report = trainer.evaluate()
    ps.destroy_model_parallel()
    return report, asked


EVALUATION = ["trainer.eval_problems=8", "trainer.eval_samples=2"]


def test_data_parallel_evaluation_generates_half_the_problems_per_replica(root, student):
    """Each of two replicas generates (and grades) 4 of the 8 held-out problems through the actor hooks, and the
    report is the one-replica report: problem i has its own seed whatever the split. The reference is the HF run
    (one replica, local engine), whose samples equal the megatron engine's (same logits, same uniforms)."""
    from megatron_red.trainer.red_trainer import RedTrainer

    hf = _prepare(RedTrainer(tiny_config(root / "hf_eval", *EVALUATION, f"model.path={student}"), root / "hf_eval"),
                  per_prompt_seeds=False)
    want = hf.evaluate()
    (report, asked), (report_1, asked_1) = run_distributed(_evaluation_worker, 2, str(root / "megatron_eval_dp2"),
                                                           student)
    assert asked == asked_1 == [4]
    assert report == report_1
    assert 0 < want["eval/accuracy"] < 1 and want["eval/problems"] == 8
    for key, value in want.items():
        if key.startswith("eval/teacher_prob"):  # a forward of each backend: float32 rounding apart
            assert report[key] == pytest.approx(value, rel=1e-5), key
        else:
            assert report[key] == value, key
