"""Mixtures of experts (Qwen3-MoE, Qwen2-MoE) on the megatron-core backend against the Hugging Face model (CPU, gloo,
fp32, real megatron-core), with the experts split over expert-parallel ranks.

Each case spawns TP x PP x DP processes (EP divides DP; expert tensor parallelism follows TP), builds a tiny
mixture of experts (8 experts, top-2, an odd vocabulary of 203) from its Hugging Face weights in the released
per-expert checkpoint layout, and checks: HF -> Megatron -> HF export is bit-exact (every expert gathered from its
EP rank); forward-only log-probs and entropies through the pipeline schedule equal the float64 Hugging Face model's;
one training step (policy-gradient + entropy loss, global token counts, Adam, clipping) gives the same weights and
grad norm as the same step on the Hugging Face model. Qwen3-MoE renormalises the top-k probabilities
(`norm_topk_prob`, megatron's softmax after top-k), Qwen2-MoE does not (megatron's pre-softmax) and adds a gated
shared expert. megatron-core's unconditional CUDA calls are redirected by tests/megatron_compat.py (no GPU here).
"""
from __future__ import annotations

import copy

import pytest
import torch

from dist_utils import run_distributed

transformers = pytest.importorskip("transformers")
pytest.importorskip("megatron.core")

from megatron_red.models.hf_checkpoint import checkpoint_tensors  # noqa: E402
from test_megatron import (OPTIM, as_tensors, hf_reference_step, hf_weights, make_batch, pg_loss_fn,  # noqa: E402
                           portable)

VOCAB = 203  # odd: the vocabulary is padded to 256 x TP, and those rows are never a target's


def tiny_moe_config(kind: str = "qwen3_moe", layers: int = 2):
    common = dict(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                  vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-6)
    if kind == "qwen2_moe":
        return transformers.Qwen2MoeConfig(shared_expert_intermediate_size=48, norm_topk_prob=False,
                                           tie_word_embeddings=True, **common)
    return transformers.Qwen3MoeConfig(head_dim=32, norm_topk_prob=True, tie_word_embeddings=False, **common)


