"""LocalEngine on tiny random Qwen2 / Llama models (CPU, fp32): against HF `generate`, float64 teacher forcing,
truncation of an unconstrained run at EOS, and the closed-form top-p nucleus."""
import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from megatron_red.rollout import LocalEngine, SamplingParams
from megatron_red.rollout.local import sample_tokens

VOCAB, PAD = 64, 0
PROMPTS = [[5, 9, 17, 3, 8], [11, 2], [40, 41, 42, 43, 44, 45, 46]]


def tiny_model(arch="qwen2", seed=0):
    # A wide init makes the next-token distributions peaked, so greedy choices have clear margins.
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  initializer_range=0.3, pad_token_id=PAD)
    config = Qwen2Config(**kwargs) if arch == "qwen2" else LlamaConfig(**kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_greedy_matches_hf_generate(arch):
    model = tiny_model(arch)
    eos = 7
    engine = LocalEngine(model, eos_token_id=eos, pad_token_id=PAD, max_batch_size=8)
    out = engine.generate(PROMPTS, n=1, params=SamplingParams(top_p=1e-9, max_new_tokens=12, seed=0))
    width = max(map(len, PROMPTS))
    input_ids = torch.tensor([[PAD] * (width - len(p)) + p for p in PROMPTS])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    hf = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=12,
                        eos_token_id=eos, pad_token_id=PAD)[:, width:]
    for i, (completion,) in enumerate(out):
        expected = hf[i].tolist()
        if eos in expected:
            expected = expected[:expected.index(eos) + 1]
        assert completion.token_ids == expected
        assert completion.finished == (eos in expected)
        # The nucleus of a near-zero top_p is the arg-max alone: probability 1.
        assert all(lp == 0.0 for lp in completion.logprobs)


def teacher_forced_logp(model, prompt, tokens, temperature):
    """float64 log_softmax(logits / temperature) at the response positions of prompt + tokens."""
    model64 = copy.deepcopy(model).double()
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model64(ids).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits / temperature, dim=-1)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_behaviour_logprobs_match_teacher_forcing(top_p):
    model = tiny_model()
    temperature = 1.3
    engine = LocalEngine(model, eos_token_id=VOCAB + 1, pad_token_id=PAD, max_batch_size=4)
    out = engine.generate(PROMPTS, n=2, params=SamplingParams(temperature, top_p, max_new_tokens=10, seed=1))
    for prompt, completions in zip(PROMPTS, out):
        assert len(completions) == 2
        for c in completions:
            assert len(c.token_ids) == len(c.logprobs) == len(c.entropies) == 10 and not c.finished
            logp = teacher_forced_logp(model, prompt, c.token_ids, temperature)
            # The entropy of pi at the temperature over the whole vocabulary, whatever the nucleus (H_rl's input).
            entropy = -(logp.exp() * logp).sum(-1)
            torch.testing.assert_close(torch.tensor(c.entropies, dtype=torch.float64), entropy, atol=1e-4, rtol=0)
            if top_p < 1.0:
                # Reference nucleus: tokens whose more-probable predecessors hold < top_p of the mass.
                p = logp.exp()
                mass_before = (p[:, None, :] > p[:, :, None]).double().mul(p[:, None, :]).sum(-1)
                nucleus = mass_before < top_p
                assert nucleus.gather(-1, torch.tensor(c.token_ids)[:, None]).all(), "sampled outside the nucleus"
                logp = logp.masked_fill(~nucleus, -math.inf)
                logp = logp - logp.logsumexp(-1, keepdim=True)
            expected = logp.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), expected, atol=1e-4, rtol=0)


def test_stop_at_eos_truncates_the_unconstrained_run():
    model = tiny_model(seed=2)
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=3)
    free = LocalEngine(model, eos_token_id=VOCAB + 1, pad_token_id=PAD).generate(PROMPTS, 4, params)
    counts = torch.bincount(torch.tensor([t for cs in free for c in cs for t in c.token_ids]), minlength=VOCAB)
    eos = int(counts.argmax())  # the most frequent token: most rows hit it, some may not
    stopped = LocalEngine(model, eos_token_id=eos, pad_token_id=PAD, sync_every=3).generate(PROMPTS, 4, params)
    n_finished = 0
    for free_cs, stop_cs in zip(free, stopped):
        for f, s in zip(free_cs, stop_cs):
            if eos in f.token_ids:
                cut = f.token_ids.index(eos) + 1
                assert s.finished and s.token_ids == f.token_ids[:cut]
                assert s.logprobs == pytest.approx(f.logprobs[:cut], abs=1e-6)
                n_finished += 1
            else:
                assert not s.finished and s.token_ids == f.token_ids
    assert 0 < n_finished


