"""`rollout.offload_optimizer` through `OptimizerOffload` (models/megatron/offload.py), on CPU (one gloo process; no
GPU here, so the host buffers are not pinned and "device" is the CPU, but the copies and the bookkeeping are those a
GPU run does):

- a bf16 policy with the distributed optimizer, after a step: offloading moves the fp32 master weights and both Adam
  moments into host buffers (the optimizer then holds exactly those buffers, with the same values) and frees the
  gradient buffers; onloading gives the optimizer new device tensors with the same values; the next offload reuses
  the same buffers (allocated once per run);
- the step after an offload / onload round trip equals the same step of a twin policy that never offloaded.
The pinned, non-blocking copies themselves are measured on a GPU by tools/gpu_checks.sh's `offload` step.
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from test_megatron import OPTIM, make_batch, pg_loss_fn, portable, tiny_hf_config, tiny_hf_model

pytest.importorskip("megatron.core")


def _moving(policy) -> list[torch.Tensor]:
    """The master weights and Adam moments, in the optimizer's order."""
    out = []
    for opt in policy.optimizer.chained_optimizers:
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                out.append(p.data)
                out += [v for k, v in sorted(opt.optimizer.state[p].items()) if k != "step"]
    return out


def _worker(rank, world_size, hf_config, hf_state):
    import megatron_compat
    megatron_compat.install()
    from megatron.core import parallel_state as ps

    from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy

    config = MegatronConfig(dtype="bfloat16", use_distributed_optimizer=True, attention="sdpa",
                            offload_optimizer=True)
    batch = make_batch()
    loss_fn = pg_loss_fn(float(batch.loss_mask.sum()))
    policies = [MegatronPolicy(hf_config, hf_state, config, OPTIM) for _ in range(2)]
    for policy in policies:
        policy.get_loss_and_metrics(batch, 2, loss_fn)
        policy.optimizer_step()
    policy, twin = policies
    out = {}
    before = [t.clone() for t in _moving(policy)]
    policy.prepare_for_inference()
    buffers = {t.data_ptr() for t in policy._offload.host.values()}  # `p.data` is a new object at every access
    offloaded = _moving(policy)
    out["held_are_buffers"] = [t.data_ptr() in buffers for t in offloaded]
    out["offloaded_equal"] = [torch.equal(a, b) for a, b in zip(offloaded, before)]
    out["grad_storage"] = [b.grad_data.untyped_storage().size() for b in policy.model.buffers]
    policy.prepare_for_training()
    onloaded = _moving(policy)
    out["onloaded_are_buffers"] = [t.data_ptr() in buffers for t in onloaded]
    out["onloaded_equal"] = [torch.equal(a, b) for a, b in zip(onloaded, before)]
    policy.prepare_for_inference()
    out["buffers_reused"] = {t.data_ptr() for t in policy._offload.host.values()} == buffers and all(
        t.data_ptr() in buffers for t in _moving(policy))
    policy.prepare_for_training()
    for p in policies:
        p.get_loss_and_metrics(batch, 2, loss_fn)
        p.optimizer_step()
    out["next_equal"] = [torch.equal(a, b) for a, b in zip(_moving(policy), _moving(twin))]
    out["moved"] = len(before)
    ps.destroy_model_parallel()
    return portable(out)


def test_offload_moves_master_weights_and_moments_through_reused_host_buffers():
    config = tiny_hf_config("qwen2", layers=2)
    (out,) = run_distributed(_worker, 1, config, tiny_hf_model(config).state_dict())
    assert out["moved"] > 0 and out["moved"] % 3 == 0  # master weights + two moments per parameter shard
    assert all(out["held_are_buffers"]) and all(out["offloaded_equal"])
    assert out["grad_storage"] and all(size == 0 for size in out["grad_storage"])
    assert not any(out["onloaded_are_buffers"]) and all(out["onloaded_equal"])
    assert out["buffers_reused"]
    assert all(out["next_equal"])
