"""Build the Megatron backend of a run (`model.backend=megatron`): the policy and its rollout engine.

Every rank reads only its TP x PP shard of the Hugging Face checkpoint (`load_hf_weights`). Rollouts use the local
engine over a Hugging Face copy of the policy, refreshed tensor by tensor (`HFExport`) after each update. Only the
first rank of each model-parallel group (its TP x PP ranks, one data-parallel replica) holds that copy and
samples; it broadcasts the completions to the other ranks of the group, which must train on exactly the same rows
(independent sampling on each TP rank would agree only as far as the GPU kernels are bit-deterministic).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_red.models.hf_checkpoint import HFCheckpoint, is_hf_checkpoint
from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy
from megatron_red.models.megatron.weights import HFExport
from megatron_red.models.precision import dtype_name, resolve_dtype
from megatron_red.rollout.base import Completion, RolloutEngine, SamplingParams


def load_hf_config(path: str | Path):
    """The transformers config of a local checkpoint directory (its weights are read lazily, see HFCheckpoint)."""
    from transformers import AutoConfig

    if not is_hf_checkpoint(path):
        raise ValueError(f"{path}: expected a Hugging Face checkpoint directory (config.json + *.safetensors)")
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def fused_kernel_enabled(mode: str) -> bool:
    """`model.fused_kernel` auto | on | off -> whether the LM-head log-probs go through the fused kernel."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"model.fused_kernel must be auto, on or off, got {mode!r}")
    if mode == "auto":
        from megatron_red.kernels import fused_kernel_available

        return torch.cuda.is_available() and fused_kernel_available(torch.device("cuda"))
    return mode == "on"


def build_megatron_policy(config, task, cache_dir: Path) -> MegatronPolicy:
    """The `MegatronPolicy` of a `RunConfig` (joins the torchrun world first). Without `model.path`, the tiny
    built-in student (warmed up once by global rank 0 with the Hugging Face backend) is the checkpoint."""
    from megatron_red.trainer.build import warmed_up_student
    from megatron_red.trainer.distributed import barrier, init_distributed, is_main_process

    init_distributed(config.trainer.dist_timeout_minutes)
    path = config.model.path
    if path is None:
        if is_main_process():
            warmed_up_student(config, task, cache_dir)
        barrier()
        path = warmed_up_student(config, task, cache_dir)  # cached by rank 0: only resolves the directory
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    m = config.model
    hf_config = load_hf_config(path)
    megatron_config = MegatronConfig(
        tensor_model_parallel_size=m.tensor_model_parallel_size,
        pipeline_model_parallel_size=m.pipeline_model_parallel_size,
        dtype=dtype_name(resolve_dtype(m.dtype, device)), use_distributed_optimizer=m.use_distributed_optimizer,
        fused_kernel=fused_kernel_enabled(m.fused_kernel), recompute_activations=m.gradient_checkpointing,
        recompute_modules=m.recompute_modules, sequence_parallel=m.sequence_parallel, attention=m.attention,
        max_tokens_per_micro_batch=config.trainer.max_tokens_per_micro_batch, seed=config.trainer.seed,
        dist_timeout_minutes=config.trainer.dist_timeout_minutes)
    return MegatronPolicy(hf_config, HFCheckpoint(path), megatron_config, config.optim)


class MegatronRolloutEngine(RolloutEngine):
    """`LocalEngine` sampling from a Hugging Face copy of a `MegatronPolicy` (see the module docstring).

    policy:          the trained policy; its weights are copied in now and on every `sync_weights`.
    eos_token_id, pad_token_id, max_batch_size: as for `LocalEngine`.
    """

    def __init__(self, policy: MegatronPolicy, eos_token_id: int, pad_token_id: int, max_batch_size: int):
        from megatron.core import parallel_state as ps
        from transformers import AutoModelForCausalLM

        from megatron_red.rollout.local import LocalEngine

        self.group = ps.get_model_parallel_group()
        self.src = dist.get_global_rank(self.group, 0)
        self.engine: LocalEngine | None = None
        if dist.get_rank() == self.src:
            on_gpu = torch.cuda.is_available()
            device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
            hf_model = AutoModelForCausalLM.from_config(
                policy.hf_config, dtype=torch.bfloat16 if on_gpu else torch.float32).to(device)
            hf_model.requires_grad_(False)
            self.engine = LocalEngine(hf_model, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                      max_batch_size=max_batch_size, device=device)
        self.sync_weights(policy)

    def sync_weights(self, policy: MegatronPolicy) -> None:
        # Collective over TP x PP: every rank of the group iterates; the sampling rank copies one tensor at a time.
        copy = self.engine.model.state_dict() if self.engine is not None else {}
        loaded = set()
        for name, tensor in HFExport(policy.model, policy.arch, policy.tp_group, policy.pp_group):
            copy[name].copy_(tensor)
            loaded.add(name)
        if self.engine is not None:
            tied = {"lm_head.weight"} if policy.arch.tie_word_embeddings else set()
            if set(copy) - tied - loaded:
                raise RuntimeError(f"rollout copy mismatch: not exported {sorted(set(copy) - tied - loaded)}")

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        holder = [self.engine.generate(prompts, n, params) if self.engine is not None else None]
        if dist.get_world_size(self.group) > 1:
            dist.broadcast_object_list(holder, src=self.src, group=self.group)
        return holder[0]
