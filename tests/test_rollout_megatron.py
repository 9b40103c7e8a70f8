"""The megatron rollout engine (megatron_red/rollout/megatron.py) on the policy's own shards, against the Hugging Face
model and the trainer's log-probs (CPU, gloo, fp32).

One spawn per parallel layout (TP = 2, PP = 2, TP = 2 x PP = 2; the policy is a `MegatronPolicy` with its engine
attached by `build_engine`, blocks of 4 tokens so sequences cross many block boundaries, megatron_red's paged
attention in place of flash-attn) runs every check:

- greedy decoding (top_k = 1) of ragged prompts equals `transformers`' greedy `generate` token for token, EOS
  included where it stops;
- sampled rollouts at temperature 0.7: every rank of the model-parallel group returns the same tokens, no padded
  vocabulary id is ever sampled, and each token's behaviour log-prob equals the trainer's log-prob of that token
  at the same temperature (`get_inference_log_probs`, the pipeline's log-prob head) to 1e-5, and so does the
  full-vocabulary entropy the engine reports at each position (H_rl's input) equal the trainer's;
- with top-k, top-p and an extra stop id, the tokens, stop flags and log-probs equal the local engine's run of the
  same seed on the Hugging Face model (both engines sample row r's t-th token with the seed's uniform u[r, t]);
- `finish_inference` returns the KV cache (no live reference is left) and the next `infer` rebuilds it and
  samples the same tokens again; prefix sharing skips the shared prompt blocks without changing a token;
- too long a request and too small a KV buffer are refused with errors naming the option to raise.

The TP = 2 spawn also checks the actor hooks around an update: with `rollout.offload_optimizer` the gradient
buffers are freed during inference and an offloaded-then-onloaded step equals a plain one.
megatron-core's unconditional CUDA calls are redirected by tests/megatron_compat.py (no GPU here).
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from dist_utils import run_distributed
from test_megatron import hf_weights

transformers = pytest.importorskip("transformers")
pytest.importorskip("megatron.core")

VOCAB = 200
PROMPTS = [[5, 17, 42, 99, 3, 61, 150, 23, 11, 90, 4], [8, 9], [120, 33, 70, 71, 72, 1, 2]]
BLOCK = 4


def tiny_hf_config(model_type: str):
    common = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=128, rms_norm_eps=1e-6,
                  bos_token_id=None, eos_token_id=None)
    if model_type == "qwen2":
        return transformers.Qwen2Config(rope_theta=20000.0, tie_word_embeddings=False, **common)
    return transformers.LlamaConfig(rope_theta=50000.0, tie_word_embeddings=True, attention_bias=False, **common)


def tiny_hf_model(config, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # large perturbations: continuations that do not just repeat a token
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


class Tokens:
    def __init__(self, eos: int):
        self.eos_token_id, self.pad_token_id = eos, 0


def response_batch(prompts, completions):
    """Prompt + response rows, right-padded, loss on the response tokens (what the trainer scores)."""
    from megatron_red.batch import SequenceBatch

    rows = [(p, c.token_ids) for p, cs in zip(prompts, completions) for c in cs]
    length = max(len(p) + len(r) for p, r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    attn = torch.zeros_like(ids)
    loss_mask = torch.zeros(len(rows), length - 1)
    for i, (p, r) in enumerate(rows):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        attn[i, :len(p) + len(r)] = 1
        loss_mask[i, len(p) - 1:len(p) + len(r) - 1] = 1
    return SequenceBatch(ids, attn, loss_mask)


def tokens_of(out):
    return [c.token_ids for cs in out for c in cs]


def _worker(rank, world_size, hf_config, hf_state, eos, stops, tp, pp, check_update):
    import megatron_compat
    megatron_compat.install()
    from megatron.core import parallel_state as ps

    from megatron_red.config import RolloutConfig
    from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy
    from megatron_red.models.optim import OptimConfig
    from megatron_red.rollout.base import SamplingParams
    from megatron_red.trainer.build import build_engine
    from megatron_red.rollout.local import LocalEngine

    optim = OptimConfig(lr=1e-3, warmup_steps=1, total_steps=10, grad_clip=1.0)
    policy = MegatronPolicy(hf_config, hf_state, MegatronConfig(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, dtype="float32",
        use_distributed_optimizer=False, offload_optimizer=check_update), optim)
    rollout = RolloutConfig(max_batch_size=8, kv_block_size=BLOCK)
    engine = build_engine("megatron", policy, Tokens(eos), rollout, max_sequence_length=40)
    assert policy.rollout_engine is engine
    out = {"attention": engine.attention}

    policy.prepare_for_inference()
    out["greedy"] = tokens_of(policy.infer(PROMPTS, 2, SamplingParams(top_k=1, max_new_tokens=12, seed=1)))
    sampled_params = SamplingParams(temperature=0.7, max_new_tokens=10, seed=3)
    sampled = policy.infer(PROMPTS, 3, sampled_params)
    out["sampled"] = tokens_of(sampled)
    out["sampled_logprobs"] = [c.logprobs for cs in sampled for c in cs]
    out["sampled_entropies"] = [c.entropies for cs in sampled for c in cs]
    filtered = SamplingParams(temperature=1.3, top_p=0.9, top_k=20, max_new_tokens=10, seed=5,
                              stop_token_ids=stops)
    megatron_filtered = policy.infer(PROMPTS, 2, filtered)
    kv = weakref.ref(engine.kv_cache)
    prefill = engine.prefix_cache_stats()
    policy.finish_inference()
    gc.collect()
    out["kv_released"] = kv() is None and engine.kv_cache is None
    out["resampled"] = tokens_of(policy.infer(PROMPTS, 3, sampled_params))  # rebuilt cache, same seed
    out["prefill"] = prefill

    with pytest.raises(ValueError, match="rollout.max_sequence_length"):
        policy.infer([list(range(1, 35))], 1, SamplingParams(max_new_tokens=10))
    small = build_engine("megatron", policy, Tokens(eos),
                         RolloutConfig(max_batch_size=2, kv_block_size=BLOCK, kv_buffer_gb=3 * engine.block_bytes / 2**30),
                         max_sequence_length=40)
    with pytest.raises(ValueError, match="rollout.kv_buffer_gb"):
        small.generate([PROMPTS[0]], 1, SamplingParams(max_new_tokens=10))
    no_sharing = build_engine("megatron", policy, Tokens(eos), RolloutConfig(max_batch_size=8, kv_block_size=BLOCK,
                                                                           prefix_caching=False),
                              max_sequence_length=40)
    out["unshared"] = tokens_of(no_sharing.generate(PROMPTS, 3, sampled_params))
    no_sharing.suspend()
    policy.finish_inference()

    batch = response_batch(PROMPTS, sampled)
    logprobs, entropy = policy.get_inference_log_probs(batch, micro_batch_size=4, temperature=0.7)
    out["trainer_logprobs"] = [logprobs[i][batch.loss_mask[i] > 0].tolist() for i in range(len(batch))]
    out["trainer_entropies"] = [entropy[i][batch.loss_mask[i] > 0].tolist() for i in range(len(batch))]

    if rank == 0:  # the local engine on the Hugging Face model, same seed and parameters
        hf = transformers.AutoModelForCausalLM.from_config(hf_config).float()
        hf.load_state_dict(hf_state)
        local = LocalEngine(hf, eos_token_id=eos, pad_token_id=0).generate(PROMPTS, 2, filtered)
        out["filtered_match"] = [(a.token_ids == b.token_ids, a.finished == b.finished,
                                  max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)))
                                 for cs, ls in zip(megatron_filtered, local) for a, b in zip(cs, ls)]
        out["filtered_stops"] = [c.finished for cs in megatron_filtered for c in cs]

    if check_update:
        out["update"] = _update_checks(policy, hf_config, hf_state, tp, pp, optim, batch)
    ps.destroy_model_parallel()
    return out


def _update_checks(policy, hf_config, hf_state, tp, pp, optim, batch):
    """Offloaded-then-onloaded optimiser vs a policy that never offloads."""
    from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy

    def loss_fn(logprobs, entropy, mb):
        mask = mb.loss_mask.to(logprobs.dtype)
        loss = -(logprobs * mask).sum() / float(batch.loss_mask.sum()) - 0.01 * (entropy * mask).sum()
        return loss, {"loss": float(loss.detach())}

    plain = MegatronPolicy(hf_config, hf_state, MegatronConfig(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, dtype="float32",
        use_distributed_optimizer=False), optim)
    norms, freed = [], []
    for step in range(2):
        for p in (policy, plain):
            p.prepare_for_inference()
            if p is policy:
                freed.append(all(b.grad_data.untyped_storage().size() == 0 for b in p.model.buffers))
            p.finish_inference()
            p.prepare_for_training()
            trained = p.get_loss_and_metrics(batch, 4, loss_fn)
            norms.append((p.optimizer_step(), [m["loss"] for m in trained]))
            p.finish_training()
    weights = [hf_weights(p) for p in (policy, plain)]
    same = all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    return {"freed": freed, "norms": norms, "same_weights": same}


@pytest.mark.parametrize("model_type,tp,pp", [("qwen2", 2, 1), ("llama", 1, 2), ("qwen2", 2, 2)])
def test_megatron_engine_matches_hf_and_trainer(model_type, tp, pp):
    config = tiny_hf_config(model_type)
    model = tiny_hf_model(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    def hf_greedy(prompt, eos):
        return model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=eos,
                              pad_token_id=0)[0, len(prompt):].tolist()

    # EOS: a token that some prompt's greedy continuation reaches (first) after >= 2 new tokens.
    eos = next(free[i] for free in (hf_greedy(p, None) for p in PROMPTS) for i in range(2, 12)
               if free[i] not in free[:i])
    greedy = [ids for prompt in PROMPTS for ids in [hf_greedy(prompt, eos)] * 2]
    assert any(2 < len(ids) < 12 and ids[-1] == eos for ids in greedy)  # a continuation stops on EOS
    stops = tuple({ids[1] for ids in greedy if len(ids) > 1} - {eos})  # likely tokens: some sampled rows stop
    results = run_distributed(_worker, tp * pp, config, state, eos, stops, tp, pp, tp == 2 and pp == 1)
    first = results[0]
    assert first["attention"] == "megatron_red paged attention (torch)"
    for r in results:  # every rank of the model-parallel group
        assert r["greedy"] == greedy
        assert r["sampled"] == first["sampled"] == r["resampled"] == r["unshared"]
        assert r["kv_released"]
        for behaviour, trainer in zip(r["sampled_logprobs"], r["trainer_logprobs"]):
            assert behaviour == pytest.approx(trainer, abs=1e-5)
        for sampled_h, trainer_h in zip(r["sampled_entropies"], r["trainer_entropies"]):  # H_rl's input
            assert sampled_h == pytest.approx(trainer_h, abs=1e-5)
    sampled = [t for ids in first["sampled"] for t in ids]
    assert max(sampled) < VOCAB and len({tuple(ids) for ids in first["sampled"][0::3]}) > 1
    assert len({tuple(ids) for ids in first["sampled"][3:6]}) > 1  # a prompt's G samples differ
    # Prefix sharing: prompt 0 has 2 full blocks, prompt 2 one. At most each prompt's first sample computes them, in
    # the calls with 2 (greedy), 3 (sampled) and 2 (filtered) samples per prompt; megatron's scheduler decides how
    # many later samples find them registered (a sample admitted in the same step as the first recomputes).
    shareable = (1 + 2 + 1) * (2 * BLOCK + BLOCK)
    prefill = first["prefill"]
    assert prefill["computed"] + prefill["skipped"] == (2 + 3 + 2) * sum(map(len, PROMPTS))
    assert 0 < prefill["skipped"] <= shareable and prefill["skipped"] % BLOCK == 0
    for same_tokens, same_stop, logprob_gap in first["filtered_match"]:
        assert same_tokens and same_stop and logprob_gap < 1e-5
    assert any(first["filtered_stops"])  # some rows stopped on an extra stop id

    if "update" in first:
        update = first["update"]
        assert update["freed"] == [True, True] and update["same_weights"]
        for (norm_a, train_a), (norm_b, train_b) in zip(update["norms"][0::2], update["norms"][1::2]):
            assert norm_a == norm_b and train_a == train_b
