"""Fused GPU kernels: the vocabulary-parallel LM head + token log-prob + entropy (Triton, with a torch fallback)."""
from megatron_red.kernels.fused_linear_logprobs import (
    FusedKernelConfig,
    fused_kernel_available,
    fused_linear_logprobs_entropy,
    reference_linear_logprobs_entropy,
)

__all__ = [
    "FusedKernelConfig",
    "fused_kernel_available",
    "fused_linear_logprobs_entropy",
    "reference_linear_logprobs_entropy",
]
