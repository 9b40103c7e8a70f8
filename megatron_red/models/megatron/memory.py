"""Per-GPU memory of the Megatron backend, by part and by phase, from the architecture, the parallel layout and
the workload.

A RED step alternates two phases that never overlap: generation (megatron-core's dynamic inference engine on the
policy's own shards, rollout/megatron.py, or a colocated vLLM engine, rollout/vllm_engine.py) and training
(log-probs, then forward + backward + optimizer step).
What each part counts (bytes on one GPU of a pipeline stage):
- weights:     the stage's parameters on one TP rank (the embedding on the first stage; the LM head on the last, also
               when tied to the embedding and PP > 1, where megatron keeps a synchronised copy), in `dtype`. Both
               phases (the engine generates with them). A mixture of experts: each layer's router (whole on every
               rank), its experts / EP experts (each split over TP like a dense MLP) and a shared expert; the
               expert part is also shown on its own (`MemoryPlan.experts`).
- gradients:   one fp32 gradient per parameter (megatron's DDP reduces gradients in fp32). Both phases, unless
               `rollout.offload_optimizer` frees the gradient buffers while generating.
- optimizer:   Adam's two fp32 moments, plus an fp32 master copy when the parameters are 16-bit; divided over the
               data-parallel ranks by the distributed optimizer (the mean over ranks: megatron aligns each
               parameter to 64 elements in its buffer, which moves a few elements between ranks), the experts'
               over the expert-data-parallel ranks (DP / EP: the replicas of the same experts). Both phases,
               unless `rollout.offload_optimizer` moves it to host memory while generating.
- activations: training. What autograd keeps for the backward, per token and layer (bytes of the activation dtype
               `a`, `h` hidden, `q` / `g` query / key-value heads of width `d`, `f` MLP width, TP = t):
                 norms and projection inputs   4 a h (+ 8 for the two fp32 inverse RMS)   / t with sequence par.
                 q, k, v after RoPE, context    a (2 q + 2 g) d / t
                 flash-attention log-sum-exp    4 q / t
                 SwiGLU (silu input, silu, up)  3 a f / t, and the down-projection input a f / t
               A mixture-of-experts layer instead runs each token through its k experts (and the shared expert):
               f is then k x the expert width (+ the shared expert's), plus the k dispatched copies of its input
               (a h k) and the router's fp32 logits and probabilities (8 E): balanced routing assumed (every EP
               rank receives k x its tokens), a skewed router needs more.
               megatron's unfused attention (`local`) instead keeps the [q, s, s] probabilities in fp32 and `a`
               and the K/V heads repeated: + (4 + a) q s / t, a (2 q - 2 g) d / t, no log-sum-exp.
               Selective recompute drops what the named submodules recompute; full recompute keeps only each
               layer's input (a h per token) plus one layer's activations while that layer is recomputed. The
               first pipeline stage holds PP micro-batches in flight (1F1B), stage s holds PP - s.
- LM head:     training, last stage: the loss-mask hidden states (a h per token) and the log-prob / entropy head's
               buffers: the fused kernel's <= 256 MiB, or the [tokens, V / t] logits and their gradient plus two
               256 MiB fp32 chunks (kernels/vocab_parallel.py).
- KV cache:    the engine's paged KV buffer, sized as megatron-core 0.19's `DynamicInferenceContext` sizes it:
               blocks = max(2, int(rollout.kv_buffer_gb * 2**30) // block bytes) (one of them megatron's dummy
               block), block bytes = 2 (K, V) x this stage's layers x kv_block_size x key-value heads per TP rank
               (at least 1: megatron replicates them when TP > g) x d x the parameter dtype; one buffer of
               blocks x block bytes. Generation; through training too with `rollout.release_kv_cache=false`.
- prefill step: generation. One engine step runs up to megatron's `max_tokens` tokens (prefill and decode rows
               together) through the stage without autograd; the largest transient is one layer's MLP: the
               residual stream and the norm output (2 a h per token) and the gate+up output and its SwiGLU
               (3 a f / t, f as above for experts), plus megatron's sequence-parallel all-gather buffer (a h per
               token) with SP.
- sampling logits: generation. The rows decoded together (`rollout.max_batch_size`, megatron's max_requests):
               their logits gathered over TP (on every stage under PP) and the sampler's row selection of them
               (a V each, padded vocabulary), the last stage's own [rows, V / t] shard, megatron's static logits
               buffer with CUDA graphs, and the sampler's fp32 / fp64 temporaries (rollout/sampling.py: 20 bytes
               per real vocabulary entry, 28 with top-p).
- reserve:     CUDA context, NCCL and allocator slack. Both phases.
With the vLLM engine (`Rollout.engine="vllm"`) generation holds instead:
- engine weights: vLLM's own copy, every layer (vLLM has no pipeline stages here) of one TP rank, the embedding and
               an untied head, in `dtype` (counted with megatron's vocabulary padding; vLLM pads less). Released
               with the KV cache while training (sleep level 2, `rollout.release_kv_cache`), kept otherwise.
- KV cache:    exactly `rollout.kv_buffer_gb` (vLLM's kv_cache_memory_bytes), by default max_batch_size sequences of
               max_sequence_length at 2 (K, V) x all layers x key-value heads per TP rank x d x `dtype` per token.
- prefill step: as above for one vLLM step of `vllm_engine.STEP_TOKENS` tokens (vLLM's max_num_batched_tokens).
- sampling logits: the rows' fp32 logits and vLLM's processed log-probs (4 + 4 bytes per vocabulary entry), the
               entropy recorder's log-softmax and product (8) and the top-k / top-p sort (12).
Not counted: megatron's CUDA-graph memory pool (one decode step of max_requests tokens), the context's bookkeeping
tensors (kilobytes per request), pinned host buffers; vLLM's CUDA graphs and its scheduler's buffers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_red.models.megatron.layout import ParallelLayout
from megatron_red.models.megatron.model import HFArchitecture, padded_vocab_size
from megatron_red.models.precision import DTYPES
from megatron_red.rollout import vllm_engine
from megatron_red.rollout.megatron import (default_kv_buffer_gb, kv_block_bytes, kv_buffer_blocks, kv_heads_per_rank,
                                           sequences_held)

GIB = 2**30
HEAD_CHUNK_BYTES = 2 * 256 * 2**20  # two DEFAULT_CHUNK_ELEMENTS fp32 buffers of vocab_parallel_logprobs_entropy
FUSED_KERNEL_EXTRA_BYTES = 256 * 2**20  # the fused kernel's extra-memory bound (docs: kernel targets)


@dataclass
class Rollout:
    """The rollout engine's settings that size its memory (rollout.* of the run config)."""

    requests: int
    """Rows decoded together: megatron's max_requests (rollout.max_batch_size rounded up to a multiple of TP)."""
    sequence_length: int
    """Longest prompt + response the engine accepts (rollout.max_sequence_length)."""
    block_size_tokens: int = 256
    kv_buffer_gb: float | None = None
    """rollout.kv_buffer_gb; None = the engine's default (`default_kv_buffer_gb`)."""
    step_tokens: int = 16384
    """Tokens of one engine step (megatron's max_tokens)."""
    offload_optimizer: bool = False
    """Gradients and Adam state leave the GPU while generating (rollout.offload_optimizer)."""
    release_kv_cache: bool = True
    """The KV buffer is freed while training (rollout.release_kv_cache)."""
    cuda_graph: bool = False
    """megatron's static logits buffer exists (rollout.cuda_graph)."""
    top_p: float = 1.0
    """< 1 adds the nucleus filter's temporaries to the sampler's."""
    engine: str = "megatron"
    """`megatron` (the policy's own shards) or `vllm` (a colocated copy: module docstring)."""


