"""The RED objective: group advantages, the accuracy-aware policy shift, the entropy-ratio weight and the
mixed-policy loss. Pure torch on per-token tensors: no process groups, no I/O.

One RED step, as the trainer drives it (config = RedLossConfig.from_name(name)):
  1. rewards [num_prompts, G(+1)] -> group_advantages(rewards, config.std_normalize); the offline trace is a
     column of the group only when config.offline_in_group. group_accuracy (rbar) is the mean accuracy reward
     of the same group, offline trace included.
  2. w = EntropyRatioController(G).update(H_rl, H_sft) if config.entropy_regulation else 1.0, with H the mean
     token entropy (no grad, rollout-time policy) of the on-policy samples and of the offline traces.
  3. red_policy_loss(...) per micro-batch with the step's global num_sequences / num_tokens; sum the losses.

Methods of Table 2 that are schedules of the trainer rather than losses:
  SFT->GRPO  train with RedLossConfig.sft() on the traces, then start GRPO (RedLossConfig.grpo()) from that
             checkpoint: the trainer needs an init-from-checkpoint option and two runs.
  ReLIFT     GRPO over on-policy rollouts; prompts whose rollouts all fail go, with their traces, to a buffer;
             each time it holds 128, one separate optimiser step with the sft() loss on the buffer (its own lr,
             1e-6), then the buffer is emptied. Needs a buffer of failed prompts and a second loss/lr.
  BREAD      GRPO; for a prompt whose rollouts all fail, regenerate with the shortest prefix of the expert trace
             that gives at least one success and train on the continuations only (the prefix is context, masked
             out of response_mask). Needs prefix search in the rollout loop; the loss is grpo().
"""
from megatron_red.objectives.advantages import (
    POLICY_SHIFTS,
    accuracy_aware_pi_offline,
    group_advantages,
    offline_ratio,
)
from megatron_red.objectives.entropy_controller import EntropyRatioController
from megatron_red.objectives.loss import NORMALIZATIONS, PRESETS, RedLossConfig, red_policy_loss

__all__ = [
    "NORMALIZATIONS",
    "POLICY_SHIFTS",
    "PRESETS",
    "EntropyRatioController",
    "RedLossConfig",
    "accuracy_aware_pi_offline",
    "group_advantages",
    "offline_ratio",
    "red_policy_loss",
]
