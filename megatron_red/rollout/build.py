"""The one constructor of rollout engines, used by the trainer and by `megatron-red eval`."""
from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from megatron_red.rollout.base import RolloutEngine

if TYPE_CHECKING:
    from megatron_red.config import RolloutConfig

ENGINE_KINDS: tuple[str, ...] = ("local", "megatron", "vllm")


def build_engine(kind: str, policy, tokenizer, rollout: "RolloutConfig | None" = None, *,
                 max_sequence_length: int | None = None) -> RolloutEngine:
    """The rollout engine `kind` sampling from `policy`.

    kind:                "local" (torch decode loop over a Hugging Face module; CPU or one GPU) or "megatron"
                         (megatron-core's dynamic engine on the policy's own TP x PP shards); "vllm" is not wired.
    policy:              local: an `HFPolicy` or a Hugging Face causal-LM module. megatron: a `MegatronPolicy` or
                         a `ShardedModel` (anything with `.model`, `.arch` and `.mp_group`). A policy backend gets
                         the engine attached as `policy.rollout_engine`, which its actor hooks (`infer`, ...) use.
    tokenizer:           gives the EOS id (and the pad id the local engine emits after it).
    rollout:             a `RolloutConfig` (batch size, CUDA graphs, KV-cache options); None = its defaults.
    max_sequence_length: megatron: longest prompt + response (None = `rollout.max_sequence_length`, else the
                         model's `max_position_embeddings`).
    """
    if kind not in ENGINE_KINDS:
        raise ValueError(f"unknown engine {kind!r}; known: {ENGINE_KINDS}")
    if kind == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ImportError("engine 'vllm' needs vLLM: pip install 'megatron_red[vllm]' (GPU only)")
        raise NotImplementedError("engine 'vllm' is not wired yet; use local or megatron")
    if rollout is None:
        from megatron_red.config import RolloutConfig

        rollout = RolloutConfig()
    if kind == "local":
        engine = _local_engine(policy, tokenizer, rollout)
    else:
        engine = _megatron_engine(policy, tokenizer, rollout, max_sequence_length)
    from megatron_red.models.base import PolicyBackend

    if isinstance(policy, PolicyBackend):
        policy.rollout_engine = engine
    return engine


def _local_engine(policy, tokenizer, rollout) -> RolloutEngine:
    import torch

    from megatron_red.rollout.local import LocalEngine

    model = policy if isinstance(policy, torch.nn.Module) else getattr(policy, "model", None)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_decoder"):
        raise ValueError("the local engine samples from a Hugging Face causal LM (an HFPolicy or its module); "
                         "the Megatron backend uses rollout.engine=megatron")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return LocalEngine(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                       max_batch_size=rollout.max_batch_size, device=device,
                       cuda_graph=rollout.cuda_graph and device.type == "cuda")


def _megatron_engine(policy, tokenizer, rollout, max_sequence_length: int | None) -> RolloutEngine:
    from megatron_red.rollout.megatron import MegatronEngine

    if not all(hasattr(policy, a) for a in ("model", "arch", "mp_group")):
        raise ValueError("the megatron engine samples from a MegatronPolicy or a ShardedModel "
                         "(models/megatron/policy.py)")
    length = max_sequence_length or rollout.max_sequence_length or policy.arch.max_position_embeddings
    return MegatronEngine(
        policy.model, valid_vocab_size=policy.arch.vocab_size, eos_token_id=tokenizer.eos_token_id,
        max_requests=rollout.max_batch_size, max_sequence_length=length, block_size_tokens=rollout.kv_block_size,
        kv_buffer_gb=rollout.kv_buffer_gb, prefix_caching=rollout.prefix_caching,
        cuda_graph=rollout.cuda_graph and next(policy.model.parameters()).is_cuda, release_kv_cache=rollout.release_kv_cache, mp_group=policy.mp_group)