@dataclass
class Workload:
    """Token counts that size the activations, and the rollout engine (None = no generation phase).

    tokens_per_micro_batch: tokens of one micro-batch (packed budget, or rows x padded length).
    max_sequence_length:    longest row (sizes `local` attention's score tensor).
    """

    tokens_per_micro_batch: int
    max_sequence_length: int
    rollout: Rollout | None = None


def _mlp_numel(width: int, h: int, tp: int) -> int:
    """A SwiGLU MLP of `width` on one TP rank: gate+up (column-parallel), down (row-parallel)."""
    return 2 * width // tp * h + h * width // tp


def stage_expert_numel(arch: HFArchitecture, tp: int, pp: int, ep: int = 1) -> int:
    """The experts' parameters one rank holds on any pipeline stage: its experts / EP experts of each of its layers,
    each expert's MLP split over TP (0 for a dense model)."""
    return arch.num_layers // pp * arch.num_experts // ep * _mlp_numel(arch.moe_ffn_hidden_size, arch.hidden_size, tp)


def stage_parameter_numel(arch: HFArchitecture, tp: int, pp: int, stage: int, ep: int = 1) -> int:
    """Parameters held by one TP rank (of EP rank any) of pipeline stage `stage` (megatron's GPTModel built by
    build_gpt_model), the experts' (`stage_expert_numel`) included."""
    h, d, q, g, f = (arch.hidden_size, arch.head_dim, arch.num_attention_heads, arch.num_query_groups,
                     arch.ffn_hidden_size)
    qkv = (q + 2 * g) * d // tp
    if arch.num_experts:  # the router (whole on every rank); Qwen2-MoE's shared expert and its gate
        shared = arch.shared_expert_ffn_hidden_size
        mlp = arch.num_experts * h + (_mlp_numel(shared, h, tp) + h if shared else 0)
    else:
        mlp = _mlp_numel(f, h, tp)
    layer = (h  # input norm
             + qkv * h + (qkv if arch.qkv_bias else 0)  # fused q/k/v projection (column-parallel)
             + h * q * d // tp  # output projection (row-parallel)
             + (2 * d if arch.qk_layernorm else 0)  # per-head q / k norm gains (whole on every TP rank)
             + h  # pre-MLP norm
             + mlp)
    numel = layer * arch.num_layers // pp + stage_expert_numel(arch, tp, pp, ep)
    vocab_shard = padded_vocab_size(arch.vocab_size, tp) // tp
    if stage == 0:
        numel += vocab_shard * h  # word embeddings
    if stage == pp - 1:
        numel += h  # final norm
        if not arch.tie_word_embeddings or pp > 1:
            numel += vocab_shard * h  # LM head (a synchronised copy of the embedding when tied across stages)
    return numel


