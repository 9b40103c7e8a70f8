"""The RED objective: group advantages, the accuracy-aware policy shift, the entropy-ratio weight and the
mixed-policy loss. Pure torch on per-token tensors: no process groups, no I/O.

One RED step, as the trainer drives it (config = RedLossConfig.from_name(name)):
  1. rewards [num_prompts, G(+1)] -> group_advantages(rewards, config.std_normalize); the offline trace is a
     column of the group only when config.offline_in_group. group_accuracy (rbar) is the mean accuracy reward
     of the same group, offline trace included.
  2. w = EntropyRatioController(G).update(H_rl, H_sft) if config.entropy_regulation else 1.0, with H the mean
     token entropy (no grad, rollout-time policy) of the on-policy samples and of the offline traces.
  3. red_policy_loss(...) per micro-batch with the step's global num_sequences / num_tokens; sum the losses.
     With config.tis_cap it also takes the engine's behaviour log-probs (truncated importance sampling,
     `tis_weights`); `behaviour_mismatch` measures how far they are from pi_old.

Methods of Table 2 that are schedules of the trainer (megatron_red/trainer/red_trainer.py) rather than losses,
as it runs them:
  SFT->GRPO  the paper's SFT+GRPO in one run: `algo.sft_then_grpo_sft_steps` (default `trainer.steps`) steps of sft()
             at `algo.sft_lr_multiplier` x a schedule spanning them (the `sft` baseline), then `trainer.steps` steps
             of grpo() as a new run from those weights: fresh optimiser state, its own schedule.
  ReLIFT     (one optimiser and schedule, like every other method) grpo() over on-policy rollouts; prompts whose rollouts all fail go, with their traces, to a buffer
             shared by the data-parallel replicas; once it holds `algo.relift_buffer_size` (default 16), one extra
             optimiser step with sft() at `algo.sft_lr_multiplier` x the current scheduled lr (it does not advance
             the schedule, which counts RL steps), then the buffer is emptied.
  BREAD      grpo(); prompts whose rollouts all fail are re-rolled from prefixes of the expert trace
             (`algo.bread_prefix_fractions`, shortest first; one engine call per prefix length for all prompts
             still failing); a prompt takes the first prefix that gives a success and trains on the continuations
             only (the prefix is context, outside response_mask).
"""
from megatron_red.objectives.advantages import (
    POLICY_SHIFTS,
    accuracy_aware_pi_offline,
    group_advantages,
    offline_ratio,
)
from megatron_red.objectives.entropy_controller import EntropyRatioController
from megatron_red.objectives.loss import (
    METHODS,
    NORMALIZATIONS,
    PRESETS,
    SCHEDULES,
    RedLossConfig,
    behaviour_mismatch,
    red_policy_loss,
    tis_weights,
)

__all__ = [
    "METHODS",
    "NORMALIZATIONS",
    "POLICY_SHIFTS",
    "PRESETS",
    "SCHEDULES",
    "EntropyRatioController",
    "RedLossConfig",
    "accuracy_aware_pi_offline",
    "behaviour_mismatch",
    "group_advantages",
    "offline_ratio",
    "red_policy_loss",
    "tis_weights",
]
