"""The rollout-engine interface: sample responses from the current policy, with behaviour log-probs."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

ENGINE_KINDS: tuple[str, ...] = ("local", "megatron", "vllm")
"""The engines of this package: `local` (local.py), `megatron` (megatron.py) and `vllm` (vllm_engine.py);
`rollout.engine` names one."""


@dataclass
class SamplingParams:
    """How responses are sampled (paper: temperature 1.0, top-p 1.0 for training rollouts).

    temperature:     logits are divided by it (> 0; greedy decoding is top_k=1).
    top_p:           nucleus threshold in (0, 1]; 1 = off.
    max_new_tokens:  generation budget per response.
    seed:            seeds the call's uniforms (see rollout/sampling.py); None = a fresh random seed.
    prompt_seeds:    one seed per prompt instead (`seed` is then unused): prompt i's n rows draw their uniforms
                     from its own seed, so its samples do not depend on the other prompts of the call (held-out
                     evaluation split over data-parallel replicas samples what one replica would).
    top_k:           sample among the k most probable tokens; 0 = off (applied before top_p).
    stop_token_ids:  generation also stops after any of these tokens (included in the response), besides EOS.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    prompt_seeds: tuple[int, ...] | None = None


@dataclass
class Completion:
    """One sampled response.

    token_ids:  generated tokens, EOS included when the model stopped on it.
    logprobs:   behaviour log-probs of `token_ids` under the sampling distribution (temperature / top-k / top-p
                applied as in sampling), same length.
    finished:   True when generation stopped on EOS or a stop token, False when cut at max_new_tokens.
    entropies:  at each position of `token_ids`, the full-vocabulary entropy of pi at the sampling temperature
                (before top-k / top-p) that the token was drawn from: H_rl of Eq. 9-11 comes from these.
    routed_experts: a mixture of experts: the experts each MoE layer (of this rank's pipeline stage) chose at every
                position the engine ran, [prompt + response - 1 positions, layers, k] int16 (prompt and response,
                the last token aside: it is sampled, never run); None for a dense model or when the engine lost
                them (the trainer routes such a row itself). The trainer replays them (`model.moe_routing_replay`).
    """

    token_ids: list[int]
    logprobs: list[float]
    finished: bool
    entropies: list[float]
    routed_experts: torch.Tensor | None = None


class RolloutEngine(ABC):
    """Generates `n` completions for each prompt (lists of token ids)."""

    @abstractmethod
    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        """Returns, for each prompt, its `n` completions."""

    def sync_weights(self, policy) -> None:
        """Make the engine sample from `policy`'s current weights (no-op for engines that share the module)."""

    def suspend(self) -> None:
        """Release generation-only memory (KV cache, graphs) until the next `generate`; no-op by default."""
