"""Triton kernels of the fused LM head + log-prob + entropy: per-token softmax statistics and logit gradients.

Both kernels recompute a tile of logits z = (h @ W^T) / temperature with fp32 accumulation and consume it in
registers, so no [N, V] tensor is ever written:

- `launch_forward_stats`: each program owns BLOCK_N tokens and one split of this rank's vocabulary columns and
  keeps online statistics relative to its running max m: S = sum exp(z - m), T = sum exp(z - m) (z - m), in
  base 2 (exp2 is a single MUFU op). The splits give enough programs for small N; the caller merges them.
- `launch_grad_logits`: writes dL/dx for a chunk of vocabulary columns (x = h @ W^T, the unscaled logits), with
  dL/dz_j = g_lp (1[j=y] - p_j) - g_H p_j (log p_j + H); the caller feeds the chunk to cuBLAS matmuls.

The epilogues are kept to a few FP32 operations per logit (per-token coefficients are folded on the host, the
target logit is a separate O(N d) gather) because on Hopper they do not overlap the tensor-core work.

Block sizes are arguments: on a GPU a small autotuned set is used, under TRITON_INTERPRET=1 the tests pass tiny
blocks. Program ids are swizzled into groups of row blocks so that programs running at the same time share
their hidden tiles and weight tiles in L2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Finite "minus infinity" for the running max: exp(-1e30 - m) is 0 and 0 * (-1e30 - m) stays finite, whereas
# -inf would give inf - inf = nan when a split has no valid column.
NEG_BIG = tl.constexpr(-1.0e30)

# Few configs keep autotuning to well under a second per (d, N-bucket). Compiled offline for sm_90a (Triton 3.6 and
# 3.8) none spills, except the dZ kernel's 128 x 256 tiles under 3.8 (~108 bytes, epilogue only): the 128 x 256
# tiles use ~255 registers and 144-192 KB of shared memory (one program per SM); the 128 x 128 x 64, 3-stage tile
# uses 128 registers and 96 KB, so two programs share an SM and one's epilogue overlaps the other's matmul.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
# The vocabulary split of the forward is a multiple of every BLOCK_V above, so one split size serves all configs.
SPLIT_COLUMN_MULTIPLE = 256
# The backward's epilogue keeps more values live per logit (log2 p, p, dZ, the target mask) than the forward's,
# so its set adds a deeper-pipelined 128 x 128 x 64 tile, which leaves registers to spare at 8 warps.
_GRAD_CONFIGS = _GPU_CONFIGS + [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
]


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, D, stride_h, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # rows / cols are already clamped into range, so only the tail of d needs a mask.
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            h = tl.load(h_rows + ks[None, :])
            w = tl.load(w_rows + ks[None, :])
        else:
            h = tl.load(h_rows + ks[None, :], mask=ks[None, :] < D, other=0.0)
            w = tl.load(w_rows + ks[None, :], mask=ks[None, :] < D, other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _grouped_tile(N, n_col_tiles, group_rows, BLOCK_N: tl.constexpr):
    """This program's tile of a grid of cdiv(N, BLOCK_N) row blocks x `n_col_tiles` column tiles, numbered so that
    `group_rows` consecutive row blocks take each column tile in turn (they share it in L2): its rows (clamped
    into range: `row_ok` masks the results of the clamped ones), `row_ok`, and its column tile."""
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    per_group = group_rows * n_col_tiles
    first_rb = (pid // per_group) * group_rows
    group_size = tl.minimum(n_row_blocks - first_rb, group_rows)
    local = pid % per_group
    rows = (first_rb + local % group_size) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    return tl.where(row_ok, rows, 0), row_ok, local // group_size


@triton.jit
def _forward_stats_kernel(h_ptr, w_ptr, m_ptr, s_ptr, t_ptr,
                          N, D, n_valid, split_cols, n_splits, group_rows,
                          stride_h, stride_w, scale2, N_BUCKET,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                          EVEN_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rows, row_ok, split = _grouped_tile(N, n_splits, group_rows, BLOCK_N)
    v_begin = split * split_cols
    v_end = tl.minimum(v_begin + split_cols, n_valid)
    m = tl.full((BLOCK_N,), NEG_BIG, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        cols = tl.where(col_ok, cols, 0)
        # Base-2 logits (scale2 = log2(e) / temperature) so that exp2 is one MUFU op per element. Masked columns
        # get a finite -1e30: exp2 gives 0 and 0 * (-1e30 - m) stays 0, so no select is needed in the sums.
        z2 = _logits_tile(h_ptr, w_ptr, rows, cols, D, stride_h, stride_w,
                          BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, PRECISION, UPCAST) * scale2
        z2 = tl.where(col_ok[None, :], z2, NEG_BIG)
        m_new = tl.maximum(m, tl.max(z2, axis=1))
        alpha = tl.exp2(m - m_new)
        shifted = z2 - m_new[:, None]
        e = tl.exp2(shifted)
        # T is kept relative to the running max; moving the max by (m - m_new) shifts every past term by it.
        t = alpha * (t + s * (m - m_new)) + tl.sum(e * shifted, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new

    out = split * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(t_ptr + out, t, mask=row_ok)


@triton.jit
def _grad_logits_kernel(h_ptr, w_ptr, tgt_ptr, lse2_ptr, coef_p_ptr, coef_logp_ptr, coef_target_ptr, dz_ptr,
                        N, D, chunk_start, chunk_cols, vocab_start, group_rows,
                        stride_h, stride_w, scale2, N_BUCKET,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                        EVEN_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rows, row_ok, cb = _grouped_tile(N, tl.cdiv(chunk_cols, BLOCK_V), group_rows, BLOCK_N)
    chunk_col = cb * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = chunk_col < chunk_cols
    # Only the weight rows are clamped; the dZ offsets below keep the plain arange so that Triton's contiguity
    # analysis sees BLOCK_V consecutive columns per row and stores 16 contiguous bytes per thread, whole rows per
    # warp. With a clamped (tl.where) column index Triton 3.6 laid the store out column-major (a warp's 32 lanes
    # on 32 rows, one 2-byte store each, every bf16 in its own 32-byte sector); that kernel ran at ~170 TFLOP/s on
    # an H200 against the forward's ~620 with the same matmul code.
    cols = chunk_start + tl.where(col_ok, chunk_col, 0)

    z2 = _logits_tile(h_ptr, w_ptr, rows, cols, D, stride_h, stride_w,
                      BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, PRECISION, UPCAST) * scale2
    lse2 = tl.load(lse2_ptr + rows)
    coef_p = tl.load(coef_p_ptr + rows)
    coef_logp = tl.load(coef_logp_ptr + rows)
    coef_target = tl.load(coef_target_ptr + rows)
    # Vocabulary ids and dZ offsets fit in int32 (the chunk buffer is far below 2^31 elements): 64-bit index
    # tensors would double the registers of the epilogue.
    target_local = (tl.load(tgt_ptr + rows) - vocab_start).to(tl.int32)

    # log2 p_j and p_j; the per-token coefficients fold g_lp, g_H, H, ln 2 and 1/temperature (see the caller).
    log2_p = z2 - lse2[:, None]
    p = tl.exp2(log2_p)
    dz = -p * (coef_p[:, None] + coef_logp[:, None] * log2_p)
    is_target = cols[None, :] == target_local[:, None]
    dz = tl.where(is_target, dz + coef_target[:, None], dz)
    ptrs = dz_ptr + (rows[:, None] * chunk_cols + chunk_col[None, :])
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _even_k(args) -> bool:
    return args["D"] % args["BLOCK_K"] == 0


_forward_stats = triton.heuristics({"EVEN_K": _even_k})(_forward_stats_kernel)
_grad_logits = triton.heuristics({"EVEN_K": _even_k})(_grad_logits_kernel)
# Keyed on d and a power-of-two bucket of N so that varying micro-batch sizes do not re-tune on every call.
_forward_stats_tuned = triton.autotune(_GPU_CONFIGS, key=["D", "N_BUCKET", "PRECISION"])(_forward_stats)
_grad_logits_tuned = triton.autotune(_GRAD_CONFIGS, key=["D", "N_BUCKET", "PRECISION"])(_grad_logits)


def grad_logits_best_config() -> str | None:
    """The dZ kernel's autotuned config as "BLOCK_N x BLOCK_V x BLOCK_K, warps, stages", or None before tuning."""
    best = getattr(_grad_logits_tuned, "best_config", None)
    if best is None:
        return None
    k = best.kwargs
    return f"{k['BLOCK_N']}x{k['BLOCK_V']}x{k['BLOCK_K']}, {best.num_warps} warps, {best.num_stages} stages"


