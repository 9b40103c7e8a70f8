"""Build the pieces of a run from its `RunConfig`: task (examples, tokenizer, reward), policy, rollout engine
(`build_engine`, the one constructor of engines: the trainer's and `megatron-red eval`'s).

The built-in task's student is a tiny Qwen2 (or, with `model.num_experts`, a tiny Qwen3-MoE) built from a config and
warmed up briefly by SFT on short solutions of easy problems (cached per task and seed), so that it starts like a
weak base model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from megatron_red.config import DataConfig, ModelConfig, RolloutConfig, RunConfig, student_experts
from megatron_red.data.openr1 import RedExample
from megatron_red.distributed import barrier, global_rank, init_distributed, is_main_process
from megatron_red.errors import ConfigError
from megatron_red.kernels import fused_kernel_enabled
from megatron_red.models.architectures import check_supported
from megatron_red.models.base import PolicyBackend
from megatron_red.models.megatron.layout import ParallelLayout, resolve_attention
from megatron_red.models.precision import dtype_name, resolve_dtype
from megatron_red.rollout.base import ENGINE_KINDS, RolloutEngine


@dataclass
class Task:
    """What the trainer needs of the data: prompts with traces, a held-out split, a tokenizer and a verifier."""

    train: Sequence[RedExample]
    test: Sequence[RedExample]
    tokenizer: object
    reward_fn: Callable[[list[str], list], list[float]]
    hard_min_difficulty: int | None = None
    """Built-in task: held-out problems with at least this many steps count as hard."""
    warmup: list[RedExample] | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_task(config: RunConfig, cache_dir: Path | None = None) -> Task:
    """The run's task; an `openr1` file is tokenised once into `data.cache_dir` (default: `cache_dir / "data"`,
    `cache_dir` defaulting to `.cache` beside `trainer.out_dir`)."""
    data = config.data
    if data.task == "builtin":
        from megatron_red.data.builtin import BuiltinTask, BuiltinTaskConfig

        task_config = BuiltinTaskConfig.for_regime(**{"seed": config.trainer.seed, **data.builtin})
        task = BuiltinTask(task_config)
        return Task(task.train_examples, task.test_examples, task.tokenizer,
                    lambda texts, answers: [task.grade(t, a) for t, a in zip(texts, answers)],
                    hard_min_difficulty=task_config.hard_min_steps, warmup=task.warmup_examples())
    from megatron_red.data.cache import heldout_split
    from megatron_red.data.tokenizer import HFTokenizer
    from megatron_red.rewards import grade_math

    tokenizer = HFTokenizer(config.model.path)  # data.task=openr1
    root = Path(data.cache_dir) if data.cache_dir else (
        cache_dir or Path(config.trainer.out_dir).parent / ".cache") / "data"
    examples = tokenised_once(data.path, tokenizer, root, data, require_trace=True)
    if not len(examples):
        raise ConfigError(f"data.path={data.path}: no usable rows")
    test = []
    if data.eval_path:
        test = tokenised_once(data.eval_path, tokenizer, root, data, require_trace=False)
    elif data.eval_fraction:
        train_rows, test_rows = heldout_split(examples.prompt_digests(), data.eval_fraction)
        examples, test = examples.select(train_rows), examples.select(test_rows)
    return Task(examples, test, tokenizer, lambda texts, answers: grade_math(texts, answers))


def tokenised_once(path: str, tokenizer, root: Path, data: DataConfig, require_trace: bool):
    """`load_openr1` of `path` through the on-disk cache (data/cache.py), tokenised by one process: global rank 0
    first (enough when `root` is on a shared file system), then local rank 0 of each node that still misses it
    (node-local disks); then every rank maps it."""
    from megatron_red.data.cache import MappedExamples, build_cache, cache_path

    options = dict(max_prompt_tokens=data.max_prompt_tokens, max_trace_tokens=data.max_trace_tokens,
                   skip_malformed=data.skip_malformed, require_trace=require_trace)
    directory = cache_path(root, path, tokenizer, **options)
    built = False
    for builder in (global_rank() == 0, int(os.environ.get("LOCAL_RANK", "0")) == 0):
        if builder and not directory.exists():
            build_cache(directory, path, tokenizer, **options)
            built = True
        barrier()
    examples = MappedExamples(directory)
    if is_main_process():
        stats = examples.stats
        print(f"[data] {path}: {stats.kept}/{stats.rows} rows kept, {stats.dropped_prompts} long prompts dropped, "
              f"{stats.truncated_traces} traces truncated, {stats.skipped_malformed} malformed skipped "
              f"({'tokenised into' if built else 'read from'} {directory})")
    return examples


def tiny_student_config(config: RunConfig, tokenizer):
    """The built-in student's transformers config: Qwen2, or Qwen3-MoE with `model.num_experts` experts."""
    from transformers import Qwen2Config, Qwen3MoeConfig

    m = config.model
    common = dict(
        vocab_size=tokenizer.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
        max_position_embeddings=m.max_position_embeddings, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if m.num_experts:
        return Qwen3MoeConfig(num_experts=m.num_experts, num_experts_per_tok=m.num_experts_per_tok,
                              moe_intermediate_size=m.moe_intermediate_size, norm_topk_prob=True,
                              head_dim=m.hidden_size // m.num_heads, **common)
    return Qwen2Config(**common)


def check_backend_runs_here(model: ModelConfig) -> None:
    """Refuse to train `model.backend=megatron` where megatron-core cannot run (no CUDA device), before any work:
    its model forward, pipeline schedules and DDP call CUDA directly and would fail only after the warm-up and the
    model load. `plan` does not call this: it sizes a GPU run on any host."""
    from megatron_red.megatron_internals import megatron_runs_here

    if model.backend == "megatron" and not megatron_runs_here():
        raise ConfigError("model.backend=megatron needs CUDA GPUs (megatron-core's model, pipeline schedules and DDP "
                          "call CUDA directly) and torch sees no CUDA device here. Without GPUs, train with "
                          "model.backend=hf (CPU or one device); to size a Megatron layout for your GPUs, run "
                          "`megatron-red plan CONFIG --world-size N` (needs no GPU).")


def build_policy(config: RunConfig, task: Task, cache_dir: Path):
    """The student: a local HF checkpoint, or the tiny built-in Qwen2 after its (cached) warm-up."""
    from megatron_red.models.hf import HFPolicy

    if config.model.backend == "megatron":
        return build_megatron_policy(config, task, cache_dir)
    device = resolve_device(config.model.device)
    dtype = resolve_dtype(config.model.dtype, device)
    common = dict(optim_config=config.optim, device=device, dtype=dtype, fused_kernel=config.model.fused_kernel,
                  gradient_checkpointing=config.model.gradient_checkpointing,
                  moe_routing_replay=config.model.moe_routing_replay)
    if config.model.path:
        return HFPolicy.from_pretrained(config.model.path, **common)
    start = warmed_up_student(config, task, cache_dir)
    return HFPolicy.from_pretrained(str(start), **common)


def code_digest(package_dir: Path = Path(__file__).resolve().parents[1]) -> str:
    """A digest of this package's Python source and torch's version: what computes a warm-up, beside its inputs."""
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted(package_dir.rglob("*.py")):
        digest.update(str(path.relative_to(package_dir)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def warmed_up_student(config: RunConfig, task: Task, cache_dir: Path) -> Path:
    """Train (once) and cache the tiny student: random init, then SFT on short easy solutions."""
    from megatron_red.models.hf import HFPolicy
    from megatron_red.models.optim import OptimConfig
    from megatron_red.objectives import RedLossConfig
    from megatron_red.trainer.groups import Group, build_batch
    from megatron_red.trainer.update import policy_update

    # What the warm-up reads (not the method, nor the RL settings: every method of a seed shares the student). The
    # task enters through its warm-up data and tokenizer, so a change of the task's code or defaults is a new key;
    # the code that trains it through `code_digest` (a change of summation order is another student).
    content = hashlib.sha256(getattr(task.tokenizer, "model_proto", b""))
    for ex in task.warmup:
        content.update(json.dumps([ex.prompt_ids, ex.trace_ids]).encode())
    key = json.dumps({"model": dataclasses.asdict(config.model), "task": content.hexdigest(),
                      "seed": config.trainer.seed, "steps": config.data.warmup_steps, "lr": config.data.warmup_lr,
                      "batch": config.data.warmup_batch_size, "code": code_digest()}, sort_keys=True)
    path = cache_dir / f"student_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (path / "config.json").exists():
        return path
    torch.manual_seed(config.trainer.seed)
    device = resolve_device(config.model.device)
    steps = config.data.warmup_steps
    policy = HFPolicy.from_config(
        tiny_student_config(config, task.tokenizer),
        optim_config=OptimConfig(lr=config.data.warmup_lr, warmup_steps=max(1, steps // 10), total_steps=steps,
                                 weight_decay=0.0),
        device=device, dtype=resolve_dtype(config.model.dtype, device), fused_kernel=config.model.fused_kernel)
    sft = RedLossConfig.sft()
    generator = torch.Generator().manual_seed(config.trainer.seed)
    examples = task.warmup
    batch_size = config.data.warmup_batch_size
    print(f"[warm-up] {steps} SFT steps on {len(examples)} solutions of the warm-up problems", flush=True)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        rows = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
        batch = build_batch([Group(examples[i].prompt_ids, trace_ids=examples[i].trace_ids) for i in rows],
                            offline_in_group=False, std_normalize=False, pad_token_id=task.tokenizer.pad_token_id)
        metrics = policy_update(policy, batch, sft, 1.0, config.trainer.micro_batch_size)
        if step % max(1, steps // 5) == 0 or step == steps:
            print(f"[warm-up] step {step}/{steps}, loss {metrics['loss/loss']:.3f}, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    # A private temporary directory, renamed into place: concurrent runs (compare, DP ranks) never see half a student.
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    policy.save_pretrained(str(tmp))
    task.tokenizer.save(str(tmp))
    try:
        tmp.rename(path)
    except OSError:  # another run finished the same student first; both are identical
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def engine_kind(config: RunConfig) -> str:
    """`rollout.engine` with `auto` resolved: the local engine for the HF backend, megatron's for Megatron."""
    if config.rollout.engine == "auto":
        return "megatron" if config.model.backend == "megatron" else "local"
    return config.rollout.engine


def build_engine(kind: str, policy, tokenizer, rollout: RolloutConfig | None = None, *,
                 max_sequence_length: int | None = None) -> RolloutEngine:
    """The rollout engine `kind` sampling from `policy`.

    kind:                one of `ENGINE_KINDS`: "local" (torch decode loop over a Hugging Face module; CPU or one
                         GPU), "megatron" (megatron-core's dynamic engine on the policy's own TP x PP shards) or
                         "vllm" (vLLM in this process, TP = the policy's, refitted from the policy's weights).
    policy:              local: an `HFPolicy` or a Hugging Face causal-LM module. megatron: a `MegatronPolicy` or
                         a `ShardedModel` (anything with `.model`, `.arch` and `.mp_group`). vllm: an `HFPolicy`,
                         a `MegatronPolicy` or a `ShardedModel` (what has `named_hf_weights()`), or a Hugging Face
                         checkpoint directory (loaded by vLLM itself). A policy backend gets the engine attached as
                         `policy.rollout_engine`, which its actor hooks (`infer`, ...) use.
    tokenizer:           gives the EOS id (and the pad id the local engine emits after it).
    rollout:             a `RolloutConfig` (batch size, CUDA graphs, KV-cache options); None = its defaults.
    max_sequence_length: megatron, vllm: longest prompt + response (None = `rollout.max_sequence_length`, else the
                         model's `max_position_embeddings`).
    """
    if kind not in ENGINE_KINDS:
        raise ValueError(f"unknown engine {kind!r}; known: {ENGINE_KINDS}")
    rollout = rollout or RolloutConfig()
    if kind == "local":
        engine = _local_engine(policy, tokenizer, rollout)
    elif kind == "vllm":
        engine = _vllm_engine(policy, tokenizer, rollout, max_sequence_length)
    else:
        engine = _megatron_engine(policy, tokenizer, rollout, max_sequence_length)
    if isinstance(policy, PolicyBackend):
        policy.rollout_engine = engine
    return engine


def _local_engine(policy, tokenizer, rollout) -> RolloutEngine:
    from megatron_red.rollout.local import LocalEngine

    model = policy if isinstance(policy, torch.nn.Module) else getattr(policy, "model", None)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_decoder"):
        raise ValueError("the local engine samples from a Hugging Face causal LM (an HFPolicy or its module); "
                         "the Megatron backend uses rollout.engine=megatron")
    check_supported(model.config)  # the engine runs the family's sub-modules itself
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return LocalEngine(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                       max_batch_size=rollout.max_batch_size, device=device,
                       cuda_graph=rollout.cuda_graph and device.type == "cuda")


def _megatron_engine(policy, tokenizer, rollout, max_sequence_length: int | None) -> RolloutEngine:
    from megatron_red.rollout.megatron import MegatronEngine

    if not all(hasattr(policy, a) for a in ("model", "arch", "mp_group")):
        raise ValueError("the megatron engine samples from a MegatronPolicy or a ShardedModel "
                         "(models/megatron/policy.py)")
    length = max_sequence_length or rollout.max_sequence_length or policy.arch.max_position_embeddings
    return MegatronEngine(
        policy.model, valid_vocab_size=policy.arch.vocab_size, eos_token_id=tokenizer.eos_token_id,
        max_requests=rollout.max_batch_size, max_sequence_length=length, block_size_tokens=rollout.kv_block_size,
        kv_buffer_gb=rollout.kv_buffer_gb, prefix_caching=rollout.prefix_caching,
        cuda_graph=rollout.cuda_graph and next(policy.model.parameters()).is_cuda,
        release_kv_cache=rollout.release_kv_cache, mp_group=policy.mp_group, ep_group=getattr(policy, "lockstep", None))


def _vllm_engine(policy, tokenizer, rollout, max_sequence_length: int | None) -> RolloutEngine:
    from megatron_red.rollout.vllm_engine import VLLMEngine

    if not isinstance(policy, (str, Path)) and not hasattr(policy, "named_hf_weights"):
        raise ValueError("the vllm engine refits from a policy's named_hf_weights() (an HFPolicy, MegatronPolicy or "
                         "ShardedModel), or loads a checkpoint directory")
    on_cuda = torch.cuda.is_available()
    common = dict(eos_token_id=tokenizer.eos_token_id, max_batch_size=rollout.max_batch_size,
                  kv_buffer_gb=rollout.kv_buffer_gb, prefix_caching=rollout.prefix_caching,
                  cuda_graph=rollout.cuda_graph and on_cuda, release_kv_cache=rollout.release_kv_cache)
    requested = max_sequence_length or rollout.max_sequence_length
    if isinstance(policy, (str, Path)):  # a checkpoint directory: vLLM reads it
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(policy), local_files_only=True)
        return VLLMEngine(model_path=str(policy), dtype=torch.bfloat16 if on_cuda else torch.float32,
                          max_sequence_length=vllm_sequence_length(requested, config.max_position_embeddings),
                          **common)
    if hasattr(policy, "mp_group"):  # Megatron: TP = the training TP, the pipeline stages split the prompts
        from megatron.core import parallel_state as ps

        hf_config, tp = policy.hf_config, ps.get_tensor_model_parallel_world_size()
        groups = dict(gather_group=ps.get_pipeline_model_parallel_group(), mp_group=policy.mp_group)
        dtype = next(policy.model.parameters()).dtype
    else:
        hf_config, tp, groups = policy.model.config, 1, {}
        dtype = policy.dtype  # the HF backend's compute dtype (bf16 on CUDA; its fp32 on CPU)
    return VLLMEngine(hf_config, weights=policy, dtype=dtype, tensor_parallel_size=tp,
                      max_sequence_length=vllm_sequence_length(requested, hf_config.max_position_embeddings),
                      **groups, **common)


def vllm_sequence_length(requested: int | None, max_position_embeddings: int) -> int:
    """vLLM's max_model_len: the requested length (None: the model's), at most the model's positions (vLLM refuses
    more; a longer request is refused by the engine, naming rollout.max_sequence_length). `plan` sizes with it."""
    return min(requested or max_position_embeddings, max_position_embeddings)


def rollout_max_sequence_length(config: RunConfig) -> int:
    """`rollout.max_sequence_length`, or the longest request a run makes: prompt + response, with BREAD's longest
    expert prefix in the prompt."""
    if config.rollout.max_sequence_length is not None:
        return config.rollout.max_sequence_length
    prefix = 0
    if config.algo.method == "bread":
        prefix = int(max(config.algo.bread_prefix_fractions, default=0.0) * config.data.max_trace_tokens)
    return config.data.max_prompt_tokens + prefix + config.rollout.max_new_tokens


def parallel_layout(model: ModelConfig, world_size: int, device: torch.device, num_experts: int = 0) -> ParallelLayout:
    """The Megatron layout of `model` (the run config's model section, whose student has `num_experts` experts per
    layer, 0 = dense: `config.student_experts`) in a world of `world_size` processes on `device`: what `train`
    builds and `plan` counts.

    The device-dependent `auto`s follow `device`: `model.dtype` is bfloat16 on CUDA and float32 elsewhere
    (`resolve_dtype`), `model.fused_kernel` is on for CUDA (`fused_kernel_enabled`). `train` passes the device it
    trains on; `plan` passes CUDA, its target, on any host. `model.attention=auto` is sdpa on every installation
    (only paths that have run: models/megatron/layout.py, `AUTO_ATTENTION`); RoPE fusion goes with `te`.
    """
    tp, pp, ep = model.tensor_model_parallel_size, model.pipeline_model_parallel_size, model.expert_model_parallel_size
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not a multiple of TP x PP = {tp} x {pp} "
                          "(model.tensor_model_parallel_size x model.pipeline_model_parallel_size)")
    dp = world_size // (tp * pp)
    if dp % ep:
        raise ConfigError(f"model.expert_model_parallel_size={ep} must divide the data-parallel size {dp} (world size "
                          f"{world_size} / (TP x PP = {tp} x {pp})): the experts are split over data-parallel ranks")
    recompute = "full" if model.gradient_checkpointing else "selective" if model.recompute_modules else "none"
    return ParallelLayout(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, data_parallel_size=dp,
        dtype=dtype_name(resolve_dtype(model.dtype, device)), use_distributed_optimizer=model.use_distributed_optimizer,
        sequence_parallel=model.sequence_parallel, attention=resolve_attention(model.attention), recompute=recompute,
        recompute_modules=model.recompute_modules if recompute == "selective" else (),
        fused_kernel=fused_kernel_enabled(model.fused_kernel, device), moe=num_experts > 0,
        expert_model_parallel_size=ep, moe_router_dtype=model.moe_router_dtype,
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_capacity_factor=model.moe_capacity_factor)


def build_megatron_policy(config: RunConfig, task: Task, cache_dir: Path):
    """The `MegatronPolicy` of a `RunConfig` (joins the torchrun world first) in its `parallel_layout`. Without
    `model.path`, the tiny built-in student (warmed up once by global rank 0 with the Hugging Face backend) is the
    checkpoint."""
    init_distributed(config.trainer.dist_timeout_minutes)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    # before the warm-up: a bad world fails now
    layout = parallel_layout(config.model, dist.get_world_size(), device, student_experts(config.model))
    path = config.model.path
    if path is None:
        if is_main_process():
            warmed_up_student(config, task, cache_dir)
        barrier()
        path = warmed_up_student(config, task, cache_dir)  # cached by rank 0: only resolves the directory
    return megatron_policy(config, layout, path)


def megatron_policy(config: RunConfig, layout: ParallelLayout, path: str | Path):
    """The `MegatronPolicy` of `config` in `layout` from the Hugging Face checkpoint directory `path` (every rank
    reads only its shard)."""
    from megatron_red.models.hf_checkpoint import HFCheckpoint
    from megatron_red.models.megatron import MegatronConfig, MegatronPolicy, load_hf_config

    if is_main_process():
        print(f"[model] Megatron layout: {layout.describe()}")
    megatron_config = MegatronConfig(
        **dataclasses.asdict(layout), max_tokens_per_micro_batch=config.trainer.max_tokens_per_micro_batch,
        seed=config.trainer.seed, dist_timeout_minutes=config.trainer.dist_timeout_minutes,
        offload_optimizer=config.rollout.offload_optimizer,
        inference_cuda_graphs=config.rollout.cuda_graph and torch.cuda.is_available(),
        moe_routing_replay=config.model.moe_routing_replay)
    return MegatronPolicy(load_hf_config(path), HFCheckpoint(path), megatron_config, config.optim)
