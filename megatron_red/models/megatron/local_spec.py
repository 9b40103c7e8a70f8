"""The layer spec used without Transformer Engine: megatron-core's local spec with our core attention and norm.

`SDPACoreAttention` replaces megatron's unfused `DotProductAttention` (baddbmm into a [b*heads, sq, sk] score
tensor, softmax, bmm; K/V repeated for grouped-query attention) with torch's `scaled_dot_product_attention`,
which on a GPU runs the flash / memory-efficient kernels: no score tensor is stored, and grouped-query attention
runs without repeating K/V (`enable_gqa`, flash kernel) whenever no explicit mask is needed. It also takes packed
sequences (THD layout, `PackedSeqParams.cu_seqlens_q`), which `DotProductAttention` rejects; attention never
crosses a sequence boundary there. The varlen implementation:
  - CUDA, 16-bit: `torch.nn.attention.varlen.varlen_attn` (one flash-attention varlen call over the whole pack,
    grouped-query native) when this torch has it;
  - otherwise: one SDPA call per sequence of the pack. Memory is that of the longest sequence (flash on GPU), the
    cost a Python loop over the pack's sequences per layer.
flex_attention with a document mask was not chosen: it needs torch.compile to be memory-efficient, and compiled
per pack shape it would recompile for every new set of lengths.

`RMSNorm` is `torch.nn.RMSNorm`'s computation (`F.rms_norm`) as a megatron layer-norm module: unlike megatron's
`WrappedTorchNorm` it allows sequence parallelism (its weight is marked `sequence_parallel`, so megatron sums its
gradient over the tensor-parallel group).
"""
from __future__ import annotations

import dataclasses
import inspect
import math

import torch
import torch.nn.functional as F

try:  # recent torch; earlier versions of varlen_attn lack grouped-query attention and windows: not used then
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    if not {"enable_gqa", "window_size", "scale"} <= set(inspect.signature(_varlen_attn).parameters):
        _varlen_attn = None
except ImportError:
    _varlen_attn = None


def local_layer_spec(spec, attention: str):
    """Megatron's local layer `spec` (from `get_gpt_layer_local_spec`) with `RMSNorm` for every torch norm and
    the core attention of `attention` (`sdpa` or `local`). Returns a new spec; `spec` is not modified."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if attention not in ("sdpa", "local"):
        raise ValueError(f"local layer spec attention must be sdpa or local, got {attention!r}")

    def norms_replaced(submodules, **changes):
        fields = {f.name: getattr(submodules, f.name) for f in dataclasses.fields(submodules)}
        changes.update({name: RMSNorm for name, value in fields.items() if value is WrappedTorchNorm})
        return dataclasses.replace(submodules, **changes)

    attention_spec = spec.submodules.self_attention
    core = SDPACoreAttention if attention == "sdpa" else DotProductAttention
    attention_spec = dataclasses.replace(
        attention_spec, submodules=norms_replaced(attention_spec.submodules, core_attention=core))
    return dataclasses.replace(spec, submodules=norms_replaced(spec.submodules, self_attention=attention_spec))


def local_block_spec(layer_spec, config):
    """The transformer block of this pipeline stage: `layer_spec` for each of its layers and `RMSNorm` as the final
    norm (megatron's default final norm without apex, `WrappedTorchNorm`, refuses sequence parallelism)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    return TransformerBlockSubmodules(layer_specs=[layer_spec] * get_num_layers_to_build(config),
                                      layer_norm=RMSNorm)


