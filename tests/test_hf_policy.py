"""HFPolicy on tiny random Qwen2 / Llama models (CPU, fp32) against float64 re-computations and closed forms."""
import copy
import math

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from megatron_red.batch import SequenceBatch
from megatron_red.models import HFPolicy, OptimConfig, lr_multiplier

VOCAB = 96


def tiny_config(arch="qwen2", tied=False):
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=tied)
    return Qwen2Config(**kwargs) if arch == "qwen2" else LlamaConfig(**kwargs)


def make_policy(arch="qwen2", tied=False, fused_kernel="off", optim=None, seed=0):
    return HFPolicy.from_config(tiny_config(arch, tied), optim_config=optim or OptimConfig(lr=1e-3),
                                device="cpu", fused_kernel=fused_kernel, seed=seed)


def make_batch(seed=0, lengths=(11, 7, 9, 5), prompt_len=3):
    """Right-padded rows of different lengths; the loss mask covers the response part of each row."""
    g = torch.Generator().manual_seed(seed)
    b, width = len(lengths), max(lengths)
    input_ids = torch.zeros(b, width, dtype=torch.long)
    attention_mask = torch.zeros(b, width, dtype=torch.long)
    loss_mask = torch.zeros(b, width - 1)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        attention_mask[i, :n] = 1
        loss_mask[i, prompt_len - 1:n - 1] = 1  # targets input_ids[prompt_len:n]
    weights = torch.randn(b, width - 1, generator=g)
    return SequenceBatch(input_ids, attention_mask, loss_mask, {"weights": weights})


def reference_logprobs_entropy(model, batch, temperature):
    """float64 log-softmax over the model's full logits, per row without padding."""
    model64 = copy.deepcopy(model).double()
    lp = torch.zeros(batch.loss_mask.shape, dtype=torch.float64)
    ent = torch.zeros_like(lp)
    with torch.no_grad():
        for i in range(len(batch)):
            n = int(batch.attention_mask[i].sum())
            logits = model64(batch.input_ids[i:i + 1, :n]).logits[0, :-1] / temperature
            logp = torch.log_softmax(logits, -1)
            lp[i, :n - 1] = logp.gather(-1, batch.input_ids[i, 1:n, None]).squeeze(-1)
            ent[i, :n - 1] = -(logp.exp() * logp).sum(-1)
    return lp * batch.loss_mask, ent * batch.loss_mask


@pytest.mark.parametrize("arch,tied", [("qwen2", False), ("qwen2", True), ("llama", False)])
def test_logprobs_entropy_match_float64_reference(arch, tied):
    policy = make_policy(arch, tied)
    if tied:
        assert policy.model.get_output_embeddings().weight is policy.model.get_input_embeddings().weight
    batch = make_batch()
    lp, ent = policy.get_inference_log_probs(batch, micro_batch_size=3, temperature=0.7)
    ref_lp, ref_ent = reference_logprobs_entropy(policy.model, batch, 0.7)
    assert lp.dtype == torch.float32 and lp.shape == batch.loss_mask.shape
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=0)
    assert (lp[batch.loss_mask == 0] == 0).all() and (ent[batch.loss_mask == 0] == 0).all()


def test_fused_kernel_on_matches_off():
    off = make_policy(fused_kernel="off")
    on = make_policy(fused_kernel="on")
    on.model.load_state_dict(off.model.state_dict())
    batch = make_batch(seed=1)
    lp_off, ent_off = off.get_inference_log_probs(batch, 4, temperature=1.3)
    lp_on, ent_on = on.get_inference_log_probs(batch, 4, temperature=1.3)
    torch.testing.assert_close(lp_on, lp_off, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_on, ent_off, atol=1e-5, rtol=0)
    loss_fn = weighted_token_loss(batch)
    off.get_loss_and_metrics(batch, 4, loss_fn, temperature=1.3)
    on.get_loss_and_metrics(batch, 4, loss_fn, temperature=1.3)
    for (name, p_off), p_on in zip(off.model.named_parameters(), on.model.parameters()):
        torch.testing.assert_close(p_on.grad, p_off.grad, atol=1e-5, rtol=1e-4, msg=name)


def weighted_token_loss(batch):
    """sum over tokens of (w * logprob + 0.1 * entropy), divided by the global token count."""
    total = batch.loss_mask.sum()

    def loss_fn(logprobs, entropy, mb):
        loss = ((mb.fields["weights"] * logprobs + 0.1 * entropy) * mb.loss_mask).sum() / total
        return loss, {"loss": float(loss.detach())}
    return loss_fn


def test_micro_batch_rows_group_rows_of_similar_length():
    lengths = (11, 7, 9, 5, 9, 3, 7)
    batch = make_batch(lengths=lengths)
    groups = batch.micro_batch_rows(3)
    # Longest first, ties in row order, every row exactly once.
    assert [g.tolist() for g in groups] == [[0, 2, 4], [1, 6, 3], [5]]
    widths = [batch.select(g).trimmed().input_ids.shape[1] for g in groups]
    assert widths == [11, 7, 3]  # padded positions: 33 + 21 + 3 = 57, against 33 + 27 + 7 = 67 for consecutive rows
    with pytest.raises(ValueError, match="micro_batch_size"):
        batch.micro_batch_rows(0)


