"""Overlong reward shaping (DAPO's soft overlong punishment, as the RED authors' code adds it; issue 25):

- the penalty at, inside and beyond the buffer against its closed form;
- advantages from the shaped rewards against a float64 reference, rbar from the verifier's accuracy; a group of
  truncated failures is still all-fail (ReLIFT, BREAD) but has signal (its advantages are not zero), and a group
  whose only correct rollouts were cut at the limit has none (issue 33: dynamic sampling kept it, with seven zero
  advantages); overlong filtering empties the loss mask of truncated rollouts only;
- the offline trace (issue 33): under every recipe's settings (8192 new tokens, buffer 2000) a correct 8000-token
  trace in a group where 1 of 7 rollouts is right keeps a positive advantage (float64 reference), because the
  trace is shaped only with `rewards.overlong_penalize_trace`, which gives the -0.117 of the authors' shaping;
- through `RedTrainer` (toy size, Hugging Face backend): the step's groups carry each rollout's penalty by its
  length (the trace's only with the option), the metrics split the shaped mean into accuracy and penalty, ReLIFT's
  and BREAD's decisions and the all-fail count are the same with shaping on as off, and dynamic sampling keeps
  exactly the groups whose advantages are not all zero.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_red.config import load_config
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


def test_a_group_of_truncated_failures_is_still_all_fail_and_has_signal():
    group = _shaped_groups()[1]
    assert group.members(offline_in_group=False) == [-1.0, -1.0, 0.0]  # the shaped rewards differ ...
    assert max(group.rewards) == 0  # ... the accuracies do not: all-fail for ReLIFT's and BREAD's test
    assert group.has_signal(offline_in_group=False) and group.has_signal(offline_in_group=True)
    batch = build_batch([group], offline_in_group=False, std_normalize=True, pad_token_id=0)
    rollouts = batch.fields["advantages"][~batch.fields["is_offline"]]
    assert rollouts.abs().min() > 0  # the penalty is a gradient: the group trains


def test_a_group_whose_correct_rollouts_were_all_cut_has_no_signal():
    """Issue 33: 2 correct rollouts cut at the limit (1 - 1 = 0) + 5 wrong ones: the accuracies differ, the shaped
    rewards do not, so every advantage is zero and dynamic sampling must drop the group."""
    group = Group([1], responses=[[2]] * 7, rewards=[1.0, 1.0] + [0.0] * 5, penalties=[-1.0, -1.0] + [0.0] * 5,
                  finished=[False, False] + [True] * 5)
    assert min(group.rewards) != max(group.rewards)  # the accuracy rule would keep it
    batch = build_batch([group], offline_in_group=False, std_normalize=True, pad_token_id=0)
    assert torch.equal(batch.fields["advantages"], torch.zeros(7))
    assert not group.has_signal(offline_in_group=False)


RECIPES = sorted(Path(__file__).resolve().parent.parent.glob("examples/red/*.yaml"))


def _trace_advantage_float64(trace_penalty: float) -> float:
    """The trace's advantage (z-score over the 8 members, unbiased std + 1e-6) of a correct trace with
    `trace_penalty` in a group where 1 of 7 rollouts is right (none of them long), in float64 by hand."""
    members = [1.0 + trace_penalty, 1.0] + [0.0] * 6
    mean = statistics.fmean(members)
    return (members[0] - mean) / (statistics.stdev(members) + 1e-6)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if "overlong_buffer: 2000" in r.read_text()],
                         ids=lambda r: r.stem)
def test_a_long_correct_trace_keeps_a_positive_advantage_under_the_recipes(recipe):
    architectures = recipe.parent / "architectures"
    model = next(architectures / name for key, name in (("30b_a3b", "qwen3-30b-a3b"), ("32b", "qwen2.5-32b"),
                                                        ("7b", "qwen2.5-math-7b"), ("1p5b", "qwen2.5-math-1.5b"))
                 if key in recipe.stem)
    config = load_config(recipe, [f"model.path={model}"], planning=True)
    r = config.rewards
    assert (config.rollout.max_new_tokens, r.overlong_buffer) == (8192, 2000) and not r.overlong_penalize_trace

    def batch_of(cfg):
        penalty = RedTrainer.overlong_penalty(SimpleNamespace(config=cfg), 8000, trace=True)  # the trainer's rule
        group = Group([1], responses=[[2]] * 7, rewards=[1.0] + [0.0] * 6, penalties=[0.0] * 7, trace_ids=[3] * 8000,
                      trace_reward=1.0, trace_penalty=penalty)
        batch = build_batch([group], offline_in_group=True, std_normalize=True, pad_token_id=0)
        return penalty, float(batch.fields["advantages"][0])

    penalty, advantage = batch_of(config)
    assert penalty == 0.0 and advantage == pytest.approx(_trace_advantage_float64(0.0), rel=1e-6) and advantage > 0
    # The authors' shaping, as an option: the trace pays -(8000 - 6192) / 2000 = -0.904 and is pushed away.
    config.rewards.overlong_penalize_trace = True
    penalty, advantage = batch_of(config)
    assert penalty == pytest.approx(-0.904, abs=1e-12)
    assert advantage == pytest.approx(_trace_advantage_float64(-0.904), rel=1e-6)
    assert advantage == pytest.approx(-0.117, abs=5e-4)


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


@pytest.mark.parametrize("penalize_trace", [False, True])
def test_the_step_shapes_every_sample_by_its_length(root, penalize_trace):
    # The buffer is the whole generation limit: every sample's penalty is -len / limit (-1 for a long trace).
    metrics, built, trainer = _step(root, f"shaped_{penalize_trace}", "rewards.overlong_buffer=24",
                                    "rewards.overlong_penalty=0.5", f"rewards.overlong_penalize_trace={penalize_trace}")
    groups = built[0]
    penalties = [-0.5 * min(len(r) / 24, 1.0) for g in groups for r in g.responses]
    assert [p for g in groups for p in g.penalties] == pytest.approx(penalties)
    trace_penalties = [-0.5 * min(len(g.trace_ids) / 24, 1.0) if penalize_trace else 0.0 for g in groups]
    assert [g.trace_penalty for g in groups] == pytest.approx(trace_penalties)
    assert min(len(g.trace_ids) for g in groups) > 0 and (min(trace_penalties) < 0) == penalize_trace
    accuracy = [r for g in groups for r in g.rewards]
    assert metrics["reward/accuracy"] == pytest.approx(statistics.fmean(accuracy))
    assert metrics["reward/overlong_penalty_mean"] == pytest.approx(statistics.fmean(penalties))
    assert metrics["reward/mean"] == pytest.approx(statistics.fmean(accuracy) + statistics.fmean(penalties))
    assert metrics["reward/overlong_penalty_mean"] < 0


@pytest.mark.parametrize("method", ["relift", "bread"])
def test_decisions_read_accuracy_not_the_shaped_reward(root, method):
    extra = {"relift": ["algo.method=relift", "algo.relift_buffer_size=64"],
             "bread": ["algo.method=bread"]}[method]
    off = _step(root, f"{method}_off", *extra)
    on = _step(root, f"{method}_on", *extra, "rewards.overlong_buffer=24")
    assert on[0]["reward/overlong_penalty_mean"] < 0 == off[0]["reward/overlong_penalty_mean"]
    for key in ("reward/accuracy", "reward/all_fail_prompts", "bread/branched_prompts"):
        assert on[0].get(key) == off[0].get(key), key
    trained = [[(g.prompt_ids, g.responses, g.rewards) for g in groups] for groups in on[1]]
    assert trained == [[(g.prompt_ids, g.responses, g.rewards) for g in groups] for groups in off[1]]
    assert on[2].relift_buffer == off[2].relift_buffer
    assert on[0]["reward/all_fail_prompts"] > 0  # the toy has all-fail prompts: the decisions were taken


def test_dynamic_sampling_keeps_the_groups_whose_advantages_are_not_zero(root, monkeypatch):
    """With shaping (the buffer is the whole limit: every length is penalised), the step trains the first 4 of the
    sampled groups (all rounds, in order) whose advantages are not all zero, then dropped ones if it must: here
    groups whose rollouts were all graded alike but differ in length are among them, which the accuracy rule would
    drop."""
    extra = ["algo.method=grpo", "rollout.dynamic_sampling=true", "rollout.dynamic_sampling_max_rounds=3",
             "rewards.overlong_buffer=24"]
    run_dir = root / "dynamic_shaped"
    trainer = RedTrainer(tiny_config(run_dir, "trainer.prompts_per_step=4", *extra), run_dir)
    trainer.task.reward_fn = lambda texts, answers: [float(len(t) % 5 == 0) for t in texts]
    sampled, roll_out = [], trainer.roll_out

    def recording(examples, loss_cfg, round_=0):
        out = roll_out(examples, loss_cfg, round_)
        sampled.extend(out.groups)
        return out

    trainer.roll_out = recording
    built = []
    monkeypatch.setattr(red_trainer, "build_batch",
                        lambda groups, **kw: built.append(groups) or build_batch(groups, **kw))
    metrics = trainer.red_step(trainer.stream.next_batch(), trainer.loss_config(0))

    def zero_advantages(g):
        return bool(build_batch([g], offline_in_group=False, std_normalize=True,
                                pad_token_id=0).fields["advantages"].abs().max() == 0)

    kept = [g for g in sampled if not zero_advantages(g)]
    dropped = [g for g in sampled if zero_advantages(g)]
    assert [id(g) for g in built[0]] == [id(g) for g in (kept + dropped)[:4]]
    assert metrics["dynamic/kept_groups"] == min(len(kept), 4) > 0
    assert any(min(g.rewards) == max(g.rewards) for g in built[0][:metrics["dynamic/kept_groups"]])
