"""End-to-end steps of every Table-2 method through `RedTrainer` at a toy size, the schedules' special paths
(SFT->GRPO stage switch, ReLIFT's buffered SFT step, BREAD's expert-prefix branching), and `build_batch` /
`masked_row_mean` against hand-computed float64 references."""
from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import statistics

import pytest
import torch

from megatron_red.batch import masked_row_mean
from megatron_red.models.optim import lr_multiplier
from megatron_red.objectives import METHODS, RedLossConfig
from megatron_red.trainer.groups import Group, build_batch
from megatron_red.trainer.red_trainer import RedTrainer
from trainer_fixtures import parameters, read_lines, step_lines, tiny_config

STEPS = 2


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    # One root for the module: the warmed-up tiny student is cached in root/.cache and shared by every run.
    return tmp_path_factory.mktemp("trainer_e2e")


def _trainer(root, name, *extra) -> RedTrainer:
    run_dir = root / name
    return RedTrainer(tiny_config(run_dir, f"trainer.steps={STEPS}", *extra), run_dir)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _pay_even_lengths(trainer: RedTrainer) -> None:
    """At this size the student never solves a problem, so every GRPO group would be uniform and carry no
    gradient. The verifier's reward or'ed with "the text has an even number of characters" gives groups
    signal without changing any correct answer's (or teacher trace's) reward."""
    verify = trainer.task.reward_fn
    trainer.task.reward_fn = lambda texts, answers: [max(float(r), float(len(t) % 2 == 0))
                                                     for r, t in zip(verify(texts, answers), texts)]


