"""Per-token log-probs and entropies through megatron-core's pipeline schedule (TP x PP).

Rollouts and offline teacher traces are scored the same way: each micro-batch goes through the model's pipeline
stages via `get_forward_backward_func()`; on the last stage an `output_processor` hook of `GPTModel` turns the
final hidden states at the loss-mask positions into `log pi(target)` and the full-vocabulary entropy without
gathering the vocabulary-parallel logits (`vocab_parallel_logprobs_entropy`, or the fused LM-head kernel when
`fused_kernel` is on); prompt and padding positions never reach the LM head.

`run_pipeline` is shared by forward-only scoring and by training (`loss_fn` given): one schedule, one head. With a
mixture of experts, a `RoutingSession` (parallel/routing.py) sees each micro-batch's recorded experts before its
forward, and under expert parallelism every rank of the expert-parallel group runs as many micro-batches
(`in_lockstep`): its MoE layers exchange tokens with the other data-parallel replicas in every forward.
Micro-batches are right-padded rows (attention is causal, so real tokens never see padding and no padding mask is
needed) or, with `packed=True`, rows packed into one THD sequence (parallel/packing.py). Packed micro-batches of
different lengths pass through the pipeline like padded ones of different lengths: megatron-core exchanges the
activation shape of every micro-batch between stages (`variable_seq_lengths`), so no pack is padded to the budget.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist

from megatron_red.kernels import fused_linear_logprobs_entropy, vocab_parallel_logprobs_entropy
from megatron_red.parallel.packing import ModelMicroBatch, micro_batch_rows, packed_micro_batch, padded_micro_batch


@dataclass
class LogprobHead:
    """How the last pipeline stage maps hidden states to per-token log-probs and entropies.

    tp_group:          tensor-parallel group of the vocabulary-parallel LM head.
    valid_vocab_size:  real vocabulary size; the padded ids of Megatron's vocabulary get probability 0.
    temperature:       logits are divided by it (sampling temperature of the rollouts).
    fused_kernel:      use `megatron_red.kernels.fused_linear_logprobs_entropy` (LM-head matmul fused with the
                       log-prob / entropy reductions, no [tokens, V_shard] logits tensor) instead of the
                       output layer followed by `vocab_parallel_logprobs_entropy`.
    """

    tp_group: dist.ProcessGroup | None
    valid_vocab_size: int
    temperature: float = 1.0
    fused_kernel: bool = False

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def __call__(self, *, hidden_states: torch.Tensor, output_layer, output_weight, context, config,
                 **_unused) -> tuple[torch.Tensor, torch.Tensor]:
        """GPTModel `output_processor`: hidden [S, B, h] (S / TP with sequence parallelism) and the context
        (positions [n] into the flattened [S * B] hidden states, targets [n]) -> (logprobs, entropy), each [n]."""
        from megatron.core.tensor_parallel import (copy_to_tensor_model_parallel_region,
                                                   gather_from_sequence_parallel_region)

        positions, targets = context
        tensor_parallel = self.tp_group is not None and dist.get_world_size(self.tp_group) > 1
        if config.sequence_parallel:
            # Every rank needs the whole sequence; each rank's gradient below is already the full one (summed over
            # TP), so the backward of the gather keeps this rank's slice instead of reduce-scattering.
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False,
                                                                 group=self.tp_group)
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, positions)
        weight = output_weight if output_weight is not None else output_layer.weight
        if self.fused_kernel:
            # The kernel sums the hidden-state gradient over tp_group itself (ColumnParallelLinear's job otherwise).
            return fused_linear_logprobs_entropy(hidden, weight, targets, tp_group=self.tp_group,
                                                 temperature=self.temperature,
                                                 valid_vocab_size=self.valid_vocab_size)
        if tensor_parallel:  # the head is column-parallel: the hidden-state gradient is a sum over vocabulary shards
            hidden = copy_to_tensor_model_parallel_region(hidden, group=self.tp_group)
        logits = torch.nn.functional.linear(hidden, weight)  # [n, V_shard]
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return vocab_parallel_logprobs_entropy(logits, targets, tp_group=self.tp_group,
                                               valid_vocab_size=self.valid_vocab_size)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def in_lockstep(micro_batches: list, batch, group: dist.ProcessGroup | None) -> tuple[list, int]:
    """(`micro_batches` followed by idle ones, how many of them are real): as many micro-batches as the rank of
    `group` (the expert-parallel group, or None) with the most; an idle one is `batch.idle_row()`, which trains
    nothing."""
    real = len(micro_batches)
    if group is None or dist.get_world_size(group) == 1:
        return micro_batches, real
    count = torch.tensor([real], dtype=torch.int64, device="cuda" if dist.get_backend(group) == "nccl" else "cpu")
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    return micro_batches + [batch.idle_row()] * (int(count.item()) - real), real


def run_pipeline(model: torch.nn.Module, micro_batches: list, head: LogprobHead, *,
                 loss_fn: Callable | None = None, packed: bool = False, routing=None) -> list:
    """Run every micro-batch through the pipeline schedule.

    micro_batches: `SequenceBatch`es, the same on every rank of the TP x PP grid.
    loss_fn:       None for forward only; otherwise `loss_fn(logprobs, entropy, micro_batch) -> (loss, metrics)`
                   with logprobs / entropy [b, L-1] (zero outside the loss mask) and the micro-batch's rows; each
                   loss is back-propagated through all stages (gradients accumulate in `model`).
    packed:        run each micro-batch's rows packed into one THD sequence instead of right-padded.
    routing:       a `RoutingSession` (parallel/routing.py) of a mixture of experts, given each micro-batch's
                   recorded experts before its forward; None for a dense model.
    Returns, on the last pipeline stage, one entry per micro-batch: `(logprobs, entropy)` [b, L-1] detached when
    forward only, else the metrics dict; an empty list on the other stages.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    device = _model_device(model)
    forward_only = loss_fn is None
    # Sequence parallelism splits the sequence over the TP ranks: its length must divide evenly.
    multiple = dist.get_world_size(head.tp_group) if get_model_config(model).sequence_parallel else 1
    layout = packed_micro_batch if packed else padded_micro_batch
    model_batches = [layout(mb, multiple) for mb in micro_batches]

    def last_stage_reduce(micro_batch: ModelMicroBatch, output):
        # Back to the rows' right-padded [b, L-1] layout (row-major over the loss mask, as the positions were taken).
        mask = micro_batch.rows.loss_mask.bool()
        zeros = torch.zeros(mask.shape, dtype=torch.float32, device=device)
        logprobs, entropy = (zeros.masked_scatter(mask, o.float()) for o in output)
        if forward_only:
            return torch.zeros((), device=device), torch.ones((), dtype=torch.int), (logprobs.detach(),
                                                                                   entropy.detach())
        loss, metrics = loss_fn(logprobs, entropy, micro_batch.rows)
        # A 3-tuple with `calculate_per_token_loss=True` (see policy.py) stops the schedule from dividing the
        # loss by the number of micro-batches: the loss is already normalised with global counts.
        return loss, torch.ones((), dtype=torch.int), metrics

    def forward_step(data_iterator, chunk):
        micro_batch = next(data_iterator).to(device)
        if routing is not None:
            routing.set_micro_batch(micro_batch.routing)
        output = chunk(micro_batch.input_ids, micro_batch.position_ids, None,
                       packed_seq_params=micro_batch.packed_seq_params(), output_processor=head,
                       output_processor_context=(micro_batch.head_positions, micro_batch.targets))
        return output, partial(last_stage_reduce, micro_batch)

    schedule = get_forward_backward_func()
    with torch.set_grad_enabled(not forward_only), routing if routing is not None else contextlib.nullcontext():
        return schedule(forward_step_func=forward_step, data_iterator=iter(model_batches), model=[model],
                        num_microbatches=len(model_batches),
                        seq_length=max(mb.input_ids.shape[1] for mb in model_batches),
                        micro_batch_size=max(mb.input_ids.shape[0] for mb in model_batches),
                        forward_only=forward_only)


