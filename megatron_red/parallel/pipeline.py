"""Per-token log-probs and entropies through megatron-core's pipeline schedule (TP x PP).

Rollouts and offline teacher traces are scored the same way: each micro-batch goes through the model's pipeline
stages via `get_forward_backward_func()`; on the last stage an `output_processor` hook of `GPTModel` turns the
final hidden states into `log pi(target)` and the full-vocabulary entropy without gathering the vocabulary-
parallel logits (`vocab_parallel_logprobs_entropy`, or the fused LM-head kernel when `fused_kernel` is on).

`run_pipeline` is shared by forward-only scoring and by training (`loss_fn` given): one schedule, one head.
Attention is causal and sequences are right-padded, so real tokens never see padding and no padding mask is
needed; padded positions are zeroed by `loss_mask` afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist

from megatron_red.parallel.vocab_parallel import vocab_parallel_logprobs_entropy


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

    def __call__(self, *, hidden_states: torch.Tensor, output_layer, output_weight, context: torch.Tensor,
                 **_unused) -> tuple[torch.Tensor, torch.Tensor]:
        """GPTModel `output_processor`: hidden [L, b, h] and targets [b, L-1] -> (logprobs, entropy) [b, L-1]."""
        targets = context
        hidden = hidden_states[:-1]  # position t predicts target t = input t+1
        weight = output_weight if output_weight is not None else output_layer.weight
        if self.fused_kernel:
            from megatron_red.kernels import fused_linear_logprobs_entropy

            # The kernel sums the hidden-state gradient over tp_group itself (ColumnParallelLinear's job otherwise).
            return fused_linear_logprobs_entropy(hidden.transpose(0, 1), weight, targets, tp_group=self.tp_group,
                                                 temperature=self.temperature,
                                                 valid_vocab_size=self.valid_vocab_size)
        logits, _ = output_layer(hidden, weight=output_weight, runtime_gather_output=False)
        logits = logits.transpose(0, 1)  # [b, L-1, V_shard]
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return vocab_parallel_logprobs_entropy(logits, targets, tp_group=self.tp_group,
                                               valid_vocab_size=self.valid_vocab_size)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_pipeline(model: torch.nn.Module, micro_batches: list, head: LogprobHead, *,
                 loss_fn: Callable | None = None) -> list:
    """Run every micro-batch through the pipeline schedule.

    micro_batches: `SequenceBatch`es, the same on every rank of the TP x PP grid.
    loss_fn:       None for forward only; otherwise `loss_fn(logprobs, entropy, micro_batch) -> (loss, metrics)`
                   and each loss is back-propagated through all stages (gradients accumulate in `model`).
    Returns, on the last pipeline stage, one entry per micro-batch: `(logprobs, entropy)` detached when
    forward only, else the metrics dict; an empty list on the other stages.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = _model_device(model)
    forward_only = loss_fn is None

    def last_stage_reduce(micro_batch, output):
        logprobs, entropy = output
        if forward_only:
            return torch.zeros((), device=device), torch.ones((), dtype=torch.int), (logprobs.detach(),
                                                                                   entropy.detach())
        loss, metrics = loss_fn(logprobs, entropy, micro_batch)
        # A 3-tuple with `calculate_per_token_loss=True` (see policy.py) stops the schedule from dividing the
        # loss by the number of micro-batches: the loss is already normalised with global counts.
        return loss, torch.ones((), dtype=torch.int), metrics

    def forward_step(data_iterator, chunk):
        micro_batch = next(data_iterator).to(device)
        input_ids = micro_batch.input_ids
        position_ids = torch.arange(input_ids.shape[1], device=device).unsqueeze(0).expand_as(input_ids)
        output = chunk(input_ids, position_ids, None, output_processor=head,
                       output_processor_context=input_ids[:, 1:])
        return output, partial(last_stage_reduce, micro_batch)

    schedule = get_forward_backward_func()
    max_len = max(mb.input_ids.shape[1] for mb in micro_batches)
    with torch.set_grad_enabled(not forward_only):
        return schedule(forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
                        num_microbatches=len(micro_batches), seq_length=max_len,
                        micro_batch_size=max(len(mb) for mb in micro_batches), forward_only=forward_only)


def pipeline_logprobs_entropy(model: torch.nn.Module, batch, micro_batch_size: int, head: LogprobHead,
                              pp_group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-only fp32 (logprobs, entropy), each [B, L-1] on CPU and zero where `loss_mask` is 0, on every rank.

    Computed on the last pipeline stage and broadcast to the other stages of `pp_group`.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    b, length = batch.input_ids.shape
    device = _model_device(model)
    out = torch.zeros(2, b, length - 1, dtype=torch.float32, device=device)
    results = run_pipeline(model, batch.micro_batches(micro_batch_size), head)
    row = 0
    for logprobs, entropy in results:
        n, width = logprobs.shape
        out[0, row:row + n, :width] = logprobs
        out[1, row:row + n, :width] = entropy
        row += n
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        last = dist.get_global_rank(pp_group, dist.get_world_size(pp_group) - 1)
        dist.broadcast(out, src=last, group=pp_group)
    mask = batch.loss_mask.to(device=device, dtype=torch.float32)
    out = out * mask
    return out[0].cpu(), out[1].cpu()
