"""SDPA core attention, THD sequence packing, sequence parallelism and selective recompute (CPU, gloo, fp32).

Single-process: `dense_attention` / `varlen_attention` (SDPACoreAttention's two paths) against a float64 softmax
reference with explicit masks — causal, padding, grouped-query, decode (one query, many keys), packed sequences;
the first-fit-decreasing packer (budget never exceeded, every row once, the too-long-row error names both numbers);
the THD layout (head positions predict the right tokens inside their own row).

One 4-process spawn (TP=2 x PP=2, one layout, several checks): SDPACoreAttention equals megatron-core's
DotProductAttention on each TP rank's heads (values and gradients, padding mask, GQA, decode); the policy with
packed micro-batches + selective recompute gives the same log-probs, entropies and one-step update as the padded
policy (both sequence-parallel), and both equal the single-process Hugging Face model; `plan`'s weight, gradient and
optimizer bytes equal those of a bf16 policy's real objects (distributed optimizer, tied embeddings across stages),
and its KV-cache term equals the buffer megatron-core's `DynamicInferenceContext` allocates when the rollout engine
built from the same run config generates on that policy (the default buffer and an explicit kv_buffer_gb that is
not a whole number of blocks).
"""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from test_megatron import (OPTIM, VOCAB, as_tensors, hf_logprobs_entropy, hf_reference_step, hf_weights, pg_loss_fn,
                           portable, tiny_hf_config, tiny_hf_model)

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_red.batch import SequenceBatch  # noqa: E402
from megatron_red.models.megatron.layout import ParallelLayout  # noqa: E402
from megatron_red.models.megatron.memory import Workload, memory_plan  # noqa: E402
from megatron_red.rollout.megatron import sequences_held  # noqa: E402
from megatron_red.models.megatron.model import HFArchitecture  # noqa: E402
from megatron_red.models.megatron.local_spec import dense_attention, varlen_attention  # noqa: E402
from megatron_red.parallel.packing import (micro_batch_rows, packed_micro_batch, padded_micro_batch,  # noqa: E402
                                           token_budget_groups)