def _dot_options(x: torch.Tensor) -> dict:
    # fp32 inputs get true fp32 products (tf32 would cost ~1e-3 relative error in the logits). The interpreter
    # (CPU tensors) computes bf16/fp16 dots wrongly in Triton 3.8, so there the exact fp32 upcast is used.
    return {"PRECISION": "ieee" if x.dtype == torch.float32 else "tf32", "UPCAST": not x.is_cuda}


def _n_bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block_kwargs(blocks: tuple[int, int, int] | None) -> dict:
    if blocks is None:
        return {}
    block_n, block_v, block_k = blocks
    return {"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_K": block_k}


def launch_forward_stats(hidden: torch.Tensor, weight: torch.Tensor, n_valid: int, scale2: float, split_cols: int,
                         n_splits: int, group_rows: int, blocks: tuple[int, int, int] | None, num_warps: int = 4):
    """Per-split statistics [n_splits, N] in base 2 (m2, S, T2) over this rank's first `n_valid` vocabulary rows.

    With z2 = log2(e) z: m2 = max z2, S = sum 2^(z2 - m2), T2 = sum 2^(z2 - m2) (z2 - m2). `blocks` =
    (BLOCK_N, BLOCK_V, BLOCK_K), or None to autotune; `split_cols` must be a multiple of every BLOCK_V in use.
    """
    n, d = hidden.shape
    stats = torch.empty(3, n_splits, n, dtype=torch.float32, device=hidden.device)
    args = (hidden, weight, stats[0], stats[1], stats[2], n, d, n_valid, split_cols, n_splits, group_rows,
            hidden.stride(0), weight.stride(0), scale2, _n_bucket(n))
    if blocks is None:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * n_splits,)  # noqa: E731
        _forward_stats_tuned[grid](*args, **_dot_options(hidden))
    else:
        grid = (triton.cdiv(n, blocks[0]) * n_splits,)
        _forward_stats[grid](*args, **_dot_options(hidden), num_warps=num_warps, **_block_kwargs(blocks))
    return stats[0], stats[1], stats[2]


