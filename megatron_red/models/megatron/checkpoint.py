"""Resumable Megatron checkpoints with megatron-core `dist_checkpointing` (reshardable across TP / PP / DP).

A checkpoint directory holds the model and optimiser as a sharded state dict (each tensor saved once, addressed
by its global shape and offset, so a run saved at TP2 loads at TP1) and the optimiser step (the trainer writes its
own state beside it, trainer/checkpoint.py). Hugging Face exports are separate (`MegatronPolicy.save_pretrained`;
`load_model_weights` reads a checkpoint's weights alone for an export). The functions take the (DDP-wrapped) model
and megatron's optimizer, as `MegatronPolicy` holds them.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_red.distributed import broadcast_from_main, is_main_process
from megatron_red.errors import ConfigError
from megatron_red.models.megatron.weights import unwrap_model

TRAINER_STATE_FILE = "trainer_state.pt"  # the optimiser step; its presence marks a complete checkpoint


def _sharded_state_dict(model, optimizer, is_loading: bool) -> dict:
    model_state = unwrap_model(model).sharded_state_dict()
    # The distributed optimiser's default layout ("fully_sharded_model_space") no longer passes megatron-core's own
    # validation (flattened ranges); "fully_reshardable" also reshards across DP.
    return {"model": model_state,
            "optimizer": optimizer.sharded_state_dict(
                model_state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"})}


def _allocate_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimiser zero Adam state with a `step`, which the checkpoint then overwrites.

    Why: the DistributedOptimizer builds its loading state dict from its own `state_dict()`, which with PyTorch's
    Adam (no Apex / Transformer Engine) reads each parameter's `step`, absent until the first update.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in optimizer.chained_optimizers:
        inner = opt.optimizer
        if not isinstance(opt, DistributedOptimizer) or len(inner.state) > 0 or opt.init_state_fn is None:
            continue
        opt.init_state_fn(inner, opt.config)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for group in inner.param_groups:
                for p in group["params"]:
                    inner.state[p]["step"] = torch.tensor(0.0)


def _load_optimizer_state(optimizer, state) -> None:
    """`optimizer.load_state_dict(state)`, with the distributed optimiser's parameter state loaded while
    PyTorch Adam's per-parameter `step` tensors are set aside.

    Why: megatron-core copies every tensor of the inner optimiser's state from the checkpoint, but
    "fully_reshardable" checkpoints hold the step once per group, not per parameter (KeyError: 'step'). And it
    gives every parameter the *same* step tensor, which PyTorch's Adam then increments once per parameter per
    update (wrong bias correction); each parameter gets its own copy back.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    optimizers = optimizer.chained_optimizers
    states = [state] if len(optimizers) == 1 else [v for _, v in sorted(state.items())]
    for opt, opt_state in zip(optimizers, states):
        if not isinstance(opt, DistributedOptimizer) or "param_state" not in opt_state:
            opt.load_state_dict(opt_state)
            continue
        param_state = opt_state.pop("param_state")
        if opt_state.pop("param_state_sharding_type") != "fully_reshardable":
            raise ValueError("expected a fully_reshardable distributed-optimizer checkpoint")
        opt.load_state_dict(opt_state)  # hyper-parameters and step; allocates the Adam state
        steps = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
        opt.load_parameter_state_from_fully_reshardable(param_state)
        for p, step in steps.items():
            opt.optimizer.state[p]["step"] = step.clone()


def save_checkpoint(model, optimizer, step: int, path: str) -> None:
    """Collectively save `model` and `optimizer` (and `step`, written by global rank 0) under directory `path`."""
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state_dict(model, optimizer, False), path)
    if dist.get_rank() == 0:
        torch.save({"step": step}, os.path.join(path, TRAINER_STATE_FILE))
    dist.barrier()


def is_megatron_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TRAINER_STATE_FILE))


def _check_checkpoint(path: str) -> None:
    """Raise ConfigError on every rank unless `path` is a checkpoint `save_checkpoint` wrote. Collective: global
    rank 0 looks, so that ranks whose views of a shared file system lag do not disagree (some entering the
    collective load, others raising)."""
    if not broadcast_from_main(is_megatron_checkpoint(path) if is_main_process() else None):
        raise ConfigError(f"{path!r} is not a megatron_red checkpoint (no {TRAINER_STATE_FILE})")


def load_model_weights(model: torch.nn.Module, path: str) -> None:
    """Collectively load only the model weights of a checkpoint saved by `save_checkpoint` into the (possibly
    wrapped) model stage of this rank, at any TP / PP layout (an export needs no optimiser)."""
    from megatron.core import dist_checkpointing

    _check_checkpoint(path)
    model = unwrap_model(model)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)
    model.load_state_dict(loaded["model"])


def load_checkpoint(model, optimizer, path: str) -> int:
    """Collectively load a checkpoint saved by `save_checkpoint` (any TP/PP/DP layout); returns its step."""
    from megatron.core import dist_checkpointing

    _check_checkpoint(path)
    _allocate_optimizer_state(optimizer)
    loaded = dist_checkpointing.load(_sharded_state_dict(model, optimizer, True), path)
    unwrap_model(model).load_state_dict(loaded["model"])
    _load_optimizer_state(optimizer, loaded["optimizer"])
    step = torch.load(os.path.join(path, TRAINER_STATE_FILE), weights_only=False)["step"] if is_main_process() else None
    return broadcast_from_main(step)