def active_ffn_width(arch: HFArchitecture) -> int:
    """The MLP width a token runs through: the dense MLP's, or its k experts' and the shared expert's."""
    if arch.num_experts:
        return arch.moe_router_topk * arch.moe_ffn_hidden_size + arch.shared_expert_ffn_hidden_size
    return arch.ffn_hidden_size


def activation_bytes_per_token_layer(arch: HFArchitecture, layout: ParallelLayout, sequence_length: int) -> float:
    """Bytes autograd keeps per token per layer without recompute (see the module docstring)."""
    a = DTYPES[layout.dtype].itemsize
    t = layout.tensor_model_parallel_size
    sp = t if layout.sequence_parallel else 1
    h, d, q, g, f = (arch.hidden_size, arch.head_dim, arch.num_attention_heads, arch.num_query_groups,
                     active_ffn_width(arch))
    norms = (4 * a * h + 8) / sp
    attention = a * (2 * q + 2 * g) * d / t
    if layout.attention == "local":
        attention += (4 + a) * q * sequence_length / t + a * (2 * q - 2 * g) * d / t
    else:
        attention += 4 * q / t
    mlp = 4 * a * f / t
    if arch.num_experts:  # the dispatched copies of the input and the router's fp32 logits and probabilities
        mlp += a * h * arch.moe_router_topk + 8 * arch.num_experts
    modules = set(layout.recompute_modules) if layout.recompute == "selective" else set()
    if "core_attn" in modules:  # recomputed from q, k, v (kept): scores / log-sum-exp and the repeated K/V go
        attention = a * (2 * q + 2 * g) * d / t
    if "mlp" in modules and not arch.num_experts:  # recomputed from its input (counted in `norms`); megatron leaves
        mlp = 0.0                                  # mixture-of-experts layers out of `mlp`
    if "layernorm" in modules:  # the two norm outputs are recomputed
        norms -= 2 * a * h / sp
    return norms + attention + mlp


