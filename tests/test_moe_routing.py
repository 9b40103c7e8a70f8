"""Routing replay of a mixture of experts (Qwen3-MoE): what the rollout engines record, what the trainer's forwards
do with it, and what a flipped top-k costs without it (CPU, fp32, real megatron-core and transformers).

- Megatron at EP 2 (two gloo processes, each data-parallel replica with its own prompts, so the expert-parallel
  ranks step and run micro-batches together): megatron's engine, with prefix-shared prompt blocks and more rows
  than it decodes at once, records every position of prompt and response (the last token aside); the trainer's
  forward with replay routes each recorded position to exactly the recorded experts, and the trace row (never
  generated) is not recorded.
- A constructed flip: one recorded position of one layer is given a different expert set, as an engine whose
  numerics flipped a top-k would have recorded. The float64 Hugging Face model forced to that routing (a hook
  written here, independent of the package's) is what that engine computed; the trainer with replay reproduces it
  (1e-5), the trainer without replay reproduces the unforced model instead, whose log-probs differ from it from
  the flipped position on (and only there), and `moe/routing_mismatch` counts exactly that one routing.
- The same on the Hugging Face backend in one process: the local engine's records are the model's own choices, and
  the policy's replay of a flipped record reproduces the forced float64 model.
megatron-core's unconditional CUDA calls are redirected by tests/megatron_compat.py (no GPU here).
"""
from __future__ import annotations

import copy

import pytest
import torch

from dist_utils import run_distributed
from megatron_red.batch import NOT_RECORDED
from megatron_red.models.hf_checkpoint import checkpoint_tensors
from megatron_red.trainer.groups import Group, build_batch
from test_megatron import as_tensors, portable
from test_megatron_moe import tiny_moe_config, tiny_moe_model

pytest.importorskip("megatron.core")

EOS = 1
PREFIX = [5, 6, 7, 8]  # one whole KV block of 4 tokens: the prompts sharing it share its block
PROMPTS = {0: [PREFIX + [20], [9, 10, 11], PREFIX + [21, 22]], 1: [[12, 13, 14, 15, 16]]}
TRACE = [30, 31, 32, 33, 34, 35]


def _batch(prompts, completions, trace: bool = True):
    """The rows a RED step trains on: the first prompt with an offline trace, each prompt's rollouts."""
    groups = [Group(p, responses=[c.token_ids for c in comps], rewards=[0.0] * len(comps),
                    routed_experts=[c.routed_experts for c in comps],
                    trace_ids=TRACE if trace and i == 0 else None)
              for i, (p, comps) in enumerate(zip(prompts, completions))]
    return build_batch(groups, offline_in_group=True, std_normalize=False, pad_token_id=0)


def _flip(batch, row: int, position: int, layer: int, experts: int) -> torch.Tensor:
    """The recorded experts with one routing changed: the second of (row, position, layer)'s experts replaced by
    the first expert it does not choose."""
    routed = batch.fields["routed_experts"].clone()
    chosen = routed[row, position, layer].tolist()
    routed[row, position, layer, 1] = next(e for e in range(experts) if e not in chosen)
    return routed


def _used_experts(routers) -> tuple[list, list]:
    """Forward hooks recording the experts each megatron router routes to (its routing map), in call order."""
    used = []
    handles = [r.register_forward_hook(lambda m, i, o: used.append(o[1].nonzero()[:, 1].view(o[1].shape[0], -1)))
               for r in routers]
    return used, handles


