"""Overlong reward shaping (DAPO's soft overlong punishment, as the RED authors' code adds it; issue 25):

- the penalty at, inside and beyond the buffer against its closed form;
- advantages from the shaped rewards against a float64 reference, rbar from the verifier's accuracy, the trace
  shaped like any sample; a group of truncated failures is still all-fail; overlong filtering empties the loss mask
  of truncated rollouts only;
- through `RedTrainer` (toy size, Hugging Face backend): the step's groups carry each sample's penalty by its length,
  the metrics split the shaped mean into accuracy and penalty, and dynamic sampling's, ReLIFT's and BREAD's
  decisions and the all-fail count are the same with shaping on as off.
"""
from __future__ import annotations

import statistics

import pytest
import torch

from megatron_red.rewards.overlong import overlong_penalty
from megatron_red.trainer import red_trainer
from megatron_red.trainer.groups import Group, build_batch
from megatron_red.trainer.red_trainer import RedTrainer
from trainer_fixtures import tiny_config


@pytest.mark.parametrize("penalty", [1.0, 0.5])
def test_penalty_at_inside_and_beyond_the_buffer(penalty):
    limit, buffer = 100, 20
    assert overlong_penalty(0, limit, buffer, penalty) == 0.0
    assert overlong_penalty(80, limit, buffer, penalty) == 0.0  # the buffer starts after token 80
    assert overlong_penalty(81, limit, buffer, penalty) == pytest.approx(-penalty / 20)
    assert overlong_penalty(90, limit, buffer, penalty) == pytest.approx(-penalty / 2)
    assert overlong_penalty(100, limit, buffer, penalty) == pytest.approx(-penalty)  # at the limit
    assert overlong_penalty(150, limit, buffer, penalty) == pytest.approx(-penalty)  # a trace beyond it
    assert overlong_penalty(100, limit, 0, penalty) == 0.0  # off
    with pytest.raises(ValueError, match="within the generation limit"):
        overlong_penalty(50, limit, 101)


def _shaped_groups() -> list[Group]:
    return [
        Group([5, 6], responses=[[7, 8], [9], [10, 11, 12]], rewards=[1.0, 0.0, 0.0], penalties=[0.0, 0.0, -0.5],
              finished=[True, True, False], trace_ids=[13, 14, 15], trace_reward=1.0, trace_penalty=-0.25),
        # Every rollout fails, two of them cut at the limit: different shaped rewards, still an all-fail group.
        Group([20], responses=[[21, 22, 23], [24, 25, 26], [27]], rewards=[0.0, 0.0, 0.0],
              penalties=[-1.0, -1.0, 0.0], finished=[False, False, True], trace_ids=[28], trace_reward=1.0),
    ]


def _reference(values: list[float], std_normalize: bool) -> list[float]:
    if len(set(values)) <= 1:
        return [0.0] * len(values)
    mean = statistics.fmean(values)
    scale = statistics.stdev(values) + 1e-6 if std_normalize else 1.0
    return [(v - mean) / scale for v in values]


