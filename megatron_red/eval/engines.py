"""Construction of the rollout engine used for evaluation, by kind ("local" now; vLLM and Megatron to come)."""
from __future__ import annotations

import importlib.util

from megatron_red.rollout.base import RolloutEngine

ENGINE_KINDS: tuple[str, ...] = ("local", "vllm", "megatron")


def build_engine(kind: str, model, tokenizer, **kwargs) -> RolloutEngine:
    """A RolloutEngine of `kind` over `model` (a loaded HF causal LM for "local"); kwargs go to the engine."""
    if kind not in ENGINE_KINDS:
        raise ValueError(f"unknown engine {kind!r}; known: {ENGINE_KINDS}")
    if kind == "local":
        try:
            from megatron_red.rollout.local import LocalEngine
        except ImportError as e:
            raise ImportError(f"the local engine (megatron_red.rollout.local) is not available: {e}") from e
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return LocalEngine(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, **kwargs)
    if kind == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ImportError("engine 'vllm' needs vLLM: pip install 'megatron_red[vllm]' (GPU only)")
    raise NotImplementedError(f"engine {kind!r} is not wired into evaluation yet; use --engine local")
