"""`megatron-red eval` end to end on CPU: a tiny random Qwen2 checkpoint with a locally trained BPE tokenizer,
10 problems each of MATH500 and AIME24 (the paper's protocol: n = 1 and n = 32), 16 new tokens, sampled by the
LocalEngine; then a rerun (all cached) and an interrupted run resumed, both giving the same results; and
`--engine megatron` at TP = 2 (two gloo processes, as under torchrun) giving the local engine's samples and scores."""
import argparse
import json
import os

import pytest
import torch

from dist_utils import run_distributed
from megatron_red.config import RolloutConfig
from megatron_red.eval import EvalConfig, evaluate
from megatron_red.eval.command import add_arguments, load_model_and_tokenizer, run
from megatron_red.eval.runner import CACHE_FILE
from megatron_red.rewards import configure_grader
from megatron_red.trainer.build import build_engine
from shared_files import needs_shared
from test_eval import DATA_DIR, build_tiny_tokenizer, corpus

pytestmark = needs_shared


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    configure_grader(2)
    tokenizer = build_tiny_tokenizer(corpus())
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("tiny-qwen2"))
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def cli_args(model, out, *extra):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([
        "--model", model, "--out", out, "--benchmarks", "math500,aime24", "--data-dir", DATA_DIR,
        "--limit", "10", "--max-new-tokens", "16", "--batch-size", "64", "--device", "cpu", "--no-progress",
        "--dump-problems", *extra,
    ])


def test_eval_command_end_to_end(checkpoint, tmp_path, capsys):
    out = str(tmp_path / "eval")
    assert run(cli_args(checkpoint, out)) == 0
    printed = capsys.readouterr().out
    assert "| Model | MATH500 Acc | MATH500 LEN | AIME24 Acc | AIME24 LEN | Overall Acc | Overall LEN |" in printed
    assert "generated 330 samples" in printed

    results = json.load(open(os.path.join(out, "results.json")))
    dump = [json.loads(line) for line in open(os.path.join(out, "problems.jsonl"))]
    assert sum(1 for _ in open(os.path.join(out, CACHE_FILE))) == 10 * 1 + 10 * 32
    for name, n in [("math500", 1), ("aime24", 32)]:
        got = results["benchmarks"][name]
        assert got["num_problems"] == 10 and got["n"] == n and got["metric"] == ("pass@1" if n == 1 else "avg@32")
        assert got["sampling"] == {"n": n, "temperature": 0.6, "top_p": 1.0, "max_new_tokens": 16}
        # Re-aggregate the per-problem dump independently.
        samples = [s for row in dump if row["benchmark"] == name for s in row["samples"]]
        assert len(samples) == 10 * n
        assert all(1 <= s["num_tokens"] <= 16 for s in samples)
        assert got["mean_length"] == pytest.approx(sum(s["num_tokens"] for s in samples) / len(samples))
        assert got["truncation_rate"] == pytest.approx(sum(not s["finished"] for s in samples) / len(samples))
        assert got["accuracy"] == pytest.approx(sum(s["score"] for s in samples) / len(samples))
        assert sum(got["reasons"].values()) == 10 * n
    overall = results["overall"]
    accs = [results["benchmarks"][b]["accuracy"] for b in ("math500", "aime24")]
    assert overall["accuracy"] == pytest.approx(sum(accs) / 2)
    assert results["cache"]["used"] == 0 and results["generated_samples"] == 330

    # A rerun into the same directory generates nothing and reproduces the results.
    assert run(cli_args(checkpoint, out)) == 0
    assert "generated 0 samples, reused 330" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "results.json")))["benchmarks"] == results["benchmarks"]


def _megatron_eval_worker(rank, world_size, args):
    import megatron_compat
    megatron_compat.install()
    from megatron.core import parallel_state as ps

    configure_grader(2)
    code = run(args)
    ps.destroy_model_parallel()
    return code


def test_eval_megatron_engine_matches_local(checkpoint, tmp_path):
    """Both engines sample row r's t-th token with the seed's uniform u[r, t]: same samples, same scores."""
    pytest.importorskip("megatron.core")
    extra = ["--limit", "2", "--n", "4"]
    local, mega = str(tmp_path / "local"), str(tmp_path / "megatron")
    assert run(cli_args(checkpoint, local, *extra)) == 0
    args = cli_args(checkpoint, mega, *extra, "--engine", "megatron", "--tensor-model-parallel-size", "2",
                    "--kv-block-size", "8")
    assert run_distributed(_megatron_eval_worker, 2, args) == [0, 0]
    # Samples compared by text and length (a grading reason can differ: "timeout" on a loaded machine).
    samples = [[(row["benchmark"], row["idx"], s["text"], s["num_tokens"], s["finished"])
                for line in open(os.path.join(out, "problems.jsonl")) for row in [json.loads(line)]
                for s in row["samples"]] for out in (local, mega)]
    assert samples[0] == samples[1] and len(samples[0]) == 2 * 2 * 4
    results = [json.load(open(os.path.join(out, "results.json")))["benchmarks"] for out in (local, mega)]
    for key in ("num_problems", "n", "mean_length", "truncation_rate", "sampling"):
        assert [r[key] for r in results[0].values()] == [r[key] for r in results[1].values()]
    assert sum(1 for _ in open(os.path.join(mega, CACHE_FILE))) == 2 * 2 * 4  # written once (rank 0)


class Interrupting:
    """Wraps the real engine and stops the run at its `stop_at`-th call, as Ctrl-C would."""

    def __init__(self, engine, stop_at):
        self.engine, self.stop_at, self.calls = engine, stop_at, 0

    def generate(self, prompts, n, params):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.engine.generate(prompts, n, params)


def test_interrupted_eval_resumes_to_the_same_results(checkpoint, tmp_path):
    model, tokenizer = load_model_and_tokenizer(checkpoint, "cpu")
    engine = build_engine("local", model, tokenizer, RolloutConfig(max_batch_size=64))

    def config(out):
        return EvalConfig(model_id=os.path.realpath(checkpoint), out_dir=str(out), benchmarks=["aime24"],
                          data_dir=DATA_DIR, limit=6, n=8, max_new_tokens=16, batch_size=16, progress=False)

    reference = evaluate(engine, tokenizer, config(tmp_path / "ref"))
    with pytest.raises(KeyboardInterrupt):
        evaluate(Interrupting(engine, stop_at=2), tokenizer, config(tmp_path / "run"))  # 2 prompts x 8 per call
    resumed = evaluate(engine, tokenizer, config(tmp_path / "run"))
    assert resumed.cache.used == 16 and resumed.generated_samples == 6 * 8 - 16
    ref_json = json.load(open(reference.files["json"]))["benchmarks"]
    assert json.load(open(resumed.files["json"]))["benchmarks"] == ref_json
    assert open(resumed.files["markdown"]).read() == open(reference.files["markdown"]).read()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eval_command_on_cuda(checkpoint, tmp_path, capsys):
    out = str(tmp_path / "eval-cuda")
    args = cli_args(checkpoint, out)
    args.device = "cuda"
    assert run(args) == 0
    assert "generated 330 samples" in capsys.readouterr().out
    results = json.load(open(os.path.join(out, "results.json")))
    assert {b: r["num_problems"] for b, r in results["benchmarks"].items()} == {"math500": 10, "aime24": 10}
    assert all(1 <= r["mean_length"] <= 16 for r in results["benchmarks"].values())