def reference_attention(q, k, v, allowed):
    """float64 softmax(q k^T / sqrt(d) + mask) v with K/V heads repeated; allowed [.., sq, sk] bool."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _qkv(b, heads, kv_heads, sq, sk, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, requires_grad=True)
            for shape in ((b, heads, sq, d), (b, kv_heads, sk, d), (b, kv_heads, sk, d))]


def _check_values_and_grads(ours, ref, inputs):
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=0)
    g = torch.randn_like(ref)
    ours_grads = torch.autograd.grad(ours, inputs, g.float())
    ref_grads = torch.autograd.grad(ref, inputs, g)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_dense_attention_causal_padding_decode(heads, kv_heads):
    scale = 1 / math.sqrt(8)
    # causal self-attention (sq = sk): SDPA's is_causal, grouped-query without repeating K/V
    q, k, v = _qkv(2, heads, kv_heads, 7, 7)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    _check_values_and_grads(dense_attention(q, k, v, None, scale, causal=True), reference_attention(q, k, v, causal),
                            (q, k, v))
    # left padding + causal, as megatron passes it: the whole mask, True = masked
    lengths = torch.tensor([7, 4])
    key_ok = torch.arange(7)[None] >= (7 - lengths)[:, None]  # [b, sk]
    allowed = causal[None] & key_ok[:, None, :]  # [b, sq, sk]
    out = dense_attention(q, k, v, ~allowed[:, None], scale, causal=True)
    ref = reference_attention(q, k, v, allowed[:, None])
    real = key_ok[:, None, :, None].expand_as(out)  # query rows that are real tokens
    torch.testing.assert_close(out.double()[real], ref[real], atol=1e-5, rtol=0)
    assert torch.isfinite(out).all()  # fully masked (padding) queries attend uniformly, never NaN
    # decode: one query sees every cached key (bottom-right alignment), and a 3-query chunk after 5 cached keys
    for sq in (1, 3):
        q, k, v = _qkv(2, heads, kv_heads, sq, 8, seed=sq)
        allowed = torch.ones(sq, 8, dtype=torch.bool).tril(diagonal=8 - sq)
        _check_values_and_grads(dense_attention(q, k, v, None, scale, causal=True),
                                reference_attention(q, k, v, allowed), (q, k, v))


def test_varlen_attention_matches_per_sequence_attention():
    lengths = [5, 1, 9, 3]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v = _qkv(1, 4, 2, sum(lengths), sum(lengths), seed=3)
    thd = [t.squeeze(0).transpose(0, 1) for t in (q, k, v)]  # [t, heads, d]
    out = varlen_attention(*thd, cu, max(lengths), 1 / math.sqrt(8), causal=True)
    # reference: a block-diagonal causal mask over the whole pack
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = (segment[:, None] == segment[None, :]) & torch.ones(len(segment), len(segment), dtype=torch.bool).tril()
    ref = reference_attention(q, k, v, allowed).squeeze(0).transpose(0, 1)
    _check_values_and_grads(out, ref, (q, k, v))


def test_token_budget_groups_first_fit_decreasing():
    rng = random.Random(0)
    for _ in range(50):
        budget = rng.randint(8, 64)
        lengths = [rng.randint(1, budget) for _ in range(rng.randint(1, 30))]
        groups = token_budget_groups(lengths, budget)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in g) <= budget for g in groups)
        assert len(groups) >= math.ceil(sum(lengths) / budget)
    # longest first, each into the first group with room: 8 | 6 | 5, then 3 joins 6, 2 joins 8
    assert token_budget_groups([3, 8, 5, 2, 6], 10) == [[1, 3], [4, 0], [2]]


def test_row_longer_than_budget_is_an_error():
    with pytest.raises(ValueError, match=r"row of 12 tokens .*max_tokens_per_micro_batch=10"):
        token_budget_groups([4, 12, 3], 10)


def _rows(lengths, width=12, prompt=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    attn = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=g) * attn
    loss_mask = attn[:, 1:].clone()
    loss_mask[:, :prompt] = 0
    return SequenceBatch(ids, attn, loss_mask, {"advantages": torch.randn(len(lengths), generator=g)})


def test_packed_layout_positions_and_targets():
    rows = _rows([7, 3, 12, 5])
    packed = packed_micro_batch(rows, multiple=4)
    assert packed.cu_seqlens.tolist() == [0, 7, 10, 22, 27, 28]  # 27 real tokens + a 1-token padding segment
    assert packed.input_ids.shape == (1, 28) and packed.max_seqlen == 12
    assert packed.position_ids[0, :10].tolist() == list(range(7)) + list(range(3))
    stream = packed.input_ids[0]
    # each head position predicts the next token of its own row, and the loss-mask tokens are exactly the targets
    assert torch.equal(stream[packed.head_positions + 1], packed.targets)
    assert torch.equal(packed.targets, rows.input_ids[:, 1:][rows.loss_mask.bool()])
    padded = padded_micro_batch(rows, multiple=8)
    assert padded.input_ids.shape == (4, 16)
    flat = padded.input_ids.t().reshape(-1)  # [S, B] flattened as the last stage's hidden states
    assert torch.equal(flat[padded.head_positions + 4], padded.targets)
    # micro-batches by budget cover every row once
    batch = _rows([12, 3, 9, 4, 11, 2])
    groups = micro_batch_rows(batch, 1, max_tokens=14)
    assert sorted(torch.cat(groups).tolist()) == list(range(6))
    assert all(batch.attention_mask[g].sum() <= 14 for g in groups)


def _attention_checks(tp_group) -> dict:
    """SDPACoreAttention against megatron-core's DotProductAttention on this rank's heads; returns max errors."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_red.models.megatron.local_spec import SDPACoreAttention

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
                               tensor_model_parallel_size=dist_size(tp_group), attention_dropout=0.0,
                               masked_softmax_fusion=False, attention_softmax_in_fp32=True)
    args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    ours, theirs = SDPACoreAttention(**args), DotProductAttention(**args)
    heads, groups = 4 // dist_size(tp_group), 2 // dist_size(tp_group)
    errors = {}
    b, s = 2, 6
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    key_ok = torch.arange(s)[None] >= torch.tensor([0, 3])[:, None]  # row 1 left-padded by 3
    padding_mask = ~(causal[None] & key_ok[:, None, :])[:, None]  # [b, 1, s, s], True = masked
    query_ok = key_ok.t()[:, :, None]  # [s, b, 1]: rows of real query tokens
    cases = {"causal": (s, s, None, None), "padding": (s, s, padding_mask, query_ok), "decode": (1, s, None, None)}
    g = torch.Generator().manual_seed(dist.get_rank())
    for name, (sq, sk, mask, rows_ok) in cases.items():
        q = torch.randn(sq, b, heads, 8, generator=g)
        k, v = torch.randn(sk, b, groups, 8, generator=g), torch.randn(sk, b, groups, 8, generator=g)
        grad_out = torch.randn(sq, b, heads * 8, generator=g)
        results = []
        for module in (ours, theirs):
            inputs = [t.clone().requires_grad_() for t in (q, k, v)]
            out = module(*inputs, mask)
            keep = rows_ok.float() if rows_ok is not None else 1.0
            grads = torch.autograd.grad(out, inputs, grad_out * keep)
            results.append((out * keep, *grads))
        errors[name] = max((a - b_).abs().max().item() for a, b_ in zip(*results))
    return errors


