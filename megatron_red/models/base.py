"""The policy-backend interface: what the RED trainer needs from a policy, however it is sharded.

Every backend (Hugging Face on one device, megatron-core with TP/PP/DP) implements `PolicyBackend`; the trainer
never touches a model directly. Batches are `megatron_red.batch.SequenceBatch` (per-token tensors [B, L - 1]).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from megatron_red.batch import SequenceBatch

if TYPE_CHECKING:
    from megatron_red.models.optim import OptimConfig
    from megatron_red.rollout.base import Completion, RolloutEngine, SamplingParams


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
    """The engine `infer` samples with; attached by `megatron_red.trainer.build.build_engine`."""

    @abstractmethod
    def get_inference_log_probs(self, batch: SequenceBatch, micro_batch_size: int,
                                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Actor hook. Forward only, no gradient: fp32 `log pi(target)` and full-vocabulary entropy at
        `temperature`, each [B, L-1] on CPU, zero where `loss_mask` is 0 (pi_old of a rollout batch trained with
        several optimiser steps, and H_sft; the teacher-token probabilities of the held-out evaluation)."""

    @abstractmethod
    def get_loss_and_metrics(self, batch: SequenceBatch, micro_batch_size: int, loss_fn: LossFn,
                             temperature: float = 1.0) -> list[dict[str, float]]:
        """Actor hook. For each micro-batch: log-probs and entropies with gradient, `loss, metrics = loss_fn(...)`,
        `loss.backward()`; gradients accumulate across micro-batches and calls (the loss must already be normalised
        with global counts) until `optimizer_step`. Returns the metrics of each micro-batch."""

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

    @abstractmethod
    def named_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The current weights under Hugging Face names, one tensor at a time (a tied LM head once, as the
        embedding), in the model's dtype; what a rollout engine with its own copy of the weights refits from.
        Collective on sharded backends: every rank of the model-parallel group gets every tensor."""

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
            raise RuntimeError("no rollout engine attached (megatron_red.trainer.build.build_engine attaches one)")
        return self.rollout_engine.generate(prompts, n, params)

    def finish_inference(self) -> None:
        """After the rollout phase: the engine releases its generation-only memory (KV cache, graphs)."""
        if self.rollout_engine is not None:
            self.rollout_engine.suspend()

    def prepare_for_training(self) -> None:
        """Before the update: nothing to do by default."""

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