def test_micro_batching_does_not_change_gradients():
    batch = make_batch(seed=2)
    grads = []
    for micro in (1, len(batch)):
        policy = make_policy(tied=True)
        metrics = policy.get_loss_and_metrics(batch, micro, weighted_token_loss(batch), temperature=0.9)
        assert len(metrics) == math.ceil(len(batch) / micro)
        grads.append({n: p.grad.clone() for n, p in policy.model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("tied,checkpointing", [(False, False), (True, True)])
def test_get_loss_and_metrics_gradients_match_float64_autograd(tied, checkpointing):
    policy = HFPolicy.from_config(tiny_config("qwen2", tied), device="cpu", fused_kernel="off", seed=0,
                                  gradient_checkpointing=checkpointing)
    batch = make_batch(seed=3)
    calls = []
    policy.model.get_decoder().layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    policy.get_loss_and_metrics(batch, 2, weighted_token_loss(batch))
    assert len(calls) == (4 if checkpointing else 2)  # 2 micro-batches; checkpointing re-runs the layer in backward
    model64 = copy.deepcopy(policy.model).double()
    model64.zero_grad(set_to_none=True)
    lp, ent = reference_logprobs_entropy_with_grad(model64, batch)
    loss = ((batch.fields["weights"].double() * lp + 0.1 * ent) * batch.loss_mask).sum() / batch.loss_mask.sum()
    loss.backward()
    for (name, p), p64 in zip(policy.model.named_parameters(), model64.parameters()):
        torch.testing.assert_close(p.grad.double(), p64.grad, atol=1e-6, rtol=1e-4, msg=name)


def reference_logprobs_entropy_with_grad(model64, batch):
    logits = model64(batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    return lp, -(logp.exp() * logp).sum(-1)


def test_optimizer_step_reduces_loss_and_reports_norm():
    policy = make_policy(optim=OptimConfig(lr=3e-3, weight_decay=0.0, grad_clip=0.5))
    batch = make_batch(seed=4)

    def nll(logprobs, entropy, mb):  # mean negative log-likelihood of the response tokens
        loss = -(logprobs * mb.loss_mask).sum() / batch.loss_mask.sum()
        return loss, {"nll": float(loss.detach())}
    losses = []
    for _ in range(5):
        losses.append(sum(m["nll"] for m in policy.get_loss_and_metrics(batch, 2, nll)))
        expected_norm = torch.cat([p.grad.flatten() for p in policy.model.parameters() if p.grad is not None]).norm()
        norm = policy.optimizer_step()
        assert norm == pytest.approx(float(expected_norm), rel=1e-5)
        assert all(p.grad is None for p in policy.model.parameters())
    assert losses[-1] < losses[0] - 0.05


def test_schedule_matches_closed_form():
    cfg = OptimConfig(lr=1e-3, warmup_steps=3, total_steps=13, min_lr_ratio=0.1)
    policy = make_policy(optim=cfg)
    batch = make_batch(seed=5)
    for step in range(16):
        if step < 3:
            expected = (step + 1) / 3
        else:
            progress = min((step - 3) / 10, 1.0)
            expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr_multiplier(step, cfg) == pytest.approx(expected, abs=1e-12)
        assert policy.learning_rate == pytest.approx(1e-3 * expected, rel=1e-9)
        policy.get_loss_and_metrics(batch, 4, weighted_token_loss(batch))
        policy.optimizer_step()
    assert policy.learning_rate == pytest.approx(1e-4)


def test_state_dict_round_trip_resumes_exactly(tmp_path):
    cfg = OptimConfig(lr=2e-3, warmup_steps=2, total_steps=6)
    batch = make_batch(seed=6)
    loss_fn = weighted_token_loss(batch)
    a = make_policy(optim=cfg)
    for _ in range(2):
        a.get_loss_and_metrics(batch, 2, loss_fn)
        a.optimizer_step()
    a.save_checkpoint(str(tmp_path))
    b = make_policy(optim=cfg, seed=123)  # different initial weights, fresh optimiser
    b.load_checkpoint(str(tmp_path))
    assert b.learning_rate == a.learning_rate
    for policy in (a, b):
        for _ in range(2):
            policy.get_loss_and_metrics(batch, 2, loss_fn)
            policy.optimizer_step()
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(pa, pb), name


def test_save_pretrained_loads_back(tmp_path):
    policy = make_policy(tied=True)
    policy.save_pretrained(str(tmp_path))
    assert any(p.suffix == ".safetensors" for p in tmp_path.iterdir())
    loaded = HFPolicy.from_pretrained(str(tmp_path), device="cpu", fused_kernel="off")
    batch = make_batch(seed=7)
    torch.testing.assert_close(loaded.get_inference_log_probs(batch, 4), policy.get_inference_log_probs(batch, 4),
                               atol=0, rtol=0)


def test_bad_inputs_raise():
    policy = make_policy()
    with pytest.raises(ValueError, match="temperature"):
        policy.get_inference_log_probs(make_batch(), 2, temperature=0.0)
    with pytest.raises(ValueError, match="micro_batch_size"):
        policy.get_inference_log_probs(make_batch(), 0)
    with pytest.raises(ValueError, match="fused_kernel"):
        HFPolicy(policy.model, fused_kernel="maybe")
    with pytest.raises(ValueError, match="does not exist"):
        HFPolicy.from_pretrained("/nonexistent/checkpoint")


def test_lr_scale_equals_a_scaled_learning_rate_for_one_step():
    """optimizer_step(lr_scale=s) moves the weights as a policy whose lr is s times larger, then the schedule resumes."""
    batch = make_batch()
    scaled = make_policy(optim=OptimConfig(lr=1e-3, weight_decay=0.0))
    larger = make_policy(optim=OptimConfig(lr=4e-3, weight_decay=0.0))
    for policy in (scaled, larger):
        policy.get_loss_and_metrics(batch, len(batch), weighted_token_loss(batch))
    scaled.optimizer_step(lr_scale=4.0)
    larger.optimizer_step()
    for a, b in zip(scaled.model.parameters(), larger.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert scaled.learning_rate == pytest.approx(1e-3)
