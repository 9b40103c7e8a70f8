"""One policy update with `red_policy_loss`: the loss over micro-batches with the step's global counts, then an
optimiser step. Shared by the RED step, the student's warm-up, ReLIFT's SFT step and the overhead benchmark."""
from __future__ import annotations

import math

from megatron_red.objectives import RedLossConfig, red_policy_loss
from megatron_red.trainer.distributed import DataParallel

# Local means of `red_policy_loss`, each with the token count that weighs it when micro-batches are combined.
_WEIGHTED_MEANS = {"clip_fraction": "num_on_policy_tokens", "on_policy_ratio_mean": "num_on_policy_tokens",
                   "r_off_mean": "num_offline_tokens", "tis_weight_mean": "num_on_policy_tokens",
                   "tis_capped_fraction": "num_on_policy_tokens"}


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


def policy_update(policy, batch, loss_cfg: RedLossConfig, w: float, micro_batch_size: int,
                  dp: DataParallel | None = None, lr_scale: float = 1.0, temperature: float = 1.0,
                  advance_schedule: bool = True) -> dict:
    """Backpropagate `red_policy_loss` (Eq. 10, offline term weighted by `w`) over `batch` and step the optimiser.
    `batch.fields` must hold old_logprobs, advantages, is_offline and group_accuracy (and behaviour_logprobs with
    `loss_cfg.tis_cap`). Counts are summed over the data-parallel replicas, so the gradients summed over them are
    the full-batch ones. pi is computed at `temperature` (the one pi_old was computed at); `advance_schedule=False`
    takes a step at the current learning rate without moving the schedule (ReLIFT's extra SFT steps)."""
    dp = dp or DataParallel()
    num_sequences = int(dp.all_sum((batch.loss_mask.sum(dim=1) > 0).sum()))
    num_tokens = dp.all_sum(batch.loss_mask.sum())

    def loss_fn(logprobs, entropy, mb):
        return red_policy_loss(
            logprobs, mb.fields["old_logprobs"], mb.fields["advantages"], mb.loss_mask, mb.fields["is_offline"],
            mb.fields["group_accuracy"], w, loss_cfg, entropy=entropy, num_sequences=num_sequences,
            num_tokens=num_tokens, behaviour_logprobs=mb.fields.get("behaviour_logprobs"))

    per_micro = policy.get_loss_and_metrics(batch, False, micro_batch_size, loss_fn, temperature=temperature)
    per_micro = dp.gather(per_micro)  # every replica's micro-batches, for the step's metrics
    lr = policy.learning_rate * lr_scale  # the rate this step uses (the schedule moves on inside optimizer_step)
    grad_norm = policy.optimizer_step(lr_scale, advance_schedule=advance_schedule)
    out = {"train/grad_norm": grad_norm, "train/lr": lr}
    out.update({f"loss/{k}": v for k, v in aggregate_micro_metrics(per_micro).items()
                if k != "r_off_mean" or loss_cfg.offline_in_group})  # r_off of a term outside the objective: none
    return out
