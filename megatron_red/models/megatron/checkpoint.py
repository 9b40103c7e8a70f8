"""Resumable Megatron checkpoints with megatron-core `dist_checkpointing` (reshardable across TP / PP / DP).

A checkpoint directory holds the model and optimiser as a sharded state dict (each tensor saved once, addressed
by its global shape and offset, so a run saved at TP2 loads at TP1), the optimiser step and the trainer's own
state (an opaque dict: controller state, data position, RNG...). Hugging Face exports are separate
(`MegatronPolicy.save_pretrained`).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_red.models.megatron.policy import MegatronPolicy
from megatron_red.models.megatron.weights import unwrap_model

TRAINER_STATE_FILE = "trainer_state.pt"


def _sharded_state_dict(policy: MegatronPolicy, is_loading: bool, with_optimizer: bool) -> dict:
    model_state = unwrap_model(policy.model).sharded_state_dict()
    state = {"model": model_state}
    if with_optimizer:
        # The distributed optimiser's default layout ("fully_sharded_model_space") no longer passes megatron-core's
        # own validation (flattened ranges); "fully_reshardable" also reshards across DP.
        state["optimizer"] = policy.optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    return state


def save_checkpoint(policy: MegatronPolicy, path: str, trainer_state: dict | None = None,
                    with_optimizer: bool = True) -> None:
    """Collectively save `policy` (and `trainer_state`, written by global rank 0) under directory `path`."""
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state_dict(policy, False, with_optimizer), path)
    if dist.get_rank() == 0:
        torch.save({"step": policy.step, "trainer_state": trainer_state or {}},
                   os.path.join(path, TRAINER_STATE_FILE))
    dist.barrier()


def load_checkpoint(policy: MegatronPolicy, path: str, with_optimizer: bool = True) -> dict:
    """Collectively load a checkpoint saved by `save_checkpoint` (any TP/PP/DP layout); returns the trainer state."""
    from megatron.core import dist_checkpointing

    if not os.path.isfile(os.path.join(path, TRAINER_STATE_FILE)):
        raise ValueError(f"{path!r} is not a megatron_red checkpoint (no {TRAINER_STATE_FILE})")
    loaded = dist_checkpointing.load(_sharded_state_dict(policy, True, with_optimizer), path)
    unwrap_model(policy.model).load_state_dict(loaded["model"])
    if with_optimizer:
        policy.optimizer.load_state_dict(loaded["optimizer"])
    meta = torch.load(os.path.join(path, TRAINER_STATE_FILE), weights_only=False)
    policy.step = meta["step"]
    policy._set_lr()
    return meta["trainer_state"]
