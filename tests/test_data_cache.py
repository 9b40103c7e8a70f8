"""OpenR1-format data tokenised once: the memory-mapped cache (built once, reused, rebuilt when the file, tokenizer or
options change, examples identical to `load_openr1`), one builder among ranks, the held-out split, and held-out
evaluation of real answers with math-verify (a two-step RED run with `trainer.eval_every` on an HF checkpoint).

Synthetic rows in the OpenR1 schema and tokenizers trained here: nothing needs ../shared.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from dist_utils import run_distributed
from megatron_red.config import DataConfig
from megatron_red.data import load_openr1, train_sentencepiece, write_openr1
from megatron_red.data.cache import MappedExamples, heldout_split
from megatron_red.data.tokenizer import SentencePieceTokenizer
from megatron_red.trainer.build import tokenised_once

SYSTEM = "Think step by step, then put the final answer in \\boxed{}."


def rows(n: int = 24, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append({
            "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {a} + {b}?"}],
            "target": [{"role": "assistant", "content": f"<think>\n{a} + {b} = {a + b}\n</think>\n\n"
                                                        f"The answer is \\boxed{{{a + b}}}."}],
            "reward_model": {"ground_truth": str(a + b)},
            "extra_info": {"difficulty": i % 3},
        })
    if n > 5:  # one prompt twice, with its own trace
        out[5]["prompt"], out[5]["reward_model"] = out[2]["prompt"], out[2]["reward_model"]
    return out


class CountingTokenizer(SentencePieceTokenizer):
    """A SentencePiece tokenizer that counts the texts it encodes."""

    def __init__(self, model_proto: bytes, system_prompt: str | None = None):
        super().__init__(model_proto, system_prompt)
        self.encoded = 0

    def encode_batch(self, texts):
        self.encoded += len(texts)
        return super().encode_batch(texts)


@pytest.fixture(scope="module")
def spm_proto() -> bytes:
    texts = [m["content"] for r in rows(64, seed=1) for m in r["prompt"] + r["target"]]
    return train_sentencepiece(texts, 320).model_proto


def data_config(**overrides) -> DataConfig:
    return DataConfig(**{"task": "openr1", "max_prompt_tokens": 256, "max_trace_tokens": 256, **overrides})


def assert_same_examples(mapped, expected):
    assert len(mapped) == len(expected)
    for got, want in zip(mapped, expected):
        assert got == want  # dataclass equality: uid, ids, answer, difficulty and both texts


def test_built_once_reused_and_rebuilt_when_an_input_changes(tmp_path, spm_proto):
    path = str(tmp_path / "train.parquet")
    write_openr1(rows(), path)
    root = tmp_path / "cache"
    tok = CountingTokenizer(spm_proto)
    first = tokenised_once(path, tok, root, data_config(), require_trace=True)
    assert tok.encoded == 2 * 24  # prompts and traces, once
    reference, _ = load_openr1(path, SentencePieceTokenizer(spm_proto), 256, 256)
    assert_same_examples(first, reference)
    assert isinstance(first._tokens, np.memmap) and first._tokens.dtype == np.int32  # mapped, not loaded

    again = tokenised_once(path, tok, root, data_config(), require_trace=True)
    assert tok.encoded == 48, "the second load tokenised again"
    assert again.directory == first.directory
    assert_same_examples(again, reference)

    # Options: a shorter trace limit is a different dataset.
    short = tokenised_once(path, tok, root, data_config(max_trace_tokens=8), require_trace=True)
    assert tok.encoded == 96 and short.directory != first.directory
    assert all(len(ex.trace_ids) <= 8 for ex in short) and short.stats.truncated_traces == 24
    # Tokenizer: another system prompt renders other prompts.
    other = CountingTokenizer(spm_proto, system_prompt="unused by rows that carry their own")
    tokenised_once(path, other, root, data_config(), require_trace=True)
    assert other.encoded == 48
    # File: rewritten with one changed answer.
    changed = rows()
    changed[0]["reward_model"] = {"ground_truth": "12345"}
    write_openr1(changed, path)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1))  # a later write, even if instant
    rebuilt = tokenised_once(path, tok, root, data_config(), require_trace=True)
    assert tok.encoded == 144 and rebuilt[0].answer == "12345"
    assert len(list(root.iterdir())) == 4  # four complete caches, no temporary directories left


def test_heldout_split_is_disjoint_deterministic_and_keeps_copies_together(tmp_path, spm_proto):
    tok = SentencePieceTokenizer(spm_proto)
    path = str(tmp_path / "train.jsonl")
    write_openr1(rows(), path, fmt="jsonl")
    examples = tokenised_once(path, tok, tmp_path / "cache", data_config(), require_trace=True)
    train, held = heldout_split(examples.prompt_digests(), 0.25)
    prompts = [tuple(ex.prompt_ids) for ex in examples]
    assert sorted(train + held) == list(range(24))
    assert not {prompts[i] for i in train} & {prompts[i] for i in held}  # no prompt on both sides
    assert len({prompts[i] for i in held}) == round(0.25 * 23)  # 23 distinct prompts
    assert (2 in held) == (5 in held)  # the repeated prompt stays on one side

    # The same prompts are held out whatever the row order (and the seed plays no part).
    shuffled = rows()
    random.Random(3).shuffle(shuffled)
    path2 = str(tmp_path / "shuffled.jsonl")
    write_openr1(shuffled, path2, fmt="jsonl")
    examples2 = tokenised_once(path2, tok, tmp_path / "cache", data_config(), require_trace=True)
    train2, held2 = heldout_split(examples2.prompt_digests(), 0.25)
    assert {tuple(examples2[i].prompt_ids) for i in held2} == {prompts[i] for i in held}
    assert heldout_split(examples.prompt_digests(), 0.0) == (list(range(24)), [])
    with pytest.raises(ValueError, match="data.eval_fraction"):
        heldout_split(examples.prompt_digests(), 1.0)

    # Views over the same mapped files: select() keeps the examples.
    assert_same_examples(examples.select(held), [examples[i] for i in held])


def _build_on_two_ranks(rank, world_size, path, root, proto):
    tok = CountingTokenizer(proto)
    examples = tokenised_once(path, tok, Path(root), data_config(), require_trace=True)
    return {"encoded": tok.encoded, "uids": [ex.uid for ex in examples], "trace": examples[3].trace_ids,
            "directory": str(examples.directory)}


def test_one_rank_tokenises_every_rank_maps(tmp_path, spm_proto):
    # LOCAL_RANK = rank in this world, so rank 1 plays the first rank of a second node whose disk is the same.
    path = str(tmp_path / "train.parquet")
    write_openr1(rows(), path)
    first, second = run_distributed(_build_on_two_ranks, 2, path, str(tmp_path / "cache"), spm_proto)
    assert (first["encoded"], second["encoded"]) == (48, 0)
    assert first["uids"] == second["uids"] and first["trace"] == second["trace"]
    assert first["directory"] == second["directory"]


def test_eval_rows_need_no_trace(tmp_path, spm_proto):
    held = rows(4, seed=7)
    for row in held:
        del row["target"]
    path = str(tmp_path / "valid.parquet")
    write_openr1(held, path)
    tok = SentencePieceTokenizer(spm_proto)
    with pytest.raises(ValueError, match="column 'target': missing column"):
        tokenised_once(path, tok, tmp_path / "cache", data_config(), require_trace=True)
    examples = tokenised_once(path, tok, tmp_path / "cache", data_config(), require_trace=False)
    assert [ex.trace_ids for ex in examples] == [[]] * 4
    assert [ex.answer for ex in examples] == [row["reward_model"]["ground_truth"] for row in held]


# --------------------------------------------------------------------------------- held-out evaluation, end to end
def _tiny_hf_checkpoint(texts: list[str], directory: Path) -> None:
    """A byte-level BPE with a chat template and a randomly initialised 2-layer Qwen2, saved together."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).save_pretrained(directory)


