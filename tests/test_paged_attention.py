"""Paged attention (megatron_red/kernels/paged_attention.py) against unpaged float64 attention, and the flash-attn
entry points megatron's dynamic engine calls (megatron_red/rollout/megatron_attention.py).

Each case scatters every request's keys / values over shuffled blocks of the cache and checks the output against
causal attention computed in float64 from the contiguous tensors: ragged query and key lengths (a full prefill, a
decode step, a resumed prefill whose queries are the tail of a longer sequence, a request with no queries),
sequences that end inside and exactly at block boundaries, grouped-query ratios 1, 3 and 4, a head width that is
not a power of two, and padding rows after the last query (must be zero). The Triton kernel runs under
TRITON_INTERPRET=1 in a subprocess (the variable must be set before Triton kernels are defined); the torch path and
the flash-attn signatures run here.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

# name, heads, kv_heads, head_dim, block_size, [(q_len, kv_len), ...], padding rows
CASES = [
    ("gqa3_block4", 6, 2, 16, 4, [(9, 9), (1, 1), (3, 13), (1, 5), (0, 8), (4, 4)], 3),
    ("mha_block16_dim24", 2, 2, 24, 16, [(16, 16), (1, 33), (17, 17), (5, 32)], 0),
    ("gqa4_block8", 8, 2, 32, 8, [(1, 7), (1, 8), (1, 9), (1, 24)], 2),
]
TOLERANCE = 1e-6


def build_case(heads, kv_heads, dim, block_size, lengths, padding, seed=0):
    """Random q / contiguous k, v per request and the same k, v scattered into a shuffled paged cache."""
    g = torch.Generator().manual_seed(seed)
    blocks_per = [math.ceil(kv / block_size) for _, kv in lengths]
    num_blocks = sum(blocks_per) + 3
    order = torch.randperm(num_blocks, generator=g)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g)  # unused slots hold garbage
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g)
    block_table = torch.full((len(lengths), max(blocks_per) + 2), -1, dtype=torch.int32)
    keys, values, used = [], [], 0
    for b, ((_, kv), nb) in enumerate(zip(lengths, blocks_per)):
        ids = order[used:used + nb]
        used += nb
        block_table[b, :nb] = ids.int()
        k = torch.randn(kv, kv_heads, dim, generator=g)
        v = torch.randn(kv, kv_heads, dim, generator=g)
        for j in range(kv):
            k_cache[ids[j // block_size], j % block_size] = k[j]
            v_cache[ids[j // block_size], j % block_size] = v[j]
        keys.append(k)
        values.append(v)
    q_lens = torch.tensor([q for q, _ in lengths])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)]).int()
    q = torch.randn(int(cu[-1]) + padding, heads, dim, generator=g)
    kv_lens = torch.tensor([kv for _, kv in lengths], dtype=torch.int32)
    return q, k_cache, v_cache, block_table, cu, kv_lens, keys, values


def unpaged_reference(q, cu, keys, values, scale):
    """float64 causal attention from contiguous keys; query i of a request sits at position kv - q_len + i."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    heads = q.shape[1]
    for b, (k, v) in enumerate(zip(keys, values)):
        lo, hi = int(cu[b]), int(cu[b + 1])
        if hi == lo:
            continue
        group = heads // k.shape[1]
        k64 = k.double().repeat_interleave(group, dim=1)
        v64 = v.double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[lo:hi].double(), k64) * scale
        pos = torch.arange(k.shape[0] - (hi - lo), k.shape[0])
        scores = scores.masked_fill(torch.arange(k.shape[0])[None, None] > pos[None, :, None], float("-inf"))
        out[lo:hi] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v64)
    return out


def case_errors(fn) -> dict[str, float]:
    """Max |fn - reference| per case; `fn(q, k_cache, v_cache, block_table, cu, kv_lens, scale, max_q)`."""
    errors = {}
    for name, heads, kv_heads, dim, block_size, lengths, padding in CASES:
        q, kc, vc, bt, cu, kv_lens, keys, values = build_case(heads, kv_heads, dim, block_size, lengths, padding)
        scale = 0.7 / math.sqrt(dim)
        out = fn(q, kc, vc, bt, cu, kv_lens, scale, max(q for q, _ in lengths))
        ref = unpaged_reference(q, cu, keys, values, scale)
        errors[name] = float((out.double() - ref).abs().max())
        errors[name + "_padding_rows"] = float(out[int(cu[-1]):].abs().max()) if padding else 0.0
    return errors


def test_torch_paged_attention_matches_unpaged():
    from megatron_red.kernels.paged_attention import paged_attention_reference

    errors = case_errors(lambda q, kc, vc, bt, cu, kv, s, _: paged_attention_reference(q, kc, vc, bt, cu, kv, s))
    assert max(errors.values()) <= TOLERANCE, errors


def test_flash_attn_entry_points_match_unpaged():
    """megatron's two call shapes: varlen (kv lengths as cu_seqlens_k) and decode ([B, S, H, d] queries)."""
    from megatron_red.rollout.megatron_attention import flash_attn_varlen_func, flash_attn_with_kvcache

    def varlen(q, kc, vc, bt, cu, kv, scale, max_q):
        cu_k = torch.cat([torch.zeros(1, dtype=torch.int32), kv.cumsum(0).int()])
        return flash_attn_varlen_func(q, kc, vc, cu, cu_k, max_q, int(kv.max()), softmax_scale=scale, causal=True,
                                      block_table=bt)

    assert max(case_errors(varlen).values()) <= TOLERANCE
    name, heads, kv_heads, dim, block_size, lengths, _ = CASES[2]  # decode only: one query per request
    q, kc, vc, bt, cu, kv_lens, keys, values = build_case(heads, kv_heads, dim, block_size, lengths, 0)
    out = flash_attn_with_kvcache(q[:, None], kc, vc, cache_seqlens=kv_lens, softmax_scale=0.3, causal=True,
                                  block_table=bt, num_splits=0)
    ref = unpaged_reference(q, cu, keys, values, 0.3)
    assert out.shape == (len(lengths), 1, heads, dim)
    assert float((out[:, 0].double() - ref).abs().max()) <= TOLERANCE
    with pytest.raises(NotImplementedError, match="window_size"):
        flash_attn_with_kvcache(q[:, None], kc, vc, cache_seqlens=kv_lens, causal=True, block_table=bt,
                                window_size=(4, 0))


def _interpreter_errors() -> dict[str, float]:
    from megatron_red.kernels.paged_attention import paged_attention_triton

    return case_errors(paged_attention_triton)


def test_triton_paged_attention_matches_unpaged_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "import json, test_paged_attention as t; print('ERRORS', json.dumps(t._interpreter_errors()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.split("ERRORS", 1)[1])
    assert set(errors) == {n for c in CASES for n in (c[0], c[0] + "_padding_rows")}
    assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_triton_paged_attention_on_cuda(dtype, tolerance):
    """The compiled kernel (not the interpreter): fp32 with IEEE products, bf16 inputs as the engine runs them."""
    from megatron_red.kernels.paged_attention import paged_attention_triton

    def on_cuda(q, kc, vc, bt, cu, kv, scale, max_q):
        args = [t.cuda() for t in (q.to(dtype), kc.to(dtype), vc.to(dtype), bt, cu, kv)]
        return paged_attention_triton(*args, scale, max_q).float().cpu()

    errors = case_errors(on_cuda)
    assert max(errors.values()) <= tolerance, errors
