"""The rollout-engine interface: sample responses from the current policy, with behaviour log-probs."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass
class SamplingParams:
    """How responses are sampled (paper: temperature 1.0, top-p 1.0 for training rollouts)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None


@dataclass
class Completion:
    """One sampled response.

    token_ids:  generated tokens, EOS included when the model stopped on it.
    logprobs:   behaviour log-probs of `token_ids` under the sampling distribution (temperature / top-p applied
                as in sampling), same length.
    finished:   True when generation stopped on EOS, False when cut at max_new_tokens.
    """

    token_ids: list[int]
    logprobs: list[float]
    finished: bool


class RolloutEngine(ABC):
    """Generates `n` completions for each prompt (lists of token ids)."""

    @abstractmethod
    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        """Returns, for each prompt, its `n` completions."""

    def sync_weights(self, policy) -> None:
        """Make the engine sample from `policy`'s current weights (no-op for engines that share the module)."""
