"""Per-GPU memory of the Megatron backend, by part, from the architecture, the parallel layout and the workload.

What each part counts (bytes on one GPU of a pipeline stage):
- weights:     the stage's parameters on one TP rank (the embedding on the first stage; the LM head on the last, also
               when tied to the embedding and PP > 1, where megatron keeps a synchronised copy), in `dtype`.
- gradients:   one fp32 gradient per parameter (megatron's DDP reduces gradients in fp32).
- optimizer:   Adam's two fp32 moments, plus an fp32 master copy when the parameters are 16-bit; divided over the
               data-parallel ranks by the distributed optimizer (the mean over ranks: megatron aligns each
               parameter to 64 elements in its buffer, which moves a few elements between ranks).
- activations: what autograd keeps for the backward, per token and layer (bytes of the activation dtype `a`,
               `h` hidden, `q` / `g` query / key-value heads of width `d`, `f` MLP width, TP = t):
                 norms and projection inputs   4 a h (+ 8 for the two fp32 inverse RMS)   / t with sequence par.
                 q, k, v after RoPE, context    a (2 q + 2 g) d / t
                 flash-attention log-sum-exp    4 q / t
                 SwiGLU (silu input, silu, up)  3 a f / t, and the down-projection input a f / t
               megatron's unfused attention (`local`) instead keeps the [q, s, s] probabilities in fp32 and `a`
               and the K/V heads repeated: + (4 + a) q s / t, a (2 q - 2 g) d / t, no log-sum-exp.
               Selective recompute drops what the named submodules recompute; full recompute keeps only each
               layer's input (a h per token) plus one layer's activations while that layer is recomputed. The
               first pipeline stage holds PP micro-batches in flight (1F1B), stage s holds PP - s.
- LM head:     last stage: the loss-mask hidden states (a h per token) and the log-prob / entropy head's buffers:
               the fused kernel's <= 256 MiB, or the [tokens, V / t] logits and their gradient plus two 256 MiB
               fp32 chunks (parallel/vocab_parallel.py).
- rollout:     `local` engine: a full 16-bit Hugging Face copy of the policy on the first rank of each
               model-parallel group and its KV cache for `rows` sequences of `rollout_tokens`; `megatron` engine:
               the KV cache of this rank's layers and key-value heads only (the training weights generate).
- reserve:     CUDA context, NCCL and allocator slack.
Generation and training do not overlap, so the peak is the static parts plus the larger of (activations + LM
head) and the rollout's working memory.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_red.models.megatron.model import HFArchitecture, padded_vocab_size

GIB = 2**30
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEAD_CHUNK_BYTES = 2 * 256 * 2**20  # two DEFAULT_CHUNK_ELEMENTS fp32 buffers of vocab_parallel_logprobs_entropy
FUSED_KERNEL_EXTRA_BYTES = 256 * 2**20  # the fused kernel's extra-memory bound (docs: kernel targets)


@dataclass
class MemoryLayout:
    """The run's parallel layout and numerics (model.* of the run config, DP from the world size)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    data_parallel_size: int = 1
    dtype: str = "bfloat16"
    use_distributed_optimizer: bool = True
    sequence_parallel: bool = False
    attention: str = "sdpa"
    """Which attention runs: `sdpa` and `te` keep no score tensor; `local` does."""
    recompute: str = "none"
    """`none`, `full`, or `selective` (then `recompute_modules`)."""
    recompute_modules: tuple[str, ...] = ()
    fused_kernel: bool = True


@dataclass
class Workload:
    """Token counts that size the activations and the rollout.

    tokens_per_micro_batch: tokens of one micro-batch (packed budget, or rows x padded length).
    max_sequence_length:    longest row (sizes `local` attention's score tensor).
    rollout_engine:         `local` or `megatron`.
    rollout_rows:           sequences decoded at once.
    rollout_tokens:         prompt + new tokens of each decoded sequence.
    """

    tokens_per_micro_batch: int
    max_sequence_length: int
    rollout_engine: str = "local"
    rollout_rows: int = 0
    rollout_tokens: int = 0


