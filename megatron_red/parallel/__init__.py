"""Parallel building blocks over explicit process groups: vocabulary-parallel log-probs and entropy."""
from megatron_red.parallel.vocab_parallel import vocab_parallel_logprobs_entropy

__all__ = ["vocab_parallel_logprobs_entropy"]
