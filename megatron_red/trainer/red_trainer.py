"""The RED trainer: one RED step (`RedTrainer.red_step`) and the loop around it.

One step, top to bottom (paper Eq. 10):
  rollout G per prompt (the engine also reports pi's entropy at each token: H_rl) -> rewards (graded once per
  model-parallel group; overlong shaping) -> [dynamic sampling: drop groups whose advantages are all zero, sample
  more prompts] -> groups with the offline trace -> `red_policy_loss` over micro-batches with global counts at the
  sampling temperature -> optimiser step(s). With one optimiser step per rollout batch, pi_old = pi detached and,
  with entropy regulation, the traces are trained first (their forward gives H_sft, w = EntropyRatioController's
  step, the gradient so far is scaled by w), then the rollouts. With K x E (`trainer.mini_batches_per_step` /
  `epochs_per_step`), one forward-only pass gives pi_old, H_sft and w, then each mini-batch of whole groups is an
  optimiser step and the PPO clip acts (trainer/update.py). pi_old is also compared with the engine's behaviour
  log-probs (the mismatch).
Every method of the paper's Table 2 runs through the same step: loss presets by name, and three schedules —
SFT->GRPO (an SFT stage, then GRPO), ReLIFT (GRPO; prompts that all rollouts fail are buffered with their traces and
trained on with a separate SFT step once the buffer is full) and BREAD (GRPO; all-fail prompts are re-rolled from the
shortest expert prefix of the trace that gives a success; the prefix is context, not trained).

Data parallelism (Megatron backend under torchrun): each step's prompts are split over the DP replicas
(`DataParallel.shard`); counts, entropies and metrics are reduced over them (megatron_red/distributed.py), so the
update is the full-batch one. Every decision that changes what is sampled or trained (dynamic sampling's extra
rounds, the ReLIFT buffer) is taken from values gathered over all replicas, so every replica takes it alike; within
a replica, rewards come from one rank (`ModelParallel.from_source`). With one process every reduction is the
identity.
"""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from megatron_red.config import RunConfig, config_to_dict
from megatron_red.data.stream import PromptStream
from megatron_red.distributed import (DataParallel, ModelParallel, current_phase, init_distributed, is_main_process,
                                      set_phase)
from megatron_red.errors import ConfigError
from megatron_red.objectives import SCHEDULES, EntropyRatioController, RedLossConfig
from megatron_red.rewards.overlong import overlong_penalty
from megatron_red.rollout.base import SamplingParams
from megatron_red.trainer import checkpoint
from megatron_red.trainer.build import (build_engine, build_policy, build_task, check_backend_runs_here, engine_kind,
                                       rollout_max_sequence_length)
from megatron_red.trainer.evaluate import evaluate_heldout, teacher_token_probability
from megatron_red.trainer.groups import Group, build_batch
from megatron_red.trainer.metrics import MetricsLog, NullMetricsLog
from megatron_red.trainer.update import policy_update, prepare_update, rollout_update

@dataclass
class Rollouts:
    """What this replica sampled in one step.

    groups:    the groups to train on (BREAD's re-rolled groups in place of all-fail ones).
    positions: each group's position among the step's groups of all replicas (replica 0's first), which cuts the
               step into mini-batches (trainer/update.py) as one replica would.
    sampled:   every group as first graded (before BREAD), over all sampling rounds: the step's reward metrics.
    branched:  groups BREAD re-rolled from an expert prefix with a success.
    """

    groups: list[Group]
    positions: list[int] = field(default_factory=list)
    sampled: list[Group] = field(default_factory=list)
    branched: int = 0


