"""Hugging Face <-> Megatron weight conversion for Qwen2 / Llama / Qwen3, with tensor and pipeline sharding.

Megatron fuses and shards some projections differently from Hugging Face:

- `linear_qkv` stacks q, k and v per query group: for each of the G key/value groups, that group's H/G query
  heads, then its key head, then its value head. Tensor parallelism splits the groups, so each rank's shard is
  a contiguous run of whole groups.
- `linear_fc1` holds the SwiGLU gate and up projections; each TP rank's shard is [gate_r; up_r], so the
  unsharded layout is [gate_0; up_0; gate_1; up_1; ...] — it depends on TP.
- The embedding and (untied) LM head are padded with zero rows to the padded vocabulary and split by rows.
- Row-parallel projections (`linear_proj`, `linear_fc2`) are split along their input dimension.

Conversion goes through the *full* Megatron-layout tensor: import builds it from the HF tensors and keeps this
rank's chunk along the parameter's `partition_dim`; export all-gathers the chunks over TP and inverts. Pipeline
stages own disjoint layers, addressed by each layer's global `layer_number`. Data-parallel replicas hold the same
weights and need no communication.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist

from megatron_red.models.megatron.model import HFArchitecture, padded_vocab_size

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# Megatron per-layer parameter -> HF per-layer parameter, for the tensors that map one to one.
_LAYER_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",  # Transformer Engine spec
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",  # Transformer Engine spec
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    # Qwen3's per-head RMSNorm gains (head_dim wide): every TP rank holds the whole vector.
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _global_layer_numbers(model) -> dict[int, int]:
    """Local layer index -> 0-based global layer index (pipeline stages own consecutive layers)."""
    return {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}


def _qkv_full(arch: HFArchitecture, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    g, d = arch.num_query_groups, arch.head_dim
    per_group = arch.num_attention_heads // g
    rest = q.shape[1:]
    q = q.reshape(g, per_group * d, *rest)
    k = k.reshape(g, d, *rest)
    v = v.reshape(g, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _qkv_split(arch: HFArchitecture, full: torch.Tensor):
    g, d = arch.num_query_groups, arch.head_dim
    per_group = arch.num_attention_heads // g
    rest = full.shape[1:]
    grouped = full.reshape(g, (per_group + 2) * d, *rest)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _pad_vocab(weight: torch.Tensor, padded: int) -> torch.Tensor:
    out = weight.new_zeros(padded, weight.shape[1])
    out[: weight.shape[0]] = weight
    return out


def _full_from_hf(name: str, layer: int | None, hf: dict[str, torch.Tensor], arch: HFArchitecture,
                  tp: int) -> torch.Tensor:
    """The unsharded Megatron-layout tensor for Megatron parameter `name` (of global layer `layer`)."""
    vocab = padded_vocab_size(arch.vocab_size, tp)
    if layer is None:
        if name == "embedding.word_embeddings.weight":
            return _pad_vocab(hf["model.embed_tokens.weight"], vocab)
        if name == "output_layer.weight":
            head = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
            return _pad_vocab(hf[head], vocab)
        if name == "decoder.final_layernorm.weight":
            return hf["model.norm.weight"]
        raise KeyError(f"no Hugging Face tensor maps to Megatron parameter {name!r}")
    p = f"model.layers.{layer}."
    if name in _LAYER_DIRECT:
        return hf[p + _LAYER_DIRECT[name]]
    if name in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = name.rsplit(".", 1)[1]
        return _qkv_full(arch, *(hf[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv"))
    if name == "mlp.linear_fc1.weight":
        gates = hf[p + "mlp.gate_proj.weight"].chunk(tp, dim=0)
        ups = hf[p + "mlp.up_proj.weight"].chunk(tp, dim=0)
        return torch.cat([t for pair in zip(gates, ups) for t in pair], dim=0)
    raise KeyError(f"no Hugging Face tensor maps to Megatron parameter decoder.layers.*.{name}")


def _hf_from_full(name: str, layer: int | None, full: torch.Tensor, arch: HFArchitecture,
                  tp: int) -> dict[str, torch.Tensor]:
    """Inverse of `_full_from_hf`: the HF tensors held in the unsharded Megatron tensor `full`."""
    if layer is None:
        if name == "embedding.word_embeddings.weight":
            return {"model.embed_tokens.weight": full[: arch.vocab_size]}
        if name == "output_layer.weight":
            return {} if arch.tie_word_embeddings else {"lm_head.weight": full[: arch.vocab_size]}
        if name == "decoder.final_layernorm.weight":
            return {"model.norm.weight": full}
        raise KeyError(name)
    p = f"model.layers.{layer}."
    if name in _LAYER_DIRECT:
        return {p + _LAYER_DIRECT[name]: full}
    if name in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = name.rsplit(".", 1)[1]
        q, k, v = _qkv_split(arch, full)
        return {f"{p}self_attn.q_proj.{kind}": q, f"{p}self_attn.k_proj.{kind}": k,
                f"{p}self_attn.v_proj.{kind}": v}
    if name == "mlp.linear_fc1.weight":
        pairs = [chunk.chunk(2, dim=0) for chunk in full.chunk(tp, dim=0)]
        return {p + "mlp.gate_proj.weight": torch.cat([g for g, _ in pairs]),
                p + "mlp.up_proj.weight": torch.cat([u for _, u in pairs])}
    raise KeyError(name)


def _split_name(name: str, layer_map: dict[int, int]) -> tuple[str, int | None]:
    match = _LAYER.match(name)
    if match is None:
        return name, None
    return match.group(2), layer_map[int(match.group(1))]


@torch.no_grad()
def import_hf_state_dict(model: torch.nn.Module, hf_state_dict: dict[str, torch.Tensor], arch: HFArchitecture,
                         tp_group: dist.ProcessGroup | None) -> None:
    """Copy this rank's shard of every parameter of the (possibly wrapped) Megatron `model` from an HF state dict.

    Every rank passes the full HF state dict (or at least the tensors of its pipeline stage).
    """
    model = unwrap_model(model)
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    layer_map = _global_layer_numbers(model)
    for full_name, param in model.named_parameters():
        name, layer = _split_name(full_name, layer_map)
        full = _full_from_hf(name, layer, hf_state_dict, arch, tp)
        if getattr(param, "tensor_model_parallel", False):
            full = full.chunk(tp, dim=param.partition_dim)[tp_rank]
        if tuple(full.shape) != tuple(param.shape):
            raise ValueError(f"{full_name}: converted shape {tuple(full.shape)} != parameter {tuple(param.shape)}")
        param.copy_(full)


@torch.no_grad()
def export_hf_state_dict(model: torch.nn.Module, arch: HFArchitecture, tp_group: dist.ProcessGroup | None,
                         pp_group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
    """The full HF state dict (CPU tensors), returned on every rank of the TP x PP grid.

    TP shards are all-gathered; pipeline stages exchange their converted tensors as CPU objects.
    """
    model = unwrap_model(model)
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    layer_map = _global_layer_numbers(model)
    out: dict[str, torch.Tensor] = {}
    for full_name, param in model.named_parameters():
        name, layer = _split_name(full_name, layer_map)
        if name == "output_layer.weight" and arch.tie_word_embeddings:
            continue  # the last stage's copy of the tied embedding
        tensor = param.detach()
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(tensor) for _ in range(tp)]
            dist.all_gather(parts, tensor.contiguous(), group=tp_group)
            tensor = torch.cat(parts, dim=param.partition_dim)
        out.update({k: v.cpu().clone() for k, v in _hf_from_full(name, layer, tensor, arch, tp).items()})
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        stages: list[dict | None] = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(stages, out, group=pp_group)
        out = {k: v for stage in stages for k, v in stage.items()}
    return out
