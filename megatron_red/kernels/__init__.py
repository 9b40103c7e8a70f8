"""Fused GPU kernels: the vocabulary-parallel LM head + token log-prob + entropy (Triton, with a torch fallback)."""
from megatron_red.kernels.fused_linear_logprobs import (
    FusedKernelConfig,
    FUSED_KERNEL_MODES,
    fused_kernel_enabled,
    fused_linear_logprobs_entropy,
    reference_linear_logprobs_entropy,
)

__all__ = [
    "FusedKernelConfig",
    "FUSED_KERNEL_MODES",
    "fused_kernel_enabled",
    "fused_linear_logprobs_entropy",
    "reference_linear_logprobs_entropy",
]