def stage_parameter_numel(arch: HFArchitecture, tp: int, pp: int, stage: int) -> int:
    """Parameters held by one TP rank of pipeline stage `stage` (megatron's GPTModel built by build_gpt_model)."""
    h, d, q, g, f = (arch.hidden_size, arch.head_dim, arch.num_attention_heads, arch.num_query_groups,
                     arch.ffn_hidden_size)
    qkv = (q + 2 * g) * d // tp
    layer = (h  # input norm
             + qkv * h + (qkv if arch.qkv_bias else 0)  # fused q/k/v projection (column-parallel)
             + h * q * d // tp  # output projection (row-parallel)
             + h  # pre-MLP norm
             + 2 * f // tp * h + h * f // tp)  # gate+up (column-parallel), down (row-parallel)
    numel = layer * arch.num_layers // pp
    vocab_shard = padded_vocab_size(arch.vocab_size, tp) // tp
    if stage == 0:
        numel += vocab_shard * h  # word embeddings
    if stage == pp - 1:
        numel += h  # final norm
        if not arch.tie_word_embeddings or pp > 1:
            numel += vocab_shard * h  # LM head (a synchronised copy of the embedding when tied across stages)
    return numel


def activation_bytes_per_token_layer(arch: HFArchitecture, layout: MemoryLayout, sequence_length: int) -> float:
    """Bytes autograd keeps per token per layer without recompute (see the module docstring)."""
    a = _BYTES[layout.dtype]
    t = layout.tensor_model_parallel_size
    sp = t if layout.sequence_parallel else 1
    h, d, q, g, f = (arch.hidden_size, arch.head_dim, arch.num_attention_heads, arch.num_query_groups,
                     arch.ffn_hidden_size)
    norms = (4 * a * h + 8) / sp
    attention = a * (2 * q + 2 * g) * d / t
    if layout.attention == "local":
        attention += (4 + a) * q * sequence_length / t + a * (2 * q - 2 * g) * d / t
    else:
        attention += 4 * q / t
    mlp = 4 * a * f / t
    modules = set(layout.recompute_modules) if layout.recompute == "selective" else set()
    if "core_attn" in modules:  # recomputed from q, k, v (kept): scores / log-sum-exp and the repeated K/V go
        attention = a * (2 * q + 2 * g) * d / t
    if "mlp" in modules:  # recomputed from its input (a projection input counted in `norms`)
        mlp = 0.0
    if "layernorm" in modules:  # the two norm outputs are recomputed
        norms -= 2 * a * h / sp
    return norms + attention + mlp


@dataclass
class MemoryPlan:
    """Bytes per part for the first and last pipeline stage (stage -> part -> bytes) of a layout and workload."""

    parts: dict[int, dict[str, float]]
    layout: MemoryLayout
    workload: Workload

    def peak(self, stage: int) -> float:
        p = self.parts[stage]
        static = p["weights"] + p["gradients"] + p["optimizer"] + p["rollout weights"] + p["reserve"]
        return static + max(p["activations"] + p["LM head"], p["rollout KV cache"])

    def table(self, card_gib: float) -> str:
        stages = sorted(self.parts)
        header = "| part | " + " | ".join(f"stage {s} (GiB)" for s in stages) + " |"
        lines = [header, "|---|" + "---|" * len(stages)]
        for part in self.parts[stages[0]]:
            lines.append(f"| {part} | " + " | ".join(f"{self.parts[s][part] / GIB:.2f}" for s in stages) + " |")
        lines.append("| **peak** | " + " | ".join(f"**{self.peak(s) / GIB:.2f}**" for s in stages) + " |")
        verdict = " | ".join("fits" if self.peak(s) <= card_gib * GIB else "does NOT fit" for s in stages)
        lines.append(f"| {card_gib:g} GiB card | {verdict} |")
        return "\n".join(lines)


def memory_plan(arch: HFArchitecture, layout: MemoryLayout, workload: Workload,
                reserve_bytes: float = 3 * GIB) -> MemoryPlan:
    """Per-GPU bytes by part for the first and the last pipeline stage (the two largest)."""
    tp, pp, dp = (layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size, layout.data_parallel_size)
    if layout.recompute not in ("none", "full", "selective"):
        raise ValueError(f"recompute must be none, full or selective, got {layout.recompute!r}")
    a = _BYTES[layout.dtype]
    tokens = workload.tokens_per_micro_batch
    per_layer = activation_bytes_per_token_layer(arch, layout, workload.max_sequence_length)
    layers = arch.num_layers // pp
    sp = tp if layout.sequence_parallel else 1
    optimizer_per_param = 8 + (4 if a == 2 else 0)
    kv_per_token_layer = 2 * arch.num_query_groups * arch.head_dim * 2  # K and V, 16-bit
    kv_heads_per_rank = max(arch.num_query_groups // tp, 1)  # megatron replicates key/value heads when TP > groups
    total_params = stage_parameter_numel(arch, 1, 1, 0)
    parts = {}
    for stage in sorted({0, pp - 1}):
        numel = stage_parameter_numel(arch, tp, pp, stage)
        in_flight = pp - stage
        if layout.recompute == "full":
            one_layer = activation_bytes_per_token_layer(arch, dataclasses.replace(layout, recompute="none"),
                                                         workload.max_sequence_length)
            activations = in_flight * layers * tokens * a * arch.hidden_size / sp + tokens * one_layer
        else:
            activations = in_flight * layers * tokens * per_layer
        if stage == 0:
            activations += in_flight * tokens * a * arch.hidden_size / sp  # embedding output
        head = 0.0
        if stage == pp - 1:
            head = tokens * a * arch.hidden_size
            vocab_shard = padded_vocab_size(arch.vocab_size, tp) // tp
            head += FUSED_KERNEL_EXTRA_BYTES if layout.fused_kernel else 2 * tokens * vocab_shard * a + HEAD_CHUNK_BYTES
        if workload.rollout_engine == "local":  # only the model-parallel group's first rank (stage 0) samples
            rollout_weights = 2.0 * total_params if stage == 0 else 0.0
            kv = (workload.rollout_rows * workload.rollout_tokens * arch.num_layers * kv_per_token_layer
                  + workload.rollout_rows * arch.vocab_size * 4) if stage == 0 else 0.0  # + fp32 decode logits
        else:
            rollout_weights = 0.0
            kv = (workload.rollout_rows * workload.rollout_tokens * layers * kv_per_token_layer
                  * kv_heads_per_rank / arch.num_query_groups + workload.rollout_rows * arch.vocab_size * 4)
        optimizer = numel * optimizer_per_param / (dp if layout.use_distributed_optimizer else 1)
        parts[stage] = {"weights": numel * a, "gradients": numel * 4.0, "optimizer": optimizer,
                        "activations": activations, "LM head": head, "rollout weights": rollout_weights,
                        "rollout KV cache": kv, "reserve": reserve_bytes}
    return MemoryPlan(parts, layout, workload)
