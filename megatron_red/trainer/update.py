"""The policy update of a step: `red_policy_loss` over micro-batches with global counts, then optimiser steps.

`policy_update` is one optimiser step on a batch; the warm-up, ReLIFT's SFT step and the overhead benchmark call it
directly. A sampling step's rollout batch goes through `prepare_update` (phase "log-probs") and `rollout_update`.

H_rl (Eq. 9-11) is the entropy of pi at the sampling temperature over the on-policy tokens, as the engine computed
it while sampling (`Completion.entropies`, the batch's `rollout_entropy`): the policy that sampled is the one whose
entropy w needs, and the engine has its logits at every token anyway.

- One optimiser step per rollout batch (K = E = 1, `trainer.mini_batches_per_step` / `epochs_per_step`): pi_old is
  the update's own forward, detached, since the policy being updated is the one that sampled (a separate
  forward-only pass would compute the same numbers again: it was 12-16% of a step on the built-in task); that
  forward also gives H_sft and the sampler-vs-trainer mismatch. With entropy regulation the offline rows are
  trained first with w factored out of their term (it is linear in w), H_sft comes from their forward, and once
  w is known the accumulated gradient is multiplied by it before the on-policy rows add theirs: no pass is spent
  on measuring entropies (the forward-only pass over the traces this replaced cost RED 5% over GRPO).
- K x E > 1 optimiser steps: the policy moves between them, so pi_old, H_sft, w and the mismatch come from one
  forward-only pass over the whole rollout batch before the first update, and w is held for all of them (one
  controller step per rollout batch); each mini-batch (whole groups, a block of the step's group positions over
  all replicas, so that DP does not change which groups share a step) is then one optimiser step whose loss is
  normalised with that mini-batch's counts, and the PPO clip acts.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from megatron_red.batch import SequenceBatch
from megatron_red.distributed import DataParallel
from megatron_red.objectives import RedLossConfig, behaviour_mismatch, red_policy_loss

# Local means of `red_policy_loss`, each with the token count that weighs it when micro-batches are combined.
_WEIGHTED_MEANS = {"clip_fraction": "num_on_policy_tokens", "on_policy_ratio_mean": "num_on_policy_tokens",
                   "r_off_mean": "num_offline_tokens", "tis_weight_mean": "num_on_policy_tokens",
                   "tis_capped_fraction": "num_on_policy_tokens"}
# What a micro-batch measures besides its loss: sums (and a max) that combine exactly over micro-batches and ranks.
_ENTROPY_SUMS = ("entropy_sft_sum", "entropy_sft_rows")
_MISMATCH = ("mismatch_abs_sum", "mismatch_abs_max", "mismatch_outside", "mismatch_tokens")
# A mixture of experts' routing counts of a training pass (the policies report them with a micro-batch's metrics).
_ROUTING = ("moe_routing_mismatched", "moe_routings_recorded", "moe_aux_loss_sum", "moe_aux_loss_terms")


def aggregate_micro_metrics(per_micro: list[dict]) -> dict:
    """Combine per-micro-batch loss metrics: loss parts (already globally normalised) and counts add up, local
    means are weighted by their token counts, anything else is averaged."""
    out = {}
    for key in per_micro[0]:
        values = [(m[key], m.get(_WEIGHTED_MEANS.get(key, ""), 1.0)) for m in per_micro
                  if m.get(key) is not None and math.isfinite(m[key])]
        if key.startswith(("loss", "num_")):
            out[key] = sum(v for v, _ in values)
        elif key in _WEIGHTED_MEANS:
            total = sum(w for _, w in values)
            out[key] = sum(v * w for v, w in values) / total if total else float("nan")
        elif values:
            out[key] = sum(v for v, _ in values) / len(values)
    return out


def _measured(entropy: torch.Tensor, logprobs: torch.Tensor, mb) -> dict:
    """A micro-batch's H_sft sums (per-row token means summed over its offline rows, and their count: H is the mean
    over rows of each row's token mean) and, with behaviour log-probs, the mismatch of its on-policy tokens
    (`behaviour_mismatch`, pi_old = the update's forward)."""
    mask = mb.loss_mask.to(torch.float64)
    counts = mask.sum(dim=1)
    offline = mb.fields["is_offline"].bool()
    rows = (counts > 0) & offline
    row_means = (entropy.detach().double() * mask).sum(dim=1)[rows] / counts[rows]
    return {**dict(zip(_ENTROPY_SUMS, (float(row_means.sum()), float(rows.sum())))), **_mismatch_sums(logprobs, mb)}


def _mismatch_sums(old_logprobs: torch.Tensor, batch: SequenceBatch) -> dict:
    """`behaviour_mismatch`'s sums over the on-policy tokens of `batch` (pi_old against the engine's behaviour
    log-probs), by `_MISMATCH` name; empty when the batch has no behaviour log-probs."""
    if "behaviour_logprobs" not in batch.fields:
        return {}
    on_tokens = batch.loss_mask.bool() & ~batch.fields["is_offline"].bool().unsqueeze(-1)
    return dict(zip(_MISMATCH, behaviour_mismatch(old_logprobs.detach(), batch.fields["behaviour_logprobs"],
                                                  on_tokens).tolist()))


def _entropy_sft(per_micro: list[dict]) -> float:
    rows = sum(m["entropy_sft_rows"] for m in per_micro)
    return sum(m["entropy_sft_sum"] for m in per_micro) / rows if rows else float("nan")


def _mismatch_metrics(per_micro: list[dict]) -> dict:
    """Sampler vs trainer on the step's on-policy tokens (all replicas), delta = log pi_old - log pi_behaviour:
    mean and max |delta|, and the fraction of tokens whose probability ratio leaves [1/2, 2]."""
    stats = [m for m in per_micro if "mismatch_tokens" in m]
    tokens = sum(m["mismatch_tokens"] for m in stats)
    if not tokens:
        return {}
    return {"mismatch/logprob_abs_mean": sum(m["mismatch_abs_sum"] for m in stats) / tokens,
            "mismatch/logprob_abs_max": max(m["mismatch_abs_max"] for m in stats),
            "mismatch/ratio_outside_half_2": sum(m["mismatch_outside"] for m in stats) / tokens}


def _routing_metrics(per_micro: list[dict]) -> dict:
    """A mixture of experts' routing in the update's forwards (all replicas and stages): moe/routing_mismatch, the
    share of the (token, MoE layer) routings the engine recorded whose top-k the trainer computes differently (what
    routing replay overrides), and moe/aux_loss, the load-balancing loss E * sum_i f_i P_i of the trainer's own
    routing, mean over layers and micro-batches (1 = balanced)."""
    stats = [m for m in per_micro if "moe_aux_loss_terms" in m]
    out = {}
    terms = sum(m["moe_aux_loss_terms"] for m in stats)
    if terms:
        out["moe/aux_loss"] = sum(m["moe_aux_loss_sum"] for m in stats) / terms
    recorded = sum(m["moe_routings_recorded"] for m in stats)
    if recorded:
        out["moe/routing_mismatch"] = sum(m["moe_routing_mismatched"] for m in stats) / recorded
    return out


def policy_update(policy, batch, loss_cfg: RedLossConfig, w: float | Callable[[float], float],
                  micro_batch_size: int, dp: DataParallel | None = None, lr_scale: float = 1.0,
                  temperature: float = 1.0, advance_schedule: bool = True) -> dict:
    """Backpropagate `red_policy_loss` (Eq. 10, offline term weighted by `w`) over `batch` and step the optimiser.
    `batch.fields` must hold advantages, is_offline and group_accuracy (and behaviour_logprobs with
    `loss_cfg.tis_cap`). pi_old is `batch.fields["old_logprobs"]` when the batch has it (`prepare_update`'s pass),
    else the update's own forward, detached, which then also measures H_sft and the mismatch. Counts are summed
    over the data-parallel replicas, so the gradients summed over them are the full-batch ones. pi is computed at
    `temperature` (the one the rows were sampled at); `advance_schedule=False` takes a step at the current learning
    rate without moving the schedule (ReLIFT's extra SFT steps).

    w: a number, or a function of H_sft (Eq. 9-11: the controller, given H_rl) for entropy regulation. Then the
    offline rows, the only ones w weighs, are trained first with w = 1 (the loss is linear in w: RedLossConfig
    refuses an NLL term beside entropy regulation), H_sft is taken from their forward (all replicas), the
    accumulated gradient is multiplied by w (`scale_gradients`), and the on-policy rows add theirs (two
    `get_loss_and_metrics` calls; gradients accumulate until the optimiser step).

    Returns the loss metrics, train/grad_norm and train/lr; when pi_old is the update's forward, also
    entropy/H_sft, entropy/w and mismatch/* (when the batch holds the engine's behaviour log-probs); for a mixture
    of experts moe/aux_loss and, when the batch holds the engine's recorded experts, moe/routing_mismatch."""
    dp = dp or DataParallel()
    num_sequences = int(dp.all_sum((batch.loss_mask.sum(dim=1) > 0).sum()))
    num_tokens = dp.all_sum(batch.loss_mask.sum())
    sft_weight = 1.0 if callable(w) else w  # w factored out of the offline rows' term until it is known
    rollout_time = "old_logprobs" not in batch.fields  # the forward is the policy that sampled

    def loss_fn(logprobs, entropy, mb):
        old = logprobs.detach() if rollout_time else mb.fields["old_logprobs"]
        loss, metrics = red_policy_loss(
            logprobs, old, mb.fields["advantages"], mb.loss_mask, mb.fields["is_offline"],
            mb.fields["group_accuracy"], sft_weight, loss_cfg, entropy=entropy, num_sequences=num_sequences,
            num_tokens=num_tokens, behaviour_logprobs=mb.fields.get("behaviour_logprobs"))
        return loss, {**metrics, **(_measured(entropy, logprobs, mb) if rollout_time else {})}

    def train(rows) -> list[dict]:
        part = batch if rows is None else batch.select(rows)
        if len(part) == 0:  # this replica holds no row of the (mini-)batch; it still joins the collectives
            return []
        return policy.get_loss_and_metrics(part, micro_batch_size, loss_fn, temperature=temperature)

    if callable(w):
        offline = batch.fields["is_offline"].bool()
        per_micro = dp.gather(train(torch.nonzero(offline).squeeze(-1)))  # every replica's micro-batches
        sft_weight = w(_entropy_sft(per_micro))
        policy.scale_gradients(sft_weight)
        for m in per_micro:  # what the offline rows' losses are, now that w is known (the rows hold no other term)
            m["loss"], m["loss_offline"] = m["loss"] * sft_weight, m["loss_offline"] * sft_weight
        per_micro += dp.gather(train(torch.nonzero(~offline).squeeze(-1)))
    else:
        per_micro = dp.gather(train(None))
    lr = policy.learning_rate * lr_scale  # the rate this step uses (the schedule moves on inside optimizer_step)
    grad_norm = policy.optimizer_step(lr_scale, advance_schedule=advance_schedule)
    out = {"train/grad_norm": grad_norm, "train/lr": lr, **_routing_metrics(per_micro)}
    if rollout_time:
        out.update({"entropy/H_sft": _entropy_sft(per_micro), "entropy/w": sft_weight,
                    **_mismatch_metrics(per_micro)})
    measured = {*_ENTROPY_SUMS, *_MISMATCH, *_ROUTING, "sft_weight"}  # w: entropy/w
    losses = aggregate_micro_metrics([{k: v for k, v in m.items() if k not in measured} for m in per_micro])
    out.update({f"loss/{k}": v for k, v in losses.items()
                if k != "r_off_mean" or loss_cfg.offline_in_group})  # r_off of a term outside the objective: none
    return out


def rollout_entropy(batch: SequenceBatch, dp: DataParallel) -> float:
    """H_rl: the mean over the on-policy rows of every replica of each row's mean entropy at its trained tokens, as
    the engine saw them (the batch's `rollout_entropy`); NaN for a batch without rollouts."""
    if "rollout_entropy" not in batch.fields:
        return float("nan")
    return dp.row_mean(batch.fields["rollout_entropy"], batch.loss_mask, ~batch.fields["is_offline"].bool())


def prepare_update(policy, batch: SequenceBatch, loss_cfg: RedLossConfig, controller, micro_batch_size: int,
                   dp: DataParallel, temperature: float, optimizer_steps: int
                   ) -> tuple[SequenceBatch, float | Callable[[float], float], dict]:
    """Before the update of a rollout batch (phase "log-probs"): the batch to train, its w and what was measured
    (entropy/H_rl; with several optimiser steps also entropy/H_sft, entropy/w and mismatch/*).

    One optimiser step: no forward here; w is 1, or with entropy regulation the controller's step as a function
    of H_sft, which the update's forward of the offline rows measures (`policy_update`). Several: one forward-only
    pass over the whole batch at `temperature` gives pi_old (the batch's `old_logprobs` field) and H_sft (all
    replicas), hence w (one controller step per rollout batch, Eq. 9-11), and the mismatch of pi_old against the
    engine."""
    h_rl = rollout_entropy(batch, dp)
    if optimizer_steps == 1:
        w = (lambda h_sft: controller.update(h_rl, h_sft)) if loss_cfg.entropy_regulation else 1.0
        return batch, w, {"entropy/H_rl": h_rl}
    old, entropy = policy.get_inference_log_probs(batch, micro_batch_size, temperature)
    offline, mask = batch.fields["is_offline"].bool(), batch.loss_mask
    h_sft = dp.row_mean(entropy, mask, offline)
    w = controller.update(h_rl, h_sft) if loss_cfg.entropy_regulation else 1.0
    metrics = {"entropy/H_rl": h_rl, "entropy/H_sft": h_sft, "entropy/w": w}
    metrics.update(_mismatch_metrics(dp.gather([_mismatch_sums(old, batch)])))
    return SequenceBatch(batch.input_ids, batch.attention_mask, mask, {**batch.fields, "old_logprobs": old}), w, metrics


def mini_batches(batch: SequenceBatch, k: int, num_groups: int) -> list[SequenceBatch]:
    """This replica's part of each of the `k` mini-batches of a step of `num_groups` groups (all replicas): the
    step's positions 0 .. num_groups - 1 (the `group` field) cut into `k` contiguous blocks whose numbers of groups
    differ by at most one, and of each block the rows of this replica's groups (whole groups; none when it holds no
    group of the block). The blocks depend on the step alone, so every data-parallel size trains the same groups
    together as one replica does."""
    if num_groups < k:
        raise ValueError(f"{num_groups} groups cannot make {k} mini-batches (trainer.mini_batches_per_step)")
    group = batch.fields["group"]
    if len(batch) and not 0 <= int(group.min()) <= int(group.max()) < num_groups:
        raise ValueError(f"group positions {group.unique().tolist()} outside the step's {num_groups} groups")
    base, extra = divmod(num_groups, k)
    bounds = [i * base + min(i, extra) for i in range(k + 1)]
    return [batch.select(((group >= lo) & (group < hi)).nonzero().squeeze(-1)) for lo, hi in zip(bounds, bounds[1:])]


def rollout_update(policy, batch: SequenceBatch, loss_cfg: RedLossConfig, w: float | Callable[[float], float],
                   micro_batch_size: int, dp: DataParallel, lr_scale: float = 1.0, temperature: float = 1.0,
                   mini_batches_per_step: int = 1, epochs: int = 1, num_groups: int | None = None) -> dict:
    """The update of a rollout batch prepared by `prepare_update`: `epochs` passes over its `mini_batches_per_step`
    mini-batches (`mini_batches`: blocks of the step's `num_groups` group positions, all replicas; default: this
    replica's groups are the step), one `policy_update` (optimiser step) each. Returns `policy_update`'s metrics,
    combined over the optimiser steps: loss parts, train/grad_norm and train/lr are means over them, token counts
    those of the rollout batch, clip fraction and ratio means token-weighted."""
    if mini_batches_per_step * epochs == 1:
        return policy_update(policy, batch, loss_cfg, w, micro_batch_size, dp, lr_scale, temperature)
    if num_groups is None:
        num_groups = int(batch.fields["group"].max()) + 1
    parts = mini_batches(batch, mini_batches_per_step, num_groups)
    steps = [policy_update(policy, part, loss_cfg, w, micro_batch_size, dp, lr_scale, temperature)
             for _ in range(epochs) for part in parts]
    return _combine_optimizer_steps(steps, epochs)


def _combine_optimizer_steps(steps: list[dict], epochs: int) -> dict:
    out = {}
    for key in steps[0]:
        values = [m[key] for m in steps if m.get(key) is not None and math.isfinite(m[key])]
        weight_key = "loss/" + _WEIGHTED_MEANS.get(key.removeprefix("loss/"), "")
        if key.startswith("loss/num_"):
            out[key] = sum(values) / epochs
        elif weight_key != "loss/":
            pairs = [(m[key], m[weight_key]) for m in steps if math.isfinite(m[key])]
            total = sum(w for _, w in pairs)
            out[key] = sum(v * w for v, w in pairs) / total if total else float("nan")
        else:
            out[key] = sum(values) / len(values) if values else float("nan")
    return out