def pipeline_logprobs_entropy(model: torch.nn.Module, batch, micro_batch_size: int, head: LogprobHead,
                              pp_group: dist.ProcessGroup | None, *, max_tokens: int = 0, routing=None,
                              lockstep: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-only fp32 (logprobs, entropy), each [B, L-1] on CPU and zero where `loss_mask` is 0, on every rank.

    Micro-batches of `micro_batch_size` rows, or with `max_tokens` > 0 rows packed by that token budget; as many
    as the other ranks of `lockstep` run (`in_lockstep`). Computed on the last pipeline stage and broadcast to the
    other stages of `pp_group`. `routing`: as for `run_pipeline`.
    """
    b, length = batch.input_ids.shape
    device = _model_device(model)
    out = torch.zeros(2, b, length - 1, dtype=torch.float32, device=device)
    rows = micro_batch_rows(batch, micro_batch_size, max_tokens)
    micro_batches, _ = in_lockstep([batch.select(r) for r in rows], batch, lockstep)
    results = run_pipeline(model, micro_batches, head, packed=bool(max_tokens), routing=routing) if micro_batches \
        else []
    for r, (logprobs, entropy) in zip(rows, results):
        width = logprobs.shape[1]
        index = r.to(device)
        out[0, index, :width] = logprobs
        out[1, index, :width] = entropy
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        last = dist.get_global_rank(pp_group, dist.get_world_size(pp_group) - 1)
        dist.broadcast(out, src=last, group=pp_group)
    return out[0].cpu(), out[1].cpu()
