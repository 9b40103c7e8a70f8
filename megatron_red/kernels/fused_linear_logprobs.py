"""Fused, vocabulary-parallel LM head + token log-prob + entropy (forward and backward) without [N, V] logits.

RED needs, for every token, the policy log-prob log pi(y) (Eq. 7-8, 10) and the full-vocabulary entropy H
(Eq. 9-11) of softmax(h W^T / temperature). Materialising the logits costs N x V floats (46 GiB at N = 16384,
V = 152k); this module never does:

- forward: a Triton kernel computes logit tiles in registers and keeps per-token online statistics (max m,
  S = sum exp(z - m), T = sum exp(z - m)(z - m), the target logit). With the global max M and the merged S, T:
  log pi(y) = z_y - M - log S and H = log S - T / S. Under tensor parallelism (Megatron's vocabulary layout,
  rank r holds rows [r V_shard, (r+1) V_shard)) ranks all-reduce only [N]-sized statistics: the max, then S, T, z_y.
- backward: for chunks of the vocabulary, a Triton kernel recomputes the logits and writes
  dL/dz_j = g_lp (1[j=y] - p_j) - g_H p_j (log p_j + H) (divided by the temperature) into a [N, chunk] buffer
  that two cuBLAS matmuls consume: grad_W[chunk] = dZ^T h and grad_h += dZ W[chunk] (fp32 accumulator);
  grad_h is then all-reduced over the tensor-parallel group, since h feeds every vocabulary shard. With two dZ
  buffers the next chunk's dZ kernel runs on a side CUDA stream while the current chunk's matmuls run.

Extra memory is the fp32 grad_h accumulator plus the dZ buffers (`FusedKernelConfig.grad_chunk_bytes` in all),
flat in V.
Off CUDA (and without TRITON_INTERPRET=1) the same function computes logits chunk by chunk in torch and calls
`megatron_red.kernels.vocab_parallel_logprobs_entropy`.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from megatron_red.kernels.vocab_parallel import vocab_parallel_logprobs_entropy

_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class FusedKernelConfig:
    """Tuning knobs of the fused kernel; the defaults are the GPU settings."""

    # (BLOCK_N, BLOCK_V, BLOCK_K) tile of tokens x vocabulary x hidden; None autotunes a few Hopper configs on
    # CUDA and uses (16, 32, 16) under TRITON_INTERPRET=1.
    blocks: tuple[int, int, int] | None = None
    # Warps per program when `blocks` is given (autotuned configs carry their own).
    num_warps: int = 4
    # Vocabulary splits per shard in the forward; None picks enough to give ~8 programs per multiprocessor.
    splits: int | None = None
    # Memory for all of the backward's dZ buffers together; sets the chunk width when `grad_chunk_cols` is None.
    # 128 MiB in one buffer gives 4096 columns at N = 16384 in bf16 (plus a 96 MiB fp32 grad_h accumulator at
    # d = 1536: 177 MiB measured beyond the gradients on an H200).
    grad_chunk_bytes: int = 128 * 2**20
    # Fixed backward chunk width in vocabulary columns (tests use it to force several chunks); None = from bytes.
    grad_chunk_cols: int | None = None
    # dZ buffers in the backward. With 2 or more on CUDA, the dZ kernel of the next chunks runs on a side stream
    # while the current chunk's two matmuls run, filling each launch's tail wave with the other's work; 1 is the
    # sequential schedule on one stream (the default: on an H200, 2026-11-27, two buffers were no faster).
    grad_buffers: int = 1
    # (BLOCK_N, BLOCK_V, BLOCK_K) of the backward's dZ kernel; None = as the forward (`blocks`, autotuned over the
    # backward's own config set when that is None too).
    grad_blocks: tuple[int, int, int] | None = None
    # Warps and software-pipelining stages of the dZ kernel when `grad_blocks` is given.
    grad_num_warps: int = 8
    grad_num_stages: int = 3
    # Row blocks per L2 group of the dZ kernel's program order: programs running together share these hidden
    # tiles and the chunk's weight tiles in L2.
    grad_group_rows: int = 8
    # Tokens per chunk of the CPU fallback (logits are recomputed per chunk in backward); None = 2**24 / V_shard.
    fallback_chunk_rows: int | None = None

    def __post_init__(self):
        for name in ("grad_buffers", "grad_num_warps", "grad_num_stages", "grad_group_rows", "num_warps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FusedKernelConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("blocks", "grad_blocks"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or any(not isinstance(b, int) or b < 1 for b in value)):
                raise ValueError(f"FusedKernelConfig.{name} must be None or three ints >= 1 "
                                 f"(BLOCK_N, BLOCK_V, BLOCK_K), got {value!r}")
        if self.grad_chunk_bytes < 1:
            raise ValueError(f"FusedKernelConfig.grad_chunk_bytes must be >= 1, got {self.grad_chunk_bytes!r}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


FUSED_KERNEL_MODES = ("auto", "on", "off")
"""`model.fused_kernel`: `on`, `off`, or `auto` = on for CUDA devices."""


def fused_kernel_enabled(mode: str, device: torch.device | str) -> bool:
    """Whether `model.fused_kernel=mode` puts the LM head through this kernel on `device`: `auto` on a CUDA device
    (Triton ships with PyTorch's CUDA builds; without it the kernel runs its torch fallback, the same function in
    the same memory bound), so the answer depends on the device type alone and `plan` resolves it as `train` does."""
    return mode == "on" or (mode == "auto" and torch.device(device).type == "cuda")


def _tp_size_rank(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: any small number exercises the split and grouping logic


def _forward_split(n: int, n_valid: int, block_n: int, column_unit: int, num_sms: int,
                   splits: int | None) -> tuple[int, int]:
    """(split_cols, n_splits): vocabulary columns per forward program and the number of splits."""
    n_units = max(1, math.ceil(n_valid / column_unit))
    if splits is None:
        splits = math.ceil(8 * num_sms / math.ceil(n / block_n))
    splits = min(max(1, splits), n_units)
    split_cols = math.ceil(n_units / splits) * column_unit
    return split_cols, max(1, math.ceil(n_valid / split_cols))


def _grad_chunk_cols(n: int, n_valid: int, element_size: int, config: FusedKernelConfig) -> int:
    if config.grad_chunk_cols is not None:
        cols = config.grad_chunk_cols
    else:
        per_buffer = config.grad_chunk_bytes // config.grad_buffers
        cols = max(256, per_buffer // (max(n, 1) * element_size) // 256 * 256)
    # The kernel indexes the chunk buffer with int32 offsets.
    return max(1, min(cols, n_valid, (2**31 - 1) // max(n, 1)))


_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _target_logits(hidden, weight, targets, n_valid, vocab_start, inv_temp, rows=2048):
    """z_y = h . W_y / temperature for tokens whose target is in this shard's valid rows, else 0 (fp32 [N]).

    An O(N d) gather kept out of the forward kernel, whose epilogue runs once per logit.
    """
    local = targets - vocab_start
    owns = (local >= 0) & (local < n_valid)
    local = torch.where(owns, local, torch.zeros_like(local))
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        sl = slice(start, start + rows)
        out[sl] = (hidden[sl].float() * weight[local[sl]].float()).sum(-1)
    return torch.where(owns, out * inv_temp, torch.zeros_like(out))


def _combine_splits(m2, s, t2, target_logit, tp_group, distributed: bool):
    """Merge per-split (and per-rank) base-2 statistics into (logprobs, entropy, log2-sum-exp2 of z2), fp32 [N]."""
    global_max2 = m2.max(dim=0).values
    if distributed:
        dist.all_reduce(global_max2, op=dist.ReduceOp.MAX, group=tp_group)
    shift2 = m2 - global_max2
    scale = torch.exp2(shift2)
    merged = torch.stack([(s * scale).sum(0), ((t2 + s * shift2) * scale).sum(0), target_logit])
    if distributed:
        dist.all_reduce(merged, op=dist.ReduceOp.SUM, group=tp_group)
    sum_exp, t2_sum, target_logit = merged
    log2_sum_exp = torch.log2(sum_exp)
    log_sum_exp = (global_max2 + log2_sum_exp) * _LN2
    # H = log S - T / S with natural-log S, T; both terms are >= 0, so there is no cancellation.
    entropy = (log2_sum_exp - t2_sum / sum_exp) * _LN2
    return target_logit - log_sum_exp, entropy, global_max2 + log2_sum_exp


# Whether cuBLAS accepts bf16/fp16 operands with an fp32 output accumulated in place (torch >= 2.9).
_ADDMM_FP32_OUT = True


def _accumulate_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, keeping the sum over vocabulary chunks in fp32."""
    global _ADDMM_FP32_OUT
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif not a.is_cuda:
        acc.addmm_(a.float(), b.float())
    else:
        if _ADDMM_FP32_OUT:
            try:
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                return
            except (RuntimeError, TypeError):
                _ADDMM_FP32_OUT = False
        acc.add_(torch.mm(a, b))


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b with fp32 accumulation (cuBLAS does this for bf16; CPU matmuls are upcast explicitly)."""
    if a.is_cuda or a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a.float() @ b.float())


class _FusedLinearLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, tp_group, inv_temp, n_valid, vocab_start, config):
        from megatron_red.kernels.triton_kernels import SPLIT_COLUMN_MULTIPLE, launch_forward_stats

        n = hidden.shape[0]
        tp_size, _ = _tp_size_rank(tp_group)
        distributed = tp_size > 1
        blocks = config.blocks
        if blocks is None and _interpreting():
            blocks = (16, 32, 16)
        num_sms = _num_sms(hidden.device)
        block_n, column_unit = (128, SPLIT_COLUMN_MULTIPLE) if blocks is None else (blocks[0], blocks[1])
        split_cols, n_splits = _forward_split(n, n_valid, block_n, column_unit, num_sms, config.splits)
        group_rows = max(1, num_sms // n_splits)
        m2, s, t2 = launch_forward_stats(hidden, weight, n_valid, inv_temp * _LOG2E, split_cols, n_splits,
                                         group_rows, blocks, config.num_warps)
        target_logit = _target_logits(hidden, weight, targets, n_valid, vocab_start, inv_temp)
        logprobs, entropy, lse2 = _combine_splits(m2, s, t2, target_logit, tp_group, distributed)

        ctx.save_for_backward(hidden, weight, targets, lse2, entropy)
        ctx.tp_group, ctx.distributed, ctx.inv_temp = tp_group, distributed, inv_temp
        ctx.n_valid, ctx.vocab_start, ctx.config, ctx.blocks = n_valid, vocab_start, config, blocks
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, lse2, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, d = hidden.shape
        n_valid = ctx.n_valid
        coefs = _grad_coefficients(grad_logprobs, grad_entropy, entropy, ctx.inv_temp)

        grad_weight = None
        if need_weight:
            grad_weight = torch.empty_like(weight)
            grad_weight[n_valid:].zero_()  # padded vocabulary rows: probability 0, no gradient
        grad_acc = torch.zeros(n, d, dtype=torch.float32, device=hidden.device) if need_hidden else None
        if (need_hidden or need_weight) and n_valid > 0:
            _grad_matmuls_by_chunk(hidden, weight, targets, lse2, coefs, grad_weight, grad_acc, n_valid,
                                   ctx.vocab_start, ctx.inv_temp, ctx.config, ctx.blocks)

        grad_hidden = None
        if need_hidden:
            if ctx.distributed:
                # h feeds every vocabulary shard: its gradient is the sum of the shards' contributions.
                dist.all_reduce(grad_acc, op=dist.ReduceOp.SUM, group=ctx.tp_group)
            grad_hidden = grad_acc if hidden.dtype == torch.float32 else grad_acc.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _grad_coefficients(grad_logprobs, grad_entropy, entropy, inv_temp):
    """Per-token fp32 (coef_p, coef_logp, coef_target) of the dZ kernel.

    dL/dx_j = (1/T) [g_lp 1[j=y] - p_j (g_lp + g_H H + g_H ln2 log2 p_j)]  (x = h W^T, z = x / T).
    """
    grad_logprobs, grad_entropy = grad_logprobs.float(), grad_entropy.float()
    coef_p = (grad_logprobs + grad_entropy * entropy) * inv_temp
    coef_logp = grad_entropy * (_LN2 * inv_temp)
    coef_target = grad_logprobs * inv_temp
    return coef_p, coef_logp, coef_target


def _grad_matmuls_by_chunk(hidden, weight, targets, lse2, coefs, grad_weight, grad_acc, n_valid, vocab_start,
                           inv_temp, config, blocks):
    """grad_weight[chunk] = dZ^T h and grad_acc += dZ W[chunk] over vocabulary chunks of this shard's valid rows.

    Either output may be None (not needed). Chunk k's dZ goes to buffer k mod `config.grad_buffers`. On CUDA with
    several buffers, dZ kernels run on a side stream, each waiting only until the matmuls that last read its buffer
    are done, so chunk k+1's dZ overlaps chunk k's matmuls; the current stream waits for each dZ before its
    matmuls, hence for all side-stream work before anything after this function (the buffers are freed on the
    current stream safely). No host synchronisation and no allocation inside the loop.
    """
    from megatron_red.kernels.triton_kernels import launch_grad_logits

    n = hidden.shape[0]
    chunk = _grad_chunk_cols(n, n_valid, hidden.element_size(), config)
    starts = list(range(0, n_valid, chunk))
    n_buffers = min(config.grad_buffers, len(starts))
    buffers = [torch.empty(n * chunk, dtype=hidden.dtype, device=hidden.device) for _ in range(n_buffers)]
    if config.grad_blocks is not None:
        grad_blocks, warps, stages = config.grad_blocks, config.grad_num_warps, config.grad_num_stages
    else:
        grad_blocks, warps, stages = blocks, config.num_warps, 3
    overlap = hidden.is_cuda and n_buffers > 1
    main = torch.cuda.current_stream(hidden.device) if overlap else None
    side = _side_stream(hidden.device) if overlap else None
    if overlap:
        side.wait_stream(main)  # the coefficients, lse2 and zeroed outputs were written on the current stream
        dz_done = [torch.cuda.Event() for _ in range(n_buffers)]
        mm_done = [torch.cuda.Event() for _ in range(n_buffers)]

    for k, start in enumerate(starts):
        width = min(chunk, n_valid - start)
        slot = k % n_buffers
        grad_logits = buffers[slot][: n * width].view(n, width)
        with torch.cuda.stream(side) if overlap else contextlib.nullcontext():
            if overlap and k >= n_buffers:
                side.wait_event(mm_done[slot])  # the matmuls of chunk k - n_buffers still read this buffer
            launch_grad_logits(hidden, weight, targets, lse2, *coefs, grad_logits, start, vocab_start,
                               inv_temp * _LOG2E, config.grad_group_rows, grad_blocks, warps, stages)
            if overlap:
                dz_done[slot].record(side)
        if overlap:
            main.wait_event(dz_done[slot])
        if grad_weight is not None:
            _matmul_into(grad_weight[start:start + width], grad_logits.t(), hidden)
        if grad_acc is not None:
            _accumulate_matmul(grad_acc, grad_logits, weight[start:start + width])
        if overlap:
            mm_done[slot].record(main)


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One long-lived side stream per device for the backward's dZ kernels (streams are not free to create)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


class _AllReduceGradient(torch.autograd.Function):
    """Identity forward, sum of the gradient over the tensor-parallel group backward (Megatron's "copy to region")."""

    @staticmethod
    def forward(ctx, x, tp_group):
        ctx.tp_group = tp_group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.tp_group)
        return grad, None