# Which parts each phase holds (module docstring); `MemoryPlan.held` applies the rollout options.
TRAINING_PARTS = ("weights", "gradients", "optimizer", "activations", "LM head", "reserve")
GENERATION_PARTS = ("weights", "gradients", "optimizer", "engine weights", "KV cache", "prefill step",
                    "sampling logits", "reserve")
PHASES = ("generation", "training")


@dataclass
class MemoryPlan:
    """Bytes per part for the first and last pipeline stage (stage -> part -> bytes) of a model (`arch`), layout and
    workload, the KV cache's geometry (megatron's `kv_blocks` blocks of `kv_block_bytes`, 0 without a rollout, or
    vLLM's `kv_token_bytes` per token; `kv_sequences` sequences of the rollout's length it holds at once) and, of a
    mixture of experts, the experts' share of the weights, gradients and optimizer parts (the same on every stage)."""

    parts: dict[int, dict[str, float]]
    arch: HFArchitecture
    layout: ParallelLayout
    workload: Workload
    kv_blocks: int = 0
    kv_block_bytes: int = 0
    kv_token_bytes: int = 0
    kv_sequences: int = 0
    experts: dict[str, float] = dataclasses.field(default_factory=dict)

    def held(self, phase: str) -> tuple[str, ...]:
        """The parts resident on the GPU during `phase` ("generation" or "training")."""
        rollout = self.workload.rollout
        vllm = rollout is not None and rollout.engine == "vllm"
        if phase == "training":
            keep = () if rollout is None or rollout.release_kv_cache else ("KV cache",)
            return TRAINING_PARTS + (("engine weights",) if vllm and keep else ()) + keep
        if rollout is None:
            return ()
        dropped = ("gradients", "optimizer") if rollout.offload_optimizer else ()
        dropped += () if vllm else ("engine weights",)
        return tuple(p for p in GENERATION_PARTS if p not in dropped)

    def peak(self, stage: int, phase: str) -> float:
        return sum(self.parts[stage][p] for p in self.held(phase))

    def phases(self) -> tuple[str, ...]:
        return PHASES if self.workload.rollout is not None else ("training",)

    def table(self, card_gib: float) -> str:
        stages = sorted(self.parts)
        phases = self.phases()
        columns = " | ".join(f"stage {s} (GiB)" for s in stages)
        lines = [f"| part | held during | {columns} |", "|---|---|" + "---|" * len(stages)]
        for part in self.parts[stages[0]]:
            during = [ph for ph in phases if part in self.held(ph)]
            if not during:
                continue
            lines.append(f"| {part} | {' + '.join(during)} | "
                         + " | ".join(f"{self.parts[s][part] / GIB:.2f}" for s in stages) + " |")
            if part in self.experts:
                lines.append(f"| (of which experts) | | "
                             + " | ".join(f"{self.experts[part] / GIB:.2f}" for _ in stages) + " |")
        for phase in phases:
            lines.append(f"| **{phase} peak** | | " + " | ".join(f"**{self.peak(s, phase) / GIB:.2f}**"
                                                               for s in stages) + " |")
            verdict = " | ".join("fits" if self.peak(s, phase) <= card_gib * GIB else "does NOT fit" for s in stages)
            lines.append(f"| {phase} on a {card_gib:g} GiB card | | {verdict} |")
        return "\n".join(lines)


def generation_bytes(arch: HFArchitecture, layout: ParallelLayout, rollout: Rollout, stage: int) -> dict[str, float]:
    """The engine's working memory on `stage` beyond weights and KV cache: one step's largest transient and the
    sampling logits (module docstring)."""
    a = DTYPES[layout.dtype].itemsize
    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    h, f = arch.hidden_size, active_ffn_width(arch)
    tokens = rollout.step_tokens
    prefill = tokens * a * (2 * h + 3 * f / tp) + (tokens * a * h if layout.sequence_parallel else 0.0)
    rows, vocab = rollout.requests, padded_vocab_size(arch.vocab_size, tp)
    if rollout.engine == "vllm":  # every layer on every stage; its sampler on the real vocabulary
        return {"prefill step": prefill, "sampling logits": rows * arch.vocab_size * 28.0}
    logits = 2 * rows * vocab * a  # gathered over TP, and the sampler's row selection of them
    if stage == pp - 1:
        logits += rows * vocab / tp * a  # the output layer's own shard
    if rollout.cuda_graph:
        logits += rows * vocab * a  # megatron's static logits buffer
    logits += rows * arch.vocab_size * (28 if rollout.top_p < 1.0 else 20)
    return {"prefill step": prefill, "sampling logits": logits}