class RedTrainer:
    def __init__(self, config: RunConfig, run_dir: str | Path, resume: bool = False):
        """`config` as `load_config` returns it: validated."""
        check_backend_runs_here(config.model)  # before any work (run directory, data, warm-up)
        self.config = config
        # SFT->GRPO's SFT stage (the paper's SFT checkpoint) comes before its `trainer.steps` GRPO steps.
        self.sft_stage_steps = ((config.algo.sft_then_grpo_sft_steps or config.trainer.steps)
                                if config.algo.method == "sft_then_grpo" else 0)
        self.total_steps = self.sft_stage_steps + config.trainer.steps
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if config.model.backend == "megatron":
            init_distributed(config.trainer.dist_timeout_minutes)  # the data cache is built by one rank
        set_phase("data")
        self.task = build_task(config, cache_dir=self.run_dir.parent / ".cache")
        self.tokenizer = self.task.tokenizer
        set_phase("model load")
        optim = config.optim
        if self.sft_stage_steps:  # the SFT stage's schedule spans its steps, as the `sft` baseline's spans its run
            optim = dataclasses.replace(optim, total_steps=max(self.sft_stage_steps, optim.warmup_steps))
        self.policy = build_policy(dataclasses.replace(config, optim=optim), self.task,
                                   cache_dir=self.run_dir.parent / ".cache")
        self.engine = build_engine(engine_kind(config), self.policy, self.tokenizer, config.rollout,
                                   max_sequence_length=rollout_max_sequence_length(config))
        self.dp = DataParallel.for_backend(config.model.backend)
        self.mp = ModelParallel.for_backend(config.model.backend)
        if config.algo.method == "relift" and config.algo.relift_buffer_size < self.dp.size:
            raise ConfigError(f"algo.relift_buffer_size={config.algo.relift_buffer_size} must be at least the "
                              f"data-parallel size {self.dp.size} (its SFT step is split over the replicas)")
        self.stream = PromptStream(self.task.train, config.trainer.prompts_per_step, seed=config.trainer.seed)
        self.controller = EntropyRatioController(config.rollout.n)
        self.relift_buffer: list[int] = []  # indices into task.train
        self._index = {ex.uid: i for i, ex in enumerate(self.task.train)}
        self._trace_reward: dict[str, float] = {}
        self.reward_seconds = 0.0  # grading time of the current step
        self.step = 0
        checkpoint_dir = checkpoint.latest_checkpoint(self.run_dir) if resume else None
        if resume and checkpoint_dir is None:
            raise ConfigError(f"--resume {self.run_dir}: no checkpoint there (checkpoints/latest missing)")
        if checkpoint_dir is not None:
            if checkpoint.saved_step(checkpoint_dir) >= self.sft_stage_steps > 0:  # saved in SFT->GRPO's GRPO stage
                self.policy.restart_optimizer(self.config.optim)  # its schedule, before its state is loaded
            state = checkpoint.load_checkpoint(checkpoint_dir, self.policy)
            saved_dp = state.get("data_parallel_size", self.dp.size)
            if saved_dp != self.dp.size:
                raise ConfigError(
                    f"{checkpoint_dir} was written at data-parallel size {saved_dp}, this run has {self.dp.size}: "
                    "each replica samples its own block of prompts with its own seed, so the resumed run would not "
                    "continue the same run. Resume with the same data-parallel size (world size / (TP x PP)); "
                    "TP and PP may change.")
            saved_steps = state.get("optimizer_steps_per_step", 1)
            if saved_steps != config.trainer.optimizer_steps_per_step:
                raise ConfigError(
                    f"{checkpoint_dir} was written with {saved_steps} optimiser steps per step, this run takes "
                    f"{config.trainer.optimizer_steps_per_step} (trainer.mini_batches_per_step x "
                    "trainer.epochs_per_step): the learning-rate schedule counts optimiser steps, so the resumed run "
                    "would not continue the same schedule. Resume with the same K x E.")
            self.step = state["step"]
            self.stream.load_state_dict(state["stream"])
            self.controller.load_state_dict(state["controller"])
            self.relift_buffer = state["relift_buffer"]
            self.engine.sync_weights(self.policy)
            if is_main_process():
                # The final model of the finished run, if any, is not this run's final model any more.
                shutil.rmtree(self.run_dir / checkpoint.HF_DIR, ignore_errors=True)
                print(f"[resume] {checkpoint_dir} (step {self.step})")
        elif is_main_process():
            with open(self.run_dir / "config.yaml", "w", encoding="utf-8") as f:
                yaml.safe_dump(config_to_dict(config), f, sort_keys=False)
        self.log = NullMetricsLog()
        if is_main_process():
            self.log = MetricsLog(self.run_dir, resume_step=self.step if checkpoint_dir else None,
                                  tensorboard=config.trainer.tensorboard, wandb_project=config.trainer.wandb_project,
                                  wandb_config=config_to_dict(config))

    # ------------------------------------------------------------------ schedule
    def loss_config(self, step: int) -> RedLossConfig:
        """The loss preset in force at `step` (0-based), with the user's overrides."""
        algo = self.config.algo
        presets = SCHEDULES.get(algo.method, (algo.method,))
        loss = RedLossConfig.from_name(presets[0] if step < self.sft_stage_steps else presets[-1])
        if loss.normalization == "constant":
            # LUFFY / the authors divide token sums by the generation limit: ours, not their 8192.
            loss = dataclasses.replace(loss, max_response_length=self.config.rollout.max_new_tokens)
        if loss.online_rl and algo.tis_cap is not None:
            loss = dataclasses.replace(loss, tis_cap=algo.tis_cap)
        return dataclasses.replace(loss, **algo.loss) if algo.loss else loss

    # ------------------------------------------------------------------ one RED step
    def red_step(self, examples, loss_cfg: RedLossConfig) -> dict:
        """One step on `examples`: this data-parallel replica's share of the step's prompts (dynamic sampling may
        draw more from the stream)."""
        cfg, tok, dp = self.config, self.tokenizer, self.dp
        timings, metrics = {}, {}
        t0 = time.perf_counter()
        self.reward_seconds = 0.0
        uses_trace = loss_cfg.offline_in_group or not loss_cfg.online_rl
        # A step with rollouts computes pi_old, pi and the entropies at the temperature it sampled at, so the loss
        # describes the sampled distribution; SFT-only steps fit the traces at temperature 1.
        temperature = cfg.rollout.temperature if loss_cfg.online_rl else 1.0

        # 1-2. G on-policy rollouts per prompt, graded once per model-parallel group (BREAD re-rolls all-fail
        #      prompts from expert prefixes); dynamic sampling tops the step up with groups that have signal.
        set_phase("rollout")
        if loss_cfg.online_rl:  # the policy is the actor (models/base.py): sampling between its inference hooks
            self.policy.prepare_for_inference()
            try:
                rollouts = self.roll_out(examples, loss_cfg)
                counts = dp.gather([len(examples)])  # the step's groups: replica 0's first
                num_groups = sum(counts)  # dynamic sampling keeps the count
                rollouts.positions = list(range(sum(counts[:dp.rank]), sum(counts[:dp.rank + 1])))
                if cfg.rollout.dynamic_sampling:
                    metrics.update(self.keep_groups_with_signal(rollouts, loss_cfg))
            finally:  # a failed step (a grading error, an interrupt) must not leave the KV cache allocated
                self.policy.finish_inference()
            groups, positions = rollouts.groups, rollouts.positions
            metrics.update(self.rollout_metrics(rollouts))
            timings["time/rollout_s"] = time.perf_counter() - t0
            timings["time/reward_s"] = self.reward_seconds
        else:
            groups = [Group(ex.prompt_ids, trace_ids=ex.trace_ids, trace_reward=r)
                      for ex, r in zip(examples, self.trace_rewards(examples))]
            positions, num_groups = None, None  # one optimiser step: no mini-batches
        if uses_trace:
            trace_rewards = dp.gather([g.trace_reward for g in groups])
            metrics["offline/trace_reward"] = sum(trace_rewards) / len(trace_rewards)

        # 3. groups -> one padded batch; advantages over the group members, rbar per group.
        batch = build_batch(groups, offline_in_group=loss_cfg.offline_in_group,
                            std_normalize=loss_cfg.std_normalize, pad_token_id=tok.pad_token_id,
                            rbar_counts_trace=cfg.algo.rbar_counts_trace,
                            filter_truncated=cfg.rewards.overlong_filter, positions=positions)

        # 4. w (Eq. 9-11) from the entropies at rollout time (trainer/update.py): H_rl is the engine's. With one
        #    optimiser step per batch nothing runs here (the update's own forward gives pi_old and H_sft, and w
        #    scales the traces' gradient once known); with K x E (trainer.mini_batches_per_step / epochs_per_step,
        #    sampling steps only) one forward-only pass over the batch gives pi_old, H_sft and w for all of them.
        t2 = time.perf_counter()
        set_phase("log-probs")
        k, e = (cfg.trainer.mini_batches_per_step, cfg.trainer.epochs_per_step) if loss_cfg.online_rl else (1, 1)
        batch, w, measured = prepare_update(self.policy, batch, loss_cfg, self.controller,
                                            cfg.trainer.micro_batch_size, dp, temperature, k * e)
        metrics.update(measured)
        timings["time/logprob_s"] = time.perf_counter() - t2

        # 5-6. the policy loss over micro-batches, normalised with the global counts of each optimiser step's
        #      (mini-)batch, and the optimiser steps.
        t3 = time.perf_counter()
        set_phase("update")
        self.policy.prepare_for_training()
        lr_scale = 1.0 if loss_cfg.online_rl else cfg.algo.sft_lr_multiplier
        metrics.update(rollout_update(self.policy, batch, loss_cfg, w, cfg.trainer.micro_batch_size, dp, lr_scale,
                                      temperature, k, e, num_groups))
        timings["time/update_s"] = time.perf_counter() - t3

        if cfg.algo.method == "relift" and len(self.relift_buffer) >= cfg.algo.relift_buffer_size:
            metrics.update(self.relift_sft_step())
        set_phase("weight sync")
        self.policy.finish_training()
        timings["time/step_s"] = time.perf_counter() - t0
        metrics["tokens/step"] = int(dp.all_sum(batch.loss_mask.sum()))
        return {**metrics, **timings}

    # ------------------------------------------------------------------ sampling and rewards
    def roll_out(self, examples, loss_cfg: RedLossConfig, round_: int = 0) -> Rollouts:
        """G rollouts of each prompt of `examples` (sampling round `round_` of the step), graded and shaped; ReLIFT
        buffers the all-fail prompts, BREAD re-rolls them from expert prefixes."""
        n = self.config.rollout.n
        trace_rewards = self.trace_rewards(examples) if loss_cfg.offline_in_group else [0.0] * len(examples)
        completions = self.policy.infer([ex.prompt_ids for ex in examples], n,
                                        self.sampling_params(self.step, round_))
        rewards = self.grade([c.token_ids for comps in completions for c in comps],
                             [ex.answer for ex, comps in zip(examples, completions) for _ in comps])
        groups, start = [], 0
        for ex, comps, trace_reward in zip(examples, completions, trace_rewards):
            group = Group(ex.prompt_ids, trace_ids=ex.trace_ids if loss_cfg.offline_in_group else None,
                          trace_reward=trace_reward, trace_penalty=self.overlong_penalty(len(ex.trace_ids), trace=True))
            self.fill(group, comps, rewards[start:start + len(comps)])
            start += len(comps)
            groups.append(group)
        if self.config.algo.method == "relift":
            # One buffer for all replicas: its SFT step is taken (and split) by all of them at once.
            self.relift_buffer += self.dp.gather([self._index[ex.uid] for ex, g in zip(examples, groups)
                                                  if max(g.rewards) == 0])
        rollouts = Rollouts(groups, sampled=list(groups))
        if self.config.algo.method == "bread":
            rollouts.groups = self.branch_from_expert_prefixes(groups, examples, round_)
            rollouts.branched = sum(a is not b for a, b in zip(rollouts.groups, groups))
        return rollouts

    def keep_groups_with_signal(self, rollouts: Rollouts, loss_cfg: RedLossConfig) -> dict:
        """Dynamic sampling: drop the groups whose members' shaped rewards are all equal (zero advantages,
        `Group.has_signal`) and sample further batches of prompts from the stream until the step has
        `trainer.prompts_per_step` groups with signal, or `rollout.dynamic_sampling_max_rounds` extra rounds are
        spent; then the step is completed with dropped groups (earliest first), so it always keeps its batch size.
        Replaces `rollouts.groups` and `rollouts.positions` (a group's position is its place in that choice).

        Every replica decides on every replica's (replica, index, has signal) triples, gathered in rank order each
        round, so all draw the same extra batches from the stream (whose position then includes them: a resumed
        run replays them); the groups themselves stay where they were sampled, and only those a replica must hand
        over to even out the replicas' shares travel (`DataParallel.balance`)."""
        cfg, dp = self.config, self.dp
        target, max_rounds = cfg.trainer.prompts_per_step, cfg.rollout.dynamic_sampling_max_rounds
        held: list[Group] = []  # this replica's groups of every round
        kept, dropped = [], []  # (replica, index into that replica's `held`), every replica's, in decision order
        groups, extra_rounds = rollouts.groups, 0
        while True:
            signals = dp.gather([(dp.rank, len(held) + i, g.has_signal(loss_cfg.offline_in_group))
                                 for i, g in enumerate(groups)])
            held += groups
            for replica, index, signal in signals:
                (kept if signal else dropped).append((replica, index))
            if len(kept) >= target or extra_rounds == max_rounds:
                break
            extra_rounds += 1
            more = self.roll_out(dp.shard(self.stream.next_batch()), loss_cfg, extra_rounds)
            rollouts.sampled += more.sampled
            rollouts.branched += more.branched
            groups = more.groups
        chosen = (kept + dropped)[:target]
        position = {index: p for p, (replica, index) in enumerate(chosen) if replica == dp.rank}
        mine = dp.balance(chosen, [(position.get(i), g) for i, g in enumerate(held)])
        rollouts.positions, rollouts.groups = [p for p, _ in mine], [g for _, g in mine]
        return {"dynamic/kept_groups": min(len(kept), target), "dynamic/extra_rounds": extra_rounds,
                "dynamic/prompts": target * (1 + extra_rounds)}

    def rollout_metrics(self, rollouts: Rollouts) -> dict:
        """Rewards and lengths of every group the step sampled (all replicas, before BREAD's re-rolls): the shaped
        reward's mean (`reward/mean`), the verifier's accuracy and the overlong penalty, each a mean over rollouts."""
        dp = self.dp
        group_rewards = dp.gather([g.rewards for g in rollouts.sampled])
        penalties = dp.gather([p for g in rollouts.sampled for p in g.penalties])
        lengths = dp.gather([len(r) for g in rollouts.sampled for r in g.responses])
        finished = dp.gather([f for g in rollouts.sampled for f in g.finished])
        all_rewards = [r for rewards in group_rewards for r in rewards]
        accuracy, penalty = sum(all_rewards) / len(all_rewards), sum(penalties) / len(all_rewards)
        metrics = {"reward/mean": accuracy + penalty, "reward/accuracy": accuracy,
                   "reward/overlong_penalty_mean": penalty,
                   "reward/all_fail_prompts": sum(max(rewards) == 0 for rewards in group_rewards),
                   "response/mean_length": sum(lengths) / len(all_rewards),
                   "response/truncated": sum(not f for f in finished) / len(all_rewards)}
        if self.config.algo.method == "bread":
            metrics["bread/branched_prompts"] = sum(dp.gather([rollouts.branched]))
        return metrics

    def grade(self, token_lists: list[list[int]], answers: list) -> list[float]:
        """The verifier's reward of each decoded token list against its answer. Graded on the model-parallel
        group's source rank and shared with the others: grading can time out, and the ranks of a replica must
        train on the same rewards (and take the same BREAD / ReLIFT / dynamic-sampling branches)."""
        def on_source():
            texts = [self.tokenizer.decode(ids) for ids in token_lists]
            return [float(r) for r in self.task.reward_fn(texts, list(answers))]

        t0 = time.perf_counter()
        phase = current_phase()
        set_phase("reward")
        rewards = self.mp.from_source(on_source)
        set_phase(phase)
        self.reward_seconds += time.perf_counter() - t0
        return rewards

    def trace_rewards(self, examples) -> list[float]:
        """The verifier's reward of each example's offline trace (the authors do not assume 1), graded once per
        run (and per model-parallel group) and cached."""
        missing = list({ex.uid: ex for ex in examples if ex.uid not in self._trace_reward}.values())
        if missing:
            rewards = self.grade([ex.trace_ids for ex in missing], [ex.answer for ex in missing])
            self._trace_reward.update(zip((ex.uid for ex in missing), rewards))
        return [self._trace_reward[ex.uid] for ex in examples]

    def sampling_params(self, step: int, round_: int = 0, prefix: int = 0) -> SamplingParams:
        """Sampling of `step`: round 0 is its rollouts, round r > 0 dynamic sampling's r-th extra round; prefix
        p > 0 is BREAD's re-roll from its p-th prefix length (in that round)."""
        r = self.config.rollout
        # A seed per step (not one advancing generator) keeps a resumed run's rollouts identical. Data-parallel
        # replicas sample their own prompts with their own seeds (identity with one replica); the ranks of one
        # model-parallel group share theirs.
        seed = (self.config.trainer.seed * 1_000_003 + step) * self.dp.size + self.dp.rank
        if round_ or prefix:
            # The step's further engine calls: seeds of their own, not those of another step's first call.
            seed = int.from_bytes(hashlib.sha256(f"{seed}:{round_}:{prefix}".encode()).digest()[:7], "little")
        return SamplingParams(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens, seed=seed)

    def branch_from_expert_prefixes(self, groups: list[Group], examples, round_: int = 0) -> list[Group]:
        """BREAD: for prompts whose G rollouts all failed, re-roll from the shortest trace prefix that yields a
        success; the prefix joins the prompt (context, not trained). One engine call per prefix length, for every
        prompt still failing. Returns the groups, branched ones replaced."""
        groups, n = list(groups), self.config.rollout.n
        failing = [i for i, g in enumerate(groups) if max(g.rewards) == 0]
        for p, fraction in enumerate(self.config.algo.bread_prefix_fractions, start=1):
            if not failing:
                break
            prefixes = [examples[i].trace_ids[: int(len(examples[i].trace_ids) * fraction)] for i in failing]
            prompts = [examples[i].prompt_ids + prefix for i, prefix in zip(failing, prefixes)]
            completions = self.policy.infer(prompts, n, self.sampling_params(self.step, round_, prefix=p))
            rewards = self.grade([prefix + c.token_ids for prefix, comps in zip(prefixes, completions) for c in comps],
                                 [examples[i].answer for i, comps in zip(failing, completions) for _ in comps])
            still_failing, start = [], 0
            for i, prompt, comps in zip(failing, prompts, completions):
                group_rewards, start = rewards[start:start + len(comps)], start + len(comps)
                if max(group_rewards) > 0:
                    groups[i] = self.fill(dataclasses.replace(groups[i], prompt_ids=prompt), comps, group_rewards)
                else:
                    still_failing.append(i)
            failing = still_failing
        return groups

    def overlong_penalty(self, num_tokens: int, trace: bool = False) -> float:
        """The overlong penalty (`rewards.overlong_buffer`; 0 when off) of a sample of `num_tokens` tokens; of the
        offline trace (`trace`) only with `rewards.overlong_penalize_trace`."""
        r = self.config.rewards
        if trace and not r.overlong_penalize_trace:
            return 0.0
        return overlong_penalty(num_tokens, self.config.rollout.max_new_tokens, r.overlong_buffer, r.overlong_penalty)

    def fill(self, group: Group, completions, rewards: list[float]) -> Group:
        """`group` with `completions` (a prompt's `Completion`s) as its responses, `rewards` (the verifier's) as
        their accuracies and their overlong penalties."""
        group.responses = [c.token_ids for c in completions]
        group.behaviour_logprobs = [c.logprobs for c in completions]
        group.rollout_entropies = [c.entropies for c in completions]
        routed = [c.routed_experts for c in completions]
        group.routed_experts = routed if any(r is not None for r in routed) else None
        group.finished = [c.finished for c in completions]
        group.rewards = list(rewards)
        group.penalties = [self.overlong_penalty(len(c.token_ids)) for c in completions]
        return group

    def relift_sft_step(self) -> dict:
        """ReLIFT: one SFT update on the buffered all-fail prompts' traces, then the buffer is emptied. Same
        optimiser, at `algo.sft_lr_multiplier` x the scheduled rate; it does not advance the schedule, which counts
        the run's `trainer.steps` RL steps (otherwise every SFT step would move the cosine's end forward)."""
        buffered = len(self.relift_buffer)
        examples = [self.task.train[i] for i in self.dp.shard(self.relift_buffer)]
        self.relift_buffer = []
        sft = RedLossConfig.sft()
        batch = build_batch([Group(ex.prompt_ids, trace_ids=ex.trace_ids) for ex in examples],
                            offline_in_group=False, std_normalize=False, pad_token_id=self.tokenizer.pad_token_id)
        out = policy_update(self.policy, batch, sft, 1.0, self.config.trainer.micro_batch_size, self.dp,
                            self.config.algo.sft_lr_multiplier, advance_schedule=False)
        return {"relift/sft_prompts": buffered, "relift/sft_loss": out.get("loss/loss", float("nan"))}

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        cfg = self.config.trainer
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"{self.config.algo.method}",
                   disable=not (cfg.progress and is_main_process()), dynamic_ncols=True)
        try:
            while self.step < self.total_steps:
                if self.step == self.sft_stage_steps > 0:  # SFT->GRPO: GRPO as a new run from the SFT model
                    self.policy.restart_optimizer(self.config.optim)
                examples = self.dp.shard(self.stream.next_batch())
                metrics = self.red_step(examples, self.loss_config(self.step))
                self.step += 1
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    metrics.update(self.evaluate())
                self.log.log(self.step, metrics)
                bar.update(1)
                bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3g}" for k in
                                 ("reward/mean", "entropy/H_rl", "entropy/w", "response/mean_length")
                                 if isinstance(metrics.get(k), float)})
                if self.step % cfg.save_every == 0:
                    self.save()
        finally:
            bar.close()
        if checkpoint.needs_final_save(self.run_dir, self.step, cfg.save_every):  # decided on rank 0
            self.save()
        set_phase("hf export")
        checkpoint.save_hf_model(self.policy, self.tokenizer, self.run_dir / checkpoint.HF_DIR)
        final = self.evaluate()
        self.log.log(self.step, {"final": True, **final})
        self.log.close()
        return final

    def save(self) -> Path:
        set_phase("checkpoint")
        return checkpoint.save_checkpoint(self.run_dir, self.step, self.policy, {
            "stream": self.stream.state_dict(), "controller": self.controller.state_dict(),
            "relift_buffer": self.relift_buffer, "data_parallel_size": self.dp.size,
            "optimizer_steps_per_step": self.config.trainer.optimizer_steps_per_step}, tokenizer=self.tokenizer,
            save_hf=self.config.trainer.save_hf, keep_last=self.config.trainer.keep_last)

    def evaluate(self) -> dict:
        cfg = self.config.trainer
        if not self.task.test:
            return {}
        set_phase("evaluation")
        problems = self.task.test[: cfg.eval_problems]
        try:
            out = evaluate_heldout(self.policy, problems, self.grade, n=cfg.eval_samples,
                                   temperature=cfg.eval_temperature, max_new_tokens=self.config.rollout.max_new_tokens,
                                   seed=cfg.seed, dp=self.dp, hard_min_difficulty=self.task.hard_min_difficulty)
        finally:
            # prepare_for_inference may have offloaded the optimiser state (rollout.offload_optimizer): the next
            # step's update, or the checkpoint written after this evaluation, needs it back.
            self.policy.prepare_for_training()
        if self.task.hard_min_difficulty is not None:  # the built-in task: short traces, a cheap forward
            out.update(teacher_token_probability(self.policy, problems, self.tokenizer.pad_token_id,
                                                 cfg.micro_batch_size, self.task.hard_min_difficulty))
        return out

