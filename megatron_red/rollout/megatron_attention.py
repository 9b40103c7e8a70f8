"""The paged attention megatron-core's dynamic inference engine calls: flash-attn when it is installed, else ours.

megatron-core's `Attention` (megatron/core/transformer/attention.py) runs dynamic batching through two flash-attn
functions it imports at module level, `flash_attn_varlen_func(..., block_table=)` for prefill / mixed steps and
`flash_attn_with_kvcache(..., block_table=)` for decode-only steps, and asserts flash-attn >= 2.7.3 (or FA3 / FA4)
in every forward. There is no hook to pass another implementation, so when no usable flash-attn is installed,
`select_inference_attention` puts this module's two functions (same signatures, `megatron_red.kernels.
paged_attention` underneath: Triton on GPU, torch on CPU) into that module's namespace, answers its version check
for them, and, without einops, gives it the one `rearrange` pattern it uses (megatron_red/megatron_internals.py
does the replacing, against the megatron-core version it was written for). This is the only place where the
package changes another library's module; it runs once, only when flash-attn is absent, and says which attention
runs in one line.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_red.kernels.paged_attention import paged_attention, paged_attention_backend
from megatron_red.megatron_internals import flash_attn_usable, replace_flash_attn

FLASH_ATTN_MIN_VERSION = "2.7.3"
_selected: str | None = None


def _check_supported(what: str, causal: bool, window_size, block_table, wants_lse: bool) -> None:
    if not causal or block_table is None or wants_lse or tuple(window_size or (-1, -1)) != (-1, -1):
        raise NotImplementedError(
            f"megatron_red's paged attention ({what}) supports causal full attention over a block table without "
            f"log-sum-exp outputs; got causal={causal}, window_size={window_size}, "
            f"block_table={'set' if block_table is not None else None}, lse={wants_lse} (install flash-attn)")


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                           causal=False, window_size=(-1, -1), block_table=None, return_attn_probs=False, **_):
    """flash-attn's varlen entry point with a block table: q [T, H, d] packed, k / v the paged caches
    [blocks, block_size, Hkv, d], kv lengths from `cu_seqlens_k`."""
    _check_supported("varlen", causal, window_size, block_table, return_attn_probs)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    kv_lens = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    return paged_attention(q, k, v, block_table, cu_seqlens_q, kv_lens, scale, int(max_seqlen_q))


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), block_table=None, return_softmax_lse=False, **_):
    """flash-attn's decode entry point with a block table: q [B, S, H, d] (the cache already holds the S new
    tokens, `cache_seqlens` counts them), returns [B, S, H, d]."""
    _check_supported("kvcache", causal, window_size, block_table, return_softmax_lse)
    if k is not None or v is not None:
        raise NotImplementedError("megatron_red's paged attention does not append k / v itself")
    batch, steps, heads, dim = q.shape
    scale = softmax_scale if softmax_scale is not None else dim ** -0.5
    cu_seqlens_q = torch.arange(batch + 1, device=q.device, dtype=torch.int32) * steps
    out = paged_attention(q.reshape(batch * steps, heads, dim), k_cache, v_cache, block_table, cu_seqlens_q,
                          cache_seqlens, scale, steps)
    return out.reshape(batch, steps, heads, dim)


def _merge_heads(tensor: torch.Tensor, pattern: str) -> torch.Tensor:
    """einops' `rearrange` for the single pattern megatron's dynamic attention uses."""
    if pattern.replace(" ", "") != "sbhd->sb(hd)":
        raise NotImplementedError(f"rearrange pattern {pattern!r} (install einops)")
    return tensor.reshape(tensor.shape[0], tensor.shape[1], -1)


def _stand_in_meets_version(version: str, check_equality: bool = True) -> bool:
    """The version check megatron runs before dynamic attention, answered for the stand-in above: it implements
    the block-table interface of flash-attn 2.7.3, the newest version megatron asks for."""
    from packaging.version import Version

    stand_in, asked = Version(FLASH_ATTN_MIN_VERSION), Version(version)
    return stand_in >= asked if check_equality else stand_in > asked


def select_inference_attention(device: torch.device) -> str:
    """Make megatron-core's dynamic attention runnable here and return what runs ("flash-attn", or
    "megatron_red paged attention (triton | torch)"). Idempotent; logs once on global rank 0."""
    global _selected
    if _selected is not None:
        return _selected
    if flash_attn_usable(FLASH_ATTN_MIN_VERSION):
        _selected = "flash-attn"
    else:
        replace_flash_attn(flash_attn_varlen_func, flash_attn_with_kvcache, _stand_in_meets_version, _merge_heads)
        _selected = f"megatron_red paged attention ({paged_attention_backend(device)})"
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[rollout] megatron inference attention: {_selected}", flush=True)
    return _selected