def tiny_moe_model(config, seed: int = 0):
    """A random model with every tensor perturbed (norms, router, shared-expert gate included): router logits of
    order 1, so the top-k choices have clear margins."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(10)
    return model


def _worker(rank, world_size, cases, tp, pp, ep, batch, distributed_optimizer):
    """One result per (hf_config, hf_state) case. With TP > 1, sequence parallelism (megatron-core's MoE layer
    trains tensor-parallel only with it)."""
    import megatron_compat
    megatron_compat.install()
    from megatron.core import parallel_state as ps

    from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy

    results = []
    for hf_config, hf_state in cases:
        policy = MegatronPolicy(hf_config, checkpoint_tensors(hf_state), MegatronConfig(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
            sequence_parallel=tp > 1, moe=True, dtype="float32", use_distributed_optimizer=distributed_optimizer),
            OPTIM)
        layout = (ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size(),
                  ps.get_data_parallel_world_size())
        local_experts = len(policy.model.module.decoder.layers[0].mlp.experts.local_experts)
        exported = hf_weights(policy)
        # What a colocated engine refits from (rollout/vllm_engine.py): every tensor, every expert, on every rank.
        streamed = {name: t.clone() for name, t in policy.named_hf_weights()}
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        rows = torch.arange(dp_rank, len(batch), dp)  # each replica its own rows; experts see every replica's
        local = batch.select(rows)
        logprobs, entropy = policy.get_inference_log_probs(local, 1)
        metrics = policy.get_loss_and_metrics(local, 1, pg_loss_fn(float(batch.loss_mask.sum())))
        grad_norm = policy.optimizer_step()
        stepped = hf_weights(policy)
        ps.destroy_model_parallel()
        results.append(portable(dict(exported=exported, streamed=streamed, rows=rows, logprobs=logprobs,
                                     entropy=entropy,
                                     metrics=metrics, grad_norm=grad_norm, stepped=stepped, layout=layout,
                                     local_experts=local_experts)))
    return results


@pytest.mark.parametrize("kinds,tp,pp,dp,ep,distributed_optimizer", [
    ("qwen3_moe+qwen2_moe", 1, 1, 2, 2, False),
    ("qwen3_moe", 2, 1, 2, 2, False),
    ("qwen3_moe", 1, 2, 2, 2, True),
])
def test_moe_matches_hf(kinds, tp, pp, dp, ep, distributed_optimizer):
    configs = [tiny_moe_config(kind) for kind in kinds.split("+")]
    models = [tiny_moe_model(config) for config in configs]
    states = [{k: v.detach().clone() for k, v in model.state_dict().items()} for model in models]
    batch = make_batch()
    results = run_distributed(_worker, tp * pp * dp, list(zip(configs, states)), tp, pp, ep, batch,
                              distributed_optimizer)
    for i, (config, model, hf_state) in enumerate(zip(configs, models, states)):
        per_rank = [as_tensors(r[i]) for r in results]
        for r in per_rank:
            assert tuple(int(x) for x in r["layout"]) == (ep, tp, dp)  # EP x expert-TP, as asked
            assert int(r["local_experts"]) == config.num_experts // ep
        check_against_hf(config, model, hf_state, batch, per_rank)


def check_against_hf(config, model, hf_state, batch, results):
    with torch.no_grad():
        model64 = copy.deepcopy(model).double()
        model64.set_experts_implementation("eager")  # transformers' grouped GEMM takes no float64
        logp = torch.log_softmax(model64(batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1], -1)
    ref_lp = logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    ref_ent = -(logp.exp() * logp).sum(-1)
    mask = batch.loss_mask.double()
    ref_state, ref_norm = hf_reference_step(model, batch)
    ref_state, hf_state = checkpoint_tensors(ref_state), checkpoint_tensors(hf_state)
    expected_keys = set(hf_state) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    assert sum(".mlp.experts." in k for k in expected_keys) == 3 * config.num_experts * config.num_hidden_layers
    for r in results:
        assert set(r["exported"]) == set(r["streamed"]) == expected_keys
        for k in expected_keys:
            assert torch.equal(r["exported"][k], hf_state[k]) and torch.equal(r["streamed"][k], hf_state[k]), k
        rows = r["rows"]
        torch.testing.assert_close(r["logprobs"].double(), ref_lp[rows] * mask[rows], atol=1e-5, rtol=0)
        torch.testing.assert_close(r["entropy"].double(), ref_ent[rows] * mask[rows], atol=1e-5, rtol=0)
        assert r["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
        for k in expected_keys:
            torch.testing.assert_close(r["stepped"][k], ref_state[k], atol=3e-5, rtol=0,
                                       msg=lambda m, k=k: f"{k}: {m}")
        moved = {k: (ref_state[k] - hf_state[k]).abs().max().item() for k in expected_keys}
        assert max(moved.values()) > 1e-4
        # every expert of the first layer was trained (routed to by some token of the batch)
        assert all(moved[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] > 1e-4 for e in range(config.num_experts))


def test_plan_of_the_30b_a3b_recipe_is_the_hand_count(capsys):
    """`megatron-red plan` on the Qwen3-30B-A3B recipe (16 GPUs: TP 2 x PP 2 x DP 4, EP 4) against a count by hand
    of one GPU's parameters on the first stage, from the architecture's config.json (examples/red/architectures/)."""
    import json
    from pathlib import Path

    from megatron_red.cli import main

    arch = json.loads(Path("examples/red/architectures/qwen3-30b-a3b/config.json").read_text())
    assert (arch["num_experts"], arch["num_experts_per_tok"], arch["moe_intermediate_size"]) == (128, 8, 768)
    tp, pp, dp, ep = 2, 2, 4, 4
    h, heads, kv, d, width = (arch["hidden_size"], arch["num_attention_heads"], arch["num_key_value_heads"],
                              arch["head_dim"], arch["moe_intermediate_size"])
    layers = arch["num_hidden_layers"] // pp
    embedding = -(-arch["vocab_size"] // (128 * tp)) * 128 * tp // tp * h  # padded vocabulary, split over TP
    layer = (h + (heads + 2 * kv) * d // tp * h + h * heads * d // tp + 2 * d + h  # attention and its norms
             + arch["num_experts"] * h)  # the router
    experts = layers * arch["num_experts"] // ep * 3 * width // tp * h
    dense = embedding + layers * layer
    assert (dense, experts) == (388_601_856, 1_811_939_328)
    gib = 2**30
    expected = {"weights": (dense + experts) * 2 / gib, "gradients": (dense + experts) * 4 / gib,  # bf16, fp32
                "optimizer": (dense * 12 / dp + experts * 12 / (dp // ep)) / gib}  # master + 2 moments, sharded
    assert main(["plan", "--world-size", "16", "examples/red/qwen3_30b_a3b_16gpu.yaml",
                 "model.path=examples/red/architectures/qwen3-30b-a3b"]) == 0
    out = capsys.readouterr().out
    assert f"parameters per GPU (stage 0): {dense / 1e9:.3f}B dense + {experts / 1e9:.3f}B experts" in out
    for part, value in expected.items():
        assert f"| {part} | generation + training | {value:.2f} | {value:.2f} |" in out, part
    assert f"| (of which experts) | | {experts * 12 / gib:.2f} | {experts * 12 / gib:.2f} |" in out
    assert "30.53B parameters (3.35B active per token" in out
    assert out.endswith("generation peak 61.1 GiB of 80 GiB: fits\ntraining peak 71.4 GiB of 80 GiB: fits\n")
    # 8 GPUs: DP 2, which EP 4 cannot divide
    assert main(["plan", "--world-size", "8", "examples/red/qwen3_30b_a3b_16gpu.yaml",
                 "model.path=examples/red/architectures/qwen3-30b-a3b"]) == 2
    assert "model.expert_model_parallel_size=4 must divide the data-parallel size 2" in capsys.readouterr().err


def _memory_worker(rank, world_size, hf_config, hf_state, batch, ep):
    """Bytes of this rank's weights, fp32 gradients and optimiser state (fp32 master copies and Adam moments), each
    split into experts and the rest, from the real objects of a bf16 policy with the distributed optimiser after
    one step (`test_megatron_packing._packing_worker` counts a dense model the same way)."""
    import megatron_compat
    megatron_compat.install()
    from megatron.core import parallel_state as ps

    from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy

    policy = MegatronPolicy(hf_config, checkpoint_tensors(hf_state), MegatronConfig(
        expert_model_parallel_size=ep, moe=True, dtype="bfloat16", use_distributed_optimizer=True), OPTIM)
    policy.get_loss_and_metrics(batch, 4, pg_loss_fn(float(batch.loss_mask.sum())))
    params = list(policy.model.parameters())
    expert = {id(p): not getattr(p, "allreduce", True) for p in params}  # megatron marks expert parameters
    counts = {f"{part}/{kind}": 0 for part in ("weights", "gradients", "optimizer") for kind in ("dense", "experts")}
    for p in params:
        kind = "experts" if expert[id(p)] else "dense"
        counts[f"weights/{kind}"] += p.numel() * p.element_size()
        counts[f"gradients/{kind}"] += p.main_grad.numel() * p.main_grad.element_size()
    policy.optimizer_step()
    for opt in policy.optimizer.chained_optimizers:
        for group in opt.optimizer.param_groups:
            kind = "experts" if group.get("is_expert_parallel") else "dense"
            for p in group["params"]:  # fp32 master shards
                counts[f"optimizer/{kind}"] += p.numel() * p.element_size() + sum(
                    v.numel() * v.element_size() for k, v in opt.optimizer.state[p].items()
                    if torch.is_tensor(v) and k != "step")
    counts["edp"] = ps.get_expert_data_parallel_world_size()
    ps.destroy_model_parallel()
    return counts


def test_plan_counts_the_real_objects_at_ep2():
    """The memory plan's weights, gradients and Adam state per GPU against the real objects of a 4-rank world at
    EP 2 (DP 4: the dense state sharded over 4 ranks, the experts' over the 2 that hold the same experts)."""
    from megatron_red.models.megatron.layout import ParallelLayout
    from megatron_red.models.megatron.memory import Workload, memory_plan
    from megatron_red.models.megatron.model import HFArchitecture

    config = tiny_moe_config("qwen3_moe")
    state = {k: v.detach().clone() for k, v in tiny_moe_model(config).state_dict().items()}
    results = run_distributed(_memory_worker, 4, config, state, make_batch(), 2)
    plan = memory_plan(HFArchitecture.from_hf_config(config),
                       ParallelLayout(data_parallel_size=4, dtype="bfloat16", moe=True, expert_model_parallel_size=2),
                       Workload(tokens_per_micro_batch=64, max_sequence_length=16))

    assert {r["edp"] for r in results} == {2}
    for part in ("weights", "gradients"):
        for r in results:
            assert r[f"{part}/dense"] + r[f"{part}/experts"] == plan.parts[0][part], part
            assert r[f"{part}/experts"] == plan.experts[part], part
    # the distributed optimizer's shards, as the plan counts them: the mean over the ranks
    for kind, planned in (("experts", plan.experts["optimizer"]), ("dense", plan.parts[0]["optimizer"]
                                                                  - plan.experts["optimizer"])):
        mean = sum(r[f"optimizer/{kind}"] for r in results) / len(results)
        assert mean == planned, kind


def _aux_loss_worker(rank, world_size, hf_config, hf_state, batch, coeff):
    """The router weights' gradient of one training pass whose loss is only the load-balancing term."""
    import megatron_compat
    megatron_compat.install()
    from megatron.core import parallel_state as ps

    from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy

    policy = MegatronPolicy(hf_config, checkpoint_tensors(hf_state), MegatronConfig(
        moe=True, dtype="float32", moe_aux_loss_coeff=coeff), OPTIM)
    metrics = policy.get_loss_and_metrics(batch, 2, lambda lp, ent, mb: ((lp * mb.loss_mask).sum() * 0.0, {}))
    grads = {name: p.main_grad.clone() for name, p in policy.model.named_parameters() if name.endswith("router.weight")}
    config_after = policy.model.module.config.moe_aux_loss_coeff
    dropless, _ = policy.get_inference_log_probs(batch, 4)
    ps.destroy_model_parallel()
    # A capacity factor: each expert takes at most 0.5 x tokens x k / experts tokens of a micro-batch.
    capped = MegatronPolicy(hf_config, checkpoint_tensors(hf_state), MegatronConfig(
        moe=True, dtype="float32", moe_capacity_factor=0.5), OPTIM)
    dropping, _ = capped.get_inference_log_probs(batch, 4)
    capacity = capped.model.module.config.moe_expert_capacity_factor
    ps.destroy_model_parallel()
    return portable(dict(grads=grads, aux=metrics[0]["moe_aux_loss_sum"] / metrics[0]["moe_aux_loss_terms"],
                         coeff_after=config_after, dropless=dropless, dropping=dropping, capacity=capacity))


def test_load_balancing_loss_weight_and_capacity():
    """`model.moe_aux_loss_coeff` = a: the update's load-balancing term is a x the token-weighted mean over the
    pass's micro-batches of the sum over layers of E * sum_i f_i P_i (megatron's loss, whose per-token scaling the
    policy turns into that mean). Checked on the routers' gradients against the float64 Hugging Face model with the
    same micro-batches (2 rows, longest first; padding positions routed too, as megatron routes them). And
    `model.moe_capacity_factor` makes megatron drop tokens (dropless is the default everywhere else)."""
    config = tiny_moe_config("qwen3_moe")
    model = tiny_moe_model(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batch, coeff = make_batch(), 0.1
    result = as_tensors(run_distributed(_aux_loss_worker, 1, config, state, batch, coeff)[0])
    assert result["coeff_after"] == pytest.approx(coeff)  # the per-pass rescaling is undone

    model64 = copy.deepcopy(model).double()
    model64.set_experts_implementation("eager")
    routers = [layer.mlp.gate for layer in model64.model.layers]
    logits = []
    handles = [r.register_forward_hook(lambda m, i, o: logits.append(o[0])) for r in routers]
    micro_batches = [batch.select(rows).trimmed() for rows in batch.micro_batch_rows(2)]
    total_tokens = sum(mb.input_ids.numel() for mb in micro_batches)
    objective, measured = 0.0, []
    for mb in micro_batches:
        logits.clear()
        model64(mb.input_ids)
        for layer_logits in logits:  # E * sum_i f_i P_i, f from the top-k (no gradient), P the mean probability
            probs = torch.softmax(layer_logits, dim=-1)
            chosen = probs.topk(config.num_experts_per_tok, dim=-1).indices
            f = torch.zeros_like(probs).scatter_(1, chosen, 1.0).mean(0) / config.num_experts_per_tok
            loss = config.num_experts * (f * probs.mean(0)).sum()
            measured.append(float(loss.detach()))
            objective = objective + coeff * loss * mb.input_ids.numel() / total_tokens
    objective.backward()
    for h in handles:
        h.remove()
    assert result["aux"] == pytest.approx(sum(measured) / len(measured), rel=1e-5)  # moe/aux_loss, as logged
    for layer, router in enumerate(routers):
        grad = result["grads"][f"module.decoder.layers.{layer}.mlp.router.weight"]
        torch.testing.assert_close(grad.double(), router.weight.grad, atol=1e-6, rtol=1e-4)
        assert router.weight.grad.abs().max() > 1e-4
    # `model.moe_capacity_factor` reaches megatron's router, which then drops tokens: other log-probs.
    assert result["capacity"] == 0.5 and (result["dropping"] - result["dropless"]).abs().max() > 1e-3


def test_grouped_gemm_experts_map_like_the_local_ones():
    """Transformer Engine's grouped GEMM names an expert's weights `mlp.experts.linear_fc1.weight{i}` (not installed
    here, so only its mapping is checked): the same Hugging Face tensors and slices as the local spec's
    `mlp.experts.local_experts.{i}.linear_fc1.weight`, shifted by the EP rank's first expert."""
    from megatron_red.models.megatron.model import HFArchitecture
    from megatron_red.models.megatron.weights import is_expert, shard_layout

    arch = HFArchitecture.from_hf_config(tiny_moe_config("qwen3_moe"))
    for fc, shape, split in (("1", (32, 64), 0), ("2", (64, 16), 1)):  # TP 2: [2 x 32 / 2, 64], [64, 32 / 2]
        local = shard_layout(f"mlp.experts.local_experts.3.linear_fc{fc}.weight", 1, shape, split, arch, 2, 1, 4)
        grouped = shard_layout(f"mlp.experts.linear_fc{fc}.weight3", 1, shape, split, arch, 2, 1, 4)
        assert local == grouped and is_expert(f"mlp.experts.linear_fc{fc}.weight3")
    names = sorted(shard_layout("mlp.experts.linear_fc1.weight3", 1, (32, 64), 0, arch, 2, 1, 4)[0])
    assert names == ["model.layers.1.mlp.experts.7.gate_proj.weight", "model.layers.1.mlp.experts.7.up_proj.weight"]
    assert not is_expert("mlp.router.weight") and not is_expert("mlp.shared_experts.linear_fc1.weight")