class RMSNorm(torch.nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, as `torch.nn.RMSNorm`, built the way megatron builds its norms."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"RMSNorm built for normalization={config.normalization!r}")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        # With sequence parallelism each TP rank sees a slice of the sequence: the weight gradient is a partial sum.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SDPACoreAttention(torch.nn.Module):
    """Core attention for megatron-core's `SelfAttention`, on `scaled_dot_product_attention`.

    Built with `DotProductAttention`'s arguments and called like it: query [sq, b, heads, d], key / value
    [sk, b, kv_heads, d] (heads of this tensor-parallel rank), or in THD layout [t, heads, d] with
    `packed_seq_params`; returns [sq, b, heads * d] ([t, heads * d] packed).
    Masks follow `DotProductAttention`: an `attention_mask` (bool, True = masked, broadcastable to
    [b, 1, sq, sk]) is the whole mask; without one, `attn_mask_type` causal aligns the last query with the last key
    (so decoding with sq = 1 sees every cached key; SDPA's own `is_causal` aligns top-left, which is only right for
    sq = sk). A query that every key masks attends uniformly to all keys, as megatron's finite mask fill gives.
    Of the constructor's arguments only the config and the mask type matter: the heads come from the tensors.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__()
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"SDPACoreAttention has no attention dropout (policy ratios compare deterministic "
                             f"forwards), got {dropout}")
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        if config.window_size is not None or config.softmax_type != "vanilla":
            raise ValueError("SDPACoreAttention supports full attention with a plain softmax only")
        self.attn_mask_type = attn_mask_type
        # megatron's query-key layer scaling divides the scale by the layer number and multiplies the softmax input
        # by it again: the product is the plain 1 / sqrt(d).
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        from megatron.core.transformer.enums import AttnMaskType

        if attention_bias is not None:
            raise ValueError("SDPACoreAttention does not take an attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(f"packed sequences must be in THD layout, got {packed_seq_params.qkv_format!r}")
            if attention_mask is not None:
                raise ValueError("packed sequences take no attention_mask: cu_seqlens bound the attention")
            out = varlen_attention(query, key, value, packed_seq_params.cu_seqlens_q,
                                   packed_seq_params.max_seqlen_q, self.scale, causal)
            return out.reshape(out.shape[0], -1)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = dense_attention(q, k, v, attention_mask, self.scale, causal)
        sq, b = query.shape[:2]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


def _repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, kv_heads, s, d] -> [b, kv_heads * groups, s, d], each key/value head serving `groups` query heads."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def dense_attention(q, k, v, attention_mask, scale: float, causal: bool) -> torch.Tensor:
    """q [b, h, sq, d], k / v [b, kv_heads, sk, d] -> [b, h, sq, d]; masks as in `SDPACoreAttention`."""
    sq, sk = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    if attention_mask is None and (not causal or sq == 1 or sq == sk):
        # No explicit mask: the flash kernel takes grouped-query attention as is.
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and sq > 1, scale=scale,
                                              enable_gqa=groups > 1)
    if attention_mask is not None:
        allowed = ~attention_mask.to(torch.bool)
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)  # fully masked queries: uniform, as megatron
    else:  # causal with 1 < sq < sk: the queries are the last sq positions (bottom-right alignment)
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
    # An explicit mask rules out the flash kernel; the memory-efficient one needs as many K/V heads as query heads.
    return F.scaled_dot_product_attention(q, _repeat_kv(k, groups), _repeat_kv(v, groups), attn_mask=allowed,
                                          scale=scale)


def varlen_attention(query, key, value, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float,
                     causal: bool) -> torch.Tensor:
    """Attention within each packed sequence: query [t, h, d], key / value [t, kv_heads, d], sequence i holding
    rows cu_seqlens[i]:cu_seqlens[i+1] -> [t, h, d]. See the module docstring for the two implementations."""
    groups = query.shape[1] // key.shape[1]
    if _varlen_attn is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        cu = cu_seqlens.to(device=query.device, dtype=torch.int32)
        query, key, value = (t.contiguous() for t in (query, key, value))
        return _varlen_attn(query, key, value, cu, cu, max_seqlen, max_seqlen, scale=scale,
                            window_size=(-1, 0) if causal else (-1, -1), enable_gqa=groups > 1)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    # [t, h, d] -> [1, h, t, d]; each sequence is a slice along t
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    outs = [F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=groups > 1)
            for qs, ks, vs in zip(q.split(lengths, dim=2), k.split(lengths, dim=2), v.split(lengths, dim=2))]
    return torch.cat(outs, dim=2).squeeze(0).transpose(0, 1)