def _megatron_worker(rank, world_size, hf_config, hf_state):
    import megatron_compat
    megatron_compat.install()
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_red.config import RolloutConfig
    from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy
    from megatron_red.models.optim import OptimConfig
    from megatron_red.parallel.packing import padded_micro_batch
    from megatron_red.rollout.base import SamplingParams
    from megatron_red.trainer.build import build_engine

    class Tokens:
        eos_token_id, pad_token_id = EOS, 0

    policy = MegatronPolicy(hf_config, checkpoint_tensors(hf_state), MegatronConfig(
        expert_model_parallel_size=2, moe=True, dtype="float32"), OptimConfig())
    engine = build_engine("megatron", policy, Tokens(), RolloutConfig(max_batch_size=3, kv_block_size=4),
                          max_sequence_length=40)
    prompts = PROMPTS[rank]
    # Rank 1 decodes for longer: rank 0 idles through megatron's dummy forwards meanwhile.
    completions = engine.generate(prompts, 2, SamplingParams(max_new_tokens=6 + 4 * rank, seed=rank))
    batch = _batch(prompts, completions)
    routers = [m for m in policy.model.modules() if isinstance(m, TopKRouter)]
    used, handles = _used_experts(routers)
    everything = [batch.micro_batch_rows(len(batch))[0]]  # one micro-batch: its rows, longest first
    order = everything[0]
    policy.get_inference_log_probs(batch, len(batch))
    for h in handles:
        h.remove()
    recorded = padded_micro_batch(batch.select(order)).routing  # the records in the model's token order
    used = torch.stack(used, dim=1)  # [tokens, layers, k]

    out = dict(prefix=engine.prefix_cache_stats(), recorded=recorded, used=used,
               covered=[bool((c.routed_experts != NOT_RECORDED).all()) and c.routed_experts.shape[0] == len(p) +
                        len(c.token_ids) - 1 for p, comps in zip(prompts, completions) for c in comps],
               input_ids=batch.input_ids, attention_mask=batch.attention_mask, loss_mask=batch.loss_mask,
               is_offline=batch.fields["is_offline"], routed=batch.fields["routed_experts"])
    # The constructed flip: a response position of the first rollout row (row 1: row 0 is the trace), layer 0.
    row, position = 1, len(prompts[0]) + 1
    flipped = batch.__class__(batch.input_ids, batch.attention_mask, batch.loss_mask,
                              {**batch.fields, "routed_experts": _flip(batch, row, position, 0, hf_config.num_experts)})
    out["flip"] = (row, position, flipped.fields["routed_experts"][row, position, 0])
    out["replayed"], _ = policy.get_inference_log_probs(flipped, 2)
    policy.config.moe_routing_replay = False
    out["own"], _ = policy.get_inference_log_probs(flipped, 2)

    def loss_fn(logprobs, entropy, mb):
        return (logprobs * mb.loss_mask).sum() * 0.0, {"loss": 0.0}

    out["stats"] = policy.get_loss_and_metrics(flipped, 2, loss_fn)[0]
    ps.destroy_model_parallel()
    return portable(out)


def _forced_logprobs(model, batch, forced: dict) -> torch.Tensor:
    """float64 log-probs of `batch`'s targets under the Hugging Face `model` with some routings forced:
    forced[(row, position, layer)] = experts. The routing weights of a forced token are the softmax of the router's
    logits at the forced experts, renormalised over them when the config says `norm_topk_prob`."""
    model = copy.deepcopy(model).double()
    model.set_experts_implementation("eager")
    width = batch.input_ids.shape[1]
    handles = []
    for layer_index, layer in enumerate(model.model.layers):
        mine = {row * width + position: experts for (row, position, layer), experts in forced.items()
                if layer == layer_index}

        def hook(module, inputs, output, mine=mine):
            logits, weights, chosen = output
            if not mine:
                return None
            chosen, weights = chosen.clone(), weights.clone()
            for token, experts in mine.items():
                chosen[token] = torch.as_tensor(experts, dtype=chosen.dtype)
                forced = torch.softmax(logits[token], dim=-1)[chosen[token]]
                weights[token] = forced / forced.sum() if model.config.norm_topk_prob else forced
            return logits, weights, chosen

        handles.append(layer.mlp.gate.register_forward_hook(hook))
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    for h in handles:
        h.remove()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    return logp * batch.loss_mask.double()


