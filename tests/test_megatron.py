"""megatron-core backend against the single-process Hugging Face model (CPU, gloo, fp32).

Each case spawns TP x PP x DP processes, builds a tiny Qwen2, Llama, Llama-3 (llama3 RoPE scaling) or Qwen3
(per-head QK-norm) GPTModel from the HF weights, and checks:
HF -> Megatron -> HF export is bit-exact; forward-only log-probs and entropies through the pipeline schedule equal
the HF model's (float64 log-softmax of HF logits); one training step (policy-gradient + entropy loss normalised
with global token counts, Adam, gradient clipping) gives the same weights and grad norm as the same step on the
HF model. megatron-core's unconditional CUDA calls are redirected by tests/megatron_compat.py (no GPU here).
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed

transformers = pytest.importorskip("transformers")
pytest.importorskip("megatron.core")

from megatron_red.batch import SequenceBatch  # noqa: E402
from megatron_red.models.optim import OptimConfig, build_optimizer, clip_grad_norm  # noqa: E402

VOCAB = 200
OPTIM = OptimConfig(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01, eps=1e-8, grad_clip=0.05)


def tiny_hf_config(model_type: str, layers: int = 4):
    common = dict(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-6)
    if model_type == "qwen2":
        return transformers.Qwen2Config(rope_theta=20000.0, tie_word_embeddings=False, **common)
    if model_type == "qwen3":
        # head_dim 32 != hidden / heads (16), as in real Qwen3 (e.g. 0.6B: 1024 wide, 16 heads of 128).
        return transformers.Qwen3Config(rope_theta=20000.0, tie_word_embeddings=True, head_dim=32, **common)
    if model_type == "llama3":
        # Llama-3.1's scaling (factor 8, low 1, high 4, 8192) with a base whose slow dimensions it changes within
        # the 12 test positions (wavelengths of 860 to 6e5 positions straddle the 2048 / 8192 thresholds).
        rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192, rope_theta=500000.0)
        return transformers.LlamaConfig(rope_scaling=rope, rope_theta=500000.0, tie_word_embeddings=False, **common)
    return transformers.LlamaConfig(rope_theta=50000.0, tie_word_embeddings=True, attention_bias=False, **common)


def tiny_hf_model(config, seed: int = 0):
    """A random HF model whose norms and biases are perturbed too, so every tensor's mapping is exercised."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def make_batch(seed: int = 1, b: int = 4, length: int = 12) -> SequenceBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, length), generator=g)
    lengths = torch.tensor([length, length - 3, length - 5, 7])[:b]
    attn = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids * attn  # right padding with id 0
    loss_mask = attn[:, 1:].clone()
    loss_mask[:, :3] = 0  # prompt tokens
    return SequenceBatch(ids, attn, loss_mask, {"advantages": torch.randn(b, generator=g)})


def pg_loss_fn(total_tokens: float):
    """Policy-gradient loss plus an entropy bonus, normalised with the global token count."""
    def loss_fn(logprobs, entropy, mb):
        mask = mb.loss_mask.to(logprobs.dtype)
        adv = mb.fields["advantages"].to(logprobs.dtype)[:, None]
        loss = (-(logprobs * adv * mask).sum() - 0.1 * (entropy * mask).sum()) / total_tokens
        return loss, {"loss": float(loss.detach())}
    return loss_fn


def hf_logprobs_entropy(model, batch: SequenceBatch):
    logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logp = torch.log_softmax(logits.double(), dim=-1)
    lp = logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def hf_reference_step(model, batch: SequenceBatch):
    """One step of the same loss and optimiser on the single-process HF model; returns (state dict, grad norm)."""
    optimizer, _ = build_optimizer(model.named_parameters(), OPTIM)
    logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    loss, _ = pg_loss_fn(float(batch.loss_mask.sum()))(lp, ent, batch)
    loss.backward()
    norm = clip_grad_norm(model.parameters(), OPTIM.grad_clip)
    optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, norm


