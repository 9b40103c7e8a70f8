"""Causal attention over a paged (block-table) KV cache: a Triton kernel and a plain-torch reference.

This is the attention megatron-core's dynamic inference engine needs (flash-attn's `block_table` interface, see
`megatron_red/rollout/megatron_attention.py`): each request b owns `kv_lens[b]` keys stored in fixed-size blocks,

    key j of request b  =  k_cache[block_table[b, j // block_size], j % block_size]     (k_cache [blocks, S, Hkv, d])

and contributes `q_len_b = cu_seqlens_q[b + 1] - cu_seqlens_q[b]` queries, packed along the first axis of q
[T, H, d]. The queries are the *last* q_len_b positions of the sequence (prefill: the whole prompt; decode: one
token; a resumed prefill: the new tail), so query i of request b sits at position p = kv_len_b - q_len_b + i and
attends to keys j <= p (causal, aligned bottom-right as in flash-attn). Grouped-query attention: query head h reads
key/value head h // (H / Hkv). Rows of q past cu_seqlens_q[-1] (megatron pads the token count) get zeros.

The Triton kernel runs one program per (tile of BLOCK_M queries, request, key/value head); the tile's rows are its
queries x the H / Hkv query heads that share the key/value head, so each key tile is loaded once for all of them.
Softmax is online (running max and sum in fp32, base 2), products accumulate in fp32, and the key loop stops at
the tile's last causal position, so a request costs O(q_len x kv_len) whatever the block table's width.
"""
from __future__ import annotations

import math

import torch

NEG_BIG = -1.0e30  # finite "minus infinity": exp2(NEG_BIG - m) is 0 and never produces inf - inf


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_table: torch.Tensor, cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor,
                              softmax_scale: float) -> torch.Tensor:
    """Plain torch, one request at a time: gather the request's keys from its blocks, then causal softmax attention
    in fp32 (the CPU path of the engine, and the reference of the Triton kernel). Shapes as in the module docstring;
    returns [T, H, d] in q's dtype."""
    heads, dim = q.shape[1], q.shape[2]
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    out = torch.zeros_like(q)
    cu = cu_seqlens_q.tolist()
    for b, kv_len in enumerate(kv_lens.tolist()):
        q_len = cu[b + 1] - cu[b]
        if q_len == 0:
            continue
        blocks = block_table[b, :math.ceil(kv_len / block_size)].long()
        keys = k_cache[blocks].reshape(-1, kv_heads, dim)[:kv_len].float().repeat_interleave(group, dim=1)
        values = v_cache[blocks].reshape(-1, kv_heads, dim)[:kv_len].float().repeat_interleave(group, dim=1)
        queries = q[cu[b]:cu[b + 1]].float()
        scores = torch.einsum("qhd,khd->hqk", queries, keys) * softmax_scale
        positions = torch.arange(kv_len - q_len, kv_len, device=q.device)
        allowed = torch.arange(kv_len, device=q.device)[None, :] <= positions[:, None]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        out[cu[b]:cu[b + 1]] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    return out


try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still works
    triton = None

