"""Resumable Megatron checkpoints with megatron-core `dist_checkpointing` (reshardable across TP / PP / DP), whose
host memory per rank stays near the rank's own optimizer shard when saved and when loaded.

A checkpoint directory holds the model and optimiser as a sharded state dict (each tensor saved once, addressed
by its global shape and offset, so a run saved at TP2 x DP2 loads at TP1 x DP1) and the optimiser step (the trainer
writes its own state beside it, trainer/checkpoint.py). Hugging Face exports are separate
(`MegatronPolicy.save_pretrained`; `load_model_weights` reads a checkpoint's weights alone for an export). The
functions take the (DDP-wrapped) model and megatron's optimizer, as `MegatronPolicy` holds them.

Model weights: megatron's sharded state dict; the data-parallel replicas share the writing of the weights they all
hold (megatron's `FullyParallelSaveStrategyWrapper` over the DP group: without it DP rank 0 writes them all).

Distributed-optimizer state, as "model-space pieces": each rank holds a flat range of each of its parameters
(megatron's `param` range of the parameter, the rank's DP slice) of the fp32 master weights and of each Adam
moment. A flat range of a row-major tensor is a few hyper-rectangles (a partial row, whole rows, a partial row,
recursively over the dimensions: `_flat_blocks`); each is saved as a piece of the parameter's global model-space
tensor `optimizer.state.{param,exp_avg,exp_avg_sq}.<the parameter's key>` at its global offset, whose data is a view
of the rank's own state. Nothing is gathered at save; at load each rank reads exactly its own pieces into its own
state, from whatever pieces the saving layout wrote (DCP reads any region of a saved tensor), so TP, PP and DP may
all change. The keys and global tensors are those megatron's `fully_reshardable` format writes, so checkpoints of
that format (this module's before 2026-12-07) load too (checked once: TP 2 x DP 2 saved, TP 1 loaded, the next
step equal to 2.4e-7).
megatron-core 0.19's own distributed-optimizer formats do not keep host memory near the shard: `fully_reshardable`
(used here before 2026-12-07) all-gathers the TP shard's whole optimizer state to every DP rank at save and
allocates and reads it on every rank at load (DP times the rank's shard; 12 bytes per parameter of the TP shard),
its memory-efficient variant gathers it on DP rank 0 over gloo groups (which the policy does not create),
`dp_reshardable` writes each rank's buckets as they are but reshards across DP only (same bucket layout), and the
flattened ranges of `fully_sharded_model_space` are refused by 0.19's ShardedTensor. tools/checkpoint_memory.py
measures host memory per rank (docs/benchmarks.md).

Without the distributed optimizer, megatron's own optimizer sharded state dict (model space, one copy per TP x PP
shard, written once over DP) is already the rank's own state.
"""
from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

from megatron_red.distributed import broadcast_from_main, is_main_process
from megatron_red.errors import ConfigError
from megatron_red.models.megatron.weights import unwrap_model

TRAINER_STATE_FILE = "trainer_state.pt"  # the optimiser step; its presence marks a complete checkpoint
OPTIMIZER_FORMAT = "model_space_pieces"
"""The checkpoint's name for the distributed optimizer's layout described above."""