def dist_size(group) -> int:
    return dist.get_world_size(group)


def _packing_worker(rank, world_size, hf_config, hf_state, batch, budget, plan_config, plan_state, rollouts,
                    rollout_length):
    import megatron_compat
    megatron_compat.install()
    from megatron.core import parallel_state as ps

    from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy

    # Both with sequence parallelism (padded micro-batches of odd length get a padding column); the non-SP layouts
    # are test_megatron.py's.
    common = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, dtype="float32",
                  use_distributed_optimizer=False, attention="sdpa", sequence_parallel=True)
    loss_fn = pg_loss_fn(float(batch.loss_mask.sum()))
    out = {}
    for name, extra in (("padded", {}),
                        ("packed", dict(max_tokens_per_micro_batch=budget, recompute="selective",
                                        recompute_modules=("core_attn", "mlp")))):
        policy = MegatronPolicy(hf_config, hf_state, MegatronConfig(**common, **extra), OPTIM)
        logprobs, entropy = policy.get_inference_log_probs(batch, 2)
        metrics = policy.get_loss_and_metrics(batch, 2, loss_fn)
        grad_norm = policy.optimizer_step()
        out[name] = dict(logprobs=logprobs, entropy=entropy, grad_norm=grad_norm, stepped=hf_weights(policy),
                         loss=sum(m["loss"] for m in metrics), micro_batches=len(metrics))
    out["attention"] = _attention_checks(ps.get_tensor_model_parallel_group())
    out["memory"] = _memory_counts(plan_config, plan_state, batch, rollouts, rollout_length)
    ps.destroy_model_parallel()
    return portable(out)


def _memory_counts(hf_config, hf_state, batch, rollouts, rollout_length) -> dict:
    """Bytes of this rank's weights, fp32 gradients and optimiser state (fp32 master copies and Adam moments),
    counted from the real objects of a bf16 policy with the distributed optimiser after one step; and, for each
    RolloutConfig, the KV buffer (bytes, blocks), max_requests and max_tokens of megatron's DynamicInferenceContext
    while the engine `build_engine` makes of it generates on that policy."""
    from megatron.core import parallel_state as ps

    from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy
    from megatron_red.rollout.base import SamplingParams
    from megatron_red.trainer.build import build_engine

    class Tokens:
        eos_token_id, pad_token_id = 1, 0

    policy = MegatronPolicy(hf_config, hf_state, MegatronConfig(
        tensor_model_parallel_size=2, pipeline_model_parallel_size=2, dtype="bfloat16",
        use_distributed_optimizer=True), OPTIM)
    policy.get_loss_and_metrics(batch, 4, pg_loss_fn(float(batch.loss_mask.sum())))
    params = list(policy.model.parameters())
    counts = {"stage": ps.get_pipeline_model_parallel_rank(),
              "weights": sum(p.numel() * p.element_size() for p in params),
              "gradients": sum(p.main_grad.numel() * p.main_grad.element_size() for p in params)}
    policy.optimizer_step()
    optimizer = 0
    for opt in policy.optimizer.chained_optimizers:
        for group in opt.optimizer.param_groups:
            for p in group["params"]:  # fp32 master shards
                optimizer += p.numel() * p.element_size()
                optimizer += sum(v.numel() * v.element_size() for k, v in opt.optimizer.state[p].items()
                                 if torch.is_tensor(v) and k != "step")
    counts["optimizer"] = optimizer
    counts["kv"] = []
    for rollout in rollouts:
        engine = build_engine("megatron", policy, Tokens(), rollout, max_sequence_length=rollout_length)
        engine.generate([[5, 6, 7]], 1, SamplingParams(max_new_tokens=2, seed=0))
        context = engine._engine.context
        counts["kv"].append(dict(bytes=engine.kv_cache.numel() * engine.kv_cache.element_size(),
                                 blocks=context.kv_block_allocator.total_count, max_requests=context.max_requests,
                                 max_tokens=context.max_tokens))
        engine.suspend()
    return counts


