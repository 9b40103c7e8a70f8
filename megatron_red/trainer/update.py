"""One policy update with `red_policy_loss`: the loss over micro-batches with the step's global counts, then an
optimiser step. Shared by the RED step, the student's warm-up, ReLIFT's SFT step and the overhead benchmark.

pi_old is the update's own forward, detached. Every method takes one optimiser step per batch, so the policy being
updated is the one that sampled (and whose entropies w is built from): a separate forward-only pass over the batch
would compute the same numbers again (it was 12-16% of a step on the built-in task). What that pass used to give
is measured here instead: the entropies H_rl / H_sft at rollout time and the sampler-vs-trainer mismatch.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from megatron_red.distributed import DataParallel
from megatron_red.objectives import RedLossConfig, behaviour_mismatch, red_policy_loss

# Local means of `red_policy_loss`, each with the token count that weighs it when micro-batches are combined.
_WEIGHTED_MEANS = {"clip_fraction": "num_on_policy_tokens", "on_policy_ratio_mean": "num_on_policy_tokens",
                   "r_off_mean": "num_offline_tokens", "tis_weight_mean": "num_on_policy_tokens",
                   "tis_capped_fraction": "num_on_policy_tokens"}
# What a micro-batch measures besides its loss: sums (and a max) that combine exactly over micro-batches and ranks.
_ENTROPY_SUMS = ("entropy_rl_sum", "entropy_rl_rows", "entropy_sft_sum", "entropy_sft_rows")
_MISMATCH = ("mismatch_abs_sum", "mismatch_abs_max", "mismatch_outside", "mismatch_tokens")


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
    """A micro-batch's entropy sums (per-row token means, summed over its on-policy and its offline rows, and the
    row counts: H is the mean over rows of each row's token mean) and, with behaviour log-probs, the mismatch of
    its on-policy tokens (`behaviour_mismatch`, pi_old = the update's forward)."""
    mask = mb.loss_mask.to(torch.float64)
    counts = mask.sum(dim=1)
    row_means = (entropy.detach().double() * mask).sum(dim=1) / counts.clamp_min(1)
    offline = mb.fields["is_offline"].bool()
    on_rows, off_rows = (counts > 0) & ~offline, (counts > 0) & offline
    out = dict(zip(_ENTROPY_SUMS, (float(row_means[on_rows].sum()), float(on_rows.sum()),
                                   float(row_means[off_rows].sum()), float(off_rows.sum()))))
    if "behaviour_logprobs" in mb.fields:
        on_tokens = mb.loss_mask.bool() & ~offline.unsqueeze(-1)
        out.update(zip(_MISMATCH, behaviour_mismatch(logprobs.detach(), mb.fields["behaviour_logprobs"],
                                                     on_tokens).tolist()))
    return out


def _entropy(per_micro: list[dict], kind: str) -> float:
    rows = sum(m[f"entropy_{kind}_rows"] for m in per_micro)
    return sum(m[f"entropy_{kind}_sum"] for m in per_micro) / rows if rows else float("nan")


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


def entropy_weight(policy, batch, loss_cfg: RedLossConfig, controller, micro_batch_size: int,
                   dp: DataParallel | None = None, temperature: float = 1.0) -> float | Callable[[float], float]:
    """`policy_update`'s w: 1 without entropy regulation; with it, w as a function of H_rl (the controller's Eq.
    9-11 step), H_sft measured first by a forward-only pass over the batch's offline rows (all replicas)."""
    if not loss_cfg.entropy_regulation:
        return 1.0
    dp = dp or DataParallel()
    offline = batch.select(batch.fields["is_offline"].nonzero().squeeze(-1))
    entropy = (policy.get_inference_log_probs(offline, micro_batch_size, temperature)[1]
               if len(offline) else offline.loss_mask)  # a replica without traces has no H_sft to add
    h_sft = dp.row_mean(entropy, offline.loss_mask, torch.ones(len(offline), dtype=torch.bool))
    return lambda h_rl: controller.update(h_rl, h_sft)


def policy_update(policy, batch, loss_cfg: RedLossConfig, w: float | Callable[[float], float],
                  micro_batch_size: int, dp: DataParallel | None = None, lr_scale: float = 1.0,
                  temperature: float = 1.0, advance_schedule: bool = True) -> dict:
    """Backpropagate `red_policy_loss` (Eq. 10, offline term weighted by `w`) over `batch` and step the optimiser.
    `batch.fields` must hold advantages, is_offline and group_accuracy (and behaviour_logprobs with
    `loss_cfg.tis_cap`); pi_old is the update's own forward (module docstring). Counts are summed over the
    data-parallel replicas, so the gradients summed over them are the full-batch ones. pi is computed at
    `temperature` (the one the rows were sampled at); `advance_schedule=False` takes a step at the current learning
    rate without moving the schedule (ReLIFT's extra SFT steps).

    w: a number, or a function of H_rl (Eq. 9-11: the controller, given H_sft) for entropy regulation. Then the
    on-policy rows are trained first, H_rl is taken from their forward (all replicas), and the offline rows, the
    only ones w weighs, after it (two `get_loss_and_metrics` calls; gradients accumulate until the optimiser step).
    `entropy_weight` gives it.

    Returns the loss metrics, entropy/H_rl, entropy/H_sft and entropy/w, and mismatch/* when the batch holds the
    engine's behaviour log-probs."""
    dp = dp or DataParallel()
    num_sequences = int(dp.all_sum((batch.loss_mask.sum(dim=1) > 0).sum()))
    num_tokens = dp.all_sum(batch.loss_mask.sum())
    sft_weight = 0.0 if callable(w) else w  # 0 until w is known: the on-policy pass has no offline row

    def loss_fn(logprobs, entropy, mb):
        loss, metrics = red_policy_loss(
            logprobs, logprobs.detach(), mb.fields["advantages"], mb.loss_mask, mb.fields["is_offline"],
            mb.fields["group_accuracy"], sft_weight, loss_cfg, entropy=entropy, num_sequences=num_sequences,
            num_tokens=num_tokens, behaviour_logprobs=mb.fields.get("behaviour_logprobs"))
        return loss, {**metrics, **_measured(entropy, logprobs, mb)}

    def train(rows) -> list[dict]:
        if rows is not None and rows.numel() == 0:
            return []
        part = batch if rows is None else batch.select(rows)
        return policy.get_loss_and_metrics(part, micro_batch_size, loss_fn, temperature=temperature)

    if callable(w):
        offline = batch.fields["is_offline"].bool()
        per_micro = dp.gather(train(torch.nonzero(~offline).squeeze(-1)))  # every replica's micro-batches
        sft_weight = w(_entropy(per_micro, "rl"))  # loss_fn reads the new value
        per_micro += dp.gather(train(torch.nonzero(offline).squeeze(-1)))
    else:
        per_micro = dp.gather(train(None))
    lr = policy.learning_rate * lr_scale  # the rate this step uses (the schedule moves on inside optimizer_step)
    grad_norm = policy.optimizer_step(lr_scale, advance_schedule=advance_schedule)
    out = {"train/grad_norm": grad_norm, "train/lr": lr, "entropy/H_rl": _entropy(per_micro, "rl"),
           "entropy/H_sft": _entropy(per_micro, "sft"), "entropy/w": sft_weight, **_mismatch_metrics(per_micro)}
    measured = {*_ENTROPY_SUMS, *_MISMATCH, "sft_weight"}  # w: entropy/w
    losses = aggregate_micro_metrics([{k: v for k, v in m.items() if k not in measured} for m in per_micro])
    out.update({f"loss/{k}": v for k, v in losses.items()
                if k != "r_off_mean" or loss_cfg.offline_in_group})  # r_off of a term outside the objective: none
    return out