def _flat_blocks(shape: tuple[int, ...], lo: int, hi: int) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """The hyper-rectangles (offset, shape, flat start) that cover elements [lo, hi) of a row-major tensor of
    `shape`, in order: a partial first row, whole rows, a partial last row, the partial rows recursively. Each is
    one contiguous run of the flat tensor."""
    if lo >= hi:
        return []
    if len(shape) == 1:
        return [((lo,), (hi - lo,), lo)]
    inner = math.prod(shape[1:])
    blocks = []

    def rows_part(row: int, start: int, end: int):  # elements [start, end) of row `row`
        return [((row, *o), (1, *s), row * inner + f) for o, s, f in _flat_blocks(shape[1:], start, end)]

    if lo % inner:
        row = lo // inner
        end = min(hi, (row + 1) * inner)
        blocks += rows_part(row, lo - row * inner, end - row * inner)
        lo = end
    if hi - lo >= inner:
        rows = (hi - lo) // inner
        blocks.append(((lo // inner, *(0,) * (len(shape) - 1)), (rows, *shape[1:]), lo))
        lo += rows * inner
    if lo < hi:
        blocks += rows_part(lo // inner, 0, hi - lo)
    return blocks


def _saved_parts(meta, param: torch.Tensor) -> list[tuple[object, int]]:
    """(ShardedTensor, flat offset in `param`) of each part in which megatron saves `param`: its ShardedTensor, or
    what its ShardedTensorFactory builds from it (views of it, e.g. the SwiGLU gate and up halves of linear_fc1)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    built = meta.build_fn(meta.key, param, meta.replica_id, None) if isinstance(meta, ShardedTensorFactory) else meta
    parts = list(nested_values(built)) if isinstance(built, (dict, list)) else [built]
    out = []
    for part in parts:
        data = part.data
        same_storage = data.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
        if not (same_storage and data.is_contiguous() and part.flattened_range is None):
            raise NotImplementedError(f"{part.key}: a saved part that is not a contiguous view of its parameter")
        out.append((part, data.storage_offset() - param.storage_offset()))
    return out


def _optimizer_pieces(opt, model_metadata: dict) -> tuple[dict, list]:
    """The distributed optimizer `opt`'s state as model-space pieces (see the module docstring): a flat dict of
    ShardedTensors, and (key, state view) pairs to copy loaded pieces back from."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    pieces, views = {}, []
    for gbuf_range_maps in opt.gbuf_ranges:
        for gbuf_range_map_for_all_buckets in gbuf_range_maps.values():
            for gbuf_range_map in gbuf_range_map_for_all_buckets:
                for model_param, range_map in gbuf_range_map["param_map"].items():
                    own = range_map["param"]  # this rank's elements of the flattened parameter
                    states = {k: v for k, v in opt._get_main_param_and_optimizer_states(model_param).items()
                              if k != "step"}
                    for part, offset in _saved_parts(model_metadata[model_param], model_param):
                        lo, hi = max(own.start, offset), min(own.end, offset + part.data.numel())
                        pre = part.prepend_axis_num
                        replica_id = (*part.replica_id[:2], opt.distributed_optimizer_instance_id)
                        for block_offset, block_shape, start in _flat_blocks(part.local_shape, lo - offset,
                                                                             hi - offset):
                            first = offset + start - own.start  # in the rank's flat state of this parameter
                            global_offset = (*part.global_offset[:pre],
                                             *(g + b for g, b in zip(part.global_offset[pre:], block_offset)))
                            # megatron's prepended axes (the layer number) as leading axes of length 1: its
                            # uneven-sharding path (no regular grid) does not handle prepended axes
                            shape = (1,) * pre + block_shape
                            for name, state in states.items():
                                view = state.view(-1)[first:first + math.prod(block_shape)].view(shape)
                                key = f"optimizer.state.{name}.{part.key}"
                                piece = f"{key}@{','.join(map(str, global_offset))}"
                                pieces[piece] = ShardedTensor(key, view, view.dtype, shape, part.global_shape,
                                                              global_offset, axis_fragmentations=None,
                                                              replica_id=replica_id)
                                views.append((piece, view))
    return pieces, views


def _sharded_state_dict(model, optimizer, is_loading: bool) -> tuple[dict, list]:
    """The checkpoint's sharded state dict, and per distributed optimizer the (piece, state view) pairs that
    `_load_optimizer_state` copies loaded pieces back through."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    model_state = unwrap_model(model).sharded_state_dict()
    optimizers = optimizer.chained_optimizers
    if not all(isinstance(opt, DistributedOptimizer) for opt in optimizers):
        return {"model": model_state,
                "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading)}, []
    metadata = {sh.data: sh for sh in nested_values(extract_sharded_tensors_and_factories(model_state)[0])}
    states, views = [], []
    for opt in optimizers:
        pieces, opt_views = _optimizer_pieces(opt, metadata)
        states.append({**opt.state_dict(), "param_state": pieces, "param_state_sharding_type": OPTIMIZER_FORMAT})
        views.append(opt_views)
    # megatron's ChainedOptimizer layout: one optimizer's state alone, several by index
    return {"model": model_state, "optimizer": states[0] if len(states) == 1 else dict(enumerate(states))}, views


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


def _load_optimizer_state(optimizer, state, views: list) -> None:
    """Load what `_sharded_state_dict` asked for: hyper-parameters and step through `load_state_dict`, the
    distributed optimizers' pieces copied into their state where dist_checkpointing did not load them in place.

    PyTorch's Adam keeps a `step` per parameter; megatron's DistributedOptimizer saves one per group and on loading
    gives every parameter the *same* step tensor, which Adam would then increment once per parameter per update
    (wrong bias correction): each parameter gets its own copy back.
    """
    optimizers = optimizer.chained_optimizers
    if not views:
        optimizer.load_state_dict(state)
        return
    states = [state] if len(optimizers) == 1 else [state[i] for i in range(len(optimizers))]
    for opt, opt_state, opt_views in zip(optimizers, states, views):
        opt_state = dict(opt_state)
        loaded = opt_state.pop("param_state")
        opt_state.pop("param_state_sharding_type")
        opt.load_state_dict(opt_state)  # hyper-parameters and step; the state tensors stay those viewed
        for piece, view in opt_views:
            if loaded[piece].data_ptr() != view.data_ptr():
                view.copy_(loaded[piece])
        for s in opt.optimizer.state.values():
            if "step" in s:
                s["step"] = s["step"].clone()


def save_checkpoint(model, optimizer, step: int, path: str) -> None:
    """Collectively save `model` and `optimizer` (and `step`, written by global rank 0) under directory `path`."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    # The DP replicas share the writing of the weights they all hold (the optimizer pieces are each rank's own).
    strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(),
                                                ps.get_data_parallel_group(with_context_parallel=True))
    dist_checkpointing.save(_sharded_state_dict(model, optimizer, False)[0], path, sharded_strategy=strategy)
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
    sharded, views = _sharded_state_dict(model, optimizer, True)
    loaded = dist_checkpointing.load(sharded, path)
    unwrap_model(model).load_state_dict(loaded["model"])
    _load_optimizer_state(optimizer, loaded["optimizer"], views)
    step = torch.load(os.path.join(path, TRAINER_STATE_FILE), weights_only=False)["step"] if is_main_process() \
        else None
    return broadcast_from_main(step)
