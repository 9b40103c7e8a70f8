"""Data-parallel helpers of the RED trainer: process-group start-up, prompt sharding and step-wide reductions.

Under `torchrun` every data-parallel (DP) rank rolls out, rewards and trains on its own slice of the step's
prompts (the step's prompt list is the same on every rank: `PromptStream` is seeded). For the update to equal the
full-batch one, everything the loss normalises by — sequence and token counts, the entropies H_rl / H_sft that
give w (Eq. 9-11) — is reduced over the DP group first, and logged metrics are computed from the gathered values
of all ranks. With one process (the Hugging Face backend, or Megatron at DP = 1) every helper is the identity,
so the single-process step is unchanged.

The TP x PP ranks of one replica (its model-parallel group) must train on identical rows. Anything on the way that
is not bit-deterministic — above all grading, whose time-outs depend on the wall clock — is computed once, on the
group's source rank, and shared (`ModelParallel.from_source`).

Only the global rank 0 writes run files (metrics, config, TensorBoard, progress bar, checkpoint pointer).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_red.trainer.groups import masked_row_mean


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed() -> None:
    """Join the `torchrun` world (NCCL on CUDA, gloo on CPU) unless a process group already exists; on CUDA,
    bind this process to GPU `LOCAL_RANK`."""
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if dist.is_initialized():
        return
    if not under_torchrun():
        raise ValueError("model.backend=megatron runs under torchrun (WORLD_SIZE / RANK / MASTER_ADDR unset); "
                         "e.g. torchrun --nproc_per_node=1 -m megatron_red.cli train model.backend=megatron ...")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_process() -> bool:
    return global_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@dataclass
class DataParallel:
    """This process's place among the data-parallel replicas.

    rank:  index of this replica (0 .. size-1); the TP x PP ranks of one replica share it.
    size:  number of replicas (DP degree).
    group: the process group joining the ranks that hold the same model shard; None with one replica.
    """

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    @classmethod
    def for_backend(cls, backend: str) -> "DataParallel":
        """Megatron: megatron-core's data-parallel group; any other backend is a single replica."""
        if backend != "megatron":
            return cls()
        from megatron.core import parallel_state as ps

        size = ps.get_data_parallel_world_size()
        return cls(ps.get_data_parallel_rank(), size, ps.get_data_parallel_group() if size > 1 else None)

    def shard(self, items: Sequence) -> list:
        """This replica's contiguous block of `items` (blocks differ in length by at most one); concatenating
        the blocks in rank order gives `items` back, so `gather(shard(x)) == x`."""
        if len(items) < self.size:
            raise ValueError(f"{len(items)} items cannot be split over {self.size} data-parallel ranks; "
                             f"raise trainer.prompts_per_step (or the ReLIFT buffer) to at least {self.size}")
        base, extra = divmod(len(items), self.size)
        start = self.rank * base + min(self.rank, extra)
        return list(items[start:start + base + (self.rank < extra)])

    def gather(self, items: list) -> list:
        """The concatenation, in rank order, of every replica's `items` (picklable), on every replica."""
        if self.size == 1:
            return items
        parts: list = [None] * self.size
        dist.all_gather_object(parts, items, group=self.group)
        return [x for part in parts for x in part]

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over the replicas (a new tensor on `value`'s device; `value` itself with one)."""
        if self.size == 1:
            return value
        reduced = value.detach().to(self._comm_device(), copy=True)
        dist.all_reduce(reduced, group=self.group)
        return reduced.to(value.device)

    def row_mean(self, values: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> float:
        """`masked_row_mean` over the selected rows of every replica: the mean of per-row token means, from the
        all-reduced (sum of row means, number of rows) pair. NaN when no replica has such a row."""
        if self.size == 1:
            return masked_row_mean(values, mask, rows)
        mask = mask.to(torch.float64)
        counts = mask.sum(dim=1)
        keep = rows & (counts > 0)
        per_row = (values.to(torch.float64) * mask).sum(dim=1)[keep] / counts[keep]
        total, n = self.all_sum(torch.stack([per_row.sum(), keep.sum().to(torch.float64)])).tolist()
        return total / n if n else float("nan")

    def _comm_device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


@dataclass
class ModelParallel:
    """The model-parallel group of this process: the TP x PP ranks that hold one replica's shards.

    group: the process group; None when it is this process alone (one rank, or Megatron at TP = PP = 1).
    src:   global rank of the group's source, its first rank.
    """

    group: dist.ProcessGroup | None = None
    src: int = 0

    @classmethod
    def for_backend(cls, backend: str) -> "ModelParallel":
        """Megatron: megatron-core's model-parallel group; any other backend runs one rank per replica."""
        if backend != "megatron":
            return cls()
        from megatron.core import parallel_state as ps

        group = ps.get_model_parallel_group()
        if dist.get_world_size(group) == 1:
            return cls()
        return cls(group, dist.get_global_rank(group, 0))

    def from_source(self, fn):
        """`fn()` computed on the source rank only and broadcast (picklable) to every rank of the group; with no
        group, just `fn()`. Collective: every rank of the group calls it."""
        if self.group is None:
            return fn()
        holder = [fn() if dist.get_rank() == self.src else None]
        dist.broadcast_object_list(holder, src=self.src, group=self.group)
        return holder[0]


class NullMetricsLog:
    """What ranks other than 0 log to: nothing (rank 0 writes metrics.jsonl and TensorBoard)."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass
