"""Group-relative advantages and the offline policy shift (what r_off = pi / pi_offline is made of).

A GRPO group is every sample of one prompt: the G on-policy rollouts and, when the offline trace is a member of
the group (RED, MixPolicy, LUFFY, SRFT), the prompt's teacher trace. `group_advantages` normalises the rewards of
each group; `offline_ratio` turns the current log-probs of offline tokens into r_off for the chosen policy shift.
"""
from __future__ import annotations

import torch

POLICY_SHIFTS = ("accuracy_aware", "one", "on_policy", "luffy")


def group_advantages(rewards: torch.Tensor, std_normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Advantages of every sample from its group's rewards.

    rewards: [num_groups, group_size], one row per prompt (its on-policy samples and offline trace(s) together).
    Returns (r - mean) / (std + eps) per row with the unbiased torch.std, or r - mean if `std_normalize` is False.
    A group whose rewards are all equal (including a group of one sample) carries no signal and gets exact zeros.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {tuple(rewards.shape)}")
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    # Exact zeros rather than rounding noise (mean of equal floats need not equal them) and no 0/0 or std of one.
    uniform = (rewards == rewards[:, :1]).all(dim=-1, keepdim=True)
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if std_normalize and rewards.shape[1] > 1:
        centred = centred / (rewards.std(dim=-1, keepdim=True) + eps)
    return torch.where(uniform, torch.zeros_like(centred), centred)


def accuracy_aware_pi_offline(token_prob: torch.Tensor, group_accuracy: torch.Tensor) -> torch.Tensor:
    """pi_offline = pi + (1 - pi) * rbar (Eq. 8).

    token_prob: [B, T] current probability pi of each offline token; group_accuracy: [B] mean accuracy reward
    rbar of the row's group (in [0, 1]). High accuracy pushes pi_offline towards 1 (r_off -> pi: learn from the
    own policy); low accuracy towards pi (r_off -> 1: imitate the trace).
    """
    rbar = group_accuracy.to(token_prob.dtype).unsqueeze(-1)
    return token_prob + (1.0 - token_prob) * rbar


def offline_ratio(
    logprobs: torch.Tensor,
    group_accuracy: torch.Tensor,
    policy_shift: str,
    luffy_gamma: float = 0.1,
    detach_pi_offline: bool = True,
) -> torch.Tensor:
    """r_off = pi / pi_offline for offline tokens, [B, T] (Eq. 7), computed as exp(log pi - log pi_offline).

    policy_shift:
      "accuracy_aware"  pi_offline = pi + (1 - pi) * rbar (Eq. 8)
      "one"             pi_offline = 1, r_off = pi
      "on_policy"       pi_offline = sg(pi): r_off = 1 in value, gradient grad log pi (MixPolicy, Eq. 6); always
                        detached, since without the stop-gradient the term would be a constant
      "luffy"           pi_offline = pi + luffy_gamma, i.e. LUFFY's shaping f(pi) = pi / (pi + gamma)
    detach_pi_offline: stop the gradient through pi_offline ("accuracy_aware", "luffy"). True is the paper's
      Eq. 7 (the gradient is r_off * A * grad log pi); False differentiates the quotient, as the authors' code does.
    Every r_off is at most 1, so the exponential cannot overflow.
    """
    if policy_shift == "one":
        return logprobs.exp()
    if policy_shift == "on_policy":
        return (logprobs - logprobs.detach()).exp()
    pi = logprobs.exp()
    if policy_shift == "luffy":
        log_pi_offline = torch.log(pi + luffy_gamma)
    elif policy_shift == "accuracy_aware":
        has_accuracy = (group_accuracy > 0).unsqueeze(-1)
        # rbar = 0 makes pi_offline = pi exactly; using log pi there keeps an underflowed pi = 0 from giving 0/0,
        # and the placeholder rbar = 1 keeps the unused branch's gradient finite.
        placeholder = torch.where(group_accuracy > 0, group_accuracy, torch.ones_like(group_accuracy))
        log_pi_offline = torch.where(has_accuracy, accuracy_aware_pi_offline(pi, placeholder).log(), logprobs)
    else:
        raise ValueError(f"unknown policy_shift {policy_shift!r}; valid: {', '.join(POLICY_SHIFTS)}")
    if detach_pi_offline:
        log_pi_offline = log_pi_offline.detach()
    return (logprobs - log_pi_offline).exp()
