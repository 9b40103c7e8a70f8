"""Assemble one step's GRPO groups into a padded `SequenceBatch`.

A group is one prompt's G on-policy completions plus, when the method uses it, the prompt's offline teacher trace
(placed first, flagged by `is_offline`, never found by position). Advantages are normalised over the members' shaped
rewards (the verifier's accuracy plus any overlong penalty), and rbar (`group_accuracy`) is the members' mean
accuracy (paper Eq. 8; the authors count the trace as a member): shaping moves advantages, never accuracies.
A group "has signal" (dynamic sampling keeps it) exactly when its advantages are not all zero.
The engine's behaviour log-probs of each response ride along, aligned with the targets, for the mismatch metric and
truncated importance sampling, and so do its entropies of pi at each response token, from which H_rl is taken, and,
for a mixture of experts, the experts it chose at each position of prompt and response (`routed_experts`), which
the trainer's forwards replay; a trace row has none (the engine never ran it: the trainer routes it itself).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_red.batch import NOT_RECORDED, SequenceBatch
from megatron_red.objectives import group_advantages


@dataclass
class Group:
    """One prompt's samples. `prompt_ids` may carry an expert prefix (BREAD), which is context, not trained."""

    prompt_ids: list[int]
    responses: list[list[int]] = field(default_factory=list)
    """On-policy completions (token ids)."""
    rewards: list[float] = field(default_factory=list)
    """The verifier's accuracy of each response (0 or 1 for the built-in task and math-verify)."""
    penalties: list[float] = field(default_factory=list)
    """Overlong penalty (<= 0) of each response (rewards/overlong.py); empty = none."""
    behaviour_logprobs: list[list[float]] | None = None
    """The engine's log-probs of each response's tokens under the distribution it sampled from (`Completion`)."""
    rollout_entropies: list[list[float]] | None = None
    """The engine's full-vocabulary entropy of pi at each response token (`Completion.entropies`)."""
    routed_experts: list[torch.Tensor | None] | None = None
    """A mixture of experts: the experts the engine chose at each position of prompt + response (but its last
    token) of each response, [positions, layers, k] (`Completion.routed_experts`; None: not recorded)."""
    finished: list[bool] = field(default_factory=list)
    """Per response: True when it ended on EOS, False when cut at the generation limit."""
    trace_ids: list[int] | None = None
    """The offline teacher trace, when it joins the step."""
    trace_reward: float = 0.0
    """The verifier's accuracy of the trace."""
    trace_penalty: float = 0.0
    """The trace's overlong penalty (<= 0): 0 unless `rewards.overlong_penalize_trace`, then by its length."""

    def accuracies(self, offline_in_group: bool) -> list[float]:
        """The members' accuracies (the trace's first when it is a member): rbar and the signal rule read these."""
        if self.trace_ids is not None and offline_in_group:
            return [self.trace_reward, *self.rewards]
        return list(self.rewards)

    def members(self, offline_in_group: bool) -> list[float]:
        """The shaped rewards the group's advantages are computed from: accuracy + overlong penalty, in the order
        of `accuracies`."""
        penalties = self.penalties or [0.0] * len(self.rewards)
        if self.trace_ids is not None and offline_in_group:
            penalties = [self.trace_penalty, *penalties]
        return [a + p for a, p in zip(self.accuracies(offline_in_group), penalties)]

    def has_signal(self, offline_in_group: bool) -> bool:
        """Whether the members' shaped rewards differ, i.e. whether the group's advantages are not all zero
        (`group_advantages` gives exact zeros to equal rewards). Without shaping this is the authors' and DAPO's rule
        (accuracy std > 0); with it, two correct rollouts cut at the limit (1 - 1 = 0) among wrong ones are no
        signal, and wrong rollouts of different lengths are (the penalty is a gradient)."""
        members = self.members(offline_in_group)
        return bool(members) and min(members) != max(members)