def _fallback_chunk(hidden, weight, targets, tp_group, temperature, valid_vocab_size):
    logits = (hidden.float() @ weight.float().t()) / temperature
    return vocab_parallel_logprobs_entropy(logits, targets, tp_group, valid_vocab_size=valid_vocab_size)


def _torch_fallback(hidden, weight, targets, tp_group, temperature, valid_vocab_size, config, distributed):
    n = hidden.shape[0]
    rows = config.fallback_chunk_rows or max(1, 2**24 // weight.shape[0])
    if distributed:
        hidden = _AllReduceGradient.apply(hidden, tp_group)
    keep_graph = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logprobs, entropy = [], []
    for start in range(0, n, rows):
        args = (hidden[start:start + rows], weight, targets[start:start + rows], tp_group, temperature,
                valid_vocab_size)
        # Recompute each chunk's logits in backward instead of keeping all N x V_shard of them.
        lp, ent = checkpoint(_fallback_chunk, *args, use_reentrant=False) if keep_graph else _fallback_chunk(*args)
        logprobs.append(lp)
        entropy.append(ent)
    return torch.cat(logprobs), torch.cat(entropy)


def _validate(hidden, weight_shard, targets, temperature, valid_vocab_size, tp_size):
    if not torch.is_tensor(hidden) or hidden.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"hidden must be a bf16, fp16 or fp32 tensor, got {getattr(hidden, 'dtype', type(hidden))}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must have shape [..., d], got {tuple(hidden.shape)}")
    if not torch.is_tensor(weight_shard) or weight_shard.dim() != 2 or weight_shard.shape[0] == 0:
        raise ValueError(f"weight_shard must be a non-empty [V_shard, d] tensor, got "
                         f"{tuple(weight_shard.shape) if torch.is_tensor(weight_shard) else type(weight_shard)}")
    if weight_shard.dtype != hidden.dtype:
        raise ValueError(f"weight_shard dtype {weight_shard.dtype} must equal hidden dtype {hidden.dtype}")
    if weight_shard.device != hidden.device:
        raise ValueError(f"hidden is on {hidden.device} but weight_shard is on {weight_shard.device}")
    if weight_shard.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden size mismatch: hidden [..., {hidden.shape[-1]}] vs weight_shard "
                         f"{tuple(weight_shard.shape)} (expected [V_shard, {hidden.shape[-1]}])")
    if not torch.is_tensor(targets) or targets.is_floating_point() or targets.is_complex() \
            or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of token ids, got "
                         f"{getattr(targets, 'dtype', type(targets))}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden shape without d "
                         f"{tuple(hidden.shape[:-1])}")
    if targets.device != hidden.device:
        raise ValueError(f"targets are on {targets.device} but hidden is on {hidden.device}")
    padded_vocab = weight_shard.shape[0] * tp_size
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if valid_vocab_size is not None and (isinstance(valid_vocab_size, bool) or not isinstance(valid_vocab_size, int)
                                         or not 0 < valid_vocab_size <= padded_vocab):
        raise ValueError(f"valid_vocab_size must be an int in [1, V_shard * TP = {padded_vocab}], "
                         f"got {valid_vocab_size!r}")


