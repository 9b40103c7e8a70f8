"""`megatron-red plan CONFIG`: per-GPU memory of a run with the Megatron backend, by part, against a card.

The architecture comes from `model.path`'s config.json (or the tiny built-in student); the layout from model.*
(TP, PP, dtype, distributed optimiser, sequence parallelism, recompute, attention, fused kernel) and the world
size; the token counts from trainer.* / data.* / rollout.*. The memory model is models/megatron/memory.py.
"""
from __future__ import annotations

from megatron_red.config import RunConfig
from megatron_red.models.megatron.memory import GIB, MemoryLayout, MemoryPlan, Workload, memory_plan
from megatron_red.models.megatron.model import HFArchitecture, transformer_engine_available


def run_architecture(config: RunConfig) -> HFArchitecture:
    """The student's architecture, without loading weights."""
    if config.model.path:
        from transformers import AutoConfig

        return HFArchitecture.from_hf_config(AutoConfig.from_pretrained(config.model.path, local_files_only=True))
    from megatron_red.trainer.build import build_task, tiny_qwen2_config

    return HFArchitecture.from_hf_config(tiny_qwen2_config(config, build_task(config).tokenizer))


def plan_for_config(config: RunConfig, world_size: int) -> MemoryPlan:
    m, t = config.model, config.trainer
    tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not a multiple of TP x PP = {tp} x {pp}")
    if m.gradient_checkpointing and m.recompute_modules:
        raise ValueError("choose model.gradient_checkpointing or model.recompute_modules, not both")
    engine = "megatron" if config.rollout.engine == "auto" else config.rollout.engine  # auto: megatron's own
    if engine not in ("local", "megatron"):
        raise ValueError(f"plan models the local and megatron rollout engines, not {config.rollout.engine!r}")
    attention = m.attention
    if attention == "auto":
        attention = "te" if transformer_engine_available() else "sdpa"
    layout = MemoryLayout(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, data_parallel_size=world_size // (tp * pp),
        dtype="bfloat16" if m.dtype == "auto" else m.dtype, use_distributed_optimizer=m.use_distributed_optimizer,
        sequence_parallel=m.sequence_parallel, attention=attention,
        recompute="full" if m.gradient_checkpointing else "selective" if m.recompute_modules else "none",
        recompute_modules=m.recompute_modules, fused_kernel=m.fused_kernel != "off")
    longest = config.data.max_prompt_tokens + max(config.rollout.max_new_tokens, config.data.max_trace_tokens)
    workload = Workload(
        tokens_per_micro_batch=t.max_tokens_per_micro_batch or t.micro_batch_size * longest,
        max_sequence_length=longest, rollout_engine=engine, rollout_rows=config.rollout.max_batch_size,
        rollout_tokens=config.data.max_prompt_tokens + config.rollout.max_new_tokens)
    return memory_plan(run_architecture(config), layout, workload)


def describe(plan: MemoryPlan, arch: HFArchitecture, card_gib: float) -> str:
    """The plan as a header and a Markdown table."""
    from megatron_red.models.megatron.memory import stage_parameter_numel

    lay, work = plan.layout, plan.workload
    total = stage_parameter_numel(arch, 1, 1, 0)  # the whole model (vocabulary padded to 128)
    recompute = lay.recompute + (f" {list(lay.recompute_modules)}" if lay.recompute == "selective" else "")
    lines = [
        f"model: {arch.model_type}, {arch.num_layers} layers x {arch.hidden_size}, {total / 1e9:.2f}B parameters",
        f"layout: TP {lay.tensor_model_parallel_size} x PP {lay.pipeline_model_parallel_size} x "
        f"DP {lay.data_parallel_size}, {lay.dtype}, distributed optimizer {lay.use_distributed_optimizer}, "
        f"sequence parallel {lay.sequence_parallel}, recompute {recompute}, attention {lay.attention}, "
        f"fused LM-head kernel {lay.fused_kernel}",
        f"workload: {work.tokens_per_micro_batch} tokens per micro-batch (rows up to {work.max_sequence_length}); "
        f"rollout ({work.rollout_engine} engine) {work.rollout_rows} rows x {work.rollout_tokens} tokens",
        "peak = weights + gradients + optimizer + rollout weights + reserve + max(activations + LM head, rollout "
        "KV cache): generation and training do not overlap",
        "",
        plan.table(card_gib),
    ]
    worst = max(plan.peak(s) for s in plan.parts)
    lines.append(f"\npeak {worst / GIB:.1f} GiB of {card_gib:g} GiB: "
                 + ("fits" if worst <= card_gib * GIB else "does NOT fit"))
    return "\n".join(lines)
