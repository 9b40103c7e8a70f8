"""Evaluation harness: pass@k / avg@k against enumeration, loaders, and the cached, resumable eval loop.

The eval-loop tests drive `evaluate` with `ScriptedEngine`, a test double of the RolloutEngine interface that
answers each prompt right or wrong by a fixed rule: a tiny random model is never right, and these tests need
known correct counts to check accuracy and pass@k against an independent enumeration. The real engine
(LocalEngine with a tiny Qwen2) is exercised end to end in test_eval_e2e.py.
"""
import itertools
import json
import os
import statistics
import warnings
import zlib
from fractions import Fraction
from math import comb

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_red.eval import (
    BENCHMARKS,
    EvalConfig,
    evaluate,
    load_benchmark,
    load_problems,
    pass_at_k,
    resolve_benchmarks,
)
from megatron_red.eval.prompting import load_system_prompt, prompt_ids
from megatron_red.eval.runner import CACHE_FILE
from megatron_red.rewards import configure_grader
from megatron_red.rollout.base import Completion, RolloutEngine
from shared_files import EVAL_DATA, needs_shared

DATA_DIR = str(EVAL_DATA)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer(texts, vocab_size=600):
    """A byte-level BPE trained on `texts`, as a transformers tokenizer with a Qwen-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def corpus():
    texts = [load_system_prompt(DATA_DIR)]
    for name in ("math500", "aime24"):
        texts += [p.problem + " " + " ".join(p.golds) for p in load_benchmark(BENCHMARKS[name], DATA_DIR, 50)]
    return texts


class ScriptedEngine(RolloutEngine):
    """Sample j of a prompt (within a call) is `\\boxed{gold}` when (crc32(prompt) + j) % 3 == 0, else a wrong box;
    a filler of (crc32(prompt) % 5) words makes lengths differ, and some exceed the budget (truncated)."""

    def __init__(self, tokenizer, golds_by_prompt, fail_on_call=None):
        self.tokenizer = tokenizer
        self.golds_by_prompt = golds_by_prompt
        self.fail_on_call = fail_on_call
        self.calls = 0
        self.sequences = 0

    @staticmethod
    def rule(prompt, j):
        h = zlib.crc32(bytes(str(prompt), "utf-8"))
        return (h + j) % 3 == 0, h % 5

    def text(self, prompt, j):
        correct, filler = self.rule(prompt, j)
        answer = self.golds_by_prompt[tuple(prompt)] if correct else "\\text{nothing}"
        return "so" + " then" * (3 * filler) + f" \\boxed{{{answer}}}"

    def generate(self, prompts, n, params):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt("simulated interruption")
        out = []
        for p in prompts:
            row = []
            for j in range(n):
                ids = self.tokenizer(self.text(p, j), add_special_tokens=False)["input_ids"]
                ids.append(self.tokenizer.eos_token_id)
                finished = len(ids) <= params.max_new_tokens
                ids = ids[:params.max_new_tokens]
                row.append(Completion(ids, [0.0] * len(ids), finished, [0.0] * len(ids)))
            out.append(row)
        self.sequences += len(prompts) * n
        return out


# ------------------------------------------------------------------------- metrics


def brute_force_pass_at_k(outcomes, k):
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_subset_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(outcomes, k), abs=1e-12)


def test_pass_at_k_large_n_matches_exact_binomials():
    for n, c, k in [(200, 3, 100), (1024, 1, 1), (1024, 17, 512), (64, 0, 32), (64, 60, 8)]:
        exact = 1 - Fraction(comb(n - c, k), comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 2, 5)


# ------------------------------------------------------------------------- benchmarks


def test_red_paper_protocol_and_subsets():
    specs = resolve_benchmarks("red-paper")
    assert [s.name for s in specs] == ["aime24", "aime25", "amc", "math500", "minerva", "olympiadbench"]
    assert {s.name: s.n for s in specs} == {"aime24": 32, "aime25": 32, "amc": 32, "math500": 1, "minerva": 1,
                                            "olympiadbench": 1}
    assert all(s.temperature == 0.6 and s.max_new_tokens == 8192 for s in specs)
    assert [s.name for s in resolve_benchmarks("red-paper", "math500,aime24")] == ["math500", "aime24"]
    with pytest.raises(ValueError, match="unknown benchmark"):
        resolve_benchmarks("red-paper", "math500,gsm8k")
    with pytest.raises(ValueError, match="unknown suite"):
        resolve_benchmarks("nope")


def test_luffy_parquet_layout_is_deduplicated(tmp_path):
    def row(source, problem, gold, index):
        return {"data_source": source, "ability": "math",
                "prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": problem}],
                "reward_model": {"ground_truth": gold, "style": "rule"},
                "extra_info": {"index": index, "split": "default"}}

    rows = [row("aime", "P0", "1", 0)] * 3 + [row("aime", "P1", "2", 1)] * 3 + [row("math", "Q", "\\frac12", 0)]
    path = str(tmp_path / "valid.all.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    aime = load_problems(path, "aime")
    assert [(p.idx, p.problem, p.golds) for p in aime] == [(0, "P0", ("1",)), (1, "P1", ("2",))]
    assert len(load_problems(path)) == 3
    # A data dir with only the parquet serves the benchmark from it.
    assert [p.problem for p in load_benchmark(BENCHMARKS["aime24"], str(tmp_path))] == ["P0", "P1"]


@needs_shared
def test_shared_files_load_and_parquet_agrees_with_jsonl():
    sizes = {"aime24": 30, "aime25": 30, "amc": 83, "math500": 500, "minerva": 272, "olympiadbench": 675}
    for name, size in sizes.items():
        problems = load_benchmark(BENCHMARKS[name], DATA_DIR)
        assert len(problems) == size and len({p.idx for p in problems}) == size
    minerva = {p.idx: p for p in load_benchmark(BENCHMARKS["minerva"], DATA_DIR)}
    assert minerva[10].golds == ("0.01", "0.02")
    parquet = os.path.join(DATA_DIR, "luffy_valid.all.parquet")
    for name, source in [("aime24", "aime"), ("amc", "amc"), ("math500", "math")]:
        from_jsonl = [(p.problem, p.golds) for p in load_benchmark(BENCHMARKS[name], DATA_DIR)]
        from_parquet = [(p.problem, p.golds) for p in load_problems(parquet, source)]
        assert from_parquet == from_jsonl, name
    assert len(load_benchmark(BENCHMARKS["math500"], DATA_DIR, limit=7)) == 7


# ------------------------------------------------------------------------- eval loop


@pytest.fixture(scope="module")
def tokenizer():
    configure_grader(2)
    return build_tiny_tokenizer(corpus())


def make_engine(tokenizer, config, **kwargs):
    system = load_system_prompt(DATA_DIR)
    golds = {}
    for spec in resolve_benchmarks(config.suite, config.benchmarks):
        for p in load_benchmark(spec, DATA_DIR, config.limit):
            golds[tuple(prompt_ids(tokenizer, p.problem, config.prompt_style, system))] = p.golds[0]
    return ScriptedEngine(tokenizer, golds, **kwargs)


def make_config(out_dir, **overrides):
    kwargs = dict(model_id="scripted", out_dir=str(out_dir), benchmarks=["aime24", "math500"], data_dir=DATA_DIR,
                  limit=5, max_new_tokens=30, batch_size=40, progress=False, dump_problems=True)
    kwargs.update(overrides)
    return EvalConfig(**kwargs)


def read_results(out_dir):
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)


@needs_shared
def test_metrics_match_independent_count(tokenizer, tmp_path):
    config = make_config(tmp_path)
    engine = make_engine(tokenizer, config)
    report = evaluate(engine, tokenizer, config)
    system = load_system_prompt(DATA_DIR)
    results = read_results(tmp_path)
    expected_acc, all_finished, all_outcomes = [], [], []
    for spec in resolve_benchmarks("red-paper", ["aime24", "math500"]):
        outcomes, lengths, finished = [], [], []
        for p in load_benchmark(spec, DATA_DIR, 5):
            ids = prompt_ids(tokenizer, p.problem, "chat-think", system)
            row = []
            for j in range(spec.n):
                text_len = len(tokenizer(engine.text(ids, j), add_special_tokens=False)["input_ids"])
                lengths.append(min(text_len + 1, 30))  # + EOS, cut at the budget
                finished.append(text_len + 1 <= 30)
                row.append(ScriptedEngine.rule(ids, j)[0] and text_len <= 30)  # a cut box is no answer
            outcomes.append(row)
        got = results["benchmarks"][spec.name]
        acc = sum(sum(o) / len(o) for o in outcomes) / len(outcomes)
        expected_acc.append(acc)
        assert got["num_problems"] == 5 and got["n"] == spec.n
        assert got["accuracy"] == pytest.approx(acc, abs=1e-12)
        for k, v in got["pass_at"].items():
            k = int(k)
            if spec.n <= 8:  # enumeration over subsets stays small
                ref = sum(brute_force_pass_at_k(o, k) for o in outcomes) / len(outcomes)
            else:
                ref = sum(1 - comb(spec.n - sum(o), k) / comb(spec.n, k) for o in outcomes) / len(outcomes)
            assert v == pytest.approx(ref, abs=1e-12), (spec.name, k)
        assert got["mean_length"] == pytest.approx(statistics.mean(lengths))
        assert got["median_length"] == pytest.approx(statistics.median(lengths))
        assert got["truncation_rate"] == pytest.approx(sum(not f for f in finished) / len(finished))
        assert got["reasons"].get("correct", 0) == sum(map(sum, outcomes))
        all_finished += finished
        all_outcomes += [x for o in outcomes for x in o]
    assert 0 < sum(all_finished) < len(all_finished) and 0 < sum(all_outcomes) < len(all_outcomes)  # not vacuous
    assert results["overall"]["accuracy"] == pytest.approx(sum(expected_acc) / 2)
    assert report.generated_samples == 5 * 32 + 5 and engine.sequences == 5 * 32 + 5
    # Table 2 layout and the per-problem dump.
    table = open(report.files["markdown"]).read()
    assert "| Model | AIME24 Acc | AIME24 LEN | MATH500 Acc | MATH500 LEN | Overall Acc | Overall LEN |" in table
    assert f"{100 * results['overall']['accuracy']:.2f}" in table
    dump = [json.loads(line) for line in open(report.files["problems"])]
    assert len(dump) == 10 and all(len(r["samples"]) == r["n"] for r in dump)
    assert sum(r["correct"] for r in dump if r["benchmark"] == "aime24") == round(expected_acc[0] * 5 * 32)


@needs_shared
def test_resume_after_interruption_gives_same_table(tokenizer, tmp_path):
    reference = make_config(tmp_path / "ref")
    evaluate(make_engine(tokenizer, reference), tokenizer, reference)
    config = make_config(tmp_path / "run")
    engine = make_engine(tokenizer, config, fail_on_call=3)  # aime24: 40 // 32 = 1 prompt per call
    with pytest.raises(KeyboardInterrupt):
        evaluate(engine, tokenizer, config)
    cached = sum(1 for _ in open(tmp_path / "run" / CACHE_FILE))
    assert cached == 2 * 32
    resumed_engine = make_engine(tokenizer, config)
    report = evaluate(resumed_engine, tokenizer, config)
    assert report.cache.used == cached and report.generated_samples == 5 * 32 + 5 - cached
    assert resumed_engine.sequences == report.generated_samples
    assert read_results(tmp_path / "run")["benchmarks"] == read_results(tmp_path / "ref")["benchmarks"]
    assert open(tmp_path / "run" / "results.md").read() == open(tmp_path / "ref" / "results.md").read()
    # Nothing left to do: a third run generates nothing.
    again = make_engine(tokenizer, config)
    assert evaluate(again, tokenizer, config).generated_samples == 0 and again.calls == 0


@needs_shared
def test_truncated_last_line_is_reported_and_regenerated(tokenizer, tmp_path):
    config = make_config(tmp_path)
    evaluate(make_engine(tokenizer, config), tokenizer, config)
    before = read_results(tmp_path)["benchmarks"]
    cache_path = tmp_path / CACHE_FILE
    data = cache_path.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    cache_path.write_bytes(data[:last_start + (len(data) - last_start) // 2])  # killed mid-write
    engine = make_engine(tokenizer, config)
    with pytest.warns(UserWarning, match="1 corrupt line"):
        report = evaluate(engine, tokenizer, config)
    assert report.cache.corrupt == 1 and report.generated_samples == 1 and engine.sequences == 1
    assert read_results(tmp_path)["benchmarks"] == before
    # The regenerated line went onto a fresh line, so the file now parses except for the one corrupt line.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = evaluate(make_engine(tokenizer, config), tokenizer, config)
    assert report.cache.corrupt == 1 and report.generated_samples == 0
    assert any("1 corrupt line" in str(w.message) for w in caught)


@needs_shared
def test_foreign_cache_lines_are_reported_not_used(tokenizer, tmp_path):
    config = make_config(tmp_path)
    evaluate(make_engine(tokenizer, config), tokenizer, config)
    before = read_results(tmp_path)["benchmarks"]
    cache_path = tmp_path / CACHE_FILE
    lines = [json.loads(line) for line in open(cache_path)]
    # One math500 sample rewritten by "another model" (wrong fingerprint, different text); one extra foreign copy
    # of an aime24 sample that is otherwise intact.
    victim = next(i for i, r in enumerate(lines) if r["benchmark"] == "math500")
    lines[victim] = {**lines[victim], "fingerprint": "0" * 20, "text": "\\boxed{wrong}"}
    lines.append({**lines[0], "fingerprint": "f" * 20, "text": "foreign"})
    cache_path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    engine = make_engine(tokenizer, config)
    with pytest.warns(UserWarning, match="2 foreign line"):
        report = evaluate(engine, tokenizer, config)
    assert report.cache.foreign == 2 and report.generated_samples == 1
    assert read_results(tmp_path)["benchmarks"] == before
    # Another model id makes every line foreign: everything is regenerated.
    other = make_config(tmp_path, model_id="another-model")
    with pytest.warns(UserWarning, match="foreign"):
        report = evaluate(make_engine(tokenizer, other), tokenizer, other)
    assert report.cache.used == 0 and report.generated_samples == 5 * 32 + 5


@needs_shared
def test_bad_config_is_rejected(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(make_engine(tokenizer, make_config(tmp_path)), tokenizer, make_config(tmp_path, batch_size=0))
    with pytest.raises(ValueError, match="n and max_new_tokens"):
        evaluate(make_engine(tokenizer, make_config(tmp_path)), tokenizer, make_config(tmp_path, n=0))


@needs_shared
def test_prompt_styles(tokenizer):
    from megatron_red.eval.prompting import PLAIN_INSTRUCTION, format_prompt

    system = load_system_prompt(DATA_DIR)
    think = format_prompt(tokenizer, "What is 1+1?", "chat-think", system)
    assert think == (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n"
                     "<|im_start|>assistant\n")
    assert format_prompt(tokenizer, "Q", "chat") == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt(tokenizer, "Q", "plain") == f"Q\n{PLAIN_INSTRUCTION}\n"
    with pytest.raises(ValueError, match="needs the system prompt"):
        format_prompt(tokenizer, "Q", "chat-think", None)

    class NoTemplate:
        chat_template = None

    with pytest.warns(UserWarning, match="falls back to 'plain'"):
        assert format_prompt(NoTemplate(), "Q", "chat") == f"Q\n{PLAIN_INSTRUCTION}\n"


def test_build_engine_errors():
    import torch

    from megatron_red.trainer.build import build_engine

    for kind in ("tensorrt", "sglang"):
        with pytest.raises(ValueError, match="unknown engine"):
            build_engine(kind, None, None)
    with pytest.raises(ValueError, match="Hugging Face causal LM"):
        build_engine("local", torch.nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="MegatronPolicy"):
        build_engine("megatron", torch.nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="named_hf_weights"):
        build_engine("vllm", torch.nn.Linear(2, 2), None)
