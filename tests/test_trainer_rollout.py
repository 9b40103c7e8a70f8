"""What is sampled is what is trained (issue 10) and the schedule / resume defects of issue 13, through `RedTrainer`
on the Hugging Face backend at toy size:

- two RED steps at rollout temperature 0.7 compute pi (whose detached value is pi_old), H_rl (the engine's), H_sft,
  w and the loss at 0.7 (float64 reference on the steps' own tokens); the traces are trained before the on-policy
  rows (w is factored out of their term until their forward has given H_sft); the sampler/trainer mismatch is 0
  when the engine samples from the trained fp32 module;
- the mismatch metric and truncated importance sampling against values recomputed from the step's tensors, with an
  engine that samples at another temperature than the trainer's;
- dynamic sampling: every trained group has reward variance, the step keeps its batch, the stream's position
  includes the extra prompts, and a run stopped after its step-2 checkpoint and resumed equals an uninterrupted one;
- `train/lr` is the rate the step used; ReLIFT's SFT steps leave the learning-rate schedule alone; a resume at
  another data-parallel size is refused.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from megatron_red.models.optim import lr_multiplier
from megatron_red.objectives import red_policy_loss
from megatron_red.trainer import red_trainer
from megatron_red.trainer.red_trainer import RedTrainer
from trainer_fixtures import parameters, read_lines, step_lines, tiny_config


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("trainer_rollout")


def _trainer(root, name, *extra, resume=False) -> RedTrainer:
    run_dir = root / name
    trainer = RedTrainer(tiny_config(run_dir, *extra), run_dir, resume=resume)
    # The toy student never solves a problem; "even number of characters" or'ed into the verifier gives the
    # groups signal (as in test_trainer_e2e), "length divisible by 4" gives many groups without.
    verify, modulus = trainer.task.reward_fn, 4 if "rollout.dynamic_sampling=true" in extra else 2
    trainer.task.reward_fn = lambda texts, answers: [max(float(r), float(len(t) % modulus == 0))
                                                     for r, t in zip(verify(texts, answers), texts)]
    return trainer


def _record_updates(trainer) -> list[dict]:
    """Wrap the policy's training forward: every micro-batch records its rows, the log-probs and entropies the
    loss was given (pi, whose detached value is pi_old), the temperature and the weights it ran on."""
    records, train = [], trainer.policy.get_loss_and_metrics

    def recording(batch, micro_batch_size, loss_fn, temperature=1.0):
        model = copy.deepcopy(trainer.policy.model)

        def recording_loss(logprobs, entropy, mb):
            records.append({"mb": mb, "logprobs": logprobs.detach().clone(), "entropy": entropy.detach().clone(),
                            "temperature": temperature, "model": model})
            return loss_fn(logprobs, entropy, mb)

        return train(batch, micro_batch_size, recording_loss, temperature)

    trainer.policy.get_loss_and_metrics = recording
    return records


def _float64_logprobs_entropy(model, batch, temperature):
    model64 = copy.deepcopy(model).double()
    lp = torch.zeros(batch.loss_mask.shape, dtype=torch.float64)
    ent = torch.zeros_like(lp)
    with torch.no_grad():
        for i in range(len(batch)):
            n = int(batch.attention_mask[i].sum())
            logp = torch.log_softmax(model64(batch.input_ids[i:i + 1, :n]).logits[0, :-1] / temperature, -1)
            lp[i, :n - 1] = logp.gather(-1, batch.input_ids[i, 1:n, None]).squeeze(-1)
            ent[i, :n - 1] = -(logp.exp() * logp).sum(-1)
    return lp * batch.loss_mask, ent * batch.loss_mask


def _row_means(values: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> list[float]:
    mask = mask.double()
    return ((values.double() * mask).sum(1) / mask.sum(1).clamp_min(1))[rows & (mask.sum(1) > 0)].tolist()


def _float64_step(records: list[dict], loss_cfg, w: float) -> tuple[float, float, float]:
    """H_rl, H_sft and the loss of one step's recorded micro-batches in float64, on the weights that sampled;
    asserts that the log-probs the loss was given are those at the recorded temperature."""
    num_sequences = sum(int((r["mb"].loss_mask.sum(1) > 0).sum()) for r in records)
    num_tokens = sum(r["mb"].loss_mask.sum() for r in records)
    h_rl, h_sft, loss64 = [], [], 0.0
    for r in records:
        mb = r["mb"]
        lp64, ent64 = _float64_logprobs_entropy(r["model"], mb, r["temperature"])
        torch.testing.assert_close(r["logprobs"].double() * mb.loss_mask, lp64, atol=2e-5, rtol=0)
        is_offline = mb.fields["is_offline"]
        h_rl += _row_means(ent64, mb.loss_mask, ~is_offline)
        h_sft += _row_means(ent64, mb.loss_mask, is_offline)
        loss64 += red_policy_loss(lp64, lp64, mb.fields["advantages"].double(), mb.loss_mask, is_offline,
                                  mb.fields["group_accuracy"].double(), w, loss_cfg, num_sequences=num_sequences,
                                  num_tokens=num_tokens)[0].item()
    assert h_rl and h_sft
    return sum(h_rl) / len(h_rl), sum(h_sft) / len(h_sft), loss64


def test_red_steps_at_the_sampling_temperature_match_float64(root):
    trainer = _trainer(root, "temperature", "rollout.temperature=0.7")
    records = _record_updates(trainer)
    loss_cfg = trainer.loss_config(0)
    steps = []
    for _ in range(2):
        metrics = trainer.red_step(trainer.stream.next_batch(), loss_cfg)
        steps.append((metrics, list(records)))
        records.clear()
        # As if H_sft had moved a lot since: the next step's w is above 1 (the offline term weighs more).
        trainer.controller.prev_h_sft *= 1.5
    previous = None
    for metrics, step_records in steps:
        assert {r["temperature"] for r in step_records} == {0.7}
        # Entropy regulation: the traces are trained first (H_sft comes from their forward; w is factored out of
        # their term and their gradient scaled once it is known), then the on-policy rows; no micro-batch mixes the
        # two. H_rl is the engine's, from the sampling logits of the same weights.
        kinds = [r["mb"].fields["is_offline"] for r in step_records]
        assert all(k.all() or not k.any() for k in kinds)
        assert [bool(k.all()) for k in kinds] == sorted((bool(k.all()) for k in kinds), reverse=True)
        assert kinds[0].all() and not kinds[-1].any()
        h_rl, h_sft, _ = _float64_step(step_records, loss_cfg, 1.0)
        assert metrics["entropy/H_rl"] == pytest.approx(h_rl, rel=1e-5)
        assert metrics["entropy/H_sft"] == pytest.approx(h_sft, rel=1e-5)
        # w of Eq. 9-11 from the two steps' float64 entropies (1 on the first step), and the loss it weighs.
        w = 1.0 if previous is None else min(max(abs(1 - h_sft / previous[1]) / abs(1 - h_rl / previous[0]), 1.0),
                                             float(trainer.config.rollout.n))
        assert metrics["entropy/w"] == pytest.approx(w, rel=1e-4)
        assert metrics["loss/loss"] == pytest.approx(_float64_step(step_records, loss_cfg, w)[2], rel=1e-4, abs=1e-7)
        assert metrics["loss/on_policy_ratio_mean"] == 1.0
        assert abs(metrics["loss/loss"]) > 1e-3
        # The engine sampled from this very fp32 module at 0.7: its behaviour log-probs are the trainer's pi_old.
        assert metrics["mismatch/logprob_abs_max"] < 1e-5 and metrics["mismatch/logprob_abs_mean"] < 1e-6
        assert metrics["mismatch/ratio_outside_half_2"] == 0.0
        previous = (h_rl, 1.5 * h_sft)
    assert steps[1][0]["entropy/w"] > 1.0


def test_mismatch_and_tis_against_an_engine_sampling_at_another_temperature(root):
    trainer = _trainer(root, "tis", "rollout.temperature=0.7", "algo.tis_cap=1.1")
    assert trainer.loss_config(0).tis_cap == 1.1
    generate = trainer.engine.generate
    trainer.engine.generate = lambda prompts, n, params: generate(prompts, n, dataclasses.replace(params,
                                                                                              temperature=1.0))
    records = _record_updates(trainer)
    metrics = trainer.red_step(trainer.stream.next_batch(), trainer.loss_config(0))
    # pi_old is the trainer's own forward (what the loss was given); delta over every on-policy token of the step.
    delta = torch.cat([(r["logprobs"].double() - r["mb"].fields["behaviour_logprobs"].double())[
        r["mb"].loss_mask.bool() & ~r["mb"].fields["is_offline"].unsqueeze(-1)] for r in records])
    assert metrics["mismatch/logprob_abs_mean"] == pytest.approx(delta.abs().mean().item(), rel=1e-6)
    assert metrics["mismatch/logprob_abs_max"] == pytest.approx(delta.abs().max().item(), rel=1e-6)
    assert metrics["mismatch/ratio_outside_half_2"] == pytest.approx((delta.abs() > math.log(2)).double().mean().item())
    assert metrics["mismatch/logprob_abs_mean"] > 0.05  # T = 1 vs T = 0.7 is far from a rounding error
    weights = delta.exp().clamp(max=1.1)
    assert metrics["loss/tis_weight_mean"] == pytest.approx(weights.mean().item(), rel=1e-5)
    assert metrics["loss/tis_capped_fraction"] == pytest.approx((delta >= math.log(1.1)).double().mean().item())
    assert 0 < metrics["loss/tis_capped_fraction"] < 1


def test_dynamic_sampling_trains_groups_with_signal_and_resumes_exactly(root, monkeypatch):
    # GRPO: no trace in the group, so a group without reward variance is common at this size.
    run = ["algo.method=grpo", "rollout.dynamic_sampling=true", "rollout.dynamic_sampling_max_rounds=6",
           "trainer.steps=4", "trainer.save_every=2", "optim.total_steps=4", "optim.warmup_steps=1"]
    trained: list[list] = []
    build_batch = red_trainer.build_batch

    def recording_build_batch(groups, **kwargs):
        trained.append(list(groups))
        return build_batch(groups, **kwargs)

    monkeypatch.setattr(red_trainer, "build_batch", recording_build_batch)
    reference = _trainer(root, "dynamic", *run)
    reference.train()
    lines = step_lines(reference.run_dir)
    assert sum(line["dynamic/extra_rounds"] for line in lines) > 0, "no group was dropped: the test exercises nothing"
    for line, groups in zip(lines, trained):
        assert len(groups) == 2 and line["dynamic/kept_groups"] == 2  # the step keeps its batch, all with signal
        for group in groups:
            assert max(group.rewards) > min(group.rewards)
        assert line["dynamic/prompts"] == 2 * (1 + line["dynamic/extra_rounds"])
    # The stream's position counts every prompt drawn, the extra rounds' included.
    consumed = sum(line["dynamic/prompts"] for line in lines)
    state = reference.stream.state_dict()
    assert state["epoch"] * state["num_examples"] + state["position"] == consumed

    # Stopped once its step-2 checkpoint is written (a named step, not a timed kill), then resumed.
    stopped = _trainer(root, "dynamic_stopped", *run)
    red_step = stopped.red_step

    def stop_after_step_2(examples, loss_cfg):
        if stopped.step == 2:
            raise KeyboardInterrupt("stopped at step 2")
        return red_step(examples, loss_cfg)

    stopped.red_step = stop_after_step_2
    with pytest.raises(KeyboardInterrupt):
        stopped.train()
    resumed = _trainer(root, "dynamic_stopped", *run, resume=True)
    assert resumed.step == 2
    resumed.train()
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(read_lines(resumed.run_dir)) == strip(read_lines(reference.run_dir))
    a, b = parameters(resumed.policy), parameters(reference.policy)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dynamic_sampling_when_the_rounds_run_out_trains_what_it_has(root, monkeypatch):
    trainer = _trainer(root, "dynamic_cap", "algo.method=grpo", "rollout.dynamic_sampling=true",
                       "rollout.dynamic_sampling_max_rounds=1")
    trainer.task.reward_fn = lambda texts, answers: [0.0] * len(texts)  # no group ever has signal
    trained, build_batch = [], red_trainer.build_batch
    monkeypatch.setattr(red_trainer, "build_batch", lambda groups, **kw: trained.append(groups) or
                        build_batch(groups, **kw))
    metrics = trainer.red_step(trainer.stream.next_batch(), trainer.loss_config(0))
    assert (metrics["dynamic/kept_groups"], metrics["dynamic/extra_rounds"], metrics["dynamic/prompts"]) == (0, 1, 4)
    assert metrics["reward/all_fail_prompts"] == 4  # both rounds' prompts were sampled and graded
    # The step is completed with the first round's dropped groups: its batch, as without dynamic sampling.
    assert len(trained[0]) == 2 and metrics["loss/loss"] == 0.0


def test_groups_with_signal_count_the_trace_when_it_is_a_member():
    from megatron_red.trainer.groups import Group

    all_fail = Group([1], responses=[[2], [3]], rewards=[0.0, 0.0], trace_ids=[4], trace_reward=1.0)
    assert all_fail.has_signal(offline_in_group=True) and not all_fail.has_signal(offline_in_group=False)
    all_pass = dataclasses.replace(all_fail, rewards=[1.0, 1.0])
    assert not all_pass.has_signal(offline_in_group=True)


def test_train_lr_is_the_rate_the_step_used(root):
    trainer = _trainer(root, "lr", "trainer.steps=3", "optim.warmup_steps=2", "optim.total_steps=3")
    trainer.train()
    optim = trainer.config.optim
    lrs = [line["train/lr"] for line in step_lines(trainer.run_dir)]
    assert lrs == pytest.approx([optim.lr * lr_multiplier(step, optim) for step in range(3)], rel=1e-12)
    assert lrs[0] == pytest.approx(optim.lr / 2)  # the first warm-up step, not the second


def test_relift_sft_steps_do_not_advance_the_schedule(root):
    trainer = _trainer(root, "relift_schedule", "algo.method=relift", "algo.relift_buffer_size=1", "trainer.steps=3",
                       "optim.warmup_steps=1")
    trainer.task.reward_fn = lambda texts, answers: [0.0] * len(texts)  # every prompt fails: an SFT step each step
    trainer.train()
    lines = step_lines(trainer.run_dir)
    assert all(line.get("relift/sft_prompts") == 2 for line in lines)
    # Three RL steps and three SFT steps, and the schedule counted the RL steps only.
    assert trainer.policy.scheduler.last_epoch == 3 == trainer.config.optim.total_steps
    optim = trainer.config.optim
    assert [line["train/lr"] for line in lines] == pytest.approx([optim.lr * lr_multiplier(s, optim)
                                                                  for s in range(3)], rel=1e-12)


def test_resume_at_another_data_parallel_size_is_refused(root):
    trainer = _trainer(root, "dp_resume", "trainer.steps=1")
    trainer.train()
    latest = trainer.run_dir / "checkpoints" / (trainer.run_dir / "checkpoints" / "latest").read_text().strip()
    state = torch.load(latest / "trainer.pt", weights_only=False)
    assert state["data_parallel_size"] == 1
    state["data_parallel_size"] = 2  # as if written by a run over two replicas
    torch.save(state, latest / "trainer.pt")
    with pytest.raises(ValueError, match="data-parallel size 2, this run has 1"):
        _trainer(root, "dp_resume", "trainer.steps=2", resume=True)


def test_build_batch_aligns_behaviour_logprobs_with_the_targets():
    from megatron_red.trainer.groups import Group, build_batch

    groups = [Group([5, 6], responses=[[7, 8, 9], [10]], rewards=[1.0, 0.0], behaviour_logprobs=[[-1, -2, -3], [-4]],
                    trace_ids=[11, 12], trace_reward=1.0)]
    batch = build_batch(groups, offline_in_group=True, std_normalize=True, pad_token_id=0)
    # Rows: trace, then the responses; position t holds the log-prob of target token t + 1.
    assert batch.fields["behaviour_logprobs"].tolist() == [[0, 0, 0, 0], [0, -1, -2, -3], [0, -4, 0, 0]]
    assert (batch.fields["behaviour_logprobs"] != 0).float().le(batch.loss_mask).all()
    assert "behaviour_logprobs" not in build_batch([dataclasses.replace(groups[0], behaviour_logprobs=None)],
                                                   offline_in_group=True, std_normalize=True, pad_token_id=0).fields
    with pytest.raises(ValueError, match="behaviour log-probs"):
        build_batch([dataclasses.replace(groups[0], behaviour_logprobs=[[-1], [-4]])], offline_in_group=True,
                    std_normalize=True, pad_token_id=0)


def test_a_luffy_shift_with_a_detached_denominator_fails_before_any_work(root):
    with pytest.raises(ValueError, match="not LUFFY's shaping"):
        RedTrainer(tiny_config(root / "refused", "algo.method=luffy", "algo.loss={detach_pi_offline: true}"),
                   root / "refused")
    assert not (root / "refused").exists()