@pytest.mark.parametrize("offline_in_group", [True, False])
def test_advantages_come_from_shaped_rewards_and_rbar_from_accuracy(offline_in_group):
    batch = build_batch(_shaped_groups(), offline_in_group=offline_in_group, std_normalize=True, pad_token_id=0)
    advantages, rbar, rewards = [], [], []
    for g in _shaped_groups():
        accuracy = ([g.trace_reward] if offline_in_group else []) + g.rewards
        shaped = ([g.trace_reward + g.trace_penalty] if offline_in_group else []) + [
            a + p for a, p in zip(g.rewards, g.penalties)]
        reference = _reference(shaped, std_normalize=True)
        advantages += ([reference.pop(0)] if offline_in_group else [0.0]) + reference
        rbar += [sum(accuracy) / len(accuracy)] * (1 + len(g.responses))
        rewards += [g.trace_reward] + g.rewards
    torch.testing.assert_close(batch.fields["advantages"].double(), torch.tensor(advantages, dtype=torch.float64),
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(batch.fields["group_accuracy"].double(), torch.tensor(rbar, dtype=torch.float64))
    assert batch.fields["rewards"].tolist() == rewards  # the verifier's, unshaped
    # The shaping moved the all-fail group's rollouts apart: the truncated ones are pushed down.
    assert batch.fields["advantages"][5] < batch.fields["advantages"][7]


def test_a_group_of_truncated_failures_is_still_all_fail():
    group = _shaped_groups()[1]
    assert group.members(offline_in_group=False) == [-1.0, -1.0, 0.0]  # the shaped rewards differ ...
    assert not group.has_signal(offline_in_group=False)  # ... the accuracies do not: no signal
    assert group.has_signal(offline_in_group=True)  # the correct trace is a member
    assert max(group.rewards) == 0  # ReLIFT's and BREAD's test


def test_overlong_filter_empties_the_loss_of_truncated_rollouts_only():
    groups = _shaped_groups()
    kept = build_batch(groups, offline_in_group=True, std_normalize=True, pad_token_id=0)
    filtered = build_batch(groups, offline_in_group=True, std_normalize=True, pad_token_id=0, filter_truncated=True)
    truncated = [False, False, False, True, False, True, True, False]  # rows: trace, rollouts; per group
    for row, cut in enumerate(truncated):
        assert filtered.loss_mask[row].sum() == (0 if cut else kept.loss_mask[row].sum())
    assert kept.loss_mask.sum(dim=1).min() > 0
    # The filtered rollouts still count in their groups' advantages.
    assert torch.equal(filtered.fields["advantages"], kept.fields["advantages"])


# ------------------------------------------------------------------------------------------------ the trainer


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("overlong")


def _step(root, name: str, *extra: str) -> tuple[dict, list[list[Group]], RedTrainer]:
    """One step of a fresh toy run; returns its metrics, the groups of every `build_batch` call, the trainer."""
    run_dir = root / name
    trainer = RedTrainer(tiny_config(run_dir, "trainer.prompts_per_step=4", *extra), run_dir)
    # The toy student never solves a problem: "text length divisible by 5" as the verifier gives groups with and
    # without signal, all-fail ones included.
    trainer.task.reward_fn = lambda texts, answers: [float(len(t) % 5 == 0) for t in texts]
    built, build = [], red_trainer.build_batch

    def recording(groups, **kwargs):
        built.append(groups)
        return build(groups, **kwargs)

    red_trainer.build_batch = recording
    try:
        metrics = trainer.red_step(trainer.stream.next_batch(), trainer.loss_config(0))
    finally:
        red_trainer.build_batch = build
    return metrics, built, trainer


def test_the_step_shapes_every_sample_by_its_length(root):
    # The buffer is the whole generation limit: every sample's penalty is -len / limit (-1 for a long trace).
    metrics, built, trainer = _step(root, "shaped", "rewards.overlong_buffer=24", "rewards.overlong_penalty=0.5")
    groups = built[0]
    penalties = [-0.5 * min(len(r) / 24, 1.0) for g in groups for r in g.responses]
    assert [p for g in groups for p in g.penalties] == pytest.approx(penalties)
    assert [g.trace_penalty for g in groups] == pytest.approx([-0.5 * min(len(g.trace_ids) / 24, 1.0)
                                                               for g in groups])
    accuracy = [r for g in groups for r in g.rewards]
    assert metrics["reward/accuracy"] == pytest.approx(statistics.fmean(accuracy))
    assert metrics["reward/overlong_penalty_mean"] == pytest.approx(statistics.fmean(penalties))
    assert metrics["reward/mean"] == pytest.approx(statistics.fmean(accuracy) + statistics.fmean(penalties))
    assert metrics["reward/overlong_penalty_mean"] < 0


@pytest.mark.parametrize("method", ["dynamic_sampling", "relift", "bread"])
def test_decisions_read_accuracy_not_the_shaped_reward(root, method):
    extra = {"dynamic_sampling": ["algo.method=grpo", "rollout.dynamic_sampling=true",
                                  "rollout.dynamic_sampling_max_rounds=3"],
             "relift": ["algo.method=relift", "algo.relift_buffer_size=64"],
             "bread": ["algo.method=bread"]}[method]
    off = _step(root, f"{method}_off", *extra)
    on = _step(root, f"{method}_on", *extra, "rewards.overlong_buffer=24")
    assert on[0]["reward/overlong_penalty_mean"] < 0 == off[0]["reward/overlong_penalty_mean"]
    for key in ("reward/accuracy", "reward/all_fail_prompts", "dynamic/kept_groups", "dynamic/extra_rounds",
                "bread/branched_prompts"):
        assert on[0].get(key) == off[0].get(key), key
    trained = [[(g.prompt_ids, g.responses, g.rewards) for g in groups] for groups in on[1]]
    assert trained == [[(g.prompt_ids, g.responses, g.rewards) for g in groups] for groups in off[1]]
    assert on[2].relift_buffer == off[2].relift_buffer
    assert on[0]["reward/all_fail_prompts"] > 0  # the toy has all-fail prompts: the decisions were taken