def launch_grad_logits(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse2: torch.Tensor,
                       coef_p: torch.Tensor, coef_logp: torch.Tensor, coef_target: torch.Tensor, out: torch.Tensor,
                       chunk_start: int, vocab_start: int, scale2: float, group_rows: int,
                       blocks: tuple[int, int, int] | None, num_warps: int = 4, num_stages: int = 3) -> None:
    """Write dL/dx for vocabulary rows [chunk_start, chunk_start + out.shape[1]) into `out` [N, chunk] (contiguous).

    dL/dx_j = 1[j = y] coef_target - p_j (coef_p + coef_logp log2 p_j), p_j = 2^(z2_j - lse2), per-token fp32
    coefficients [N]. `blocks` None autotunes; `num_warps` / `num_stages` apply to fixed `blocks` only. Launches on
    the current CUDA stream.
    """
    n, d = hidden.shape
    chunk_cols = out.shape[1]
    args = (hidden, weight, targets, lse2, coef_p, coef_logp, coef_target, out,
            n, d, chunk_start, chunk_cols, vocab_start, group_rows,
            hidden.stride(0), weight.stride(0), scale2, _n_bucket(n))
    if blocks is None:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(chunk_cols, meta["BLOCK_V"]),)  # noqa: E731
        _grad_logits_tuned[grid](*args, **_dot_options(hidden))
    else:
        grid = (triton.cdiv(n, blocks[0]) * triton.cdiv(chunk_cols, blocks[1]),)
        _grad_logits[grid](*args, **_dot_options(hidden), num_warps=num_warps, num_stages=num_stages,
                           **_block_kwargs(blocks))
