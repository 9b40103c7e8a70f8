"""`MegatronPolicy`: the RED policy as a megatron-core GPTModel with tensor, pipeline and data parallelism.

One training step is `get_loss_and_metrics` (any number of calls; gradients accumulate) then `optimizer_step`.

Loss normalisation. The trainer's `loss_fn` divides by *global* token / sequence counts (over all micro-batches
and all data-parallel ranks), so the gradient of the step is the plain sum of the per-micro-batch gradients over
micro-batches and DP ranks. megatron-core by default averages twice — the schedule divides each micro-batch loss
by the number of micro-batches and DDP scales gradients by 1/DP before its reduction. Both are switched off:
`calculate_per_token_loss=True` makes the schedule leave a (loss, num_tokens, metrics) loss undivided and DDP
sum over DP (gradient_scaling_factor = 1); the per-token division megatron would then apply in
`finalize_model_grads` is skipped by calling it with `num_tokens=None`. Gradients are therefore a sum, and
TP, PP, DP and the micro-batch size do not change the update. The DP reduction (and the tied-embedding reduction
between first and last stage) happens once, in `optimizer_step`, so several `get_loss_and_metrics` calls per step
accumulate correctly.

Mixtures of experts. megatron adds each MoE layer's load-balancing loss to the gradient weighted by its micro-batch's
routed tokens (`calculate_per_token_loss`), which the skipped division would have divided by the total; instead
its coefficient is `model.moe_aux_loss_coeff` / (the tokens the routers see in the call, over all data-parallel
ranks) during each `get_loss_and_metrics`, so the term is the coefficient times the token-weighted mean over the
call's micro-batches. The routers' replay hooks (parallel/routing.py) replay the engine's recorded experts in every
forward and, in training calls, report `moe_routing_*` / `moe_aux_loss_*` sums with the first micro-batch's
metrics. Under expert parallelism every rank of an expert-parallel group runs as many micro-batches
(`pipeline.in_lockstep`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_red.batch import SequenceBatch
from megatron_red.models.base import LossFn, PolicyBackend
from megatron_red.models.hf_checkpoint import (DEFAULT_MAX_SHARD_BYTES, TensorSpec, as_hf_weights,
                                              write_hf_checkpoint)
from megatron_red.models.megatron import checkpoint
from megatron_red.models.megatron.layout import ParallelLayout
from megatron_red.models.megatron.model import HFArchitecture, build_gpt_model, make_transformer_config
from megatron_red.models.megatron.offload import OptimizerOffload
from megatron_red.models.megatron.weights import HFExport, load_hf_weights, unwrap_model
from megatron_red.models.optim import OptimConfig, lr_multiplier
from megatron_red.models.precision import DTYPES
from megatron_red.parallel import routing
from megatron_red.parallel.packing import micro_batch_rows, model_tokens
from megatron_red.parallel.pipeline import LogprobHead, in_lockstep, pipeline_logprobs_entropy, run_pipeline


@dataclass
class MegatronConfig(ParallelLayout):
    """What a `MegatronPolicy` (or a `ShardedModel`) is built with: its `ParallelLayout` (the fields above, resolved
    by `trainer.build.parallel_layout`) and the run's settings the policy applies itself:

    max_tokens_per_micro_batch:   > 0: pack rows into THD micro-batches of at most this many tokens
                                  (first-fit-decreasing, parallel/packing.py) instead of micro_batch_size rows.
    seed:                         seed of megatron's model-parallel RNG tracker (GPU only).
    dist_timeout_minutes:         time-out of the TP / PP / DP process groups megatron-core creates (its own
                                  default is 30 min, whatever the world's); `trainer.dist_timeout_minutes`.
    offload_optimizer:            move optimiser state to host memory and free the gradient buffers during
                                  the rollout phase (`prepare_for_inference` .. `prepare_for_training`).
    inference_cuda_graphs:        build the layers with megatron's "local" CUDA-graph managers for the
                                  inference engine's decode steps (off while training; GPU only).
    moe_routing_replay:           mixtures of experts: replay the engine's expert choices in the training forwards
                                  (`model.moe_routing_replay`; parallel/routing.py).

    A 16-bit layout is bfloat16 only: float16 would need loss scaling, which this backend does not wire into the
    schedule (a dynamic scaler's skipped steps would drop whole RED steps); the run config refuses it.
    """

    max_tokens_per_micro_batch: int = 0
    seed: int = 1234
    dist_timeout_minutes: float = 60.0
    offload_optimizer: bool = False
    inference_cuda_graphs: bool = False
    moe_routing_replay: bool = True


def _sum_over_dp_finalize(model_chunks, num_tokens=None, **kwargs):
    """`finalize_model_grads` without megatron's per-token division (our loss is globally normalised)."""
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(model_chunks, num_tokens=None, **kwargs)


def build_sharded_model(hf_config, weights, config: MegatronConfig):
    """This rank's `GPTModel` stage (TP x PP shard) holding the Hugging Face weights, in `config.dtype`, on the
    current CUDA device (else the CPU); no optimiser. Initialises megatron-core's parallel state if it is not
    already (torch.distributed must be). Returns (HFArchitecture, model, TransformerConfig).

    weights: an HF checkpoint directory or `HFCheckpoint` (each rank reads only its shard, lazily), or an in-memory
    state dict; see `load_hf_weights`. None leaves the parameters uninitialised, for a dist checkpoint to fill."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if not dist.is_initialized():
        raise ValueError("the Megatron backend needs torch.distributed to be initialised (torchrun)")
    if not ps.model_parallel_is_initialized():
        # No gloo twins of megatron's groups: only the distributed optimizer's gathered checkpoint formats use them
        # (checkpoint.py uses none of those), and across nodes they need a routable interface (a host name that
        # resolves to 127.0.1.1 hangs them). On CPU the groups megatron does create are gloo groups anyway.
        ps.initialize_model_parallel(tensor_model_parallel_size=config.tensor_model_parallel_size,
                                     pipeline_model_parallel_size=config.pipeline_model_parallel_size,
                                     expert_model_parallel_size=config.expert_model_parallel_size,
                                     distributed_timeout_minutes=config.dist_timeout_minutes,
                                     create_gloo_process_groups=False)
    elif (ps.get_tensor_model_parallel_world_size() != config.tensor_model_parallel_size
          or ps.get_pipeline_model_parallel_world_size() != config.pipeline_model_parallel_size
          or ps.get_expert_model_parallel_world_size() != config.expert_model_parallel_size):
        raise ValueError("megatron parallel state is initialised with a different TP/PP/EP layout than the config")
    arch = HFArchitecture.from_hf_config(hf_config)
    on_gpu = torch.cuda.is_available()
    if on_gpu:  # megatron's CUDA-graph managers need a graph-safe RNG tracker
        tensor_parallel.model_parallel_cuda_manual_seed(config.seed,
                                                        use_cudagraphable_rng=config.inference_cuda_graphs)
    dtype = DTYPES[config.dtype]
    tconfig = make_transformer_config(arch, config, use_cpu_initialization=not on_gpu,
                                      cuda_graph_impl="local" if config.inference_cuda_graphs else "none")
    tconfig.calculate_per_token_loss = True  # gradients are sums; see the module docstring
    tconfig.perform_initialization = False  # every weight is loaded next: random init would only cost time
    model = build_gpt_model(arch, tconfig, pre_process=ps.is_pipeline_first_stage(),
                            post_process=ps.is_pipeline_last_stage(), attention=config.attention)
    # The local spec's RMSNorm (local_spec.py, like torch.nn.RMSNorm) is built in fp32. megatron's 16-bit
    # optimisers assume every parameter is 16-bit (their sharded_state_dict maps optimiser ids through the
    # 16-bit params only; the distributed optimiser's buffers are per dtype), so mixed dtypes break checkpoint
    # saving. Cast the whole model, as megatron's own Float16Module does.
    model = model.to(dtype=dtype)
    if on_gpu:
        model = model.cuda(torch.cuda.current_device())
    if weights is not None:
        load_hf_weights(model, as_hf_weights(weights), arch, ps.get_tensor_model_parallel_group(),
                        ps.get_expert_model_parallel_group())
    if config.inference_cuda_graphs:
        from megatron.core.transformer.utils import toggle_cuda_graphs

        toggle_cuda_graphs(model, "none")  # eager training; the inference engine turns them on while it runs
    return arch, model, tconfig


def named_hf_weights(model: torch.nn.Module, arch: HFArchitecture):
    """Collective over the model-parallel group (and, with experts, the expert-parallel group): every HF tensor of
    the TP x PP (x EP)-sharded `model` on every rank, one at a time (`HFExport(every_rank=True)`)."""
    from megatron.core import parallel_state as ps

    yield from HFExport(model, arch, ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(),
                        ps.get_expert_model_parallel_group(), every_rank=True)


@dataclass
class ShardedModel:
    """This rank's `GPTModel` stage without an optimiser, for inference (`megatron-red eval --engine megatron`)."""

    arch: HFArchitecture
    model: torch.nn.Module
    mp_group: dist.ProcessGroup
    hf_config: object = None
    """The transformers config it was built from."""

    def named_hf_weights(self):
        return named_hf_weights(self.model, self.arch)

    @classmethod
    def from_hf(cls, hf_config, weights, config: MegatronConfig) -> "ShardedModel":
        """`weights` as for `build_sharded_model`."""
        from megatron.core import parallel_state as ps

        arch, model, _ = build_sharded_model(hf_config, weights, config)
        return cls(arch, model.eval(), ps.get_model_parallel_group(), hf_config)


def save_hf_pretrained(model: torch.nn.Module, hf_config, path: str, dtype: torch.dtype | None = None,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Collective over all ranks: write the Hugging Face checkpoint of a TP x PP (x EP)-sharded `model` into `path`
    (safetensors shards + index + config.json), streamed tensor by tensor (`HFExport`) by global rank 0; the
    other (expert-)data-parallel replicas hold the same weights and only wait."""
    from megatron.core import parallel_state as ps

    if ps.get_expert_data_parallel_rank() == 0:  # = the data-parallel rank without experts (EP 1)
        export = HFExport(model, HFArchitecture.from_hf_config(hf_config), ps.get_tensor_model_parallel_group(),
                          ps.get_pipeline_model_parallel_group(), ps.get_expert_model_parallel_group())
        if export.is_writer:
            specs = [TensorSpec(s.name, s.shape, dtype or s.dtype) for s in export.specs]
            write_hf_checkpoint(path, hf_config, specs, export, max_shard_bytes)
        else:
            for _ in export:  # serves this rank's shards to the writer
                pass
    dist.barrier()


class MegatronPolicy(PolicyBackend):
    """A Qwen2 / Llama policy sharded with megatron-core; see the module docstring for loss normalisation.

    Must be constructed on every rank of an initialised `torch.distributed` world; initialises megatron-core's
    parallel state if it is not already. `weights`: the Hugging Face weights (a checkpoint directory, read lazily,
    each rank reading only its shard; or an in-memory state dict), see `build_sharded_model`.
    """

    def __init__(self, hf_config, weights, config: MegatronConfig, optim: OptimConfig):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.arch, model, tconfig = build_sharded_model(hf_config, weights, config)
        self.hf_config, self.config, self.optim = hf_config, config, optim
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.mp_group = ps.get_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        self.routing_replays = routing.install(model)  # [] for a dense model
        self.lockstep = ps.get_expert_model_parallel_group() if config.expert_model_parallel_size > 1 else None
        dtype = DTYPES[config.dtype]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=config.use_distributed_optimizer, average_in_collective=False)
        self.model = DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=model)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=optim.lr, weight_decay=optim.weight_decay, adam_beta1=optim.betas[0],
                adam_beta2=optim.betas[1], adam_eps=optim.eps, clip_grad=max(optim.grad_clip, 0.0),
                use_distributed_optimizer=config.use_distributed_optimizer, params_dtype=dtype,
                bf16=dtype == torch.bfloat16),
            [self.model], use_gloo_process_groups=False)
        self.step = 0
        # In an fp32 model the master weights are views of the parameters, which stay on the GPU.
        self._offload = OptimizerOffload(self.optimizer, master_weights=config.dtype != "float32")
        self._set_lr()

    # -- actor hooks (models/base.py; docs/architecture.md) -------------------------------------------------------
    def prepare_for_inference(self) -> None:
        if self.config.offload_optimizer:
            self.offload_adam_states()

    def prepare_for_training(self) -> None:
        self.onload_adam_states()

    def offload_adam_states(self) -> None:
        """Adam moments (and a 16-bit model's fp32 master weights) to pinned host buffers (offload.py); gradient
        buffers freed."""
        if self._offload.offloaded:
            return
        self._offload.offload()
        self.model.offload_grad_buffers()

    def onload_adam_states(self) -> None:
        if not self._offload.offloaded:
            return
        self.model.restore_grad_buffers()
        self._offload.onload()

    # -- forward ------------------------------------------------------------------------------------------------
    def _head(self, temperature: float) -> LogprobHead:
        return LogprobHead(tp_group=self.tp_group, valid_vocab_size=self.arch.vocab_size, temperature=temperature,
                           fused_kernel=self.config.fused_kernel)

    def _routing(self, training: bool) -> routing.RoutingSession | None:
        """The routers' session of one pass (a mixture of experts; None for a dense model)."""
        if not self.routing_replays:
            return None
        return routing.RoutingSession(
            self.routing_replays, replay=self.config.moe_routing_replay, measure=training,
            recompute=training and self.config.recompute == "full", pre_softmax=not self.arch.moe_norm_topk_prob,
            tp_group=self.tp_group, sequence_parallel=self.config.sequence_parallel)

    def get_inference_log_probs(self, batch: SequenceBatch, micro_batch_size: int,
                                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        return pipeline_logprobs_entropy(self.model, batch, micro_batch_size, self._head(temperature), self.pp_group,
                                         max_tokens=self.config.max_tokens_per_micro_batch,
                                         routing=self._routing(training=False), lockstep=self.lockstep)

    def _aux_loss_weight(self, micro_batches: list[SequenceBatch]) -> float:
        """megatron's load-balancing coefficient for this call (module docstring): the configured one over the
        positions the routers see in it, on every data-parallel rank."""
        packed = bool(self.config.max_tokens_per_micro_batch)
        multiple = dist.get_world_size(self.tp_group) if self.config.sequence_parallel else 1
        tokens = torch.tensor([float(sum(model_tokens(mb, packed, multiple) for mb in micro_batches))],
                              device=next(self.model.parameters()).device)
        dist.all_reduce(tokens, group=self.dp_group)
        return self.config.moe_aux_loss_coeff / max(float(tokens.item()), 1.0)

    def get_loss_and_metrics(self, batch: SequenceBatch, micro_batch_size: int, loss_fn: LossFn,
                             temperature: float = 1.0) -> list[dict[str, float]]:
        budget = self.config.max_tokens_per_micro_batch
        rows = micro_batch_rows(batch, micro_batch_size, budget)
        micro_batches, real = in_lockstep([batch.select(r) for r in rows], batch, self.lockstep)
        if not micro_batches:
            return []
        config = unwrap_model(self.model).config
        session = self._routing(training=True)
        if self.config.moe_aux_loss_coeff:
            config.moe_aux_loss_coeff = self._aux_loss_weight(micro_batches)
        try:
            metrics = run_pipeline(self.model, micro_batches, self._head(temperature), loss_fn=loss_fn,
                                   packed=bool(budget), routing=session)
        finally:
            config.moe_aux_loss_coeff = self.config.moe_aux_loss_coeff
        # Only the last stage ran loss_fn; every rank returns its metrics (of the real micro-batches).
        if dist.get_world_size(self.pp_group) > 1:
            holder = [metrics]
            last = dist.get_global_rank(self.pp_group, dist.get_world_size(self.pp_group) - 1)
            dist.broadcast_object_list(holder, src=last, group=self.pp_group)
            metrics = holder[0]
        metrics = metrics[:real]
        if session is not None:
            stats = self._routing_statistics(session)
            if metrics:
                metrics[0].update(stats)
        return metrics

    def _routing_statistics(self, session: routing.RoutingSession) -> dict[str, float]:
        """The session's routing counts of the whole model: summed over the pipeline stages (each routes its own
        layers)."""
        stats = session.statistics(self.arch.moe_router_topk)
        if dist.get_world_size(self.pp_group) > 1:
            values = torch.tensor(list(stats.values()), dtype=torch.float64,
                                  device=next(self.model.parameters()).device)
            dist.all_reduce(values, group=self.pp_group)
            stats = dict(zip(stats, values.tolist()))
        return stats

    # -- optimiser ----------------------------------------------------------------------------------------------
    def _set_lr(self, lr_scale: float = 1.0) -> None:
        """Our warm-up + cosine schedule (models/optim.py) in place of megatron's OptimizerParamScheduler, which
        is also what turns megatron's per-group `wd_mult` (0 for biases and norm gains) into weight decay."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate * lr_scale * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.optim.weight_decay * group.get("wd_mult", 1.0)

    def restart_optimizer(self, optim: OptimConfig) -> None:
        """Adam's moments are dropped (each inner optimiser re-creates them, zero, at its next step); megatron's
        optimiser settings (betas, eps, clipping) are those of the run, which stage configs do not change."""
        for opt in self.optimizer.chained_optimizers:
            opt.optimizer.state.clear()
        self.optim, self.step = optim, 0
        self._set_lr()

    def scale_gradients(self, factor: float) -> None:
        """megatron-core DDP's own scaling of its gradient buffers (every stage scales its part; the DP and the
        tied-embedding reductions of `optimizer_step` come after, so they see the scaled sums)."""
        self.model.scale_gradients(factor)

    def optimizer_step(self, lr_scale: float = 1.0, advance_schedule: bool = True) -> float:
        _sum_over_dp_finalize([self.model])
        self._set_lr(lr_scale)
        if self.optim.grad_clip > 0:
            ok, grad_norm, _ = self.optimizer.step()
        else:  # megatron only measures the norm when clipping; report it anyway
            self.optimizer.prepare_grads()
            grad_norm = self.optimizer.get_grad_norm()
            ok = self.optimizer.step_with_ready_grads()
        if not ok:
            raise RuntimeError("megatron optimizer step skipped (non-finite gradients)")
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        if advance_schedule:
            self.step += 1
        return float(grad_norm)

    @property
    def learning_rate(self) -> float:
        return self.optim.lr * lr_multiplier(self.step, self.optim)

    # -- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's shard of model and optimiser state (resume on the same layout; see checkpoint.py for
        resharding checkpoints)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self._set_lr()

    def save_checkpoint(self, directory: str) -> None:
        """Collective: model and optimiser as a reshardable dist_checkpointing checkpoint (see checkpoint.py)."""
        checkpoint.save_checkpoint(self.model, self.optimizer, self.step, directory)

    def load_checkpoint(self, directory: str) -> None:
        """Collective: restore a checkpoint written by `save_checkpoint`, at any TP / PP / DP layout."""
        self.step = checkpoint.load_checkpoint(self.model, self.optimizer, directory)
        self._set_lr()

    def save_pretrained(self, path: str, dtype: torch.dtype | None = None) -> None:
        """Collective: the Hugging Face checkpoint, streamed tensor by tensor (see `save_hf_pretrained`)."""
        save_hf_pretrained(self.model, self.hf_config, path, dtype)

    def named_hf_weights(self):
        """Collective over the model-parallel group (`named_hf_weights` above)."""
        return named_hf_weights(self.model, self.arch)

    def checkpoint_nbytes(self, with_hf: bool = False) -> int:
        """Collective: parameters (their dtype) + fp32 main copy when 16-bit + two fp32 Adam moments (+ the
        parameters again for a Hugging Face export), over one model replica (a tied LM head counts twice; every EP
        rank holds as many experts)."""
        from megatron.core import parallel_state as ps

        params = list(unwrap_model(self.model).parameters())
        experts = sum(p.numel() for p in params if not getattr(p, "allreduce", True))  # this EP rank's experts
        local = sum(p.numel() for p in params) - experts + experts * self.config.expert_model_parallel_size
        total = torch.tensor([float(local)])
        if dist.get_backend() == "nccl":
            total = total.cuda()
        dist.all_reduce(total, group=ps.get_model_parallel_group())
        itemsize = DTYPES[self.config.dtype].itemsize
        per_param = itemsize + (4 if itemsize < 4 else 0) + 8 + (itemsize if with_hf else 0)
        return int(total.item()) * per_param
