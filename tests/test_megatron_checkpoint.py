"""dist_checkpointing round trips on CPU (gloo): fp32 save at TP=2 / load at TP=1, and bf16 at the same layout.

The fp32 TP=2 run takes a training step, saves, and takes a second step; the TP=1 run starts from different weights,
loads the checkpoint, and takes the same second step. Equal weights after loading check the model resharding,
equal weights after the second step check the optimiser state (Adam moments) resharding too.
"""
from __future__ import annotations

import pytest
import torch
import transformers

from dist_utils import run_distributed
from test_megatron import (OPTIM, VOCAB, as_tensors, hf_weights, make_batch, pg_loss_fn, portable, tiny_hf_config,
                           tiny_hf_model)

pytest.importorskip("megatron.core")


def _worker(rank, world_size, hf_config, hf_state, tp, path, save):
    import megatron_compat
    megatron_compat.install()
    from megatron.core import parallel_state as ps

    from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy

    policy = MegatronPolicy(hf_config, hf_state, MegatronConfig(
        tensor_model_parallel_size=tp, dtype="float32", use_distributed_optimizer=False), OPTIM)
    batch = make_batch()
    loss_fn = pg_loss_fn(float(batch.loss_mask.sum()))

    def train_step():
        policy.get_loss_and_metrics(batch, 2, loss_fn)
        policy.optimizer_step()

    out = {}
    if save:
        train_step()
        out["saved"] = hf_weights(policy)
        policy.save_checkpoint(path)
    else:
        policy.load_checkpoint(path)
        out["loaded"] = hf_weights(policy)
        out["step"] = policy.step
    train_step()
    out["next"] = hf_weights(policy)
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
    for k, v in saved["saved"].items():
        assert not torch.equal(other[k], v) or v.abs().max() == 0, k  # loading really replaced the weights
        assert torch.equal(loaded["loaded"][k], v), k
        torch.testing.assert_close(loaded["next"][k], saved["next"][k], atol=1e-6, rtol=0, msg=k)


def _optimizer_tensors(policy) -> list[torch.Tensor]:
    """fp32 main params and Adam moments, in the optimiser's own order (comparable only at the same layout)."""
    out = []
    for opt in policy.optimizer.chained_optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                out.append(p.detach().clone())
                out += [v.detach().clone() for k, v in sorted(opt.state[p].items())
                        if isinstance(v, torch.Tensor) and k != "step"]
    return out


def _bf16_worker(rank, world_size, hf_config, hf_state, distributed_optimizer, path, save):
    import megatron_compat
    megatron_compat.install()
    from megatron.core import parallel_state as ps

    from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy
    from megatron_red.models.megatron.weights import unwrap_model

    policy = MegatronPolicy(hf_config, hf_state, MegatronConfig(
        dtype="bfloat16", use_distributed_optimizer=distributed_optimizer, attention="sdpa"), OPTIM)
    batch = make_batch()
    loss_fn = pg_loss_fn(float(batch.loss_mask.sum()))

    def train_step():
        policy.get_loss_and_metrics(batch, 2, loss_fn)
        policy.optimizer_step()

    def weights():  # bf16 has no numpy dtype; fp32 holds every bf16 value exactly
        return {k: v.float() for k, v in hf_weights(policy).items()}

    out = {"param_dtypes": sorted({str(p.dtype) for p in unwrap_model(policy.model).parameters()})}
    if save:
        train_step()
        out["weights"], out["optim"] = weights(), _optimizer_tensors(policy)
        policy.save_checkpoint(path)
    else:
        policy.load_checkpoint(path)
        out["weights"], out["optim"] = weights(), _optimizer_tensors(policy)
    train_step()
    out["next"] = weights()
    ps.destroy_model_parallel()
    return portable(out)


@pytest.mark.parametrize("distributed_optimizer", [True, False])
def test_bf16_round_trip(tmp_path, distributed_optimizer):
    """bf16 (fp32 main params) with the Qwen2 QKV bias: save after a step, load into a model built from other
    weights, and the loaded weights, main params, Adam moments and the next step equal the saving run's exactly.

    Regression: the local spec's RMSNorm weights stayed fp32 in a bf16 model, and megatron's 16-bit optimisers
    then paired optimiser state with the wrong model tensors (QKV bias of 256 vs a norm of 128) when saving.
    """
    config = transformers.Qwen2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, vocab_size=VOCAB,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    path = str(tmp_path / "ckpt")
    saved = as_tensors(run_distributed(_bf16_worker, 1, config, tiny_hf_model(config, seed=0).state_dict(),
                                       distributed_optimizer, path, True)[0])
    other = tiny_hf_model(config, seed=7).state_dict()
    loaded = as_tensors(run_distributed(_bf16_worker, 1, config, other, distributed_optimizer, path, False)[0])

    assert saved["param_dtypes"] == loaded["param_dtypes"] == ["torch.bfloat16"]
    assert "model.layers.0.self_attn.q_proj.bias" in saved["weights"]
    for k, v in saved["weights"].items():
        assert not torch.equal(other[k].bfloat16().float(), v), k  # loading really replaced the weights
        assert torch.equal(loaded["weights"][k], v), k
    assert len(loaded["optim"]) == len(saved["optim"]) > 0
    for i, (a, b) in enumerate(zip(loaded["optim"], saved["optim"])):
        assert a.dtype == torch.float32 and torch.equal(a, b), i
    for k, v in saved["next"].items():
        assert torch.equal(loaded["next"][k], v), k
