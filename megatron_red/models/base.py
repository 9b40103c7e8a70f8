"""The policy-backend interface: what the RED trainer needs from a policy, however it is sharded.

Every backend (Hugging Face on one device, megatron-core with TP/PP/DP) implements `PolicyBackend`; the trainer
never touches a model directly. Sequences are prompt + response (or prompt + offline trace), right-padded; every
per-token tensor is aligned with the *targets* `input_ids[:, 1:]`, so it has shape `[B, L - 1]`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from megatron_red.models.optim import OptimConfig
    from megatron_red.rollout.base import Completion, RolloutEngine, SamplingParams


@dataclass
class SequenceBatch:
    """Right-padded token sequences plus the per-row / per-token inputs of the loss.

    input_ids:      [B, L] long, prompt followed by response or trace tokens, right-padded.
    attention_mask: [B, L] 1 on real tokens.
    loss_mask:      [B, L-1] 1 where the target `input_ids[:, t+1]` is a response / trace token.
    fields:         loss inputs, each with leading dimension B (e.g. old_logprobs [B, L-1], advantages [B],
                    is_offline [B], group_accuracy [B]); sliced together with the sequences.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    fields: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        b, l = self.input_ids.shape
        if self.attention_mask.shape != (b, l):
            raise ValueError(f"attention_mask {tuple(self.attention_mask.shape)} != input_ids {(b, l)}")
        if self.loss_mask.shape != (b, l - 1):
            raise ValueError(f"loss_mask {tuple(self.loss_mask.shape)} must be [B, L-1] = {(b, l - 1)}")
        for name, value in self.fields.items():
            if value.shape[0] != b:
                raise ValueError(f"field {name!r} has leading dim {value.shape[0]}, expected B={b}")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: slice | torch.Tensor) -> "SequenceBatch":
        """Rows `rows` of every tensor (a slice or an index tensor)."""
        return SequenceBatch(
            self.input_ids[rows], self.attention_mask[rows], self.loss_mask[rows],
            {k: v[rows] for k, v in self.fields.items()},
        )

    def micro_batch_rows(self, micro_batch_size: int) -> list[torch.Tensor]:
        """Row indices of micro-batches of at most `micro_batch_size` rows, longest rows first (ties in row order).
        A micro-batch is padded to its longest row (`trimmed`), and a step's rows mix lengths (short answers,
        teacher traces, rollouts cut at the generation limit): grouping rows of similar length pads the least.
        Losses are normalised with the step's global counts, so the grouping does not change the update."""
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        lengths = self.attention_mask.sum(dim=1)
        order = torch.sort(lengths, descending=True, stable=True).indices
        return list(order.split(micro_batch_size))

    def trimmed(self) -> "SequenceBatch":
        """Drop trailing columns that are padding in every row (saves compute on short micro-batches)."""
        length = int(self.attention_mask.sum(dim=1).max().item()) if len(self) else 0
        length = max(length, 2)
        if length >= self.input_ids.shape[1]:
            return self
        fields = {
            k: (v[:, : length - 1] if v.dim() >= 2 and v.shape[1] == self.input_ids.shape[1] - 1 else v)
            for k, v in self.fields.items()
        }
        return SequenceBatch(self.input_ids[:, :length], self.attention_mask[:, :length],
                             self.loss_mask[:, : length - 1], fields)

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return SequenceBatch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device),
                             {k: v.to(device) for k, v in self.fields.items()})


# loss_fn(logprobs [b, L-1], entropy [b, L-1], micro_batch) -> (scalar loss to backpropagate, metrics)
LossFn = Callable[[torch.Tensor, torch.Tensor, SequenceBatch], tuple[torch.Tensor, dict[str, float]]]


