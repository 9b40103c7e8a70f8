"""Distributed helpers every layer may use: process-group start-up, ranks, prompt sharding, step-wide reductions,
collective time-outs that name the phase.

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

Time-outs: every collective gives up after `trainer.dist_timeout_minutes`. The trainer records which phase each rank
is in (`set_phase`: data, model load, rollout, reward, log-probs, update, checkpoint, evaluation), so that a time-out
names it: `phase_named_on_failure` re-raises a failed collective (gloo raises in the calling thread) as an error that
says where it happened, and a watch thread prints the same when a phase outlasts the time-out, because NCCL's own
watchdog ends the process from C++ without returning to Python.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_red.batch import masked_row_mean
from megatron_red.errors import ConfigError


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(timeout_minutes: float, single_process: bool = False) -> None:
    """Join the `torchrun` world (NCCL on CUDA, gloo on CPU) unless a process group already exists, with collectives
    that time out after `timeout_minutes` (`trainer.dist_timeout_minutes`); on CUDA, bind this process to GPU
    `LOCAL_RANK`. Outside torchrun, `single_process` makes a world of this process alone (a tool that needs
    megatron-core's parallel state, e.g. `megatron-red export`); otherwise that is an error."""
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if dist.is_initialized():
        return
    if timeout_minutes <= 0:
        raise ConfigError(f"trainer.dist_timeout_minutes must be > 0, got {timeout_minutes}")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not under_torchrun():
        if single_process:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timedelta(minutes=timeout_minutes))
            return
        raise ConfigError("model.backend=megatron runs under torchrun (WORLD_SIZE / RANK / MASTER_ADDR unset); "
                          "e.g. torchrun --nproc_per_node=1 -m megatron_red.cli train model.backend=megatron ...")
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    watch_phases(timeout_minutes)


# ---------------------------------------------------------------------------------------------------- time-outs
@dataclass
class _Phase:
    name: str = "start-up"
    since: float = field(default_factory=time.monotonic)
    timeout_minutes: float | None = None


_phase = _Phase()


def set_phase(name: str) -> None:
    """Record the phase this rank has entered, for time-out messages."""
    _phase.name, _phase.since = name, time.monotonic()


def current_phase() -> str:
    return _phase.name


def _minutes_in_phase() -> float:
    return (time.monotonic() - _phase.since) / 60


class CollectiveTimeout(RuntimeError):
    """A collective timed out or failed; the message names the phase."""


# What gloo and NCCL errors say when a peer is late or gone (gloo raises plain RuntimeErrors).
_COLLECTIVE_FAILURE = re.compile(r"timed out|timeout|closed by peer|connection reset|nccl|gloo", re.IGNORECASE)


@contextlib.contextmanager
def phase_named_on_failure():
    """Re-raise a timed-out or failed collective raised inside the block as `CollectiveTimeout` naming the phase."""
    try:
        yield
    except RuntimeError as e:
        if _phase.timeout_minutes is None or isinstance(e, CollectiveTimeout) or not (
                isinstance(e, dist.DistError) or _COLLECTIVE_FAILURE.search(str(e))):
            raise
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CollectiveTimeout(
            f"rank {global_rank()}: a collective timed out or failed in phase '{_phase.name}' (in it for "
            f"{_minutes_in_phase():.1f} min; trainer.dist_timeout_minutes={_phase.timeout_minutes:g}): {cause}. "
            f"Another rank is late or gone: look for an earlier error on the other ranks, or raise "
            f"trainer.dist_timeout_minutes if '{_phase.name}' legitimately takes longer.") from e


def watch_phases(timeout_minutes: float, poll_seconds: float | None = None) -> None:
    """Start the daemon thread that prints, once per phase, that the phase has outlasted `timeout_minutes`."""
    _phase.timeout_minutes = timeout_minutes
    poll = poll_seconds if poll_seconds is not None else min(30.0, timeout_minutes * 6)

    def watch():
        reported = None
        while True:
            time.sleep(poll)
            entered = (_phase.name, _phase.since)
            if entered != reported and _minutes_in_phase() > timeout_minutes:
                print(f"[megatron-red] rank {global_rank()}: phase '{_phase.name}' has lasted "
                      f"{_minutes_in_phase():.1f} min, past trainer.dist_timeout_minutes={timeout_minutes:g}: a "
                      f"collective waiting in it has timed out (another rank is late or gone)",
                      file=sys.stderr, flush=True)
                reported = entered

    threading.Thread(target=watch, name="megatron-red-phase-watch", daemon=True).start()


def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def group_size_and_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(size, this rank's rank) of `group`; (1, 0) for None (a dimension of one, or no torch.distributed)."""
    return (dist.get_world_size(group), dist.get_rank(group)) if group is not None else (1, 0)


def is_main_process() -> bool:
    return global_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def check_same_tokens(tokens: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """Every rank of the model-parallel `group` must have sampled the same `tokens` (they train on them): a
    position-weighted checksum, max-reduced with its negation, differs on some rank otherwise (a RuntimeError on
    every rank). No-op for a group of one."""
    if group is None or dist.get_world_size(group) == 1:
        return
    if dist.get_backend(group) == "nccl":
        tokens = tokens.cuda()
    weights = torch.arange(1, tokens.numel() + 1, device=tokens.device, dtype=torch.float64)
    checksum = ((tokens.reshape(-1).double() + 2) * weights.remainder(9973)).sum()
    both = torch.stack([checksum, -checksum])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if both[0] != -both[1]:
        raise RuntimeError("ranks of one model-parallel group sampled different tokens (their logits differ); "
                           "rollouts would no longer match across tensor / pipeline ranks")


def broadcast_from_main(obj):
    """Global rank 0's `obj` (picklable) on every rank; `obj` itself with one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


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

    def shard(self, items: Sequence, allow_empty: bool = False) -> list:
        """This replica's contiguous block of `items` (blocks differ in length by at most one); concatenating
        the blocks in rank order gives `items` back, so `gather(shard(x)) == x`. Fewer items than replicas is an
        error unless `allow_empty` (the last replicas then get none)."""
        if len(items) < self.size and not allow_empty:
            raise ConfigError(f"{len(items)} items cannot be split over {self.size} data-parallel ranks; "
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

    def balance(self, chosen: list[tuple[int, int]], items: list) -> list:
        """This replica's share of the items `chosen` names, in order, as (replica, index into that replica's
        `items`) pairs: as many as `shard(chosen)` gives it, its own chosen items first, then, when it holds fewer
        than its share, items of the replicas that hold more than theirs. Only those surplus items travel (one
        gather, and none when every replica holds its share). Collective; identity with one replica."""
        base, extra = divmod(len(chosen), self.size)
        quota = [base + (d < extra) for d in range(self.size)]
        own = [[i for r, i in chosen if r == d] for d in range(self.size)]
        mine = [items[i] for i in own[self.rank][:quota[self.rank]]]
        if all(len(own[d]) <= quota[d] for d in range(self.size)):
            return mine
        moving = self.gather([items[i] for i in own[self.rank][quota[self.rank]:]])  # surplus, in rank order
        need = [max(quota[d] - len(own[d]), 0) for d in range(self.size)]
        start = sum(need[:self.rank])
        return mine + moving[start:start + need[self.rank]]

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