@pytest.mark.parametrize("method", METHODS)
def test_method_trains(root, method):
    trainer = _trainer(root, method, f"algo.method={method}")
    _pay_even_lengths(trainer)
    before = parameters(trainer.policy)
    final = trainer.train()

    lines = read_lines(trainer.run_dir)
    assert [r["step"] for r in lines] == [*range(1, trainer.total_steps + 1), trainer.total_steps]
    assert lines[-1].get("final") is True and not any(r.get("final") for r in lines[:-1])
    assert 0.0 <= final["eval/accuracy"] <= 1.0 and final["eval/problems"] == 8
    assert lines[-1]["eval/accuracy"] == final["eval/accuracy"]

    for step, line in enumerate(lines[:-1]):
        loss_cfg = trainer.loss_config(step)
        for key in ("loss/loss", "train/grad_norm", "entropy/w", "entropy/H_sft" if not loss_cfg.online_rl else
                    "entropy/H_rl"):
            assert _finite(line.get(key)), (method, step, key, line.get(key))
        assert line["train/grad_norm"] > 0
        assert "entropy/H_rl" in line and "tokens/step" in line
        if loss_cfg.online_rl:
            assert 0.0 <= line["reward/mean"] <= 1.0
            assert 0 <= line["reward/all_fail_prompts"] <= 2
            assert 0 < line["response/mean_length"] <= 24
        else:
            # SFT has no rollouts: no reward, and no on-policy entropy (NaN is logged as null).
            assert "reward/mean" not in line and line["entropy/H_rl"] is None
        if loss_cfg.offline_in_group or not loss_cfg.online_rl:
            # The built-in teacher's traces are correct, and the trainer grades them with the same verifier.
            assert line["offline/trace_reward"] == 1.0
        else:
            assert "offline/trace_reward" not in line
        if not loss_cfg.entropy_regulation:
            assert line["entropy/w"] == 1.0
        else:
            assert 1.0 <= line["entropy/w"] <= 3.0  # clip(., 1, G) with G = rollout.n = 3

    after = parameters(trainer.policy)
    assert all(torch.isfinite(p).all() for p in after.values())
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) > len(before) // 2, f"{method}: only {changed} changed"
    assert (trainer.run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{trainer.total_steps:06d}"


def test_micro_batching_does_not_change_the_step(root):
    # The loss is normalised with the step's global counts, so one row per micro-batch must give the same loss,
    # gradient and logged metrics as the whole step in one micro-batch.
    lines = {}
    for mbs in (1, 32):
        trainer = _trainer(root, f"micro_batch_{mbs}", "trainer.steps=1", f"trainer.micro_batch_size={mbs}")
        trainer.train()
        lines[mbs] = step_lines(trainer.run_dir)[0]
    one, whole = lines[1], lines[32]
    assert one["tokens/step"] == whole["tokens/step"] > 0
    for key in ("loss/loss", "loss/loss_on_policy", "loss/loss_offline", "train/grad_norm", "entropy/H_rl",
                "entropy/H_sft"):
        assert one[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-7), key
    # Step totals and token-weighted means, whatever the micro-batching.
    assert whole["loss/num_on_policy_tokens"] + whole["loss/num_offline_tokens"] == whole["tokens/step"]
    for key in ("loss/num_on_policy_tokens", "loss/num_offline_tokens", "loss/on_policy_ratio_mean",
                "loss/r_off_mean", "loss/clip_fraction"):
        assert one[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key


def test_grpo_without_signal_does_not_move(root):
    # With the real verifier every rollout fails: uniform groups have zero advantages, so GRPO's gradient is
    # exactly zero and AdamW (no weight decay here) leaves the parameters untouched.
    trainer = _trainer(root, "grpo_no_signal", "algo.method=grpo")
    before = parameters(trainer.policy)
    trainer.train()
    lines = step_lines(trainer.run_dir)
    assert all(line["reward/all_fail_prompts"] == 2 for line in lines), "a rollout succeeded: pick another seed"
    assert all(line["train/grad_norm"] == 0.0 and line["loss/loss"] == 0.0 for line in lines)
    after = parameters(trainer.policy)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_sft_then_grpo_switches_stage(root):
    trainer = _trainer(root, "sft_then_grpo_switch", "algo.method=sft_then_grpo", "algo.sft_then_grpo_sft_steps=1",
                       "trainer.steps=1")
    assert [trainer.loss_config(s).name for s in range(trainer.total_steps)] == ["sft", "grpo"]
    # By default the SFT stage is the `sft` baseline's whole run: trainer.steps SFT steps, then as many GRPO steps.
    assert _trainer(root, "sft_then_grpo_default", "algo.method=sft_then_grpo").total_steps == 2 * STEPS
    trainer.train()
    sft_line, grpo_line = step_lines(trainer.run_dir)
    assert "reward/mean" not in sft_line and sft_line["loss/loss_nll"] > 0
    assert "reward/mean" in grpo_line and grpo_line["loss/loss_nll"] == 0.0
    # r_off (Eq. 8) belongs to the offline term in the group, which neither stage has: it is not logged.
    assert "loss/r_off_mean" not in sft_line and "loss/r_off_mean" not in grpo_line
    # SFT trains on the traces only, GRPO on the rollouts only.
    assert sft_line["loss/num_on_policy_tokens"] == 0 and sft_line["loss/num_offline_tokens"] > 0
    assert grpo_line["loss/num_offline_tokens"] == 0 and grpo_line["loss/num_on_policy_tokens"] > 0


SFT_THEN_GRPO = ["algo.method=sft_then_grpo", "algo.sft_then_grpo_sft_steps=2", "trainer.steps=4",
                 "optim.warmup_steps=1", "trainer.save_every=1", "trainer.keep_last=0"]


@pytest.fixture(scope="module")
def sft_then_grpo(root):
    """SFT->GRPO: 2 SFT steps, then 4 GRPO steps (schedules of different lengths), and the weights at its
    switch."""
    trainer = _trainer(root, "sft_then_grpo", *SFT_THEN_GRPO)
    _pay_even_lengths(trainer)
    at_switch, restart = {}, trainer.policy.restart_optimizer

    def recording(optim):
        at_switch.update(parameters(trainer.policy), step=trainer.step)
        restart(optim)

    trainer.policy.restart_optimizer = recording
    trainer.train()
    return trainer, at_switch


def test_sft_then_grpo_is_grpo_from_the_sft_baseline(root, sft_then_grpo):
    trainer, at_switch = sft_then_grpo
    assert trainer.total_steps == 6 and at_switch.pop("step") == 2
    baseline = _trainer(root, "sft_baseline", *SFT_THEN_GRPO[2:], "algo.method=sft", "trainer.steps=2")
    baseline.train()
    # The SFT stage is the `sft` baseline of the same config: same prompts, rate and schedule, bit for bit.
    final = parameters(baseline.policy)
    assert all(torch.equal(at_switch[name], final[name]) for name in final)
    lines = step_lines(trainer.run_dir)
    assert [line["train/lr"] for line in lines[:2]] == [line["train/lr"] for line in step_lines(baseline.run_dir)]
    # The GRPO stage is a new run: its own warm-up and cosine from the first step, fresh Adam moments.
    optim = trainer.config.optim
    assert optim.total_steps == 4
    assert [line["train/lr"] for line in lines[2:]] == pytest.approx(
        [optim.lr * lr_multiplier(k, optim) for k in range(4)], rel=1e-12)
    assert {int(state["step"]) for state in trainer.policy.optimizer.state.values()} == {4}


def test_sft_then_grpo_resumes_exactly_in_either_stage(root, sft_then_grpo):
    trainer, _ = sft_then_grpo
    reference = trainer.run_dir
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    for stopped_at in (2, 3):  # the switch's checkpoint (SFT moments), and one in the GRPO stage
        run_dir = root / f"sft_then_grpo_resumed_{stopped_at}"
        shutil.copytree(reference, run_dir)
        (run_dir / "checkpoints" / "latest").write_text(f"step_{stopped_at:06d}")
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        (run_dir / "metrics.jsonl").write_text("\n".join(lines[:stopped_at + 1]) + "\n")  # steps 0..stopped_at
        resumed = RedTrainer(tiny_config(run_dir, *SFT_THEN_GRPO), run_dir, resume=True)
        _pay_even_lengths(resumed)
        resumed.train()
        assert strip(read_lines(run_dir)) == strip(read_lines(reference))
        a, b = parameters(resumed.policy), parameters(trainer.policy)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_loss_config_presets_and_overrides(root):
    trainer = _trainer(root, "loss_presets", "algo.method=luffy", "algo.loss={clip_eps: 0.3}")
    loss = trainer.loss_config(0)
    # LUFFY's constant normalisation divides by this run's generation limit; user overrides apply on top.
    expected = RedLossConfig.luffy()
    expected.max_response_length, expected.clip_eps = 24, 0.3
    assert loss == expected
    trainer.config.algo.method = "relift"
    assert trainer.loss_config(0) == RedLossConfig(**{**vars(RedLossConfig.grpo()), "clip_eps": 0.3})


def test_relift_flushes_its_buffer(root):
    trainer = _trainer(root, "relift_flush", "algo.method=relift", "algo.relift_buffer_size=1")
    trainer.train()
    lines = step_lines(trainer.run_dir)
    assert sum(line["reward/all_fail_prompts"] for line in lines) > 0, "no all-fail prompt: the test exercises nothing"
    for line in lines:
        if line["reward/all_fail_prompts"]:
            # Buffer size 1: every step's all-fail prompts are trained on at once and the buffer empties.
            assert line["relift/sft_prompts"] == line["reward/all_fail_prompts"]
            assert _finite(line["relift/sft_loss"]) and line["relift/sft_loss"] > 0
        else:
            assert "relift/sft_prompts" not in line
    assert trainer.relift_buffer == []


def test_relift_buffer_persists_below_size(root):
    trainer = _trainer(root, "relift_keep", "algo.method=relift", "algo.relift_buffer_size=100")
    trainer.train()
    lines = step_lines(trainer.run_dir)
    assert not any("relift/sft_prompts" in line for line in lines)
    assert len(trainer.relift_buffer) == sum(line["reward/all_fail_prompts"] for line in lines) > 0
    assert all(0 <= i < len(trainer.task.train) for i in trainer.relift_buffer)


def test_bread_rerolls_all_failed_prompts_in_one_call_per_prefix_length(root):
    trainer = _trainer(root, "bread_tries", "algo.method=bread")
    calls: list[tuple[int, int, int]] = []  # (step, prompts, seed) of each engine call
    generate = trainer.engine.generate

    def counting_generate(prompts, n, params):
        calls.append((trainer.step, len(prompts), params.seed))
        return generate(prompts, n, params)

    trainer.engine.generate = counting_generate
    trainer.train()
    lines = step_lines(trainer.run_dir)
    fractions = len(trainer.config.algo.bread_prefix_fractions)
    assert sum(line["reward/all_fail_prompts"] for line in lines) > 0, "no all-fail prompt: the test exercises nothing"
    for step, line in enumerate(lines):  # (the held-out evaluation runs at step STEPS)
        step_calls = [(n, seed) for s, n, seed in calls if s == step]
        # The rollouts, then one call per prefix length for every prompt still failing, with the step's seeds.
        assert step_calls[0] == (2, trainer.sampling_params(step).seed)
        rerolls = step_calls[1:]
        assert [seed for _, seed in rerolls] == [trainer.sampling_params(step, 0, prefix=p).seed
                                                 for p in range(1, len(rerolls) + 1)]
        failing = [n for n, _ in rerolls]
        assert failing == sorted(failing, reverse=True) and all(n > 0 for n in failing)
        if line["bread/branched_prompts"] == 0:
            assert failing == [line["reward/all_fail_prompts"]] * fractions or line["reward/all_fail_prompts"] == 0
        else:
            assert failing[0] == line["reward/all_fail_prompts"] and len(failing) <= fractions


def test_bread_branches_from_the_shortest_successful_prefix(root):
    # With the full trace as the longest prefix the answer is in the context, so that prefix always succeeds.
    trainer = _trainer(root, "bread_branch", "algo.method=bread", "algo.bread_prefix_fractions=[0.1, 1.0]")
    examples = trainer.task.train[:3]
    n = trainer.config.rollout.n
    groups = [Group(list(ex.prompt_ids), responses=[[1]] * n, rewards=[0.0] * n) for ex in examples]
    groups[1].rewards = [0.0, 1.0, 0.0]  # a prompt with a success is left alone
    before = [dataclasses.replace(g) for g in groups]

    calls = []
    generate = trainer.engine.generate

    def recording_generate(prompts, n, params):
        calls.append((prompts, params.seed))
        return generate(prompts, n, params)

    trainer.engine.generate = recording_generate
    branched = trainer.branch_from_expert_prefixes(groups, examples)
    trainer.engine.generate = generate
    assert groups == before  # the sampled groups are kept as they were (the step's reward metrics use them)
    assert branched[1] is groups[1]

    # Replay: the shortest prefix for both failing prompts in one call, then the full trace for those still
    # failing, with the implementation's seeds.
    failing, chosen, expected = [0, 2], {}, {}
    for p, fraction in enumerate((0.1, 1.0), start=1):
        if not failing:
            break
        prefixes = [examples[i].trace_ids[: int(len(examples[i].trace_ids) * fraction)] for i in failing]
        params = trainer.sampling_params(trainer.step, 0, prefix=p)
        prompts = [examples[i].prompt_ids + prefix for i, prefix in zip(failing, prefixes)]
        assert calls.pop(0) == (prompts, params.seed)
        completions = generate(prompts, n, params)
        still = []
        for i, prefix, comps in zip(failing, prefixes, completions):
            rewards = trainer.grade([prefix + c.token_ids for c in comps], [examples[i].answer] * n)
            if max(rewards) > 0:
                chosen[i], expected[i] = prefix, (comps, rewards)
            else:
                still.append(i)
        failing = still
    assert not calls and not failing and set(chosen) == {0, 2}
    for i in (0, 2):
        comps, rewards = expected[i]
        group = branched[i]
        assert group.prompt_ids == examples[i].prompt_ids + chosen[i]  # the prefix is context ...
        assert group.responses == [c.token_ids for c in comps] and group.rewards == rewards and max(rewards) > 0
        assert group.behaviour_logprobs == [c.logprobs for c in comps]
        # ... and each response is graded with the prefix in front of it.
        assert group.rewards == trainer.grade([chosen[i] + r for r in group.responses], [examples[i].answer] * n)


# ---------------------------------------------------------------------------------------------- build_batch


def _reference_advantages(members: list[float], std_normalize: bool) -> list[float]:
    """GRPO advantages in float64: (r - mean) / (unbiased std + 1e-6), exact zeros for a uniform group."""
    if len(set(members)) <= 1:
        return [0.0] * len(members)
    mean = statistics.fmean(members)
    scale = statistics.stdev(members) + 1e-6 if std_normalize else 1.0
    return [(r - mean) / scale for r in members]


def _groups() -> list[Group]:
    return [
        Group([5, 6, 7], responses=[[8, 9], [10]], rewards=[1.0, 0.0], trace_ids=[11, 12, 13], trace_reward=1.0),
        Group([20], responses=[[21, 22, 23], [24]], rewards=[0.0, 0.0], trace_ids=[25], trace_reward=1.0),
        Group([30, 31], responses=[[32], [33, 34], [35]], rewards=[1.0, 1.0, 0.0], trace_ids=[36, 37],
              trace_reward=0.0),
    ]


@pytest.mark.parametrize("offline_in_group", [True, False])
@pytest.mark.parametrize("std_normalize", [True, False])
def test_build_batch_rows_masks_advantages(offline_in_group, std_normalize):
    pad = 99
    batch = build_batch(_groups(), offline_in_group=offline_in_group, std_normalize=std_normalize,
                        pad_token_id=pad)

    rows, prompt_lens, adv, acc, offline, rewards = [], [], [], [], [], []
    for g in _groups():
        members = ([g.trace_reward] if offline_in_group else []) + g.rewards
        a = _reference_advantages(members, std_normalize)
        rbar = sum(members) / len(members)  # Eq. 8's rbar: the trace counts only when it is a group member
        rows.append(g.prompt_ids + g.trace_ids)
        prompt_lens.append(len(g.prompt_ids))
        adv.append(a[0] if offline_in_group else 0.0)
        acc.append(rbar)
        offline.append(True)
        rewards.append(g.trace_reward)
        for response, reward, ai in zip(g.responses, g.rewards, a[1:] if offline_in_group else a):
            rows.append(g.prompt_ids + response)
            prompt_lens.append(len(g.prompt_ids))
            adv.append(ai)
            acc.append(rbar)
            offline.append(False)
            rewards.append(reward)

    width = max(map(len, rows))
    assert batch.input_ids.tolist() == [r + [pad] * (width - len(r)) for r in rows]
    assert batch.attention_mask.tolist() == [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    # loss_mask[i, t] marks the prediction of token t + 1, so it covers the response/trace tokens exactly.
    expected_mask = [[1.0 if p <= t + 1 < len(r) else 0.0 for t in range(width - 1)] for r, p in zip(rows, prompt_lens)]
    assert batch.loss_mask.tolist() == expected_mask
    assert batch.fields["is_offline"].tolist() == offline
    assert batch.fields["rewards"].tolist() == rewards
    torch.testing.assert_close(batch.fields["advantages"].double(), torch.tensor(adv, dtype=torch.float64),
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(batch.fields["group_accuracy"].double(), torch.tensor(acc, dtype=torch.float64),
                               rtol=1e-6, atol=1e-7)
    # The all-zero on-policy group of prompt 2 carries signal only through its (correct) trace.
    second = slice(3, 6)
    if offline_in_group:
        assert batch.fields["advantages"][second].abs().min() > 0
    else:
        assert batch.fields["advantages"][second].tolist() == [0.0, 0.0, 0.0]


def test_build_batch_trace_only_groups_and_errors():
    # SFT rows (no rollouts): advantage 0, rbar 0, every trace token trained.
    batch = build_batch([Group([1, 2], trace_ids=[3, 4, 5]), Group([6], trace_ids=[7])], offline_in_group=False,
                        std_normalize=True, pad_token_id=0)
    assert batch.fields["advantages"].tolist() == [0.0, 0.0]
    assert batch.fields["group_accuracy"].tolist() == [0.0, 0.0]
    assert batch.loss_mask.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]
    # GRPO groups without traces: only the rollouts are rows.
    batch = build_batch([Group([1], responses=[[2], [3]], rewards=[0.0, 1.0], trace_ids=None)],
                        offline_in_group=True, std_normalize=True, pad_token_id=0)
    assert batch.fields["is_offline"].tolist() == [False, False]
    ref = _reference_advantages([0.0, 1.0], True)
    torch.testing.assert_close(batch.fields["advantages"].double(), torch.tensor(ref, dtype=torch.float64))
    with pytest.raises(ValueError):
        build_batch([Group([1])], offline_in_group=True, std_normalize=True, pad_token_id=0)


def test_masked_row_mean():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(5, 7, generator=g, dtype=torch.float64)
    mask = (torch.rand(5, 7, generator=g) > 0.4).float()
    mask[3] = 0.0  # a selected row without tokens does not count
    rows = torch.tensor([True, False, True, True, True])
    per_row = [sum(values[i, t].item() for t in range(7) if mask[i, t]) / mask[i].sum().item()
               for i in range(5) if rows[i] and mask[i].sum() > 0]
    assert masked_row_mean(values, mask, rows) == pytest.approx(sum(per_row) / len(per_row), rel=1e-12)
    # Not the token mean over all selected tokens: rows weigh the same whatever their length.
    long_short = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert masked_row_mean(long_short, m, torch.tensor([True, True])) == 2.0
    assert math.isnan(masked_row_mean(values, mask, torch.zeros(5, dtype=torch.bool)))
    assert math.isnan(masked_row_mean(values, torch.zeros_like(mask), rows))


def test_build_batch_rbar_without_the_trace():
    """rbar_counts_trace=False: rbar is the on-policy samples' accuracy; advantages still span the whole group."""
    counted = build_batch(_groups(), offline_in_group=True, std_normalize=True, pad_token_id=0)
    batch = build_batch(_groups(), offline_in_group=True, std_normalize=True, pad_token_id=0, rbar_counts_trace=False)
    expected = []
    for g in _groups():
        expected += [sum(g.rewards) / len(g.rewards)] * (1 + len(g.responses))
    torch.testing.assert_close(batch.fields["group_accuracy"].double(), torch.tensor(expected, dtype=torch.float64))
    assert batch.fields["group_accuracy"][3].item() == 0.0  # all rollouts of prompt 2 failed: full imitation
    torch.testing.assert_close(batch.fields["advantages"], counted.fields["advantages"])


def test_warmed_up_student_is_shared_by_methods_and_keyed_by_the_task(tmp_path):
    """One cached student per (task, seed, model, warm-up settings): another method or RL setting reuses it (what
    lets `compare` share warm-ups per seed); other warm-up data or another tokenizer (a changed task, even with the
    same config) is a new student."""
    import dataclasses

    from megatron_red.trainer.build import build_task, warmed_up_student

    config = tiny_config(tmp_path / "red")
    task = build_task(config)
    student = warmed_up_student(config, task, tmp_path / ".cache")
    other_method = tiny_config(tmp_path / "grpo", "algo.method=grpo", "optim.lr=0.5", "rollout.n=5",
                               "trainer.steps=9")
    assert warmed_up_student(other_method, build_task(other_method), tmp_path / ".cache") == student
    fewer = dataclasses.replace(task, warmup=task.warmup[:-1])
    assert warmed_up_student(config, fewer, tmp_path / ".cache") != student
    other_seed = tiny_config(tmp_path / "red1", "trainer.seed=1")
    assert warmed_up_student(other_seed, build_task(other_seed), tmp_path / ".cache") != student
    assert len(list((tmp_path / ".cache").glob("student_*"))) == 3


def test_warmed_up_student_is_keyed_by_the_code(tmp_path, monkeypatch):
    """A cached student from other code is not reused: the key holds a digest of the package's source, which any
    edit of a source file changes."""
    import shutil
    from pathlib import Path

    from megatron_red.trainer import build

    package = tmp_path / "pkg"
    shutil.copytree(Path(build.__file__).resolve().parents[1], package, ignore=shutil.ignore_patterns("__pycache__"))
    before = build.code_digest(package)
    assert build.code_digest(package) == before
    source = package / "trainer" / "update.py"
    source.write_text(source.read_text() + "\n# an edit\n")
    assert build.code_digest(package) != before

    config = tiny_config(tmp_path / "red")
    task = build.build_task(config)
    student = build.warmed_up_student(config, task, tmp_path / ".cache")
    assert build.warmed_up_student(config, task, tmp_path / ".cache") == student
    monkeypatch.setattr(build, "code_digest", lambda: "other code")
    assert build.warmed_up_student(config, task, tmp_path / ".cache") != student


def test_teacher_token_probability_against_a_float64_forward(root, monkeypatch):
    from megatron_red.trainer import evaluate

    trainer = _trainer(root, "teacher_probs")
    examples = list(trainer.task.test[:8])
    hard_min = 3
    model = copy.deepcopy(trainer.policy.model).double()  # the reference: one example at a time, float64 softmax
    probs = {"": [], "_hard": []}
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex.prompt_ids + ex.trace_ids])
            p = model(input_ids=ids).logits[0, :-1].softmax(-1)
            targets = ids[0, 1:]
            token_probs = p[torch.arange(len(targets)), targets][len(ex.prompt_ids) - 1:].tolist()
            probs[""] += token_probs
            if ex.difficulty >= hard_min:
                probs["_hard"] += token_probs
    assert probs["_hard"] and len(probs["_hard"]) < len(probs[""])
    # The toy student finds every teacher token improbable at 0.1: a threshold at its median tests the count.
    threshold = sorted(probs[""])[len(probs[""]) // 2]
    monkeypatch.setattr(evaluate, "IMPROBABLE", threshold)
    out = evaluate.teacher_token_probability(trainer.policy, examples, trainer.tokenizer.pad_token_id,
                                             micro_batch_size=3, hard_min_difficulty=hard_min)
    for suffix, values in probs.items():
        lower_median = sorted(values)[(len(values) - 1) // 2]  # torch.median's convention for an even count
        assert out[f"eval/teacher_prob_median{suffix}"] == pytest.approx(lower_median, rel=1e-4)
        improbable = sum(v < threshold for v in values) / len(values)
        # a token within float32 rounding of the threshold may fall on either side of it
        assert out[f"eval/teacher_improbable_fraction{suffix}"] == pytest.approx(improbable, abs=1.01 / len(values))
    assert 0.3 < out["eval/teacher_improbable_fraction"] < 0.7
