"""The RED trainer: one RED step (`RedTrainer.red_step`) and the loop around it.

One step, top to bottom (paper Eq. 10):
  rollout G per prompt -> rewards -> groups with the offline trace -> forward-only log-probs and entropies of all
  samples (pi_old and H_rl / H_sft at rollout time) -> EntropyRatioController gives w -> `red_policy_loss` over
  micro-batches with global counts -> optimiser step.
Every method of the paper's Table 2 runs through the same step: loss presets by name, and three schedules —
SFT->GRPO (an SFT stage, then GRPO), ReLIFT (GRPO; prompts that all rollouts fail are buffered with their traces and
trained on with a separate SFT step once the buffer is full) and BREAD (GRPO; all-fail prompts are re-rolled from the
shortest expert prefix of the trace that gives a success; the prefix is context, not trained).

Data parallelism (Megatron backend under torchrun): each step's prompts are split over the DP replicas
(`DataParallel.shard`); counts, entropies and metrics are reduced over them (trainer/distributed.py), so the
update is the full-batch one. With one process every reduction is the identity.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import yaml

from megatron_red.config import RunConfig, config_to_dict
from megatron_red.data.stream import PromptStream
from megatron_red.objectives import EntropyRatioController, RedLossConfig
from megatron_red.rollout.base import SamplingParams
from megatron_red.rollout.build import build_engine
from megatron_red.trainer import checkpoint
from megatron_red.trainer.build import build_policy, build_task, engine_kind, rollout_max_sequence_length
from megatron_red.trainer.distributed import DataParallel, NullMetricsLog, is_main_process
from megatron_red.trainer.evaluate import evaluate_heldout
from megatron_red.trainer.groups import Group, build_batch
from megatron_red.trainer.metrics import MetricsLog
from megatron_red.trainer.update import policy_update

SCHEDULES = ("sft_then_grpo", "relift", "bread")


def method_names() -> tuple[str, ...]:
    from megatron_red.objectives.loss import PRESETS

    return PRESETS + SCHEDULES


class RedTrainer:
    def __init__(self, config: RunConfig, run_dir: str | Path, resume: bool = False):
        if config.algo.method not in method_names():
            raise ValueError(f"unknown algo.method {config.algo.method!r}; valid: {', '.join(method_names())}")
        self.config = config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.task = build_task(config)
        self.tokenizer = self.task.tokenizer
        self.policy = build_policy(config, self.task, cache_dir=self.run_dir.parent / ".cache")
        self.engine = build_engine(engine_kind(config), self.policy, self.tokenizer, config.rollout,
                                   max_sequence_length=rollout_max_sequence_length(config))
        self.dp = DataParallel.for_backend(config.model.backend)
        if config.algo.method == "relift" and config.algo.relift_buffer_size < self.dp.size:
            raise ValueError(f"algo.relift_buffer_size={config.algo.relift_buffer_size} must be at least the "
                             f"data-parallel size {self.dp.size} (its SFT step is split over the replicas)")
        self.stream = PromptStream(self.task.train, config.trainer.prompts_per_step, seed=config.trainer.seed)
        self.controller = EntropyRatioController(config.rollout.n)
        self.relift_buffer: list[int] = []  # indices into task.train
        self._index = {ex.uid: i for i, ex in enumerate(self.task.train)}
        self._trace_reward: dict[str, float] = {}
        self.step = 0
        checkpoint_dir = checkpoint.latest_checkpoint(self.run_dir) if resume else None
        if resume and checkpoint_dir is None:
            raise FileNotFoundError(f"--resume {self.run_dir}: no checkpoint there (checkpoints/latest missing)")
        if checkpoint_dir is not None:
            state = checkpoint.load_checkpoint(checkpoint_dir, self.policy)
            self.step = state["step"]
            self.stream.load_state_dict(state["stream"])
            self.controller.load_state_dict(state["controller"])
            self.relift_buffer = state["relift_buffer"]
            self.engine.sync_weights(self.policy)
            if is_main_process():
                print(f"[resume] {checkpoint_dir} (step {self.step})")
        elif is_main_process():
            with open(self.run_dir / "config.yaml", "w", encoding="utf-8") as f:
                yaml.safe_dump(config_to_dict(config), f, sort_keys=False)
        self.log = NullMetricsLog()
        if is_main_process():
            self.log = MetricsLog(self.run_dir, resume_step=self.step if checkpoint_dir else None,
                                  tensorboard=config.trainer.tensorboard)

    # ------------------------------------------------------------------ schedule
    def loss_config(self, step: int) -> RedLossConfig:
        """The loss preset in force at `step` (0-based), with the user's overrides."""
        algo = self.config.algo
        if algo.method == "sft_then_grpo":
            name = "sft" if step < round(algo.sft_then_grpo_fraction * self.config.trainer.steps) else "grpo"
        elif algo.method in ("relift", "bread"):
            name = "grpo"
        else:
            name = algo.method
        loss = RedLossConfig.from_name(name)
        if loss.normalization == "constant":
            # LUFFY / the authors divide token sums by the generation limit: ours, not their 8192.
            loss = dataclasses.replace(loss, max_response_length=self.config.rollout.max_new_tokens)
        return dataclasses.replace(loss, **algo.loss) if algo.loss else loss

    # ------------------------------------------------------------------ one RED step
    def red_step(self, examples, loss_cfg: RedLossConfig) -> dict:
        """One step on `examples`: this data-parallel replica's share of the step's prompts."""
        cfg, tok, dp = self.config, self.tokenizer, self.dp
        timings, metrics = {}, {}
        t0 = time.perf_counter()
        uses_trace = loss_cfg.offline_in_group or not loss_cfg.online_rl
        groups = [Group(ex.prompt_ids, trace_ids=ex.trace_ids if uses_trace else None,
                        trace_reward=self.trace_reward(ex) if uses_trace else 0.0) for ex in examples]

        # 1-2. G on-policy rollouts per prompt, rewarded by the verifier (the policy is the actor: models/base.py).
        if loss_cfg.online_rl:
            self.policy.prepare_for_inference()
            completions = self.policy.infer([ex.prompt_ids for ex in examples], cfg.rollout.n,
                                            self.sampling_params(self.step))
            timings["time/rollout_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            for group, ex, comps in zip(groups, examples, completions):
                group.responses = [c.token_ids for c in comps]
                group.rewards = self.reward([c.token_ids for c in comps], ex.answer)
            timings["time/reward_s"] = time.perf_counter() - t1
            # Metrics over the whole step: every replica's groups (the identity with one process).
            group_rewards = dp.gather([g.rewards for g in groups])
            lengths = dp.gather([len(r) for g in groups for r in g.responses])
            finished = dp.gather([c.finished for cs in completions for c in cs])
            all_rewards = [r for rewards in group_rewards for r in rewards]
            metrics["reward/mean"] = sum(all_rewards) / len(all_rewards)
            metrics["reward/all_fail_prompts"] = sum(max(rewards) == 0 for rewards in group_rewards)
            metrics["response/mean_length"] = sum(lengths) / len(all_rewards)
            metrics["response/truncated"] = sum(not f for f in finished) / len(all_rewards)
            if cfg.algo.method == "bread":
                metrics["bread/branched_prompts"] = sum(dp.gather([self.branch_from_expert_prefixes(groups,
                                                                                                    examples)]))
            if cfg.algo.method == "relift":
                # One buffer for all replicas: its SFT step is taken (and split) by all of them at once.
                self.relift_buffer += dp.gather([self._index[ex.uid] for ex, g in zip(examples, groups)
                                                 if max(g.rewards) == 0])
            self.policy.finish_inference()
        if uses_trace:
            trace_rewards = dp.gather([g.trace_reward for g in groups])
            metrics["offline/trace_reward"] = sum(trace_rewards) / len(trace_rewards)

        # 3. groups -> one padded batch; advantages over the group members, rbar per group.
        batch = build_batch(groups, offline_in_group=loss_cfg.offline_in_group,
                            std_normalize=loss_cfg.std_normalize, pad_token_id=tok.pad_token_id,
                            rbar_counts_trace=cfg.algo.rbar_counts_trace)

        # 4. pi_old and the entropies at rollout time (forward only), then w (Eq. 9-11).
        t2 = time.perf_counter()
        old_logprobs, entropy = self.policy.get_inference_log_probs(batch, cfg.trainer.micro_batch_size)
        batch.fields["old_logprobs"] = old_logprobs
        timings["time/logprob_s"] = time.perf_counter() - t2
        is_offline = batch.fields["is_offline"]
        h_rl = dp.row_mean(entropy, batch.loss_mask, ~is_offline)  # over all replicas: w is the same everywhere
        h_sft = dp.row_mean(entropy, batch.loss_mask, is_offline)
        w = self.controller.update(h_rl, h_sft) if loss_cfg.entropy_regulation else 1.0
        metrics.update({"entropy/H_rl": h_rl, "entropy/H_sft": h_sft, "entropy/w": w})

        # 5-6. the policy loss over micro-batches, normalised with the step's global counts, and one update.
        t3 = time.perf_counter()
        self.policy.prepare_for_training()
        metrics.update(self.update(batch, loss_cfg, w))
        timings["time/update_s"] = time.perf_counter() - t3

        if cfg.algo.method == "relift" and len(self.relift_buffer) >= cfg.algo.relift_buffer_size:
            metrics.update(self.relift_sft_step())
        self.policy.finish_training()
        timings["time/step_s"] = time.perf_counter() - t0
        metrics["tokens/step"] = int(dp.all_sum(batch.loss_mask.sum()))
        return {**metrics, **timings}

    def update(self, batch, loss_cfg: RedLossConfig, w: float) -> dict:
        lr_scale = 1.0 if loss_cfg.online_rl else self.config.algo.sft_lr_multiplier
        return policy_update(self.policy, batch, loss_cfg, w, self.config.trainer.micro_batch_size, self.dp,
                             lr_scale)

    # ------------------------------------------------------------------ rewards and schedules
    def reward(self, token_lists: list[list[int]], answer) -> list[float]:
        texts = [self.tokenizer.decode(ids) for ids in token_lists]
        return [float(r) for r in self.task.reward_fn(texts, [answer] * len(texts))]

    def trace_reward(self, example) -> float:
        """The verifier's reward of the offline trace (computed once; the authors do not assume 1)."""
        if example.uid not in self._trace_reward:
            self._trace_reward[example.uid] = self.reward([example.trace_ids], example.answer)[0]
        return self._trace_reward[example.uid]

    def sampling_params(self, step: int) -> SamplingParams:
        r = self.config.rollout
        # A seed per step (not one advancing generator) keeps a resumed run's rollouts identical.
        # Data-parallel replicas sample their own prompts with their own seeds (identity with one replica).
        seed = (self.config.trainer.seed * 1_000_003 + step) * self.dp.size + self.dp.rank
        return SamplingParams(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens, seed=seed)

    def branch_from_expert_prefixes(self, groups: list[Group], examples) -> int:
        """BREAD: for prompts whose G rollouts all failed, re-roll from the shortest trace prefix that yields a
        success; the prefix joins the prompt (context, not trained). Returns how many groups were branched."""
        branched = 0
        for i, (group, ex) in enumerate(zip(groups, examples)):
            if max(group.rewards) > 0:
                continue
            for j, fraction in enumerate(self.config.algo.bread_prefix_fractions):
                prefix = ex.trace_ids[: int(len(ex.trace_ids) * fraction)]
                prompt = ex.prompt_ids + prefix
                params = self.sampling_params(self.step)
                params.seed = params.seed * 7919 + 1 + i * len(self.config.algo.bread_prefix_fractions) + j
                comps = self.policy.infer([prompt], self.config.rollout.n, params)[0]
                rewards = self.reward([prefix + c.token_ids for c in comps], ex.answer)
                if max(rewards) > 0:
                    group.prompt_ids, group.responses, group.rewards = prompt, [c.token_ids for c in comps], rewards
                    branched += 1
                    break
        return branched

    def relift_sft_step(self) -> dict:
        """ReLIFT: one SFT update on the buffered all-fail prompts' traces, then the buffer is emptied. It is an
        optimiser step like any other (same optimiser, and it advances the learning-rate schedule)."""
        buffered = len(self.relift_buffer)
        examples = [self.task.train[i] for i in self.dp.shard(self.relift_buffer)]
        self.relift_buffer = []
        sft = RedLossConfig.sft()
        batch = build_batch([Group(ex.prompt_ids, trace_ids=ex.trace_ids) for ex in examples],
                            offline_in_group=False, std_normalize=False, pad_token_id=self.tokenizer.pad_token_id)
        batch.fields["old_logprobs"] = torch.zeros_like(batch.loss_mask)
        out = self.update(batch, sft, 1.0)
        return {"relift/sft_prompts": buffered, "relift/sft_loss": out.get("loss/loss", float("nan"))}

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        cfg = self.config.trainer
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{self.config.algo.method}",
                   disable=not (cfg.progress and is_main_process()), dynamic_ncols=True)
        try:
            while self.step < cfg.steps:
                examples = self.dp.shard(self.stream.next_batch())
                metrics = self.red_step(examples, self.loss_config(self.step))
                self.step += 1
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
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
        if checkpoint.latest_checkpoint(self.run_dir) is None or self.step % cfg.save_every:
            self.save()
        final = self.evaluate()
        self.log.log(self.step, {"final": True, **final})
        self.log.close()
        return final

    def save(self) -> Path:
        return checkpoint.save_checkpoint(self.run_dir, self.step, self.policy, {
            "stream": self.stream.state_dict(), "controller": self.controller.state_dict(),
            "relift_buffer": self.relift_buffer})

    def evaluate(self) -> dict:
        cfg = self.config.trainer
        if not self.task.test:
            return {}
        try:
            return evaluate_heldout(self.policy.rollout_engine, self.tokenizer, self.task.test[: cfg.eval_problems],
                                    self.task.reward_fn, n=cfg.eval_samples, temperature=cfg.eval_temperature,
                                    max_new_tokens=self.config.rollout.max_new_tokens, seed=cfg.seed,
                                    hard_min_difficulty=self.task.hard_min_difficulty)
        finally:
            self.policy.finish_inference()