def build_batch(groups: list[Group], *, offline_in_group: bool, std_normalize: bool,
                pad_token_id: int, rbar_counts_trace: bool = True, filter_truncated: bool = False,
                positions: list[int] | None = None) -> SequenceBatch:
    """Rows: for each group, the offline trace (if `trace_ids` is set) then the on-policy responses.

    Advantages come from the members' shaped rewards (`Group.members`). rbar is the mean accuracy of the group
    members, the trace included as the authors count it; with `rbar_counts_trace=False` it is the on-policy
    samples' accuracy alone (an all-fail group then has rbar = 0, so Eq. 8 gives pi_offline = pi: full imitation).
    `filter_truncated` (DAPO's overlong filtering): responses cut at the generation limit get an empty loss mask.

    Fields: advantages [B], is_offline [B], group_accuracy [B], rewards [B], group [B] (the row's group's position
    in the step: `positions[i]` for `groups[i]`, default i; mini-batches keep a group's rows together and cut the
    step by these positions, trainer/update.py), and behaviour_logprobs / rollout_entropy [B, L-1] (zero outside the
    responses) when every group with responses has them, and routed_experts [B, L-1, layers, k] (position t of a row
    at index t; `NOT_RECORDED` for trace rows, padding and what the engine did not record) when any response has
    them. A trace outside the group (`offline_in_group=False`, e.g. SFT rows) gets advantage 0 and the on-policy
    rows' accuracy.
    """
    # (token ids, prompt length, behaviour log-probs, rollout entropies, trained: False for a filtered row)
    rows: list[tuple[list[int], int, list[float] | None, list[float] | None, bool]] = []
    routed: dict[int, torch.Tensor] = {}  # row -> the engine's recorded experts
    advantages, is_offline, accuracy, rewards, group_of = [], [], [], [], []
    positions = list(range(len(groups))) if positions is None else positions
    if len(positions) != len(groups):
        raise ValueError(f"{len(positions)} positions for {len(groups)} groups")
    for index, g in zip(positions, groups):
        members = g.members(offline_in_group)
        if members:
            adv = group_advantages(torch.tensor([members], dtype=torch.float64), std_normalize=std_normalize)[0]
            accuracy_of = g.accuracies(offline_in_group) if rbar_counts_trace or not g.rewards else g.rewards
            rbar = sum(accuracy_of) / len(accuracy_of)
        else:
            adv, rbar = torch.zeros(0, dtype=torch.float64), 0.0
        adv = adv.tolist()
        if g.trace_ids is not None:
            rows.append((g.prompt_ids + g.trace_ids, len(g.prompt_ids), None, None, True))
            advantages.append(adv.pop(0) if offline_in_group else 0.0)
            is_offline.append(True)
            accuracy.append(rbar)
            rewards.append(g.trace_reward)
            group_of.append(index)
        behaviour = g.behaviour_logprobs or [None] * len(g.responses)
        entropies = g.rollout_entropies or [None] * len(g.responses)
        finished = g.finished or [True] * len(g.responses)
        experts = g.routed_experts or [None] * len(g.responses)
        for response, reward, a, lp, h, done, routing in zip(g.responses, g.rewards, adv, behaviour, entropies,
                                                            finished, experts):
            if routing is not None:
                if routing.shape[0] != len(g.prompt_ids) + len(response) - 1:
                    raise ValueError(f"routed experts of {routing.shape[0]} positions for a prompt of "
                                     f"{len(g.prompt_ids)} and a response of {len(response)} tokens")
                routed[len(rows)] = routing
            for name, values in (("behaviour log-probs", lp), ("rollout entropies", h)):
                if values is not None and len(values) != len(response):
                    raise ValueError(f"{len(values)} {name} for a response of {len(response)} tokens")
            rows.append((g.prompt_ids + response, len(g.prompt_ids), lp, h, done or not filter_truncated))
            advantages.append(a)
            is_offline.append(False)
            accuracy.append(rbar)
            rewards.append(reward)
            group_of.append(index)
    if not rows:
        raise ValueError("a step needs at least one sequence")
    length = max(len(ids) for ids, *_ in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), length - 1), dtype=torch.float32)
    behaviour_logprobs = torch.zeros((len(rows), length - 1), dtype=torch.float32)
    rollout_entropy = torch.zeros((len(rows), length - 1), dtype=torch.float32)
    for i, (ids, prompt_len, lp, h, trained) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        if trained:  # a filtered row stays in the batch (and counted in its group's advantages), without loss
            # target t+1 is a response/trace token when t+1 >= prompt_len
            loss_mask[i, prompt_len - 1: len(ids) - 1] = 1.0
        if lp:
            behaviour_logprobs[i, prompt_len - 1: len(ids) - 1] = torch.tensor(lp, dtype=torch.float32)
        if h:
            rollout_entropy[i, prompt_len - 1: len(ids) - 1] = torch.tensor(h, dtype=torch.float32)
    fields = {
        "advantages": torch.tensor(advantages, dtype=torch.float32),
        "is_offline": torch.tensor(is_offline, dtype=torch.bool),
        "group_accuracy": torch.tensor(accuracy, dtype=torch.float32),
        "rewards": torch.tensor(rewards, dtype=torch.float32),
        "group": torch.tensor(group_of, dtype=torch.long),
    }
    if routed:
        example = next(iter(routed.values()))
        experts = torch.full((len(rows), length - 1, *example.shape[1:]), NOT_RECORDED, dtype=torch.int16)
        for i, routing in routed.items():
            experts[i, :routing.shape[0]] = routing
        fields["routed_experts"] = experts
    sampled = [g for g in groups if g.responses]
    if sampled and all(g.behaviour_logprobs is not None for g in sampled):
        fields["behaviour_logprobs"] = behaviour_logprobs
    if sampled and all(g.rollout_entropies is not None for g in sampled):
        fields["rollout_entropy"] = rollout_entropy
    return SequenceBatch(input_ids, attention_mask, loss_mask, fields)