def test_packed_sequence_parallel_tp2_pp2_matches_padded_and_hf(tmp_path):
    from megatron_red.config import load_config
    from megatron_red.trainer.build import rollout_max_sequence_length
    from megatron_red.trainer.plan import plan_for_config

    config = tiny_hf_config("qwen2")
    model = tiny_hf_model(config)
    hf_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batch = _rows([16, 9, 13, 5, 3, 12, 2, 16], width=16, prompt=3, seed=4)
    budget = 32
    plan_config = tiny_hf_config("llama")  # tied embeddings: the last stage keeps a copy
    plan_state = tiny_hf_model(plan_config, seed=1).state_dict()
    plan_config.save_pretrained(tmp_path)  # the architecture `plan` reads
    # 3 rows round up to megatron's 4 (a multiple of TP); blocks of 4 tokens, 2 layers and 1 KV head per GPU: 512 B.
    run = [f"model.path={tmp_path}", "model.backend=megatron", "model.dtype=bfloat16",
           "model.tensor_model_parallel_size=2", "model.pipeline_model_parallel_size=2", "data.max_prompt_tokens=24",
           "rollout.max_new_tokens=16", "rollout.max_batch_size=3", "rollout.kv_block_size=4"]
    runs = [load_config(None, run), load_config(None, run + [f"rollout.kv_buffer_gb={37.5 * 512 / 2**30!r}"])]
    plans = [plan_for_config(r, 4) for r in runs]
    results = run_distributed(_packing_worker, 4, config, hf_state, batch, budget, plan_config, plan_state,
                              [r.rollout for r in runs], rollout_max_sequence_length(runs[0]))

    with torch.no_grad():
        ref_lp, ref_ent = hf_logprobs_entropy(model, batch)
    mask = batch.loss_mask.double()
    ref_state, ref_norm = hf_reference_step(model, batch)
    for r in map(as_tensors, results):
        for name, err in r["attention"].items():
            assert err < 1e-5, (name, err)
        assert r["packed"]["micro_batches"] == len(token_budget_groups(
            batch.attention_mask.sum(1).tolist(), budget)) < r["padded"]["micro_batches"]
        assert r["packed"]["loss"] == pytest.approx(r["padded"]["loss"], abs=1e-6)
        for name in ("padded", "packed"):
            got = r[name]
            torch.testing.assert_close(got["logprobs"].double(), ref_lp * mask, atol=1e-5, rtol=0)
            torch.testing.assert_close(got["entropy"].double(), ref_ent * mask, atol=1e-5, rtol=0)
            assert got["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
            for k, v in ref_state.items():
                torch.testing.assert_close(got["stepped"][k], v, atol=1e-5, rtol=0, msg=f"{name} {k}")
        for k in ref_state:
            torch.testing.assert_close(r["packed"]["stepped"][k], r["padded"]["stepped"][k], atol=1e-5, rtol=0)
        # the memory plan's parameter, gradient and optimiser bytes are exactly those of the real objects
        measured = r["memory"]
        plan = memory_plan(HFArchitecture.from_hf_config(plan_config),
                           ParallelLayout(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                        data_parallel_size=1, dtype="bfloat16"),
                           Workload(tokens_per_micro_batch=64, max_sequence_length=16))
        for part in ("weights", "gradients", "optimizer"):
            assert plan.parts[measured["stage"]][part] == measured[part], (measured["stage"], part)
        # the KV term is the buffer megatron allocates: 4 rows x 10 blocks + the dummy by default, 37 blocks of 37.5
        for kv_plan, kv in zip(plans, measured["kv"]):
            assert kv_plan.parts[measured["stage"]]["KV cache"] == kv["bytes"] == kv_plan.kv_blocks * 512
            assert (kv_plan.kv_blocks, kv_plan.workload.rollout.requests, kv_plan.workload.rollout.step_tokens) == \
                (kv["blocks"], kv["max_requests"], kv["max_tokens"])
        assert [p.kv_blocks for p in plans] == [41, 37]
        assert sequences_held(plans[0].kv_blocks, 40, 4) == 4  # the default buffer holds every row at full length


@pytest.mark.parametrize("recipe,architecture,world_size", [
    ("qwen25_math_1p5b_8gpu", "qwen2.5-math-1.5b", 8),
    ("qwen25_math_7b_8gpu", "qwen2.5-math-7b", 8),
    ("qwen25_32b_16gpu", "qwen2.5-32b", 16),
    ("qwen3_30b_a3b_16gpu", "qwen3-30b-a3b", 16),
])
def test_plan_command_on_the_recipes(recipe, architecture, world_size, capsys):
    """`megatron-red plan` on each shipped recipe (architecture only, no weights): both phases of the layout it
    documents fit an 80 GiB card, the weights row is the recipe's parameters per GPU in bf16, the default KV buffer
    holds max_batch_size sequences, and the rollout options move the parts between the phases."""
    from megatron_red.cli import main
    from megatron_red.config import load_config
    from megatron_red.models.megatron.memory import stage_parameter_numel
    from megatron_red.trainer.plan import plan_for_config, run_architecture

    path = f"examples/red/{recipe}.yaml"
    overrides = [f"model.path=examples/red/architectures/{architecture}"]
    assert main(["plan", "--world-size", str(world_size), path, *overrides]) == 0
    out = capsys.readouterr().out
    assert "generation peak" in out and "of 80 GiB: fits\ntraining peak" in out and out.endswith("of 80 GiB: fits\n")
    config = load_config(path, overrides, planning=True)
    m = config.model
    weights = stage_parameter_numel(run_architecture(config), m.tensor_model_parallel_size,
                                    m.pipeline_model_parallel_size, 0, m.expert_model_parallel_size) * 2 / 2**30
    assert f"| weights | generation + training | {weights:.2f} |" in out
    if config.rollout.kv_buffer_gb is None:
        assert f"holds {config.rollout.max_batch_size} sequences of " in out
    if m.tensor_model_parallel_size * m.pipeline_model_parallel_size > 1:
        assert main(["plan", "--world-size", "3", path, *overrides]) == 2  # not a multiple of TP x PP
    assert main(["plan", path, *overrides, "model.backend=hf"]) == 2  # plan models the Megatron backend only

    base, offload, keep = (plan_for_config(load_config(path, overrides + extra, planning=True), world_size)
                           for extra in ([], ["rollout.offload_optimizer=true"], ["rollout.release_kv_cache=false"]))
    p = base.parts[0]
    assert offload.peak(0, "generation") == pytest.approx(base.peak(0, "generation") - p["gradients"] - p["optimizer"])
    assert offload.peak(0, "training") == base.peak(0, "training")
    assert keep.peak(0, "training") == pytest.approx(base.peak(0, "training") + p["KV cache"])