def fused_linear_logprobs_entropy(hidden: torch.Tensor, weight_shard: torch.Tensor, targets: torch.Tensor,
                                  tp_group: dist.ProcessGroup | None = None, temperature: float = 1.0,
                                  valid_vocab_size: int | None = None,
                                  config: FusedKernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of `targets` and entropy of softmax(hidden @ W^T / temperature), without [N, V] logits.

    Args:
        hidden: [..., d] final hidden states (bf16, fp16 or fp32), the full sequence on every TP rank.
        weight_shard: [V_shard, d] this rank's LM-head rows (global ids [r V_shard, (r+1) V_shard)), same dtype
            and device as `hidden`.
        targets: [...] integer global token ids in [0, valid vocabulary); not range-checked on the fused path
            (that would cost a host sync): an id outside the vocabulary gives a meaningless log-prob.
        tp_group: tensor-parallel group over which the vocabulary is split; None = the whole vocabulary is here.
        temperature: logits are divided by it before the softmax.
        valid_vocab_size: size of the real vocabulary when V_shard * TP includes padding rows; those rows get
            probability 0 and zero gradient. None = no padding.
        config: kernel tuning; None = GPU defaults.

    Returns:
        (logprobs, entropy), fp32 of shape [...], differentiable with respect to `hidden` and `weight_shard`.
        The gradient for `hidden` is already summed over `tp_group`; do not all-reduce it again.
    """
    tp_size, tp_rank = _tp_size_rank(tp_group)
    _validate(hidden, weight_shard, targets, temperature, valid_vocab_size, tp_size)
    v_shard = weight_shard.shape[0]
    padded_vocab = v_shard * tp_size
    config = config or FusedKernelConfig()

    out_shape = targets.shape
    d = hidden.shape[-1]
    hidden2d = hidden.reshape(-1, d).contiguous()
    targets1d = targets.reshape(-1).contiguous()
    weight = weight_shard if weight_shard.stride(1) == 1 else weight_shard.contiguous()
    vocab_size = padded_vocab if valid_vocab_size is None else valid_vocab_size
    vocab_start = tp_rank * v_shard
    n_valid = min(max(vocab_size - vocab_start, 0), v_shard)
    distributed = tp_size > 1

    if hidden2d.shape[0] == 0:
        empty = hidden2d.float().sum(-1)
        return empty.view(out_shape), empty.clone().view(out_shape)

    use_triton = _triton_importable() and (hidden2d.is_cuda or _interpreting())
    if not use_triton:
        logprobs, entropy = _torch_fallback(hidden2d, weight, targets1d, tp_group, float(temperature),
                                            valid_vocab_size, config, distributed)
    else:
        # Triton launches on the current device; make it the tensors' one.
        with torch.cuda.device(hidden2d.device) if hidden2d.is_cuda else contextlib.nullcontext():
            logprobs, entropy = _FusedLinearLogprobsEntropy.apply(
                hidden2d, weight, targets1d, tp_group, 1.0 / float(temperature), n_valid, vocab_start, config)
    return logprobs.view(out_shape), entropy.view(out_shape)


def reference_linear_logprobs_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                      temperature: float = 1.0, valid_vocab_size: int | None = None,
                                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch reference: materialises all logits in `dtype` (use float64 for tests) on one device.

    `weight` is the full [V, d] LM head; rows >= valid_vocab_size are padding. Returns (logprobs, entropy) in `dtype`.
    """
    logits = (hidden.to(dtype) @ weight.to(dtype).t()) / temperature
    vocab = weight.shape[0]
    valid = torch.arange(vocab, device=logits.device) < (vocab if valid_vocab_size is None else valid_vocab_size)
    logits = logits.masked_fill(~valid, float("-inf"))
    log_p = torch.log_softmax(logits, dim=-1)
    logprobs = log_p.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p.masked_fill(~valid, 0.0)).sum(-1)
    return logprobs, entropy