class TraceEngine:
    """A rollout engine that answers each prompt with its offline trace (or with `wrong`), for grading checks."""

    def suspend(self):  # nothing to release (the actor's finish_inference calls it)
        pass

    def __init__(self, examples, tokenizer, wrong: str | None = None):
        self.traces = {tuple(ex.prompt_ids): ex.trace_ids for ex in examples}
        self.wrong = tokenizer.encode(wrong) if wrong else None

    def generate(self, prompts, n, params):
        from megatron_red.rollout.base import Completion

        return [[Completion(self.wrong or self.traces[tuple(p)], [0.0], True, [0.0])] * n for p in prompts]


def test_eval_every_runs_on_heldout_openr1_prompts_graded_by_math_verify(tmp_path):
    from megatron_red.config import load_config
    from megatron_red.rewards import close_grader
    from megatron_red.trainer.evaluate import evaluate_heldout
    from megatron_red.trainer.metrics import read_metrics
    from megatron_red.trainer.red_trainer import RedTrainer

    data = rows(12)
    path = tmp_path / "train.parquet"
    write_openr1(data, str(path))
    _tiny_hf_checkpoint([m["content"] for r in data for m in r["prompt"] + r["target"]], tmp_path / "student")
    run_dir = tmp_path / "runs" / "red"
    config = load_config(None, [
        "data.task=openr1", f"data.path={path}", "data.eval_fraction=0.25", f"model.path={tmp_path / 'student'}",
        "rollout.n=2", "rollout.max_new_tokens=8", "trainer.prompts_per_step=2", "trainer.steps=2",
        "trainer.eval_every=1", "trainer.eval_samples=1", "trainer.tensorboard=false", "trainer.progress=false",
        f"trainer.out_dir={run_dir}"])
    try:
        trainer = RedTrainer(config, run_dir)
        held = list(trainer.task.test)
        assert len(held) == 3 and len(trainer.task.train) == 9  # 11 distinct prompts: 3 held out, copies together
        assert not {tuple(ex.prompt_ids) for ex in held} & {tuple(ex.prompt_ids) for ex in trainer.task.train}
        assert (tmp_path / "runs" / ".cache" / "data").is_dir()  # beside the run directory

        # The task's reward_fn grades real answers with math-verify: the teacher's boxed sums are right, 0 is not.
        def evaluate(engine):
            trainer.policy.rollout_engine = engine  # the actor samples with the engine attached to it
            return evaluate_heldout(trainer.policy, held, trainer.grade, n=2, temperature=1.0,
                                    max_new_tokens=8, seed=0)["eval/accuracy"]
        assert evaluate(TraceEngine(held, trainer.tokenizer)) == 1.0
        assert evaluate(TraceEngine(held, trainer.tokenizer, wrong="The answer is \\boxed{0}.")) == 0.0
        trainer.policy.rollout_engine = trainer.engine

        trainer.train()
        lines = read_metrics(run_dir)
        step1 = next(line for line in lines if line["step"] == 1 and not line.get("final"))
        assert step1["eval/problems"] == 3 and 0.0 <= step1["eval/accuracy"] <= 1.0  # eval_every=1 ran
        assert lines[-1]["final"] and lines[-1]["eval/problems"] == 3
    finally:
        close_grader()