def _check_flip(model, batch, flip, replayed, own, mismatched, recorded):
    row, position, experts = flip
    reference = _forced_logprobs(model, batch, {})
    forced = _forced_logprobs(model, batch, {(row, position, 0): experts.tolist()})
    torch.testing.assert_close(replayed.double(), forced, atol=1e-5, rtol=0)  # replay: what the engine computed
    torch.testing.assert_close(own.double(), reference, atol=1e-5, rtol=0)  # no replay: the trainer's own routing
    effect = (forced - reference).abs()[row]
    assert effect[:position].max() < 1e-12  # targets before the flipped position do not see it
    assert effect[position:].max() > 1e-3  # the log-prob difference replay removes
    assert (mismatched, recorded) == (1, int((batch.fields["routed_experts"] != NOT_RECORDED).all(-1).sum()))


def test_megatron_engine_records_and_the_trainer_replays_at_ep2():
    config = tiny_moe_config("qwen3_moe")
    model = tiny_moe_model(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results = [as_tensors(r) for r in run_distributed(_megatron_worker, 2, config, state, timeout_s=300)]
    assert results[0]["prefix"]["skipped"] > 0  # prompts took a shared block from the prefix cache
    for r in results:
        assert all(r["covered"])  # every position of prompt and response (the last token aside) recorded
        recorded = (r["recorded"] != NOT_RECORDED).all(-1)
        assert recorded.sum() > 0
        used, wanted = r["used"].sort(-1).values, r["recorded"].long().sort(-1).values
        assert torch.equal(used[recorded], wanted[recorded])  # replay: exactly the engine's experts
        offline = r["is_offline"].bool()
        assert (r["routed"][offline] == NOT_RECORDED).all()  # the trace was never generated: not recorded
    from megatron_red.batch import SequenceBatch

    r = results[0]
    batch = SequenceBatch(r["input_ids"], r["attention_mask"], r["loss_mask"],
                          {"routed_experts": r["routed"]})
    stats = r["stats"]
    _check_flip(model, batch, r["flip"], r["replayed"], r["own"], stats["moe_routing_mismatched"],
                stats["moe_routings_recorded"])


def test_local_engine_records_and_the_hf_policy_replays():
    from megatron_red.models.hf import HFPolicy
    from megatron_red.rollout import LocalEngine, SamplingParams

    config = tiny_moe_config("qwen3_moe")
    model = tiny_moe_model(config)
    policy = HFPolicy(copy.deepcopy(model), device="cpu", dtype=torch.float32, fused_kernel="off")
    engine = LocalEngine(policy.model, eos_token_id=EOS, pad_token_id=0, max_batch_size=8)
    prompts = PROMPTS[0]
    completions = engine.generate(prompts, 2, SamplingParams(max_new_tokens=6, seed=0))
    batch = _batch(prompts, completions)
    assert all(c.routed_experts.shape[0] == len(p) + len(c.token_ids) - 1 and (c.routed_experts >= 0).all()
               for p, comps in zip(prompts, completions) for c in comps)
    # the records are the model's own choices in a plain forward of each row
    chosen = []
    handles = [layer.mlp.gate.register_forward_hook(lambda m, i, o: chosen.append(o[2]))
               for layer in policy.model.model.layers]
    with torch.no_grad():
        policy.model(batch.input_ids, attention_mask=batch.attention_mask)
    for h in handles:
        h.remove()
    own = torch.stack(chosen, dim=1).view(*batch.input_ids.shape, len(chosen), -1)[:, :-1]
    recorded = (batch.fields["routed_experts"] != NOT_RECORDED).all(-1)
    assert recorded.sum() > 0 and not recorded[batch.fields["is_offline"].bool()].any()
    assert torch.equal(own.sort(-1).values[recorded], batch.fields["routed_experts"].long().sort(-1).values[recorded])

    row, position = 1, len(prompts[0]) + 1
    flipped = batch.__class__(batch.input_ids, batch.attention_mask, batch.loss_mask,
                              {**batch.fields, "routed_experts": _flip(batch, row, position, 0, config.num_experts)})
    replayed, _ = policy.get_inference_log_probs(flipped, 2)
    policy.moe_routing_replay = False
    own_logprobs, _ = policy.get_inference_log_probs(flipped, 2)
    stats = policy.get_loss_and_metrics(flipped, 2, lambda lp, ent, mb: ((lp * mb.loss_mask).sum() * 0.0, {}))[0]
    _check_flip(model, flipped, (row, position, flipped.fields["routed_experts"][row, position, 0]), replayed,
                own_logprobs, stats["moe_routing_mismatched"], stats["moe_routings_recorded"])


def _recompute_worker(rank, world_size, hf_config, hf_state, batch):
    """PP 2 (1F1B: the first stage runs a micro-batch's forward before the previous one's backward): one training
    pass replaying `batch`'s (flipped) records, with and without full recompute; the gradients' norm."""
    import megatron_compat
    megatron_compat.install()
    from megatron.core import parallel_state as ps

    from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy
    from megatron_red.models.optim import OptimConfig

    norms = []
    for recompute in ("full", "none"):
        policy = MegatronPolicy(hf_config, checkpoint_tensors(hf_state), MegatronConfig(
            pipeline_model_parallel_size=2, moe=True, dtype="float32", recompute=recompute,
            use_distributed_optimizer=False), OptimConfig(grad_clip=0.0))

        def loss_fn(logprobs, entropy, mb):
            loss = (logprobs * mb.loss_mask).sum() / batch.loss_mask.sum()
            return loss, {"loss": float(loss.detach())}

        metrics = policy.get_loss_and_metrics(batch, 1, loss_fn)  # one row per micro-batch, different lengths
        norms.append((policy.optimizer_step(), sum(m["loss"] for m in metrics), metrics[0]["moe_routing_mismatched"]))
        ps.destroy_model_parallel()
    return norms


def test_replay_under_full_recompute_with_pp2():
    """The backward's recomputation of each layer replays the micro-batch it recomputes (not the one whose forward
    ran last): a flipped record gives the same loss and gradient with and without full recompute."""
    from megatron_red.batch import SequenceBatch

    config = tiny_moe_config("qwen3_moe")
    state = {k: v.detach().clone() for k, v in tiny_moe_model(config).state_dict().items()}
    g = torch.Generator().manual_seed(3)
    lengths = [12, 9, 7]
    ids = torch.randint(2, 200, (3, 12), generator=g) * (torch.arange(12) < torch.tensor(lengths)[:, None])
    attention = (ids > 0).long()
    loss_mask = attention[:, 1:].clone()
    loss_mask[:, :3] = 0
    routed = torch.full((3, 11, 2, 2), NOT_RECORDED, dtype=torch.int16)
    for row, n in enumerate(lengths):  # every position recorded: expert pairs that differ by row and position
        for t in range(n - 1):
            routed[row, t] = torch.tensor([[(row + t) % 8, (row + t + 3) % 8], [(2 * t) % 8, (2 * t + 1) % 8]])
    batch = SequenceBatch(ids, attention, loss_mask, {"routed_experts": routed, "is_offline": torch.zeros(3).bool()})
    results = run_distributed(_recompute_worker, 2, config, state, batch)
    (full_norm, full_loss, mismatched), (plain_norm, plain_loss, _) = results[1]  # the last stage's metrics
    assert mismatched > 0  # the records are not the model's own routing: replay changes the forward
    assert full_loss == pytest.approx(plain_loss, rel=1e-6) and full_norm == pytest.approx(plain_norm, rel=1e-6)
    assert results[0][0][0] == pytest.approx(full_norm, rel=1e-6)  # both stages agree on the norm