if triton is not None:
    _NEG_BIG = tl.constexpr(NEG_BIG)

    @triton.jit
    def _paged_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, block_table_ptr, cu_q_ptr, kv_len_ptr,
                                stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                stride_ot, stride_oh, stride_bt, scale_log2, head_dim, block_size, group,
                                BLOCK_M: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
        m_tile = tl.program_id(0)
        b = tl.program_id(1)
        kv_head = tl.program_id(2)
        q_start = tl.load(cu_q_ptr + b)
        q_len = tl.load(cu_q_ptr + b + 1) - q_start
        if m_tile * BLOCK_M >= q_len:
            return
        kv_len = tl.load(kv_len_ptr + b)

        # Row r of the tile: query m = r // GROUP_P of the tile, query head kv_head * group + r % GROUP_P.
        rows = tl.arange(0, BLOCK_M * GROUP_P)
        m = m_tile * BLOCK_M + rows // GROUP_P
        g = rows % GROUP_P
        row_ok = (m < q_len) & (g < group)
        head = kv_head * group + g
        position = kv_len - q_len + m
        d = tl.arange(0, BLOCK_D)
        d_ok = d < head_dim
        token = (q_start + m).to(tl.int64)
        q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        acc = tl.zeros((BLOCK_M * GROUP_P, BLOCK_D), dtype=tl.float32)
        row_max = tl.full((BLOCK_M * GROUP_P,), _NEG_BIG, dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_M * GROUP_P,), dtype=tl.float32)
        # Keys past the tile's last query position are masked for every row: stop there.
        end = kv_len - q_len + tl.minimum(q_len, (m_tile + 1) * BLOCK_M)
        for start in range(0, end, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            j_ok = j < end
            block = tl.load(block_table_ptr + b * stride_bt + j // block_size, mask=j_ok, other=0).to(tl.int64)
            slot = (j % block_size).to(tl.int64)
            kv_mask = j_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + block[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head * stride_kh
                        + d[None, :], mask=kv_mask, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            allowed = j_ok[None, :] & (j[None, :] <= position[:, None])
            scores = tl.where(allowed, scores, _NEG_BIG)
            new_max = tl.maximum(row_max, tl.max(scores, axis=1))
            p = tl.where(allowed, tl.exp2(scores - new_max[:, None]), 0.0)
            alpha = tl.exp2(row_max - new_max)
            row_sum = row_sum * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh
                        + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            row_max = new_max
        out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
        tl.store(o_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _next_power_of_2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_table: torch.Tensor, cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor,
                           softmax_scale: float, max_seqlen_q: int, block_m: int | None = None,
                           block_n: int = 64) -> torch.Tensor:
    """The Triton kernel (GPU, or CPU under TRITON_INTERPRET=1). `max_seqlen_q` bounds the queries of any request
    (it sizes the grid; a CUDA graph may pass a larger bound). `block_m` queries per tile: by default enough that
    a tile has >= 16 rows (decode) or ~64 rows (prefill)."""
    if triton is None:
        raise RuntimeError("paged_attention_triton needs Triton")
    tokens, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    if heads % kv_heads or v_cache.shape != k_cache.shape or k_cache.shape[3] != dim:
        raise ValueError(f"incompatible shapes: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    group = heads // kv_heads
    group_p = _next_power_of_2(group)
    if block_m is None:
        block_m = max(1, (16 if max_seqlen_q <= 1 else 64) // group_p)
    block_m = min(block_m, max(1, _next_power_of_2(max_seqlen_q)))
    block_m = max(block_m, max(1, 16 // group_p))  # tl.dot needs >= 16 rows
    out = torch.zeros_like(q)
    num_requests = cu_seqlens_q.numel() - 1
    if num_requests == 0 or tokens == 0:
        return out
    grid = (triton.cdiv(max(1, max_seqlen_q), block_m), num_requests, kv_heads)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, block_table, cu_seqlens_q, kv_lens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        block_table.stride(0), softmax_scale * math.log2(math.e), dim, k_cache.shape[1], group,
        BLOCK_M=block_m, GROUP_P=group_p, BLOCK_N=block_n, BLOCK_D=max(16, _next_power_of_2(dim)),
        PRECISION=precision)
    return out


def paged_attention_backend(device: torch.device) -> str:
    """Which implementation `paged_attention` runs on `device`: "triton" on CUDA, "torch" elsewhere."""
    return "triton" if device.type == "cuda" and triton is not None else "torch"


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, softmax_scale: float,
                    max_seqlen_q: int) -> torch.Tensor:
    """Causal paged attention (module docstring), with the implementation `paged_attention_backend` picks."""
    if paged_attention_backend(q.device) == "triton":
        return paged_attention_triton(q, k_cache, v_cache, block_table, cu_seqlens_q, kv_lens, softmax_scale,
                                      max_seqlen_q)
    return paged_attention_reference(q, k_cache, v_cache, block_table, cu_seqlens_q, kv_lens, softmax_scale)
