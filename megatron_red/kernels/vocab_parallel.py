"""Token log-probs and full-vocabulary entropy from vocabulary-parallel logits.

Megatron splits the LM head by vocabulary: tensor-parallel rank r holds logits z_j for
j in [r * V_shard, (r + 1) * V_shard). RED needs two per-token quantities over the *whole* vocabulary:

- log pi(y) = z_y - logsumexp(z), the policy log-prob of the sampled or offline token (Eq. 7-8, 10);
- the token entropy H = -sum_j p_j log p_j of Sec. "Controlled Exploration"; its means over on-policy and
  offline tokens give the entropy changes dH_rl, dH_sft behind the weight w (Eq. 9-11).
  With p = softmax(z) and log p_j = z_j - logsumexp(z) this is
  H = logsumexp(z) - sum_j p_j z_j.

Both need only per-token reductions over the vocabulary, so ranks exchange per-token statistics, never logits.
With m = max_j z_j, d_j = z_j - m, S = sum_j exp(d_j), T = sum_j exp(d_j) d_j:

    log pi(y) = d_y - log S,        H = log S - T / S.

Both terms of H are non-negative (log S >= 0, T <= 0), so H is computed without cancellation, and every
exponent is <= 0, so logits of +-1e4 stay finite. The gradients are

    d log pi(y) / d z_j = 1[j = y] - p_j,      d H / d z_j = -p_j (log p_j + H).

Work is done in fp32 on `chunk_size` tokens at a time, so extra memory is about two chunk_size x V_shard fp32
buffers whatever the input dtype; the backward recomputes p per chunk from the saved input logits.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

# Default chunk: as many tokens as fill 2**26 fp32 values (256 MiB) per working buffer, e.g. 440 tokens for a
# 152k vocabulary on one rank, 3.5k tokens per rank at TP=8.
DEFAULT_CHUNK_ELEMENTS = 2**26


def _chunk_rows(chunk_size: int | None, v_shard: int) -> int:
    if chunk_size is None:
        return max(1, DEFAULT_CHUNK_ELEMENTS // max(1, v_shard))
    return chunk_size


class _VocabParallelLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, tp_group, rows: int, vocab_start: int,
                n_valid_local: int):
        # logits [N, V_shard] (input dtype), targets [N] global ids; columns >= n_valid_local are padding.
        n_tokens = logits.shape[0]
        valid = logits[:, :n_valid_local]
        distributed = tp_group is not None and dist.get_world_size(tp_group) > 1

        # The max is exact in any float dtype, so it is taken on the input without an fp32 copy.
        if n_valid_local > 0:
            global_max = valid.amax(dim=-1).float()
        else:
            global_max = torch.full((n_tokens,), float("-inf"), device=logits.device)
        if distributed:
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)

        local_target = targets - vocab_start
        owns_target = (local_target >= 0) & (local_target < n_valid_local)
        local_target = torch.where(owns_target, local_target, torch.zeros_like(local_target))

        # Per token: [S, T, d_y] of this rank's columns; summed over ranks by one all-reduce.
        stats = torch.zeros(n_tokens, 3, dtype=torch.float32, device=logits.device)
        if n_valid_local > 0:
            for start in range(0, n_tokens, rows):
                end = min(start + rows, n_tokens)
                shifted = valid[start:end] - global_max[start:end, None]  # fp32 by type promotion, a new buffer
                stats[start:end, 2] = shifted.gather(1, local_target[start:end, None]).squeeze(1)
                exp_shifted = torch.exp(shifted)
                stats[start:end, 0] = exp_shifted.sum(dim=-1)
                stats[start:end, 1] = exp_shifted.mul_(shifted).sum(dim=-1)
            stats[:, 2].masked_fill_(~owns_target, 0.0)
        if distributed:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=tp_group)

        log_sum_exp_shifted = torch.log(stats[:, 0])
        logprobs = stats[:, 2] - log_sum_exp_shifted
        entropy = log_sum_exp_shifted - stats[:, 1] / stats[:, 0]

        ctx.save_for_backward(logits, local_target, owns_target, global_max, log_sum_exp_shifted, entropy)
        ctx.rows, ctx.n_valid_local = rows, n_valid_local
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor):
        # No communication: p_j = exp(z_j - m - log S) needs only the per-token global statistics (m, log S, H)
        # kept from the forward, each rank differentiates only its own columns, and the 1[j = y] term lives on
        # the rank that owns y. The caller's gradients are per token and identical on every TP rank.
        logits, local_target, owns_target, global_max, log_sum_exp_shifted, entropy = ctx.saved_tensors
        rows, n_valid_local = ctx.rows, ctx.n_valid_local
        n_tokens = logits.shape[0]
        grad_logits = torch.empty_like(logits)
        grad_logits[:, n_valid_local:] = 0.0  # padded vocabulary: probability 0, no gradient
        if n_valid_local == 0:
            return grad_logits, None, None, None, None, None
        grad_logprobs = grad_logprobs.float()
        grad_entropy = grad_entropy.float()
        target_grad = torch.where(owns_target, grad_logprobs, torch.zeros_like(grad_logprobs))
        for start in range(0, n_tokens, rows):
            end = min(start + rows, n_tokens)
            sl = slice(start, end)
            # Subtract m first: z - m is exact near the max, while m + log S would round at |m| ~ 1e4.
            log_p = (logits[sl, :n_valid_local] - global_max[sl, None]).sub_(log_sum_exp_shifted[sl, None])
            p = torch.exp(log_p)
            # grad_j = g_lp (1[j=y] - p_j) - g_H p_j (log p_j + H), built in the log_p buffer.
            grad = log_p.add_(entropy[sl, None]).mul_(grad_entropy[sl, None]).add_(grad_logprobs[sl, None])
            grad.mul_(p).neg_()
            grad.scatter_add_(1, local_target[sl, None], target_grad[sl, None])
            grad_logits[sl, :n_valid_local] = grad
        return grad_logits, None, None, None, None, None


def vocab_parallel_logprobs_entropy(
    logits_shard: torch.Tensor,
    targets: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
    valid_vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target and full-vocabulary entropy from this rank's vocabulary shard.

    Args:
        logits_shard: [..., V_shard] finite float logits (bf16, fp16 or fp32); tensor-parallel rank r holds vocabulary
            ids [r * V_shard, (r + 1) * V_shard), Megatron's layout. Not modified.
        targets: [...] integer global token ids, the same on every rank of `tp_group`.
        tp_group: the tensor-parallel process group; None means the whole vocabulary is in `logits_shard`.
        chunk_size: tokens processed at a time in fp32; None picks enough tokens to fill
            `DEFAULT_CHUNK_ELEMENTS` fp32 values per working buffer.
        valid_vocab_size: size of the real vocabulary when the global vocabulary (V_shard * TP) is padded;
            the padded ids get probability 0 and zero gradient. None means no padding.

    Returns:
        (logprobs, entropy), both fp32 of shape [...], differentiable with respect to `logits_shard`
        (the gradient comes back in the dtype of `logits_shard`).
    """
    if not torch.is_tensor(logits_shard) or not logits_shard.is_floating_point():
        raise ValueError(f"logits_shard must be a floating-point tensor, got "
                         f"{getattr(logits_shard, 'dtype', type(logits_shard))}")
    if logits_shard.dim() < 2:
        raise ValueError(f"logits_shard must have rank >= 2 ([..., V_shard]), got shape {tuple(logits_shard.shape)}")
    if not torch.is_tensor(targets) or targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"targets must be an integer tensor, got {getattr(targets, 'dtype', type(targets))}")
    if tuple(targets.shape) != tuple(logits_shard.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal logits_shard shape without the vocabulary "
                         f"dim {tuple(logits_shard.shape[:-1])}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

    v_shard = logits_shard.shape[-1]
    if tp_group is None:
        tp_rank, tp_size = 0, 1
    else:
        tp_rank, tp_size = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    padded_vocab = v_shard * tp_size
    vocab_size = padded_vocab if valid_vocab_size is None else valid_vocab_size
    if not 0 < vocab_size <= padded_vocab:
        raise ValueError(f"valid_vocab_size must be in [1, V_shard * TP = {padded_vocab}], got {valid_vocab_size}")

    # One reduction and one host sync for the whole batch.
    if targets.numel() > 0 and bool(((targets < 0) | (targets >= vocab_size)).any()):
        raise ValueError(f"targets must be token ids in [0, {vocab_size}); got values in "
                         f"[{int(targets.min())}, {int(targets.max())}]")

    vocab_start = tp_rank * v_shard
    n_valid_local = min(max(vocab_size - vocab_start, 0), v_shard)
    logprobs, entropy = _VocabParallelLogprobsEntropy.apply(
        logits_shard.reshape(-1, v_shard), targets.reshape(-1).long(), tp_group, _chunk_rows(chunk_size, v_shard),
        vocab_start, n_valid_local)
    return logprobs.view(targets.shape), entropy.view(targets.shape)
