"""The LM head's log-probs and entropies over a TP-sharded vocabulary: from logits (`vocab_parallel_logprobs_entropy`,
torch) or fused with the LM-head matmul (`fused_linear_logprobs_entropy`, Triton, with a torch fallback); and the
paged attention megatron's inference engine runs without flash-attn (paged_attention.py)."""
from megatron_red.kernels.fused_linear_logprobs import (
    FUSED_KERNEL_MODES,
    FusedKernelConfig,
    fused_kernel_enabled,
    fused_linear_logprobs_entropy,
    reference_linear_logprobs_entropy,
)
from megatron_red.kernels.vocab_parallel import vocab_parallel_logprobs_entropy

__all__ = [
    "FUSED_KERNEL_MODES",
    "FusedKernelConfig",
    "fused_kernel_enabled",
    "fused_linear_logprobs_entropy",
    "reference_linear_logprobs_entropy",
    "vocab_parallel_logprobs_entropy",
]