class PolicyBackend(ABC):
    """A trainable policy. Implementations: `HFPolicy` (models/hf.py), `MegatronPolicy` (models/megatron/).

    Besides the training primitives below, a policy is the *actor* of an RL step, with the phase hooks of
    NeMo-Aligner's GPT actor (`prepare_for_inference` / `infer` / `finish_inference`, `get_inference_log_probs`,
    `prepare_for_training` / `get_loss_and_metrics` / `finish_training`, `offload_adam_states` /
    `onload_adam_states`; docs/architecture.md maps each to NeMo-Aligner's). The defaults here fit a policy
    whose rollout engine samples from its own module; the Megatron backend adds memory management between phases.
    Both backends also expose `hf_config`, the transformers config of the model (written next to exported weights).
    """

    rollout_engine: "RolloutEngine | None" = None
    """The engine `infer` samples with; attached by `megatron_red.rollout.build.build_engine`."""

    @abstractmethod
    def logprobs_entropy(self, batch: SequenceBatch, micro_batch_size: int,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward only, no gradient: fp32 `log pi(target)` and full-vocabulary entropy, each [B, L-1] on CPU,
        zero where `loss_mask` is 0."""

    @abstractmethod
    def forward_backward(self, batch: SequenceBatch, micro_batch_size: int, loss_fn: LossFn,
                         temperature: float = 1.0) -> list[dict[str, float]]:
        """For each micro-batch: log-probs and entropies with gradient, `loss, metrics = loss_fn(...)`,
        `loss.backward()`; gradients accumulate across micro-batches (the loss must already be normalised with
        global counts). Returns the metrics of each micro-batch."""

    @abstractmethod
    def scale_gradients(self, factor: float) -> None:
        """Multiply the gradients accumulated so far by `factor` (RED's w, once it is known: trainer/update.py)."""

    @abstractmethod
    def optimizer_step(self, lr_scale: float = 1.0, advance_schedule: bool = True) -> float:
        """Clip gradients, step optimiser and learning-rate schedule, zero gradients; return the pre-clip grad norm.
        `lr_scale` multiplies the scheduled learning rate for this step only (SFT updates run at their own rate);
        `advance_schedule=False` leaves the schedule where it is (a step outside the scheduled count)."""

    @abstractmethod
    def restart_optimizer(self, optim: "OptimConfig") -> None:
        """A new run from the current weights: fresh optimiser state, and the schedule of `optim` from its first
        step (SFT->GRPO's GRPO stage, as the paper trains GRPO from the SFT checkpoint)."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Model, optimiser and scheduler state, enough for an exact resume."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        ...

    @abstractmethod
    def save_pretrained(self, path: str, dtype: torch.dtype | None = None) -> None:
        """Export the weights in Hugging Face format (a directory loadable with `from_pretrained`: safetensors
        shards + `model.safetensors.index.json` + config.json), cast to `dtype` if given. Collective on sharded
        backends; no rank holds the whole model."""

    @property
    @abstractmethod
    def learning_rate(self) -> float:
        ...

    # -- actor hooks --------------------------------------------------------------------------------------------
    def prepare_for_inference(self) -> None:
        """Before a rollout phase (sampling, rewards): nothing to do by default."""

    def infer(self, prompts: list[list[int]], n: int, params: "SamplingParams") -> list[list["Completion"]]:
        """`n` sampled completions per prompt, with behaviour log-probs, from the attached rollout engine."""
        if self.rollout_engine is None:
            raise RuntimeError("no rollout engine attached (megatron_red.rollout.build.build_engine attaches one)")
        return self.rollout_engine.generate(prompts, n, params)

    def finish_inference(self) -> None:
        """After the rollout phase: the engine releases its generation-only memory (KV cache, graphs)."""
        if self.rollout_engine is not None:
            self.rollout_engine.suspend()

    def get_inference_log_probs(self, batch: SequenceBatch, micro_batch_size: int,
                                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """pi_old of a rollout batch trained with several optimiser steps (and the token entropies, H_sft's input):
        `logprobs_entropy` with no gradient."""
        return self.logprobs_entropy(batch, micro_batch_size, temperature)

    def prepare_for_training(self) -> None:
        """Before the update: nothing to do by default."""

    def get_loss_and_metrics(self, batch: SequenceBatch, forward_only: bool, micro_batch_size: int, loss_fn: LossFn,
                             temperature: float = 1.0) -> list[dict[str, float]]:
        """The loss of every micro-batch of `batch` and its metrics; with `forward_only=False` its gradients are
        accumulated (`forward_backward`), with True nothing is (log-probs and entropies without gradient)."""
        if not forward_only:
            return self.forward_backward(batch, micro_batch_size, loss_fn, temperature)
        logprobs, entropy = self.logprobs_entropy(batch, micro_batch_size, temperature)
        metrics = []
        for rows in batch.micro_batch_rows(micro_batch_size):
            mb = batch.select(rows).trimmed()
            width = mb.loss_mask.shape[1]
            _, out = loss_fn(logprobs[rows, :width], entropy[rows, :width], mb)
            metrics.append(out)
        return metrics

    def finish_training(self) -> None:
        """After the optimiser step: the rollout engine samples from the new weights from now on."""
        if self.rollout_engine is not None:
            self.rollout_engine.sync_weights(self)

    def offload_adam_states(self) -> None:
        """Move optimiser state to host memory (for the rollout phase); no-op by default."""

    def onload_adam_states(self) -> None:
        """Bring optimiser state back after `offload_adam_states`; no-op by default."""

    def save_checkpoint(self, directory: str) -> None:
        """Write the training state into `directory` (already created, not yet visible to readers).
        Sharded backends override this (megatron-core dist_checkpointing); the default saves `state_dict()`."""
        torch.save(self.state_dict(), f"{directory}/policy.pt")

    def load_checkpoint(self, directory: str) -> None:
        self.load_state_dict(torch.load(f"{directory}/policy.pt", map_location="cpu", weights_only=False))

    def checkpoint_nbytes(self, with_hf: bool = False) -> int:
        """About how many bytes `save_checkpoint` writes, plus a `save_pretrained` export when `with_hf`
        (collective on sharded backends)."""
        seen = set()

        def nbytes(obj) -> int:
            if isinstance(obj, torch.Tensor):  # tensors sharing storage (a tied head) are saved once
                key = (obj.untyped_storage().data_ptr(), obj.storage_offset())
                if key in seen:
                    return 0
                seen.add(key)
                return obj.numel() * obj.element_size()
            if isinstance(obj, dict):
                return sum(nbytes(v) for v in obj.values())
            if isinstance(obj, (list, tuple)):
                return sum(nbytes(v) for v in obj)
            return 0

        state = self.state_dict()
        total = nbytes(state)
        seen.clear()
        return total + (nbytes(state["model"]) if with_hf else 0)
