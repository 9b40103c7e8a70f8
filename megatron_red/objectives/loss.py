"""The RED mixed-policy loss (Eq. 10) and its configuration, with presets for every method of Table 2.

`red_policy_loss` is a pure function of per-token log-probs and per-row group quantities; it is minimised
(the negative of the objective J). Per token it maximises
  on-policy rows:  min(r * A, clip(r, 1 - eps, 1 + eps_high) * A), r = exp(log pi - log pi_old) (Eq. 1; eps_high =
                   eps unless DAPO's clip-higher sets it)
                   times sg(min(pi_old / pi_behaviour, tis_cap)) when truncated importance sampling is on
  offline rows:    w * r_off * A, no clipping,                    r_off = pi / pi_offline         (Eq. 7, 8, 10)
  offline rows:    sft_nll_coef * log pi                          (SFT / SRFT's NLL term)
and averages the token values with `config.normalization`, using counts that may be global to the whole step
so that summing the losses of micro-batches (and of data-parallel ranks) gives the loss of the full batch.

pi_old is the trainer's own forward pass before the update; pi_behaviour is what the rollout engine sampled with
(`Completion.logprobs`). The paper takes them to be equal. They are not, in practice (bf16 kernels, another
inference stack, top-p renormalisation), so `behaviour_mismatch` measures the gap and `tis_cap` corrects for it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_red.objectives.advantages import POLICY_SHIFTS, offline_ratio

NORMALIZATIONS = ("sequence_mean", "token_mean", "constant")


@dataclass
class RedLossConfig:
    """What the loss computes and what the trainer must feed it. Defaults are RED as in the paper."""

    name: str = "red"
    """Method name, for logs and `from_name`."""
    clip_eps: float = 0.2
    """PPO clip range eps of the on-policy ratio (Eq. 1): r is clipped to [1 - eps, 1 + eps_high]; offline tokens
    are never clipped. It acts only when pi_old differs from pi, i.e. with several optimiser steps per rollout
    batch (`trainer.mini_batches_per_step` / `trainer.epochs_per_step`)."""
    clip_eps_high: float | None = None
    """Upper clip range eps_high (DAPO's clip-higher: a larger upper bound lets low-probability tokens grow, which
    keeps entropy from collapsing; the RED authors' later GRPO code uses 0.28 with eps = 0.2). None = clip_eps
    (the symmetric clip of Eq. 1)."""
    policy_shift: str = "accuracy_aware"
    """pi_offline of r_off = pi / pi_offline: "accuracy_aware" (Eq. 8), "one", "on_policy" (Eq. 6) or "luffy"."""
    luffy_gamma: float = 0.1
    """gamma of LUFFY's shaping f(pi) = pi / (pi + gamma), used when policy_shift == "luffy"."""
    detach_pi_offline: bool | None = None
    """No gradient through pi_offline. None (default) takes the shift's own rule (`detaches_pi_offline`): detached
    for "accuracy_aware" (paper Eq. 7), differentiated for "luffy" (LUFFY's f(pi) = pi / (pi + gamma) has gradient
    gamma / (pi + gamma)^2 only through its denominator). False with "accuracy_aware" differentiates it, as the
    authors' released code does; True with "luffy" is refused (it would not be LUFFY's shaping)."""
    normalization: str = "sequence_mean"
    """"sequence_mean": mean over a sequence's tokens, then over sequences (paper, 1/|o_i|); "token_mean": over
    all tokens of the step; "constant": per sequence sum / max_response_length, then mean over sequences (the
    authors' code, with 3000, and LUFFY, with 8192): long and short samples weigh the same per token."""
    max_response_length: int = 8192
    """Divisor of the "constant" normalization."""
    offline_in_group: bool = True
    """The offline trace is a member of the GRPO group: it counts in the advantages and in rbar, and gets the
    offline policy term. False (GRPO, SFT): offline rows get no policy term."""
    online_rl: bool = True
    """On-policy rollouts exist and get the PPO term; False only for SFT."""
    entropy_regulation: bool = True
    """w comes from EntropyRatioController (Eq. 9-11); otherwise the trainer passes sft_weight = 1."""
    std_normalize: bool = True
    """Divide the group-centred rewards by their std (GRPO); LUFFY only centres them."""
    sft_nll_coef: float = 0.0
    """Coefficient of the NLL term on offline tokens (SFT: 1.0, SRFT: 0.5), normalised like the other terms, so
    with "token_mean" and only offline rows it is the plain token-mean NLL."""
    srft: bool = False
    """SRFT's entropy-aware weights (needs `entropy`): the NLL term is weighted per token by sg(exp(-H_t)) and
    on-policy tokens of rows with A > 0 by srft_positive_coef * sg(exp(H_t))."""
    srft_positive_coef: float = 0.1
    """SRFT's factor on the positive self-rollout term."""
    tis_cap: float | None = None
    """Truncated importance sampling (off when None): each on-policy token's surrogate is multiplied by
    sg(min(pi_old / pi_behaviour, tis_cap)) (see `tis_weights`); needs the engine's behaviour log-probs."""

    def __post_init__(self):
        if self.policy_shift not in POLICY_SHIFTS:
            raise ValueError(f"unknown policy_shift {self.policy_shift!r}; valid: {', '.join(POLICY_SHIFTS)}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {self.normalization!r}; valid: {', '.join(NORMALIZATIONS)}")
        if self.clip_eps < 0 or self.luffy_gamma <= 0 or self.max_response_length < 1 or self.sft_nll_coef < 0:
            raise ValueError(
                "need clip_eps >= 0, luffy_gamma > 0, max_response_length >= 1, sft_nll_coef >= 0; got "
                f"{self.clip_eps}, {self.luffy_gamma}, {self.max_response_length}, {self.sft_nll_coef}"
            )
        if self.policy_shift == "luffy" and self.detach_pi_offline:
            raise ValueError("policy_shift='luffy' with detach_pi_offline=True is not LUFFY's shaping "
                             "f(pi) = pi / (pi + gamma), whose gradient needs the undetached denominator; leave "
                             "detach_pi_offline unset (None)")
        if self.tis_cap is not None and not self.tis_cap > 0:
            raise ValueError(f"tis_cap must be > 0 (or None for off), got {self.tis_cap}")
        if self.entropy_regulation and self.sft_nll_coef > 0:
            # The trainer trains the offline rows with w factored out and scales their gradient by w afterwards
            # (trainer/update.py), which needs their loss to be linear in w: an NLL term (not weighted by w) is not.
            raise ValueError(f"entropy_regulation weighs the offline term by w and cannot be combined with an NLL "
                             f"term on the offline rows (sft_nll_coef={self.sft_nll_coef}); set one of them off")
        if self.clip_eps_high is not None and not self.clip_eps_high >= 0:
            raise ValueError(f"clip_eps_high must be >= 0 (or None for clip_eps), got {self.clip_eps_high}")

    @property
    def upper_clip_eps(self) -> float:
        """eps_high of the clip [1 - eps, 1 + eps_high]: `clip_eps_high`, or `clip_eps` when it is None."""
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high

    def detaches_pi_offline(self) -> bool:
        """Whether r_off has no gradient through pi_offline: `detach_pi_offline`, or the shift's rule when None."""
        if self.detach_pi_offline is None:
            return self.policy_shift != "luffy"
        return self.detach_pi_offline

    @classmethod
    def red(cls) -> "RedLossConfig":
        """RED: accuracy-aware policy shift + entropy regulation, offline trace in the group."""
        return cls()

    @classmethod
    def red_undetached(cls) -> "RedLossConfig":
        """RED with the released code's gradient: Eq. 8 with pi_offline differentiated (its commented-out line), so
        the offline gradient vanishes as rbar -> 0 instead of becoming plain imitation."""
        return cls(name="red_undetached", detach_pi_offline=False)

    @classmethod
    def red_entropy_only(cls) -> "RedLossConfig":
        """Ablation I: entropy regulation without Eq. 8. Without the accuracy-aware shift the paper's base is
        GRPO-MixPolicy, so pi_offline = sg(pi) (Eq. 6); the authors' code instead ran pi_offline = 1."""
        return cls(name="red_entropy_only", policy_shift="on_policy")

    @classmethod
    def red_policy_shift_only(cls) -> "RedLossConfig":
        """Ablation II: accuracy-aware policy shift with w = 1."""
        return cls(name="red_policy_shift_only", entropy_regulation=False)

    @classmethod
    def grpo(cls) -> "RedLossConfig":
        """GRPO: on-policy samples only."""
        return cls(name="grpo", offline_in_group=False, entropy_regulation=False)

    @classmethod
    def mixpolicy(cls) -> "RedLossConfig":
        """GRPO-MixPolicy: the trace in the group as if on-policy, r_off = pi / sg(pi) (Eq. 6)."""
        return cls(name="mixpolicy", policy_shift="on_policy", entropy_regulation=False)

    @classmethod
    def luffy(cls) -> "RedLossConfig":
        """LUFFY: shaping f(pi) = pi / (pi + 0.1) on the trace, nothing detached (the shift's rule), r - mean
        advantages, token sums over the max response length."""
        return cls(name="luffy", policy_shift="luffy", entropy_regulation=False,
                   std_normalize=False, normalization="constant", max_response_length=8192)

    @classmethod
    def sft(cls) -> "RedLossConfig":
        """SFT: token-mean NLL on the offline traces only."""
        return cls(name="sft", online_rl=False, offline_in_group=False, entropy_regulation=False,
                   sft_nll_coef=1.0, normalization="token_mean")

    @classmethod
    def from_name(cls, name: str) -> "RedLossConfig":
        """The preset called `name` (one of PRESETS)."""
        if name not in PRESETS:
            raise ValueError(f"unknown loss {name!r}; valid: {', '.join(PRESETS)}")
        return getattr(cls, name)()


def _srft_preset(cls) -> RedLossConfig:
    """SRFT: 0.5 * sg(exp(-H)) * NLL(demo) + off-policy RL on the demo in the group (pi_offline = 1, SRFT's
    behaviour policy for demonstrations) + on-policy RL with positive samples weighted by 0.1 * sg(exp(H)).
    H is the per-token entropy the trainer passes; a per-sequence variant is the row mean broadcast over T."""
    return cls(name="srft", policy_shift="one", entropy_regulation=False, sft_nll_coef=0.5, srft=True,
               normalization="token_mean")


# The preset shares its name with the `srft` field. Defined in the class body it would become the field's
# default; attached afterwards, instances read their own bool and the class reads the preset.
RedLossConfig.srft = classmethod(_srft_preset)

PRESETS = ("red", "red_undetached", "red_entropy_only", "red_policy_shift_only", "grpo", "mixpolicy", "luffy", "sft",
           "srft")
SCHEDULES = {"sft_then_grpo": ("sft", "grpo"), "relift": ("grpo",), "bread": ("grpo",)}
"""The schedules over the presets (package docstring; trainer/red_trainer.py runs them): the presets their RL steps
train with, in order (SFT->GRPO switches after its SFT stage, `algo.sft_then_grpo_sft_steps`)."""
METHODS = PRESETS + tuple(SCHEDULES)
"""What `algo.method` names: a preset, or a schedule."""


def _count(value, local: torch.Tensor, what: str) -> torch.Tensor:
    if value is None:
        return local.clamp_min(1)
    value = torch.as_tensor(value, dtype=local.dtype, device=local.device)
    if value.numel() != 1:
        raise ValueError(f"{what} must be a scalar count, got shape {tuple(value.shape)}")
    return value.clamp_min(1)


def _token_weights(mask: torch.Tensor, config: RedLossConfig, num_sequences, num_tokens) -> torch.Tensor:
    """[B, T] weight of each token in the objective; zero on padding."""
    lengths = mask.sum(dim=-1, dtype=torch.float64)
    if config.normalization == "token_mean":
        row = 1.0 / _count(num_tokens, lengths.sum(), "num_tokens").expand_as(lengths)
    else:
        n_seq = _count(num_sequences, (lengths > 0).sum().to(lengths.dtype), "num_sequences")
        per_seq = lengths.clamp_min(1) if config.normalization == "sequence_mean" else config.max_response_length
        row = 1.0 / (per_seq * n_seq)
    return row.unsqueeze(-1) * mask


# A token whose sampler/trainer probability ratio leaves [1/2, 2] counts as badly mismatched: |log ratio| > log 2.
MISMATCH_LOG_RATIO = math.log(2.0)


def behaviour_mismatch(old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """Sampler-vs-trainer mismatch over the tokens of `mask`, delta = log pi_old - log pi_behaviour.

    Returns float64 [sum |delta|, max |delta|, tokens with exp(delta) outside [1/2, 2], tokens] (max 0 without
    tokens): sums and a max, so micro-batches and data-parallel ranks combine exactly.
    """
    mask = mask.bool()
    delta = torch.where(mask, old_logprobs.double() - behaviour_logprobs.double(), 0.0).abs().detach()
    return torch.stack([delta.sum(), delta.max() if delta.numel() else delta.new_zeros(()),
                        (delta > MISMATCH_LOG_RATIO).sum().double(), mask.sum().double()])


def tis_weights(old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights sg(min(pi_old / pi_behaviour, cap)) per token.

    Truncated importance sampling (F. Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy
    RL Training"; verl's `tis_imp_ratio_cap`): the engine sampled from pi_behaviour, the PPO surrogate assumes
    pi_old, so each on-policy token's surrogate is reweighted by their ratio, truncated from above to bound the
    variance. Token level, an upper cap only and no gradient, as in verl. Not in the RED paper, which takes
    pi_behaviour = pi_old (Eq. 1); applied to on-policy tokens only, since the offline trace was not sampled by the
    engine (its off-policyness is what r_off = pi / pi_offline already models).
    """
    return (old_logprobs - behaviour_logprobs).detach().exp().clamp(max=cap)


def red_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    is_offline: torch.Tensor,
    group_accuracy: torch.Tensor,
    sft_weight: float,
    config: RedLossConfig,
    *,
    entropy: torch.Tensor | None = None,
    num_sequences: int | torch.Tensor | None = None,
    num_tokens: int | torch.Tensor | None = None,
    behaviour_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The RED loss (negative Eq. 10) of a (micro-)batch and its metrics.

    logprobs, old_logprobs, response_mask: [B, T] current / behaviour log-probs of the response or trace tokens
      and 1 on those tokens (old_logprobs is ignored on offline rows); advantages, is_offline (bool),
      group_accuracy (rbar): [B]. sft_weight: w of Eq. 10. entropy: [B, T] per-token entropy, needed for SRFT.
    num_sequences / num_tokens: rows with at least one token / masked tokens of the whole step (all micro-batches
      and data-parallel ranks); None uses this call's counts. Fully masked rows contribute nothing.
    Returns (loss, metrics). Metrics, python floats:
      loss, loss_on_policy, loss_offline, loss_nll: the loss and its three parts (they add up to loss); with
        global counts each is this call's share, to be *summed* over micro-batches and ranks.
      clip_fraction, on_policy_ratio_mean (over this call's on-policy tokens), r_off_mean (over its offline
        tokens): local means; num_on_policy_tokens, num_offline_tokens weigh them when averaging calls.
      sft_weight: w as passed.
      tis_weight_mean, tis_capped_fraction (with `config.tis_cap`): mean truncated weight and fraction of tokens
        at the cap, over this call's on-policy tokens.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    for name, t in (("old_logprobs", old_logprobs), ("response_mask", response_mask), ("entropy", entropy),
                    ("behaviour_logprobs", behaviour_logprobs)):
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logprobs {tuple(logprobs.shape)}")
    for name, t in (("advantages", advantages), ("is_offline", is_offline), ("group_accuracy", group_accuracy)):
        if t.shape != logprobs.shape[:1]:
            raise ValueError(f"{name} must be [B] = [{logprobs.shape[0]}], got shape {tuple(t.shape)}")
    if config.srft and entropy is None:
        raise ValueError("config.srft needs the per-token entropy (entropy=...)")
    if config.tis_cap is not None and behaviour_logprobs is None:
        raise ValueError("config.tis_cap needs the rollout engine's log-probs (behaviour_logprobs=...)")
    sft_weight = float(sft_weight)
    if not (sft_weight >= 0 and sft_weight < float("inf")):
        raise ValueError(f"sft_weight must be finite and >= 0, got {sft_weight}")

    mask = response_mask.bool()
    offline_rows = is_offline.bool().unsqueeze(-1)
    on_tokens, off_tokens = mask & ~offline_rows, mask & offline_rows
    zero = torch.zeros_like(logprobs)
    # Padding may hold anything (-inf, garbage); zeroing it first keeps every exp finite and its gradient exactly 0.
    lp = torch.where(mask, logprobs, zero)
    adv = advantages.to(lp.dtype).unsqueeze(-1)
    weight = _token_weights(mask, config, num_sequences, num_tokens).to(lp.dtype)
    ent = torch.where(mask, entropy, zero).detach() if entropy is not None else None

    # On-policy PPO-clipped surrogate (Eq. 1).
    ratio = torch.where(on_tokens, lp - old_logprobs, zero).exp()
    eps, eps_high = config.clip_eps, config.upper_clip_eps
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - eps, 1.0 + eps_high) * adv)
    if config.srft:  # SRFT: positive self-rollouts weighted by c * sg(exp(H))
        surrogate = surrogate * torch.where(adv > 0, config.srft_positive_coef * ent.exp(), 1.0)
    if config.tis_cap is not None:  # truncated importance sampling: sg(min(pi_old / pi_behaviour, C))
        tis = tis_weights(old_logprobs, behaviour_logprobs, config.tis_cap).to(lp.dtype)
        tis = torch.where(on_tokens, tis, zero)
        surrogate = surrogate * tis
    j_on = (surrogate * weight * on_tokens).sum() if config.online_rl else lp.new_zeros(())

    # Offline term: w * r_off * A, unclipped (Eq. 10).
    r_off = offline_ratio(lp, group_accuracy, config.policy_shift, config.luffy_gamma, config.detaches_pi_offline())
    j_off = sft_weight * (r_off * adv * weight * off_tokens).sum() if config.offline_in_group else lp.new_zeros(())

    # NLL on offline tokens (SFT; SRFT weights it by sg(exp(-H))).
    if config.sft_nll_coef > 0:
        nll_weight = config.sft_nll_coef * ((-ent).exp() if config.srft else 1.0)
        j_nll = (nll_weight * lp * weight * off_tokens).sum()
    else:
        j_nll = lp.new_zeros(())

    loss = -(j_on + j_off + j_nll)

    with torch.no_grad():
        n_on, n_off = on_tokens.sum(), off_tokens.sum()
        clipped = ((ratio > 1.0 + eps_high) & (adv > 0)) | ((ratio < 1.0 - eps) & (adv < 0))
        stats = torch.stack([t.to(torch.float64) for t in (
            loss, 0.0 - j_on, 0.0 - j_off, 0.0 - j_nll,  # 0.0 - x: no -0.0 in the logs
            (clipped & on_tokens).sum() / n_on.clamp_min(1),
            (ratio * on_tokens).sum() / n_on.clamp_min(1),
            (r_off * off_tokens).sum() / n_off.clamp_min(1),
            n_on, n_off,
        )]).tolist()
    keys = ("loss", "loss_on_policy", "loss_offline", "loss_nll", "clip_fraction", "on_policy_ratio_mean",
            "r_off_mean", "num_on_policy_tokens", "num_offline_tokens")
    metrics = dict(zip(keys, stats))
    metrics["sft_weight"] = sft_weight
    if config.tis_cap is not None:
        with torch.no_grad():
            n = n_on.clamp_min(1).double()
            metrics["tis_weight_mean"] = float(tis.double().sum() / n)
            capped = (old_logprobs - behaviour_logprobs) >= math.log(config.tis_cap)
            metrics["tis_capped_fraction"] = float((capped & on_tokens).sum() / n)
    return loss, metrics
