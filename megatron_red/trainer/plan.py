"""`megatron-red plan CONFIG`: per-GPU memory of a run with the Megatron backend, by part, for each phase of a
RED step (generation with the megatron engine, training), against a card.

The architecture comes from `model.path`'s config.json (or the tiny built-in student); the layout is
`trainer.build.parallel_layout` of model.* and the world size, the one `train` builds, resolved for the target
machine: a CUDA device whatever host `plan` runs on (`auto` dtype bfloat16, `auto` fused kernel on); the token
counts from trainer.* / data.* / rollout.*; the engine's KV buffer, step size and phase options from rollout.*
exactly as `build_engine` (trainer/build.py) hands them to the engine. The memory model is models/megatron/memory.py.
"""
from __future__ import annotations

import math

import torch

from megatron_red.config import RunConfig
from megatron_red.errors import ConfigError
from megatron_red.models.megatron.memory import (GIB, MemoryPlan, Rollout, Workload, memory_plan, stage_expert_numel,
                                                 stage_parameter_numel)
from megatron_red.models.megatron.model import HFArchitecture
from megatron_red.rollout import vllm_engine
from megatron_red.rollout.megatron import default_kv_buffer_gb, engine_max_requests, engine_step_tokens
from megatron_red.trainer.build import engine_kind, parallel_layout, rollout_max_sequence_length, vllm_sequence_length

TARGET_DEVICE = torch.device("cuda")
"""What `plan` resolves the device-dependent `auto`s for: the GPUs the run will train on."""


def run_architecture(config: RunConfig) -> HFArchitecture:
    """The student's architecture, without loading weights."""
    if config.model.path:
        from transformers import AutoConfig

        return HFArchitecture.from_hf_config(AutoConfig.from_pretrained(config.model.path, local_files_only=True))
    from megatron_red.trainer.build import build_task, tiny_student_config

    return HFArchitecture.from_hf_config(tiny_student_config(config, build_task(config).tokenizer))


def plan_for_config(config: RunConfig, world_size: int) -> MemoryPlan:
    m, t, r = config.model, config.trainer, config.rollout
    if m.backend != "megatron":
        raise ConfigError(f"plan models the Megatron backend; got model.backend={m.backend!r} "
                          f"(set model.backend=megatron)")
    arch = run_architecture(config)
    layout = parallel_layout(m, world_size, TARGET_DEVICE, arch.num_experts)
    tp = layout.tensor_model_parallel_size
    longest = config.data.max_prompt_tokens + max(r.max_new_tokens, config.data.max_trace_tokens)
    engine = engine_kind(config)
    if engine == "vllm":  # as build_engine hands them to vLLM
        requests = r.max_batch_size
        sequence_length = vllm_sequence_length(rollout_max_sequence_length(config), arch.max_position_embeddings)
        steps = vllm_engine.step_tokens(requests, sequence_length)
    else:
        requests = engine_max_requests(r.max_batch_size, tp)
        sequence_length = rollout_max_sequence_length(config)
        steps = engine_step_tokens(requests, sequence_length)
    rollout = Rollout(requests=requests, sequence_length=sequence_length, block_size_tokens=r.kv_block_size,
                      kv_buffer_gb=r.kv_buffer_gb, step_tokens=steps, offload_optimizer=r.offload_optimizer,
                      release_kv_cache=r.release_kv_cache, cuda_graph=r.cuda_graph, top_p=r.top_p, engine=engine)
    workload = Workload(tokens_per_micro_batch=t.max_tokens_per_micro_batch or t.micro_batch_size * longest,
                        max_sequence_length=longest, rollout=rollout)
    return memory_plan(arch, layout, workload)


