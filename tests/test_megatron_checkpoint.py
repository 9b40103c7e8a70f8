"""dist_checkpointing round trips on CPU (gloo): fp32 save at TP=2 / load at TP=1, bf16 at the same layout, and the
distributed optimizer saved at TP 2 x DP 2 and loaded at TP 1 x DP 1 and at TP 1 x PP 2 x DP 2 (issue 33).

The saving run takes a training step, saves, and takes a second step; the loading run starts from different
weights, loads the checkpoint, and takes the same second step. Equal weights after loading check the model
resharding, equal weights after the second step check the optimiser state (fp32 master weights and Adam moments)
resharding too. With the distributed optimizer the save and the load must never gather optimizer state: every
rank's optimizer pieces are exactly its own shard (3 fp32 tensors of its DP slice), megatron's gathering code path
(`get_parameter_state_dp_zero`) is never entered, and megatron creates no gloo groups. tools/checkpoint_memory.py
measures the host memory this keeps per rank (docs/benchmarks.md). The pieces' geometry (`_flat_blocks`: a flat
range as hyper-rectangles) is checked on its own for every range of a few shapes.
"""
from __future__ import annotations

import math

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


def test_flat_ranges_are_covered_by_their_blocks_in_order():
    """`_flat_blocks`: the hyper-rectangles of a flat range, each one contiguous run, together the range in order
    (element indices of a torch.arange tensor), for every range of a few shapes."""
    from megatron_red.models.megatron.checkpoint import _flat_blocks

    for shape in ((7,), (3, 5), (4, 3, 5), (2, 3, 2, 4)):
        flat = torch.arange(math.prod(shape)).view(shape)
        for lo in range(flat.numel() + 1):
            for hi in range(lo, flat.numel() + 1):
                covered = []
                for offset, block, start in _flat_blocks(shape, lo, hi):
                    values = flat[tuple(slice(o, o + b) for o, b in zip(offset, block))].flatten()
                    assert values.tolist() == list(range(start, start + values.numel())), (shape, lo, hi)
                    covered += values.tolist()
                assert covered == list(range(lo, hi)), (shape, lo, hi)
                assert len(_flat_blocks(shape, lo, hi)) <= 2 * len(shape) - 1


def _dist_optimizer_worker(rank, world_size, hf_config, hf_state, tp, pp, path, save):
    """TP x PP x DP ranks with the distributed optimizer (fp32); each DP replica trains its half of the batch rows
    (losses normalised with the whole batch's tokens, so the update is the full-batch one)."""
    import megatron_compat
    megatron_compat.install()
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_red.distributed import DataParallel
    from megatron_red.models.megatron import checkpoint
    from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy

    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint gathered optimizer state (get_parameter_state_dp_zero)")

    DistributedOptimizer.get_parameter_state_dp_zero = refuse
    policy = MegatronPolicy(hf_config, hf_state, MegatronConfig(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, dtype="float32",
        use_distributed_optimizer=True, attention="sdpa"), OPTIM)
    gloo_groups = [ps._DATA_PARALLEL_GROUP_GLOO, ps._DATA_PARALLEL_GROUP_WITH_CP_GLOO]
    batch = make_batch()
    dp = DataParallel.for_backend("megatron")
    loss_fn = pg_loss_fn(float(batch.loss_mask.sum()))
    rows = torch.tensor(dp.shard(list(range(len(batch)))))

    def train_step():
        policy.get_loss_and_metrics(batch.select(rows), 2, loss_fn)
        policy.optimizer_step()

    def own_pieces():  # numel of this rank's optimizer pieces per state, and of its own shard
        sharded, _ = checkpoint._sharded_state_dict(policy.model, policy.optimizer, False)
        pieces = list(sharded["optimizer"]["param_state"].values())  # one (chained) optimizer
        shard = sum(p.numel() for opt in policy.optimizer.chained_optimizers
                    for group in opt.optimizer.param_groups for p in group["params"])
        return sum(sh.data.numel() for sh in pieces), shard

    out = {"gloo_groups": [g is not None for g in gloo_groups]}
    if save:
        train_step()
        out["saved"] = hf_weights(policy)
        out["pieces"] = own_pieces()
        policy.save_checkpoint(path)
    else:
        policy.load_checkpoint(path)
        out["loaded"] = hf_weights(policy)
        out["pieces"] = own_pieces()
        out["step"] = policy.step
    train_step()
    out["next"] = hf_weights(policy)
    ps.destroy_model_parallel()
    return portable(out)


def test_distributed_optimizer_reshards_from_tp2_dp2_without_gathering(tmp_path):
    config = tiny_hf_config("qwen2", layers=2)
    path = str(tmp_path / "ckpt")
    saved = as_tensors(run_distributed(_dist_optimizer_worker, 4, config, tiny_hf_model(config, seed=0).state_dict(),
                                       2, 1, path, True))
    other = tiny_hf_model(config, seed=7).state_dict()
    for world_size, tp, pp in ((1, 1, 1), (4, 1, 2)):
        loaded = as_tensors(run_distributed(_dist_optimizer_worker, world_size, config, other, tp, pp, path, False))
        for rank in loaded:
            assert rank["step"] == 1
            for k, v in saved[0]["saved"].items():
                assert not torch.equal(other[k], v), k  # loading really replaced the weights
                assert torch.equal(rank["loaded"][k], v), (world_size, k)
                torch.testing.assert_close(rank["next"][k], saved[0]["next"][k], atol=1e-6, rtol=0,
                                           msg=f"{world_size} ranks: {k}")
    for rank in saved + loaded:
        pieces, shard = rank["pieces"]
        assert pieces == 3 * shard > 0  # master weights + two moments of the rank's own slice, nothing more
        assert rank["gloo_groups"] == [False, False]
    # The DP slices are halves of the TP shard: the pieces are not the whole shard's state.
    assert saved[0]["pieces"][1] < sum(p.numel() for p in tiny_hf_model(config).parameters()) / 2 * 0.6