def portable(obj):
    """Tensors -> numpy arrays (recursively): torch's queue pickling shares memory that dies with the worker."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(portable(v) for v in obj)
    return obj


def as_tensors(obj):
    if hasattr(obj, "__array__") and not isinstance(obj, (float, int)):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: as_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(as_tensors(v) for v in obj)
    return obj


def hf_weights(policy) -> dict[str, torch.Tensor]:
    """The policy's Hugging Face weights on every rank. Test-only (tiny models): the package streams them to one
    writer rank (`HFExport`: the model-parallel ranks of the first (expert-)data-parallel replica take part) and
    never gathers a model; here the writer, global rank 0, broadcasts them."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_red.models.megatron import HFExport

    holder = [None]
    if ps.get_expert_data_parallel_rank() == 0:
        export = HFExport(policy.model, policy.arch, policy.tp_group, policy.pp_group,
                          ps.get_expert_model_parallel_group())
        assert export.tp_rank != 0 or export.writer == 0  # the writer and its senders are TP ranks 0
        weights = dict(export)
        if export.is_writer:
            holder = [weights]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(holder, src=0)
    return holder[0]


def read_hf_weights(path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face checkpoint directory (safetensors files), in memory."""
    from pathlib import Path

    from safetensors.torch import load_file

    return {k: v.clone() for file in sorted(Path(path).glob("*.safetensors")) for k, v in load_file(file).items()}


def _worker(rank, world_size, cases, tp, pp, batch, micro_batch_size, fused_kernel):
    """One result per (hf_config, hf_state) case, each built, exported, run and stepped in turn."""
    import megatron_compat
    megatron_compat.install()
    from megatron.core import parallel_state as ps

    from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy

    results = []
    for hf_config, hf_state in cases:
        policy = MegatronPolicy(hf_config, hf_state, MegatronConfig(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, dtype="float32",
            use_distributed_optimizer=False, fused_kernel=fused_kernel), OPTIM)
        exported = hf_weights(policy)
        # Each data-parallel rank trains on its own rows; the loss uses the global token count.
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        rows = torch.arange(dp_rank, len(batch), dp)
        local = batch.select(rows)
        logprobs, entropy = policy.get_inference_log_probs(local, micro_batch_size)
        metrics = policy.get_loss_and_metrics(local, micro_batch_size, pg_loss_fn(float(batch.loss_mask.sum())))
        grad_norm = policy.optimizer_step()
        stepped = hf_weights(policy)
        ps.destroy_model_parallel()
        results.append(portable(dict(exported=exported, rows=rows, logprobs=logprobs, entropy=entropy,
                                     metrics=metrics, grad_norm=grad_norm, stepped=stepped)))
    return results


@pytest.mark.parametrize("model_types,tp,pp,dp,fused_kernel", [
    ("qwen2", 2, 1, 1, False),
    ("llama", 1, 2, 1, False),
    ("qwen2", 2, 2, 1, False),
    ("llama", 1, 2, 2, False),
    ("llama", 2, 1, 1, True),  # fused LM-head kernel (its torch fallback on CPU) with a tied TP-split head
    # Qwen3's QK-norm gains are replicated over TP (megatron sums their gradients over TP); llama3 RoPE scaling.
    ("qwen3+llama3", 2, 1, 1, False),
])
def test_megatron_matches_hf(model_types, tp, pp, dp, fused_kernel):
    configs = [tiny_hf_config(t) for t in model_types.split("+")]
    models = [tiny_hf_model(config) for config in configs]
    states = [{k: v.detach().clone() for k, v in model.state_dict().items()} for model in models]
    batch = make_batch()
    results = run_distributed(_worker, tp * pp * dp, list(zip(configs, states)), tp, pp, batch, 1, fused_kernel)
    for i, (config, model, hf_state) in enumerate(zip(configs, models, states)):
        check_against_hf(config, model, hf_state, batch, [as_tensors(r[i]) for r in results])


def check_against_hf(config, model, hf_state, batch, results):
    with torch.no_grad():
        ref_lp, ref_ent = hf_logprobs_entropy(model, batch)
    mask = batch.loss_mask.double()
    ref_state, ref_norm = hf_reference_step(model, batch)
    expected_keys = set(hf_state) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    for r in results:
        # HF -> Megatron -> HF is exact on every rank.
        assert set(r["exported"]) == expected_keys
        for k in expected_keys:
            assert torch.equal(r["exported"][k], hf_state[k]), k
        rows = r["rows"]
        torch.testing.assert_close(r["logprobs"].double(), ref_lp[rows] * mask[rows], atol=1e-5, rtol=0)
        torch.testing.assert_close(r["entropy"].double(), ref_ent[rows] * mask[rows], atol=1e-5, rtol=0)
        assert len(r["metrics"]) == len(rows)  # micro-batch size 1: one metrics dict per row
        assert r["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
        assert ref_norm > OPTIM.grad_clip  # the step exercises clipping across the TP x PP grid
        for k in expected_keys:
            # 3% of the learning rate: Adam's first step is lr * g / (|g| + eps), so an element whose gradient
            # nearly cancels (|g| ~ 1e-7) turns fp32 summation-order noise into up to ~1e-5 of movement.
            torch.testing.assert_close(r["stepped"][k], ref_state[k], atol=3e-5, rtol=0,
                                       msg=lambda m, k=k: f"{k}: {m}")
        # the step moved the weights by much more than the tolerance
        assert max((ref_state[k] - hf_state[k]).abs().max().item() for k in expected_keys) > 1e-4


def _restart_worker(rank, world_size, hf_config, hf_state, batch, second):
    """Two steps of a Megatron policy (distributed optimiser) with `restart_optimizer(second)` between them."""
    import megatron_compat
    megatron_compat.install()

    from megatron_red.models.megatron.policy import MegatronConfig, MegatronPolicy

    policy = MegatronPolicy(hf_config, hf_state, MegatronConfig(dtype="float32", use_distributed_optimizer=True),
                            OPTIM)
    total = float(batch.loss_mask.sum())
    policy.get_loss_and_metrics(batch, 2, pg_loss_fn(total))
    policy.optimizer_step()
    policy.restart_optimizer(second)
    restarted = hf_weights(policy), policy.learning_rate
    policy.get_loss_and_metrics(batch, 2, pg_loss_fn(total))
    policy.optimizer_step()
    return portable(dict(restarted=restarted[0], lr=restarted[1], stepped=hf_weights(policy)))


def test_restart_optimizer_is_a_fresh_adam_and_schedule():
    """SFT->GRPO's switch: after `restart_optimizer` the next step is Adam's first step under the new schedule,
    lr * g / (|g| + eps), on both backends; the Megatron step equals the Hugging Face policy's."""
    from megatron_red.models.hf import HFPolicy
    from megatron_red.models.optim import lr_multiplier

    config = tiny_hf_config("qwen2", layers=2)
    model = tiny_hf_model(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batch = make_batch()
    second = OptimConfig(lr=2e-4, weight_decay=0.0, warmup_steps=2, total_steps=4, grad_clip=0.0)
    [result] = run_distributed(_restart_worker, 1, config, state, batch, second)
    result = as_tensors(result)
    hf = HFPolicy(model, OPTIM, device="cpu", dtype=torch.float32, fused_kernel="off")
    total = float(batch.loss_mask.sum())
    hf.get_loss_and_metrics(batch, 2, pg_loss_fn(total))
    hf.optimizer_step()
    hf.restart_optimizer(second)
    assert hf.learning_rate == pytest.approx(second.lr * lr_multiplier(0, second)) == pytest.approx(result["lr"])
    before = {k: v.detach().clone() for k, v in hf.model.state_dict().items()}
    hf.get_loss_and_metrics(batch, 2, pg_loss_fn(total))
    hf.optimizer_step()
    after = hf.model.state_dict()
    step = second.lr * lr_multiplier(0, second)
    ratios = []
    for k, v in result["stepped"].items():
        delta = (after[k] - before[k]).abs()
        ratios.append(delta[delta > 0.5 * step] / step)
        torch.testing.assert_close(result["restarted"][k], before[k], atol=1e-5, rtol=0)
        torch.testing.assert_close(v, after[k], atol=3e-5 * step / 1e-3, rtol=0)
    # Adam's first step moves every element with a clear gradient (|g| >> eps) by the learning rate itself; with
    # the first step's moments kept, the second step's moves would spread over a range.
    ratios = torch.cat(ratios)
    assert len(ratios) > 0.5 * sum(v.numel() for v in after.values())
    assert float(((ratios - 1).abs() < 1e-3).double().mean()) > 0.95