def memory_plan(arch: HFArchitecture, layout: ParallelLayout, workload: Workload,
                reserve_bytes: float = 3 * GIB) -> MemoryPlan:
    """Per-GPU bytes by part for the first and the last pipeline stage (the two largest)."""
    tp, pp, dp = (layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size, layout.data_parallel_size)
    ep = layout.expert_model_parallel_size
    a = DTYPES[layout.dtype].itemsize
    tokens = workload.tokens_per_micro_batch
    per_layer = activation_bytes_per_token_layer(arch, layout, workload.max_sequence_length)
    layers = arch.num_layers // pp
    sp = tp if layout.sequence_parallel else 1
    optimizer_per_param = 8 + (4 if a == 2 else 0)
    rollout = workload.rollout
    blocks = block_bytes = token_bytes = sequences = 0
    kv_bytes = engine_weights = 0.0
    if rollout is not None and rollout.engine == "vllm":
        token_bytes = vllm_engine.kv_bytes_per_token(arch.num_layers, arch.num_query_groups, arch.head_dim, tp, a)
        buffer_gb = rollout.kv_buffer_gb
        if buffer_gb is None:
            buffer_gb = vllm_engine.default_kv_buffer_gb(rollout.requests, rollout.sequence_length, token_bytes)
        kv_bytes = int(buffer_gb * GIB)  # what the engine hands vLLM (kv_cache_memory_bytes)
        sequences = kv_bytes // (token_bytes * rollout.sequence_length)
        engine_weights = stage_parameter_numel(arch, tp, 1, 0) * a  # the whole model, one TP rank
    elif rollout is not None:
        block_bytes = kv_block_bytes(layers, kv_heads_per_rank(arch.num_query_groups, tp), arch.head_dim,
                                     rollout.block_size_tokens, a)
        buffer_gb = rollout.kv_buffer_gb
        if buffer_gb is None:
            buffer_gb = default_kv_buffer_gb(rollout.requests, rollout.sequence_length, rollout.block_size_tokens,
                                             block_bytes)
        blocks = kv_buffer_blocks(buffer_gb, block_bytes)  # every stage holds layers // pp: megatron's MIN agrees
        kv_bytes = float(blocks * block_bytes)
        sequences = sequences_held(blocks, rollout.sequence_length, rollout.block_size_tokens)
    parts = {}
    for stage in sorted({0, pp - 1}):
        numel = stage_parameter_numel(arch, tp, pp, stage, ep)
        experts = stage_expert_numel(arch, tp, pp, ep)
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
        dense_dp, expert_dp = (dp, dp // ep) if layout.use_distributed_optimizer else (1, 1)
        expert_optimizer = experts * optimizer_per_param / expert_dp
        optimizer = (numel - experts) * optimizer_per_param / dense_dp + expert_optimizer
        generation = (generation_bytes(arch, layout, rollout, stage) if rollout is not None
                      else {"prefill step": 0.0, "sampling logits": 0.0})
        parts[stage] = {"weights": numel * a, "gradients": numel * 4.0, "optimizer": optimizer,
                        "activations": activations, "LM head": head, "engine weights": engine_weights,
                        "KV cache": kv_bytes, **generation, "reserve": reserve_bytes}
    expert_parts = ({"weights": experts * a, "gradients": experts * 4.0, "optimizer": expert_optimizer} if experts
                    else {})
    return MemoryPlan(parts, arch, layout, workload, blocks, block_bytes, token_bytes, sequences, expert_parts)
