"""dist_checkpointing save at TP=2 and load at TP=1 (CPU, gloo, fp32).

The TP=2 run takes a training step, saves, and takes a second step; the TP=1 run starts from different weights,
loads the checkpoint, and takes the same second step. Equal weights after loading check the model resharding,
equal weights after the second step check the optimiser state (Adam moments) resharding too.
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from test_megatron import OPTIM, as_tensors, make_batch, pg_loss_fn, portable, tiny_hf_config, tiny_hf_model

pytest.importorskip("megatron.core")


def _worker(rank, world_size, hf_config, hf_state, tp, path, save):
    import megatron_compat
    megatron_compat.install()
    from megatron.core import parallel_state as ps

    from megatron_red.models.megatron.checkpoint import load_checkpoint, save_checkpoint
    from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy

    policy = MegatronPolicy(hf_config, hf_state, MegatronConfig(
        tensor_model_parallel_size=tp, dtype="float32", use_distributed_optimizer=False), OPTIM)
    batch = make_batch()
    loss_fn = pg_loss_fn(float(batch.loss_mask.sum()))

    def train_step():
        policy.forward_backward(batch, 2, loss_fn)
        policy.optimizer_step()

    out = {}
    if save:
        train_step()
        out["saved"] = policy.hf_state_dict()
        save_checkpoint(policy, path, trainer_state={"controller": {"h_rl": 0.5}})
    else:
        out["trainer_state"] = load_checkpoint(policy, path)
        out["loaded"] = policy.hf_state_dict()
        out["step"] = policy.step
    train_step()
    out["next"] = policy.hf_state_dict()
    ps.destroy_model_parallel()
    return portable(out)


def test_save_tp2_load_tp1(tmp_path):
    config = tiny_hf_config("qwen2", layers=2)
    path = str(tmp_path / "ckpt")
    saved = as_tensors(run_distributed(_worker, 2, config, tiny_hf_model(config, seed=0).state_dict(), 2, path,
                                       True)[0])
    other = tiny_hf_model(config, seed=7).state_dict()
    loaded = as_tensors(run_distributed(_worker, 1, config, other, 1, path, False)[0])

    assert loaded["step"] == 1
    assert loaded["trainer_state"] == {"controller": {"h_rl": 0.5}}
    for k, v in saved["saved"].items():
        assert not torch.equal(other[k], v) or v.abs().max() == 0, k  # loading really replaced the weights
        assert torch.equal(loaded["loaded"][k], v), k
        torch.testing.assert_close(loaded["next"][k], saved["next"][k], atol=1e-6, rtol=0, msg=k)
