"""`ParallelLayout`: the parallel layout and numerics of a Megatron run with every `auto` resolved: what `train`
builds (policy.py) and what `plan` counts (memory.py), both from `trainer.build.parallel_layout`.

The names the layout's fields take (attention implementations, selective-recompute modules) and the rule that the
layout fits a model (`check_divides`) are defined here once: the run config's validation, the resolution and the
model builder use them.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_red.errors import ConfigError

ATTENTIONS = ("te", "sdpa", "local")
"""Core attention implementations (`model.attention` takes these or `auto`): Transformer Engine's layer spec (fused
attention, TE's linear layers and norms, fused RoPE), torch SDPA in megatron's local spec (local_spec.py), megatron's
unfused DotProductAttention."""
AUTO_ATTENTION = "sdpa"
"""What `model.attention=auto` runs: only a path that has run end to end. Transformer Engine's spec (with its
packing, sequence parallelism, checkpoint extra state and fused Adam) has not run anywhere yet: `auto` moves to `te`
once tools/gpu_checks.sh's `te_red` step (a short RED run with packing, a save and a resume) has passed on a GPU and
docs/benchmarks.md records it. `model.attention=te` chooses it explicitly."""
SELECTIVE_RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")
"""Submodules megatron's selective recompute can recompute (`model.recompute_modules`); `mlp` recomputes dense MLPs
only (megatron leaves a mixture-of-experts layer out of it)."""
MOE_ROUTER_DTYPES = ("fp32", "fp64", "model")
"""The dtype of the router's logits, softmax and top-k (`model.moe_router_dtype`); `model` = the model's dtype."""


@dataclass
class ParallelLayout:
    """A Megatron run's layout, resolved (no `auto`)."""

    tensor_model_parallel_size: int = 1
    """TP: splits heads, key/value groups, MLP width and vocabulary; must divide the heads and groups."""
    pipeline_model_parallel_size: int = 1
    """PP: stages of consecutive layers; must divide the layers."""
    data_parallel_size: int = 1
    """DP = world size / (TP x PP): replicas of the model. megatron-core takes it from the world; the memory plan
    divides the distributed optimizer's state by it."""
    dtype: str = "bfloat16"
    """Parameter and compute dtype, `bfloat16` (fp32 master weights in the optimizer, fp32 gradient reduction) or
    `float32`."""
    use_distributed_optimizer: bool = True
    """Optimizer state sharded over the DP replicas (megatron-core's DistributedOptimizer)."""
    sequence_parallel: bool = False
    """Norm / residual activations split along the sequence over the TP ranks (TP > 1)."""
    attention: str = "sdpa"
    """One of `ATTENTIONS`."""
    rope_fusion: bool | None = None
    """RoPE through Transformer Engine's fused kernels (megatron's `apply_rope_fusion`): with `te`, the only spec
    with TE installed; None = that rule. Unfused, megatron's RoPE over packed micro-batches reads the sequence
    boundaries on the host (`.tolist()` / `.item()` on cu_seqlens: about four device syncs per layer and
    micro-batch on a GPU; tools/gpu_checks.sh's `packed_rope` step counts them)."""
    recompute: str = "none"
    """Activation recompute in backward: `none`, `full` (every layer) or `selective` (`recompute_modules`)."""
    recompute_modules: tuple[str, ...] = ()
    """Selective recompute's submodules (of `SELECTIVE_RECOMPUTE_MODULES`); empty unless `recompute=selective`."""
    fused_kernel: bool = False
    """LM head + log-prob + entropy through the fused kernel (megatron_red.kernels), else logits + vocab-parallel
    log-softmax."""
    moe: bool = False
    """The model is a mixture of experts: the fields below apply (they keep their defaults otherwise)."""
    expert_model_parallel_size: int = 1
    """EP: each MoE layer's experts are split over EP data-parallel ranks (megatron-core's all-to-all token
    dispatcher sends every token to the ranks of its experts: its all-gather dispatcher needs as many tokens on
    every rank, which replicas with their own rows do not have, and its `flex` one GPU-only DeepEP / HybridEP
    kernels); expert tensor parallelism follows TP. Must divide the experts and DP."""
    moe_router_dtype: str = "fp32"
    """One of `MOE_ROUTER_DTYPES`."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the load-balancing loss (Switch Transformer's E * sum_i f_i P_i per layer) in the update."""
    moe_capacity_factor: float | None = None
    """None = dropless (every token reaches its top-k experts); c caps each expert at c x (tokens x k / experts)
    tokens per micro-batch and drops the lowest-probability assignments beyond that."""

    def __post_init__(self):
        if self.rope_fusion is None:
            self.rope_fusion = self.attention == "te"
        if (self.recompute == "selective") != bool(self.recompute_modules):
            raise ValueError(f"recompute_modules {self.recompute_modules} go with recompute='selective' (and only "
                             f"then), got recompute={self.recompute!r}")

    def describe(self) -> str:
        """One line: what `megatron-red plan` prints and `train` logs."""
        recompute = self.recompute + (f" {list(self.recompute_modules)}" if self.recompute == "selective" else "")
        line = (f"TP {self.tensor_model_parallel_size} x PP {self.pipeline_model_parallel_size} x "
                f"DP {self.data_parallel_size}, {self.dtype}, distributed optimizer {self.use_distributed_optimizer}, "
                f"sequence parallel {self.sequence_parallel}, recompute {recompute}, attention {self.attention}, "
                f"RoPE fusion {self.rope_fusion}, fused LM-head kernel {self.fused_kernel}")
        if self.moe:
            capacity = "dropless" if self.moe_capacity_factor is None else f"capacity {self.moe_capacity_factor:g}"
            line += (f"; experts: EP {self.expert_model_parallel_size}, {self.moe_router_dtype} router, "
                     f"aux loss {self.moe_aux_loss_coeff:g}, {capacity}")
        return line


def check_divides(tensor_model_parallel_size: int, pipeline_model_parallel_size: int, num_attention_heads: int,
                  num_query_groups: int, num_layers: int, expert_model_parallel_size: int = 1,
                  num_experts: int = 0) -> None:
    """Raise ConfigError unless TP divides the heads and key/value groups, PP the layers and EP the experts (an
    EP > 1 needs experts)."""
    tp, pp, ep = tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size
    if num_attention_heads % tp or num_query_groups % tp:
        raise ConfigError(f"model.tensor_model_parallel_size={tp} must divide the {num_attention_heads} attention "
                          f"heads and the {num_query_groups} key/value groups")
    if num_layers % pp:
        raise ConfigError(f"model.pipeline_model_parallel_size={pp} must divide the {num_layers} layers")
    if ep > 1 and not num_experts:
        raise ConfigError(f"model.expert_model_parallel_size={ep}: the model has no experts (a dense model takes 1)")
    if num_experts % ep:
        raise ConfigError(f"model.expert_model_parallel_size={ep} must divide the {num_experts} experts")


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention(name: str) -> str:
    """`model.attention` -> the implementation that runs: `auto` is `AUTO_ATTENTION` (whether or not Transformer
    Engine is installed); the others name themselves."""
    return AUTO_ATTENTION if name == "auto" else name
