"""Real text end to end: GSM8K rows -> tools/prepare_data.py -> OpenR1-schema parquet -> a tiny Qwen2 checkpoint
with its own Hugging Face tokenizer and chat template -> two RED steps graded by math-verify (`grade_math`).

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on the prepared rows (byte level, so decoding
gives the text back exactly and the teacher's `\\boxed{answer}` survives), and the model is built from a config.
"""
from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from megatron_red.config import load_config
from megatron_red.trainer.red_trainer import RedTrainer
from shared_files import SHARED_DATA, needs_shared
from trainer_fixtures import REPO_ROOT, parameters, read_lines, step_lines

GSM8K = SHARED_DATA / "train" / "gsm8k_train.jsonl"
ROWS = 6
EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

pytestmark = needs_shared


def _prepare_data_tool():
    spec = importlib.util.spec_from_file_location("prepare_data", REPO_ROOT / "tools" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _texts(rows: list[dict]) -> list[str]:
    return [m["content"] for row in rows for m in row["prompt"] + row["target"]]


def _tiny_checkpoint(rows: list[dict], directory) -> None:
    """A byte-level BPE trained on the rows, wrapped as a transformers fast tokenizer with EOS/pad and a chat
    template, saved next to a randomly initialised 2-layer Qwen2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_texts(rows), trainers.BpeTrainer(
        vocab_size=600, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from megatron_red.data.openr1 import read_rows

    root = tmp_path_factory.mktemp("realtext")
    parquet = root / "gsm8k.parquet"
    _prepare_data_tool().main([str(GSM8K), "--out", str(parquet), "--limit", str(ROWS)])
    rows = read_rows(str(parquet))
    _tiny_checkpoint(rows, root / "student")
    yield root, parquet, rows
    from megatron_red.rewards import close_grader

    close_grader()


def test_prepared_rows_follow_the_openr1_schema(prepared):
    import json

    _, _, rows = prepared
    source = [json.loads(line) for line in GSM8K.read_text().splitlines()[:ROWS]]
    assert len(rows) == ROWS
    for row, src in zip(rows, source):
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]
        assert row["prompt"][1]["content"] == src["problem"].strip()
        trace = row["target"][0]["content"]
        assert trace.startswith("<think>\n") and trace.endswith(f"\\boxed{{{src['answer']}}}.")
        assert row["reward_model"]["ground_truth"] == src["answer"]


def test_two_red_steps_on_real_text(prepared):
    from megatron_red.rewards import grade_math

    root, parquet, rows = prepared
    run_dir = root / "red"
    config = load_config(None, [
        "data.task=openr1", f"data.path={parquet}", f"model.path={root / 'student'}",
        "rollout.n=3", "rollout.max_new_tokens=24", "trainer.prompts_per_step=2", "trainer.steps=2",
        "trainer.tensorboard=false", "trainer.progress=false", f"trainer.out_dir={run_dir}",
    ])
    trainer = RedTrainer(config, run_dir)
    assert len(trainer.task.train) == ROWS and trainer.task.test == []
    # The chat-think prompt ends with "<think>\n", so the trace's copy was dropped; decoding is exact.
    example = trainer.task.train[0]
    assert example.prompt_text.endswith("<|assistant|>\n<think>\n")
    assert trainer.tokenizer.decode(example.trace_ids) == example.trace_text
    before = parameters(trainer.policy)
    trainer.train()

    lines = step_lines(trainer.run_dir)
    assert [r["step"] for r in lines] == [1, 2]
    assert read_lines(trainer.run_dir)[-1] == {"step": 2, "final": True}  # no held-out split for openr1 data
    for line in lines:
        assert math.isfinite(line["loss/loss"]) and math.isfinite(line["entropy/H_rl"])
        assert line["offline/trace_reward"] == 1.0  # every GSM8K trace ends in \boxed{answer}
        assert line["loss/num_offline_tokens"] > 0 and line["loss/num_on_policy_tokens"] > 0
    # The verifier itself, on the decoded traces: correct against their own answer, wrong against another.
    traces = [trainer.tokenizer.decode(ex.trace_ids) for ex in trainer.task.train]
    assert grade_math(traces, [ex.answer for ex in trainer.task.train]) == [1.0] * ROWS
    assert grade_math(traces[:1], ["123456789"]) == [0.0]
    after = parameters(trainer.policy)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(p).all() for p in after.values())
