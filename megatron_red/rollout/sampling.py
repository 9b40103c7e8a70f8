"""Token sampling shared by the rollout engines: the sampling distribution, inverse-CDF draws, behaviour log-probs,
and the entropy of pi at the sampling temperature (H_rl of Eq. 9-11, measured where the logits already are).

Every engine draws the uniforms of a `generate` call up front from a CPU `torch.Generator` seeded with
`SamplingParams.seed`: row r (prompt r // n's sample r % n) consumes `uniforms[r, t]` for its t-th new token. So a
row's tokens depend only on the seed, its row index and the logits it sees, not on how an engine batches or
schedules rows, and two engines computing the same logits sample the same tokens (what lets the ranks of a
model-parallel group sample identically without exchanging tokens).
"""
from __future__ import annotations

import torch

from megatron_red.rollout.base import SamplingParams


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """fp32 log-probs [b, V] of the distribution tokens are drawn from: log_softmax(logits / temperature), restricted
    to the `top_k` most probable tokens (0 = all; ties with the k-th are kept) and then to the top-p nucleus (the
    smallest set of most probable tokens whose mass reaches top_p), renormalised; excluded tokens get -inf."""
    return _truncated(torch.log_softmax(logits.float() / temperature, dim=-1), top_p, top_k)


def _truncated(logp: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """`logp` restricted to its top-k tokens, then to its top-p nucleus, renormalised (`sampling_logprobs`)."""
    if 0 < top_k < logp.shape[-1]:
        kth = logp.topk(top_k, dim=-1).values[:, -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
        logp = logp - logp.logsumexp(-1, keepdim=True)
    if top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        sorted_p = sorted_logp.exp()
        # Keep a token while the mass of the more probable ones is still below top_p (the top token always).
        keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        logp = logp.masked_fill(~keep, float("-inf"))
        logp = logp - logp.logsumexp(-1, keepdim=True)
    return logp


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float = 1.0,
                  top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row of `logits` [b, V] by inverse CDF with `uniforms` [b] in [0, 1); return the tokens,
    their log-probs under the sampling distribution (`sampling_logprobs`) and each row's full-vocabulary entropy of
    pi at the temperature, before top-k / top-p (the trainer's H of the same position, which the update's forward
    would otherwise have to compute)."""
    tempered = torch.log_softmax(logits.float() / temperature, dim=-1)
    probs = tempered.exp()
    entropy = -torch.where(probs > 0, probs * tempered, 0.0).sum(-1)  # a -inf logit (p = 0) adds nothing
    logp = _truncated(tempered, top_p, top_k)
    cdf = logp.exp().double().cumsum(-1)
    total = cdf[:, -1:]
    # Strictly below the total, so the first index with cdf > x exists and has positive probability.
    x = torch.minimum(uniforms[:, None].double() * total, torch.nextafter(total, torch.zeros_like(total)))
    tokens = torch.searchsorted(cdf, x, right=True).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1), entropy


def draw_uniforms(rows: int, params: SamplingParams) -> torch.Tensor:
    """The [rows, max_new_tokens] float64 uniforms of one `generate` call (module docstring): from the call's seed,
    or with `params.prompt_seeds` each prompt's block of rows from its own seed."""
    if params.prompt_seeds is not None:
        n = rows // len(params.prompt_seeds)
        return torch.cat([_uniforms(n, params.max_new_tokens, seed) for seed in params.prompt_seeds])
    return _uniforms(rows, params.max_new_tokens,
                     params.seed if params.seed is not None else int(torch.randint(2**62, ()).item()))


def _uniforms(rows: int, max_new_tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.rand(rows, max_new_tokens, generator=generator, dtype=torch.float64)


def check_params(prompts: list[list[int]], n: int, params: SamplingParams) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    if params.temperature <= 0:
        raise ValueError(f"temperature must be > 0 (top_k=1 is greedy), got {params.temperature}")
    if not 0.0 < params.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {params.top_k}")
    if params.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
    if params.prompt_seeds is not None and len(params.prompt_seeds) != len(prompts):
        raise ValueError(f"{len(params.prompt_seeds)} prompt_seeds for {len(prompts)} prompts")