def test_seed_determinism_and_chunking():
    model = tiny_model(seed=4)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=11)
    whole = LocalEngine(model, eos_token_id=3, pad_token_id=PAD, max_batch_size=64).generate(PROMPTS, 3, params)
    again = LocalEngine(model, eos_token_id=3, pad_token_id=PAD, max_batch_size=64).generate(PROMPTS, 3, params)
    chunked = LocalEngine(model, eos_token_id=3, pad_token_id=PAD, max_batch_size=2).generate(PROMPTS, 3, params)
    other = LocalEngine(model, eos_token_id=3, pad_token_id=PAD).generate(
        PROMPTS, 3, SamplingParams(1.0, 0.9, 8, seed=12))
    tokens = lambda out: [c.token_ids for cs in out for c in cs]  # noqa: E731
    assert tokens(whole) == tokens(again) == tokens(chunked)
    assert tokens(whole) != tokens(other)
    for a, b in zip((c for cs in whole for c in cs), (c for cs in chunked for c in cs)):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert all(len(c.token_ids) <= 8 for cs in whole for c in cs)


def test_prompt_seeds_sample_a_prompt_alike_in_any_call():
    model = tiny_model(seed=4)
    engine = LocalEngine(model, eos_token_id=3, pad_token_id=PAD)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, prompt_seeds=(21, 22, 23))
    together = engine.generate(PROMPTS, 2, params)
    alone = engine.generate(PROMPTS[2:], 2, SamplingParams(temperature=1.0, max_new_tokens=8, prompt_seeds=(23,)))
    assert [c.token_ids for c in together[2]] == [c.token_ids for c in alone[0]]
    with pytest.raises(ValueError, match="prompt_seeds"):
        engine.generate(PROMPTS, 2, SamplingParams(prompt_seeds=(1,)))


def test_top_p_never_samples_outside_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3 | 0.15, 0.05 -> nucleus {1, 3} at top_p 0.7
    rows = 20000
    logits = probs.log().expand(rows, -1)
    tokens, logprobs, entropy = sample_tokens(logits, torch.rand(rows, generator=torch.Generator().manual_seed(0)),
                                              temperature=1.0, top_p=0.7)
    # The entropy is pi's over the whole vocabulary, not the nucleus's.
    torch.testing.assert_close(entropy.double(), -(probs * probs.log()).sum().double().expand(rows), atol=1e-6, rtol=0)
    assert set(tokens.tolist()) == {1, 3}
    freq = (tokens == 1).double().mean().item()
    assert freq == pytest.approx(0.5 / 0.8, abs=0.02)  # 4.6 binomial standard deviations
    expected = torch.where(tokens == 1, math.log(0.5 / 0.8), math.log(0.3 / 0.8)).double()
    torch.testing.assert_close(logprobs.double(), expected, atol=1e-6, rtol=0)


def test_sync_weights_shares_or_copies():
    model = tiny_model()
    shared = LocalEngine(model, eos_token_id=3, pad_token_id=PAD)
    assert shared.model is model
    shared.sync_weights(model)  # no-op
    copied = LocalEngine(model, eos_token_id=3, pad_token_id=PAD, dtype=torch.float64)
    assert copied.model is not model
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    copied.sync_weights(model)
    torch.testing.assert_close(copied.model.lm_head.weight, model.lm_head.weight.double())


def test_bad_params_raise():
    engine = LocalEngine(tiny_model(), eos_token_id=3, pad_token_id=PAD)
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(PROMPTS, 1, SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(PROMPTS, 1, SamplingParams(temperature=0.0))
    with pytest.raises(ValueError, match="non-empty"):
        engine.generate([[]], 1, SamplingParams())
    with pytest.raises(ValueError, match="cuda_graph"):
        LocalEngine(tiny_model(), eos_token_id=3, pad_token_id=PAD, cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_matches_eager():
    model = tiny_model(seed=5).cuda()
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=20, seed=7)
    runs = []
    for cuda_graph in (False, True):
        # fp32 decoding so that the float64 teacher-forced reference below applies at a tight tolerance.
        engine = LocalEngine(model, eos_token_id=3, pad_token_id=PAD, max_batch_size=4, dtype=torch.float32,
                             cuda_graph=cuda_graph)
        assert engine.model is model
        runs.append(engine.generate(PROMPTS, 3, params))  # 9 rows in chunks of 4, 4, 1: graphs are re-captured
    for a, b in zip((c for cs in runs[0] for c in cs), (c for cs in runs[1] for c in cs)):
        assert a.token_ids == b.token_ids and a.finished == b.finished
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    cpu_model = copy.deepcopy(model).cpu()
    for prompt, completions in zip(PROMPTS, runs[1]):
        for c in completions:  # behaviour log-probs (top-p nucleus renormalised) against float64 teacher forcing
            logp = teacher_forced_logp(cpu_model, prompt, c.token_ids, 1.0)
            p = logp.exp()
            mass_before = (p[:, None, :] > p[:, :, None]).double().mul(p[:, None, :]).sum(-1)
            logp = logp.masked_fill(mass_before >= 0.95, -math.inf)
            logp = logp - logp.logsumexp(-1, keepdim=True)
            expected = logp.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), expected, atol=1e-4, rtol=0)
