"""The vLLM rollout engine (rollout/vllm_engine.py) with the real vLLM (vllm-cpu on this machine), on both backends.

Each check runs in processes of its own: vLLM in-process binds the process's threads and memory and replaces
`torch.set_num_threads`, which must not leak into the other tests' pytest process.

- Hugging Face backend, a tied student (the built-in one) and an untied one: greedy decoding (top_k = 1) equals the
  local engine and a float64 Hugging Face decode token for token, before training and after one RED step refitted
  the engine (a prefix-cached prompt included: a refit must not reuse KV blocks of the old weights); sampled
  log-probs (vLLM's processed log-probs) and entropies (the engine's H_rl input) within 1e-5 of the trainer's own
  forward of the same rows at the sampling temperature.
- Megatron backend over gloo (tests/megatron_compat.py), TP2 and TP2 x PP2: every rank's engine refits from the
  shards (the weights streamed to every rank equal the writer-based export), the pipeline stages split the prompts
  and end with the same completions, and after one RED step the same equalities hold against the policy's export.
- `megatron-red train rollout.engine=vllm` end to end, killed with SIGKILL after step 3 and resumed: the same
  metrics and weights as an uninterrupted run.
- Config: vllm without vLLM installed, and a head width vLLM's CPU attention lacks, are refused at load.
- `megatron-red eval --engine vllm` end to end (vLLM reading the checkpoint directory).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from shared_files import needs_shared
from trainer_fixtures import TINY_OVERRIDES, cli, read_lines, tiny_config

# vLLM's CPU attention runs heads of width 32, 64, ...: the toy student at width 64 with 2 heads (32 wide).
VLLM = ["model.hidden_size=64", "model.num_heads=2", "model.num_kv_heads=2", "model.intermediate_size=128",
        "rollout.engine=vllm", "rollout.max_batch_size=16", "rollout.kv_buffer_gb=0.02"]
GREEDY_TOKENS = 24


def _float64_greedy(model, prompts: list[list[int]], eos: int) -> list[list[int]]:
    """Greedy decoding of a float64 copy of the HF `model` by full forwards (the reference)."""
    model = copy.deepcopy(model).double().eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(GREEDY_TOKENS):
                token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(token)
                if token == eos:
                    break
            out.append(ids[len(prompt):])
    return out


def _sampled_vs_trainer(engine, policy, prompts, temperature: float, pad: int) -> tuple[float, float, int]:
    """max |engine log-prob - trainer log-prob| and max |engine entropy - trainer entropy| over sampled tokens at
    `temperature` (top-p 1), and how many tokens were compared."""
    from megatron_red.rollout import SamplingParams
    from megatron_red.trainer.groups import Group, build_batch

    rows = engine.generate(prompts, 2, SamplingParams(temperature=temperature, max_new_tokens=GREEDY_TOKENS, seed=5))
    groups = [Group(p, responses=[c.token_ids for c in cs], rewards=[0.0] * len(cs),
                    behaviour_logprobs=[c.logprobs for c in cs], rollout_entropies=[c.entropies for c in cs])
              for p, cs in zip(prompts, rows)]
    batch = build_batch(groups, offline_in_group=False, std_normalize=False, pad_token_id=pad)
    logprobs, entropies = policy.get_inference_log_probs(batch, 4, temperature)
    mask = batch.loss_mask.bool()
    return ((logprobs - batch.fields["behaviour_logprobs"])[mask].abs().max().item(),
            (entropies - batch.fields["rollout_entropy"])[mask].abs().max().item(), int(mask.sum()))


def _prompts(task) -> list[list[int]]:
    """Four held-out prompts and one of 300 tokens (several prompts joined): longer than vLLM's KV blocks, so the
    prefix cache holds its blocks from one call to the next."""
    long = [t for ex in task.test for t in ex.prompt_ids][:300]
    return [ex.prompt_ids for ex in task.test[:4]] + [long]


def _truncated_sampling(engine, model, prompts, stop: int) -> dict:
    """Sampling at temperature 0.7, top-k 20, top-p 0.9 with an extra stop id: the behaviour log-probs against
    `rollout.sampling.sampling_logprobs` (the distribution the other engines sample) of a float64 forward, and what
    ends each row (the stop id or EOS, included and `finished`; else exactly max_new_tokens tokens)."""
    from megatron_red.rollout import SamplingParams
    from megatron_red.rollout.sampling import sampling_logprobs

    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=GREEDY_TOKENS, seed=11,
                            stop_token_ids=(stop,))
    rows = engine.generate(prompts, 4, params)
    reference = copy.deepcopy(model).double().eval()
    worst, ends = 0.0, []
    for prompt, completions in zip(prompts, rows):
        for c in completions:
            with torch.no_grad():
                logits = reference(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1:-1]
            want = sampling_logprobs(logits, 0.7, 0.9, 20).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            worst = max(worst, (torch.tensor(c.logprobs, dtype=torch.float64) - want).abs().max().item())
            ends.append((c.finished, c.token_ids[-1] in (stop, engine.eos_token_id), c.token_ids[-1] == stop,
                         len(c.token_ids)))
    return dict(logprob_error=worst, ends=ends)


def _more_prompt_tokens_than_one_step(policy, eos: int) -> int:
    """40 distinct 450-token prompts decoded together, sampled with a seed: more prompt tokens than one vLLM step
    takes (16384), so a prefill could be cut into chunks (which vLLM 0.32's CPU build cannot do for seeded
    requests). Their number of completions."""
    from megatron_red.rollout import SamplingParams
    from megatron_red.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(policy.model.config, weights=policy, eos_token_id=eos, max_batch_size=64,
                        max_sequence_length=1024, kv_buffer_gb=0.05)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 256, (40, 450), generator=g).tolist()
    rows = engine.generate(prompts, 1, SamplingParams(max_new_tokens=2, seed=1))
    engine.close()
    return sum(len(r) for r in rows)


def _greedy(engine, prompts):
    from megatron_red.rollout import SamplingParams

    rows = engine.generate(prompts, 1, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=GREEDY_TOKENS, seed=0))
    return [r[0].token_ids for r in rows]


def _kv_cache_against_plan(engine, hf_config) -> tuple[float, float, int, int]:
    """(bytes of the KV cache vLLM allocated, `plan`'s KV-cache bytes for the same engine settings; vLLM's bytes per
    cached token, the plan's)."""
    from megatron_red.models.megatron.layout import ParallelLayout
    from megatron_red.models.megatron.memory import Rollout, Workload, memory_plan
    from megatron_red.models.megatron.model import HFArchitecture

    vllm_config = engine.llm.llm_engine.vllm_config
    runner = engine.llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    allocated = sum(t.numel() * t.element_size() for t in runner.kv_caches)
    tokens = vllm_config.cache_config.num_gpu_blocks * vllm_config.cache_config.block_size
    rollout = Rollout(requests=vllm_config.scheduler_config.max_num_seqs, sequence_length=engine.max_sequence_length,
                      kv_buffer_gb=engine.kv_buffer_gb, engine="vllm")
    plan = memory_plan(HFArchitecture.from_hf_config(hf_config), ParallelLayout(dtype="float32"),
                       Workload(tokens_per_micro_batch=64, max_sequence_length=64, rollout=rollout))
    return allocated, plan.parts[0]["KV cache"], allocated // tokens, plan.kv_token_bytes


def _hf_worker(rank, world_size, run_dir, untied):
    from megatron_red.rollout.vllm_engine import VLLMEngine
    from megatron_red.trainer.build import build_engine
    from megatron_red.trainer.red_trainer import RedTrainer

    run_dir = Path(run_dir)
    extra = []
    if untied:  # a randomly initialised untied student with the built-in task's vocabulary
        from transformers import AutoModelForCausalLM, Qwen2Config

        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                             tie_word_embeddings=False, initializer_range=0.1, rope_theta=10000.0, bos_token_id=2,
                             eos_token_id=1, pad_token_id=0)
        AutoModelForCausalLM.from_config(config).save_pretrained(run_dir.parent / "untied_student")
        extra = [f"model.path={run_dir.parent / 'untied_student'}"]
    trainer = RedTrainer(tiny_config(run_dir, *VLLM, "trainer.steps=1", "optim.lr=1e-2", *extra), run_dir)
    engine, policy, tokenizer = trainer.engine, trainer.policy, trainer.tokenizer
    assert isinstance(engine, VLLMEngine) and policy.rollout_engine is engine
    assert engine.tied == (not untied) == policy.model.config.tie_word_embeddings
    local = build_engine("local", policy.model, tokenizer)  # a module, so the policy keeps the vllm engine
    prompts = _prompts(trainer.task)

    def check():
        got = _greedy(engine, prompts)
        return dict(vllm=got, local=_greedy(local, prompts),
                    float64=_float64_greedy(policy.model, prompts, tokenizer.eos_token_id),
                    sampled=_sampled_vs_trainer(engine, policy, prompts, 0.7, tokenizer.pad_token_id))

    before = check()
    first = before["vllm"][0]
    truncated = _truncated_sampling(engine, policy.model, prompts, stop=first[len(first) // 2])
    kv = _kv_cache_against_plan(engine, policy.model.config)
    start = {k: v.detach().clone() for k, v in policy.model.named_parameters()}
    trainer.train()  # one RED step; finish_training refits the engine
    moved = max((p.detach() - start[k]).abs().max().item() for k, p in policy.model.named_parameters())
    after = check()
    refits = len(engine.refit_seconds)
    long_prompts = _more_prompt_tokens_than_one_step(policy, tokenizer.eos_token_id)
    engine.close()
    return before, after, moved, refits, kv, truncated, long_prompts


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("rollout_vllm")


def _assert_engine_matches(result):
    assert result["vllm"] == result["local"] == result["float64"]
    assert any(len(tokens) > 1 for tokens in result["vllm"])
    dlogp, dentropy, compared = result["sampled"]
    assert compared >= 20 and dlogp < 1e-5 and dentropy < 1e-5, result["sampled"]


@pytest.mark.parametrize("untied", [False, True], ids=["tied", "untied"])
def test_hf_backend_greedy_and_logprobs_before_and_after_a_refit(root, untied):
    [(before, after, moved, refits, kv, truncated, long_prompts)] = run_distributed(
        _hf_worker, 1, str(root / f"hf_{untied}"), untied, timeout_s=600)
    assert long_prompts == 40
    assert truncated["logprob_error"] < 1e-5
    # (finished, ended on the stop id or EOS, on the stop id, tokens): finished exactly when it stopped, else cut
    ends = truncated["ends"]
    assert all(finished == stopped and (finished or n == GREEDY_TOKENS) for finished, stopped, _, n in ends)
    assert any(on_stop_id for *_, on_stop_id, _ in ends)
    allocated, planned, token_bytes, planned_token_bytes = kv
    assert token_bytes == planned_token_bytes and 0 <= planned - allocated < 2**20  # vLLM keeps whole blocks
    _assert_engine_matches(before)
    _assert_engine_matches(after)
    assert refits == 2  # the first generation's refit, then the step's
    assert moved > 1e-3  # the step moved the weights far beyond the log-prob tolerance


def _megatron_worker(rank, world_size, run_dir, student, tp, pp):
    import megatron_compat
    megatron_compat.install()
    from megatron.core import parallel_state as ps
    from transformers import AutoModelForCausalLM

    from megatron_red.trainer.red_trainer import RedTrainer
    from test_megatron import hf_weights

    run_dir = Path(run_dir)
    overrides = ["model.backend=megatron", f"model.path={student}", f"model.tensor_model_parallel_size={tp}",
                 f"model.pipeline_model_parallel_size={pp}", "model.use_distributed_optimizer=false",
                 "trainer.steps=1", "optim.lr=1e-2"]
    trainer = RedTrainer(tiny_config(run_dir, *VLLM, *overrides), run_dir)
    policy, engine, tokenizer = trainer.policy, trainer.engine, trainer.tokenizer
    streamed = {name: t.clone() for name, t in policy.named_hf_weights()}
    exported = hf_weights(policy)  # the writer-based export, broadcast (test helper)
    stream_error = max((streamed[k] - exported[k]).abs().max().item() for k in exported)
    prompts = _prompts(trainer.task)

    def check():
        reference = AutoModelForCausalLM.from_config(policy.hf_config, dtype=torch.float32)
        reference.load_state_dict(hf_weights(policy), strict=False)  # a tied head is the embedding
        reference.tie_weights()
        return dict(vllm=_greedy(engine, prompts), local=None,
                    float64=_float64_greedy(reference, prompts, tokenizer.eos_token_id),
                    sampled=_sampled_vs_trainer(engine, policy, prompts, 0.7, tokenizer.pad_token_id))

    before = check()
    trainer.train()
    after = check()
    moved = max((t - exported[k]).abs().max().item() for k, t in hf_weights(policy).items())
    ps.destroy_model_parallel()
    engine.close()  # vLLM's teardown, while the world it was built in still exists
    return sorted(streamed) == sorted(exported), stream_error, before, after, moved


@pytest.fixture(scope="module")
def student(root) -> str:
    """The warmed-up built-in student at the vLLM-compatible toy width (tied embeddings)."""
    from megatron_red.trainer.build import build_task, warmed_up_student

    config = tiny_config(root / "student", *VLLM)
    return str(warmed_up_student(config, build_task(config), root / ".cache"))


@pytest.mark.parametrize("tp, pp", [(2, 1), (2, 2)], ids=["tp2", "tp2pp2"])
def test_megatron_backend_refits_from_the_shards(root, student, tp, pp):
    results = run_distributed(_megatron_worker, tp * pp, str(root / f"megatron_tp{tp}pp{pp}"), student, tp, pp,
                              timeout_s=900)
    for same_names, stream_error, before, after, moved in results:
        assert same_names and stream_error == 0.0
        for result in (before, after):
            assert result["vllm"] == result["float64"]
            dlogp, dentropy, compared = result["sampled"]
            assert compared >= 20 and dlogp < 1e-5 and dentropy < 1e-5, result["sampled"]
        assert moved > 1e-3  # the step moved the weights far beyond the log-prob tolerance
    assert all(r[3]["vllm"] == results[0][3]["vllm"] for r in results)  # every rank holds every completion
    lines = read_lines(root / f"megatron_tp{tp}pp{pp}")
    assert [line["step"] for line in lines] == [1, 1] and lines[0]["train/grad_norm"] > 0


RESUMED = [*TINY_OVERRIDES, *VLLM, "trainer.steps=6", "trainer.save_every=2"]


def test_train_with_vllm_killed_and_resumed_is_exact(root):
    from test_trainer_resume import _assert_same_run, _kill_after_step_3

    reference = root / "vllm_uninterrupted"
    result = cli("train", *RESUMED, f"trainer.out_dir={reference}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = read_lines(reference)
    assert all(line["train/grad_norm"] > 0 for line in lines[1:-1]) and "eval/accuracy" in lines[-1]
    run_dir = root / "vllm_killed"
    _kill_after_step_3(root, run_dir, RESUMED)
    result = cli("train", "--resume", str(run_dir), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(run_dir, reference)


def test_vllm_engine_refused_without_vllm(monkeypatch):
    """A machine without vLLM (hidden from the import system here: it is installed on this one)."""
    import importlib.util

    from megatron_red.config import load_config
    from megatron_red.errors import ConfigError

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"rollout.engine=vllm: vLLM is not installed.*install_vllm_cpu.sh"):
        load_config(None, ["rollout.engine=vllm"])


def test_cpu_head_width_vllm_cannot_run_is_refused():
    result = cli("train", *TINY_OVERRIDES, "rollout.engine=vllm", "trainer.out_dir=/nonexistent/never")
    assert result.returncode == 2
    assert "heads of width 8" in result.stderr and "rollout.engine=local" in result.stderr


@needs_shared
def test_eval_command_with_the_vllm_engine(tmp_path):
    """`megatron-red eval --engine vllm`: vLLM reads the checkpoint directory itself; 10 MATH500 problems (n = 1) and
    10 AIME24 problems (n = 32) of at most 16 new tokens, graded and cached (a rerun generates nothing)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from test_eval import DATA_DIR, build_tiny_tokenizer, corpus

    tokenizer = build_tiny_tokenizer(corpus())
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = tmp_path / "model"
    Qwen2ForCausalLM(config).save_pretrained(model)
    tokenizer.save_pretrained(model)
    out = tmp_path / "eval"
    args = ["eval", "--model", str(model), "--out", str(out), "--benchmarks", "math500,aime24", "--data-dir",
            DATA_DIR, "--limit", "10", "--max-new-tokens", "16", "--engine", "vllm", "--kv-buffer-gb", "0.02",
            "--no-progress", "--dump-problems"]
    result = cli(*args, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generated 330 samples" in result.stdout
    results = json.loads((out / "results.json").read_text())
    samples = [s for line in (out / "problems.jsonl").read_text().splitlines()
               for s in json.loads(line)["samples"]]
    assert len(samples) == 330 and all(1 <= s["num_tokens"] <= 16 for s in samples)
    assert [results["benchmarks"][b]["n"] for b in ("math500", "aime24")] == [1, 32]
    result = cli(*args, timeout=600)
    assert result.returncode == 0 and "generated 0 samples, reused 330" in result.stdout


def test_vllm_engine_with_a_mixture_of_experts_is_refused_where_it_cannot_work():
    """vLLM records no expert choices (routing replay needs them), and its CPU build samples from stale experts after
    an in-place reload (it prepacks expert weights on the first load only: seen here, greedy decoding after a refit
    differed from the refitted Hugging Face model while a vLLM loading the same weights from disk matched it)."""
    from megatron_red.config import load_config
    from megatron_red.errors import ConfigError

    moe = ["rollout.engine=vllm", *VLLM[:4], "model.num_experts=8"]
    with pytest.raises(ConfigError, match="records no expert choices.*model.moe_routing_replay=false"):
        load_config(None, moe)
    with pytest.raises(ConfigError, match="does not repack a mixture of experts"):
        load_config(None, [*moe, "model.moe_routing_replay=false"])
