"""Collective time-outs name the phase: a 2-process gloo world with a 3-second `trainer.dist_timeout_minutes`, in which
rank 1 never joins rank 0's all-reduce."""
from __future__ import annotations

import pytest

from dist_utils import run_distributed
from megatron_red import distributed

TIMEOUT_MINUTES = 0.05  # 3 s


def _worker(rank, world_size):
    import io
    import os
    import sys
    import time

    import torch
    import torch.distributed as dist

    from megatron_red.distributed import (CollectiveTimeout, init_distributed, phase_named_on_failure,
                                                  set_phase)

    # run_distributed's world has the default time-out: join a second world with ours, on a port rank 0 picks (the
    # first world's store may still be listening on the old one while the other rank reconnects).
    from dist_utils import _free_port

    port = [_free_port() if rank == 0 else None]
    dist.broadcast_object_list(port, src=0)
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(port[0])
    stderr, sys.stderr = sys.stderr, io.StringIO()
    try:
        init_distributed(TIMEOUT_MINUTES)
        dist.barrier()
        if rank == 1:
            time.sleep(6)  # never joins the all-reduce below
            return {"stderr": sys.stderr.getvalue()}
        set_phase("rollout")
        start = time.monotonic()
        try:
            with phase_named_on_failure():
                dist.all_reduce(torch.ones(1))
            error = None
        except CollectiveTimeout as e:
            error = str(e)
        waited = time.monotonic() - start
        time.sleep(1.5)  # the watch thread polls every 0.3 s
        return {"error": error, "waited": waited, "stderr": sys.stderr.getvalue()}
    finally:
        sys.stderr = stderr


def test_a_timed_out_collective_names_its_phase():
    rank0, rank1 = run_distributed(_worker, 2, timeout_s=120)
    assert rank0["error"] is not None, "the all-reduce without rank 1 did not time out"
    assert "rank 0: a collective timed out or failed in phase 'rollout'" in rank0["error"]
    assert "trainer.dist_timeout_minutes=0.05" in rank0["error"] and "Timed out" in rank0["error"]
    assert 2.5 < rank0["waited"] < 5.5  # the world's time-out, before rank 1 leaves (6 s)
    # The watch thread says it on its own (NCCL's watchdog would end the process without a Python error).
    assert "[megatron-red] rank 0: phase 'rollout' has lasted" in rank0["stderr"]
    # Rank 1 spent 6 s in the phase it had when the world started: its watch names that one.
    assert "[megatron-red] rank 1: phase 'start-up' has lasted" in rank1["stderr"]


def test_other_errors_pass_through_unchanged(monkeypatch):
    monkeypatch.setattr(distributed._phase, "timeout_minutes", 1.0)
    distributed.set_phase("update")
    with pytest.raises(RuntimeError, match="^CUDA out of memory$"):
        with distributed.phase_named_on_failure():
            raise RuntimeError("CUDA out of memory")
    with pytest.raises(distributed.CollectiveTimeout, match="phase 'update'.*Timed out waiting 3000ms"):
        with distributed.phase_named_on_failure():
            raise RuntimeError("Timed out waiting 3000ms for recv operation to complete")
    with pytest.raises(distributed.CollectiveTimeout, match="phase 'update'.*closed by peer"):
        with distributed.phase_named_on_failure():
            raise RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:31383.")