def describe(plan: MemoryPlan, card_gib: float, config: RunConfig | None = None) -> str:
    """The plan as a header, a Markdown table and one verdict per phase. With the run's `config`, also the rows
    each model-parallel group generates per step."""
    arch, lay, work, ro = plan.arch, plan.layout, plan.workload, plan.workload.rollout
    total = stage_parameter_numel(arch, 1, 1, 0)  # the whole model (vocabulary padded to 128)
    model = f"model: {arch.model_type}, {arch.num_layers} layers x {arch.hidden_size}, {total / 1e9:.2f}B parameters"
    if arch.num_experts:
        every = stage_expert_numel(arch, 1, 1)
        active = total - every + every * arch.moe_router_topk // arch.num_experts
        model += (f" ({active / 1e9:.2f}B active per token: {arch.moe_router_topk} of {arch.num_experts} experts of "
                  f"width {arch.moe_ffn_hidden_size} in every layer)")
    lines = [model, f"layout: {lay.describe()}"]
    if arch.num_experts:
        tp, pp, ep = lay.tensor_model_parallel_size, lay.pipeline_model_parallel_size, lay.expert_model_parallel_size
        experts = stage_expert_numel(arch, tp, pp, ep)
        dense = stage_parameter_numel(arch, tp, pp, 0, ep) - experts
        shards = (lay.data_parallel_size, lay.data_parallel_size // ep) if lay.use_distributed_optimizer else (1, 1)
        lines.append(f"parameters per GPU (stage 0): {dense / 1e9:.3f}B dense + {experts / 1e9:.3f}B experts "
                     f"({arch.num_experts // ep} experts of each of {arch.num_layers // pp} layers, each split over TP "
                     f"{tp}); Adam state sharded over {shards[0]} data-parallel ranks (dense) and {shards[1]} "
                     f"expert-data-parallel ranks (experts)")
    lines.append(f"training: {work.tokens_per_micro_batch} tokens per micro-batch (rows up to "
                 f"{work.max_sequence_length})")
    if ro is not None and ro.engine == "vllm":
        lines.append(
            f"generation (vLLM engine, colocated: its own copy of the weights, all {arch.num_layers} layers at TP "
            f"{lay.tensor_model_parallel_size}): {ro.requests} rows decoded together (rollout.max_batch_size), up to "
            f"{ro.sequence_length} tokens each (rollout.max_sequence_length), {ro.step_tokens}-token steps; "
            f"offload_optimizer {ro.offload_optimizer}, release_kv_cache {ro.release_kv_cache} (sleep level 2 while "
            f"training), cuda_graph {ro.cuda_graph}")
        buffer_gib = plan.parts[0]["KV cache"] / GIB
        lines.append(
            f"KV cache: {buffer_gib:.2f} GiB per GPU (rollout.kv_buffer_gb="
            f"{'default' if ro.kv_buffer_gb is None else f'{ro.kv_buffer_gb:g}'}) at {plan.kv_token_bytes / 2**10:.0f} "
            f"KiB per token holds {plan.kv_sequences} sequences of {ro.sequence_length} tokens at once (more when a "
            f"prompt's samples share its prompt blocks)")
        if plan.kv_sequences < ro.requests:
            lines.append(f"  fewer than the {ro.requests} rows decoded together: vLLM preempts rows and recomputes "
                         "them; raise rollout.kv_buffer_gb")
    elif ro is not None:
        held = plan.kv_sequences
        buffer_gib = plan.kv_blocks * plan.kv_block_bytes / GIB
        lines.append(
            f"generation (megatron engine): {ro.requests} rows decoded together (rollout.max_batch_size), up to "
            f"{ro.sequence_length} tokens each (rollout.max_sequence_length), {ro.step_tokens}-token engine steps; "
            f"offload_optimizer {ro.offload_optimizer}, release_kv_cache {ro.release_kv_cache}, "
            f"cuda_graph {ro.cuda_graph}")
        lines.append(
            f"KV cache: {plan.kv_blocks} blocks of {ro.block_size_tokens} tokens x {plan.kv_block_bytes / 2**20:.2f} "
            f"MiB = {buffer_gib:.2f} GiB per GPU (rollout.kv_buffer_gb="
            f"{'default' if ro.kv_buffer_gb is None else f'{ro.kv_buffer_gb:g}'}; one block is megatron's dummy) "
            f"holds {held} sequences of {ro.sequence_length} tokens at once (more when a prompt's samples share its "
            f"prompt blocks)")
        if held < ro.requests:  # megatron engine
            needed = math.ceil(100 * default_kv_buffer_gb(ro.requests, ro.sequence_length, ro.block_size_tokens,
                                                          plan.kv_block_bytes)) / 100
            lines.append(f"  fewer than the {ro.requests} rows decoded together: megatron pauses rows and re-prefills "
                         f"them; rollout.kv_buffer_gb={needed:.2f} holds all {ro.requests} at full length")
    if ro is not None and config is not None:
        prompts = -(-config.trainer.prompts_per_step // lay.data_parallel_size)
        rows = prompts * config.rollout.n
        engines = lay.pipeline_model_parallel_size if ro.engine == "vllm" else 1  # vLLM: the stages split them
        waves = -(-rows // (ro.requests * engines))
        lines.append(f"rows generated per step by each model-parallel group: {prompts} prompts x "
                     f"{config.rollout.n} = {rows}, in {waves} wave{'s' if waves > 1 else ''} of up to "
                     f"{ro.requests}" + (f" on each of its {engines} vLLM engines" if engines > 1 else ""))
    if config is not None:
        t = config.trainer
        per_replica = t.prompts_per_step // lay.data_parallel_size
        groups = t.prompts_per_step / t.mini_batches_per_step
        lines.append(f"updates per step: {t.optimizer_steps_per_step} optimiser steps ({t.mini_batches_per_step} "
                     f"mini-batches x {t.epochs_per_step} epochs) of about {groups:g} groups each "
                     f"({per_replica // t.mini_batches_per_step} or more per replica); K and E leave the "
                     f"micro-batches, hence the memory, unchanged (the pi_old pass of K x E > 1 is forward-only)")
        if per_replica < t.mini_batches_per_step:
            lines.append(f"  fewer groups per replica ({per_replica}) than mini-batches: the trainer refuses this "
                         f"(raise trainer.prompts_per_step or lower trainer.mini_batches_per_step)")
    lines += ["", plan.table(card_gib), ""]
    for phase in plan.phases():
        worst = max(plan.peak(s, phase) for s in plan.parts)
        lines.append(f"{phase} peak {worst / GIB:.1f} GiB of {card_gib:g} GiB: "
                     + ("fits" if worst <= card_gib * GIB else "does NOT fit"))
    return "\n".join(lines)
