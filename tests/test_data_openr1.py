"""OpenR1 schema: tools/prepare_data.py -> load_openr1 round trip (parquet and jsonl), malformed rows, truncation.

Expected values come from the shared gsm8k file read directly (the `needs_shared` tests) or from synthetic rows
(malformed rows, drop and truncation counts), and from the tokenizer called on its own.
"""
import importlib.util
import json
import os
import re
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_red.data import load_openr1, read_rows, train_sentencepiece, write_openr1
from shared_files import SHARED_DATA, needs_shared

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM8K = str(SHARED_DATA / "train" / "gsm8k_train.jsonl")
SYSTEM_PROMPT_FILE = str(SHARED_DATA / "eval" / "luffy_system_prompt.txt")


def load_tool():
    spec = importlib.util.spec_from_file_location("prepare_data", os.path.join(ROOT, "tools", "prepare_data.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["prepare_data"] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def gsm8k_rows(n):
    with open(GSM8K, encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


@pytest.fixture(scope="module")
def gsm8k_tokenizer():
    texts = [r["problem"] + "\n" + r["solution"] for r in gsm8k_rows(200)]
    with open(SYSTEM_PROMPT_FILE, encoding="utf-8") as f:
        texts.append(f.read())
    return train_sentencepiece(texts, 600)


@needs_shared
@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_prepare_then_load_round_trip(tmp_path, gsm8k_tokenizer, fmt):
    out = str(tmp_path / f"gsm8k.{fmt}")
    stats = load_tool().prepare([GSM8K], out, fmt=fmt, limit=20, system_prompt_path=SYSTEM_PROMPT_FILE)
    assert stats.written == 20 and stats.per_file == {"gsm8k_train": 20}
    with open(SYSTEM_PROMPT_FILE, encoding="utf-8") as f:
        system_prompt = f.read().strip()

    examples, load_stats = load_openr1(out, gsm8k_tokenizer, max_prompt_tokens=4096, max_trace_tokens=4096)
    assert (load_stats.rows, load_stats.kept, load_stats.dropped_prompts, load_stats.truncated_traces) == (20, 20, 0, 0)
    for i, (ex, src) in enumerate(zip(examples, gsm8k_rows(20))):
        assert ex.uid == f"gsm8k:{i}"
        assert ex.answer == src["answer"] and ex.difficulty is None
        assert ex.prompt_text == f"{system_prompt}\n\nQuestion: {src['problem'].strip()}\nAnswer:"
        expected_trace = (f"<think>\n{src['solution'].strip()}\n</think>\n\n"
                          f"The final answer is \\boxed{{{src['answer']}}}.")
        assert ex.trace_text == expected_trace
        assert ex.prompt_ids == gsm8k_tokenizer.encode(ex.prompt_text)
        assert ex.trace_ids == gsm8k_tokenizer.encode(expected_trace) + [gsm8k_tokenizer.eos_token_id]
        assert gsm8k_tokenizer.decode(ex.trace_ids) == expected_trace

    rows = read_rows(out)
    assert rows[0]["reward_model"]["ground_truth"] == gsm8k_rows(1)[0]["answer"]
    assert rows[0]["prompt"][0] == {"role": "system", "content": system_prompt}
    assert rows[0]["data_source"] == "gsm8k_train"


@needs_shared
def test_prepare_cli_two_inputs(tmp_path, capsys):
    aime = str(SHARED_DATA / "train" / "aime_1983_2023_solutions.jsonl")
    out = str(tmp_path / "mix.jsonl")
    load_tool().main([GSM8K, aime, "--out", out, "--format", "jsonl", "--limit", "3",
                      "--system-prompt", SYSTEM_PROMPT_FILE])
    assert "wrote 6 rows" in capsys.readouterr().out
    rows = read_rows(out)
    assert [r["data_source"] for r in rows] == ["gsm8k_train"] * 3 + ["aime_1983_2023_solutions"] * 3
    assert rows[3]["extra_info"]["year"] == 1983


PREPARE_ROWS = [{"problem": "What is 1+1?", "solution": "1+1=2", "answer": "2"},
                {"problem": "What is 2+3?", "solution": "2+3=5", "answer": 5},
                {"problem": "What is 3+3?", "solution": "3+3=6", "answer": "6"}]


@pytest.mark.parametrize("line2,expected", [
    # the second line cut off in the middle of a string
    (json.dumps(PREPARE_ROWS[1])[:25], r"line 2: not valid JSON: Unterminated string starting at column 13"),
    (json.dumps({**PREPARE_ROWS[1], "problem": ["What", "is", "2+3?"]}),
     r"line 2: 'problem' must be a string, got list \['What', 'is', '2\+3\?'\]"),
    (json.dumps({**PREPARE_ROWS[1], "answer": True}), r"line 2: 'answer' must be a string or a number, got bool True"),
    (json.dumps([PREPARE_ROWS[1]]), r"line 2: expected a JSON object with problem, solution, answer, got list"),
])
def test_prepare_names_file_and_line_of_a_bad_row(tmp_path, capsys, line2, expected):
    system_prompt = tmp_path / "system.txt"
    system_prompt.write_text("sys")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([json.dumps(PREPARE_ROWS[0]), line2, json.dumps(PREPARE_ROWS[2])]) + "\n")
    out = tmp_path / "x.parquet"
    code = load_tool().main([str(bad), "--out", str(out), "--system-prompt", str(system_prompt)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.fullmatch(f"error: {re.escape(str(bad))}: {expected}\n", err), err

    # The same file with its second line whole converts, a numeric answer as text; an empty field is skipped.
    bad.write_text("\n".join(json.dumps(r) for r in [*PREPARE_ROWS, {**PREPARE_ROWS[0], "solution": " "}]) + "\n")
    assert load_tool().main([str(bad), "--out", str(out), "--system-prompt", str(system_prompt)]) == 0
    assert "wrote 3 rows" in capsys.readouterr().out
    assert [r["reward_model"]["ground_truth"] for r in read_rows(str(out))] == ["2", "5", "6"]


def good_row(i=0, padding=0, steps=1):
    """A well-formed row; `padding` extra sentences lengthen the prompt, `steps` the trace."""
    question = f"What is {i}+1?" + " Show each step." * padding
    thought = ", ".join(f"{i}+{k}={i + k}" for k in range(1, steps + 1))
    return {
        "prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": question}],
        "target": [{"role": "assistant", "content": f"<think>\n{thought}\n</think>\n\n\\boxed{{{i + 1}}}"}],
        "reward_model": {"ground_truth": str(i + 1)},
    }


def varied_rows(n):
    """Rows whose prompt and trace lengths vary, with different periods."""
    return [good_row(i, padding=i % 5, steps=1 + (3 * i) % 7) for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    """A SentencePiece model trained on the synthetic rows (byte fallback encodes any other text)."""
    return train_sentencepiece([m["content"] for r in varied_rows(40) for m in r["prompt"] + r["target"]], 400)


MALFORMED = {
    "missing prompt": (lambda r: r.pop("prompt"), "prompt"),
    "missing target": (lambda r: r.pop("target"), "target"),
    "missing reward_model": (lambda r: r.pop("reward_model"), "reward_model"),
    "prompt is a string": (lambda r: r.update(prompt="What is 1+1?"), "prompt"),
    "message lacks content": (lambda r: r.update(prompt=[{"role": "user"}]), "prompt"),
    "target is a dict": (lambda r: r.update(target={"role": "assistant", "content": "x"}), "target"),
    "two target messages": (lambda r: r.update(target=r["target"] * 2), "target"),
    "empty trace": (lambda r: r["target"][0].update(content="  \n"), "target"),
    "ground truth None": (lambda r: r.update(reward_model={"ground_truth": None}), "reward_model.ground_truth"),
    "ground truth dict": (lambda r: r.update(reward_model={"ground_truth": {"a": 1}}), "reward_model.ground_truth"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_row_names_file_row_column(tmp_path, tokenizer, kind):
    mutate, column = MALFORMED[kind]
    rows = [good_row(i) for i in range(5)]
    mutate(rows[3])
    path = str(tmp_path / "bad.jsonl")
    write_openr1(rows, path, "jsonl")
    with pytest.raises(ValueError) as err:
        load_openr1(path, tokenizer, 256, 256)
    message = str(err.value)
    assert path in message and "row 3" in message and f"column '{column}'" in message

    examples, stats = load_openr1(path, tokenizer, 256, 256, skip_malformed=True)
    assert stats.skipped_malformed == 1 and stats.kept == 4 and stats.rows == 5
    assert [e.uid for e in examples] == ["bad:0", "bad:1", "bad:2", "bad:4"]
    assert "row 3" in stats.malformed_reasons[0]


def test_invalid_json_line_and_flattened_parquet_column(tmp_path, tokenizer):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(good_row(0)) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl: row 1: column '\(json\)'"):
        load_openr1(str(path), tokenizer, 256, 256)

    rows = [good_row(i) for i in range(3)]
    flat = {"prompt": [r["prompt"] for r in rows], "target": [r["target"] for r in rows],
            "reward_model.ground_truth": [r["reward_model"]["ground_truth"] for r in rows]}
    pq.write_table(pa.table(flat), str(tmp_path / "flat.parquet"))
    examples, _ = load_openr1(str(tmp_path / "flat.parquet"), tokenizer, 256, 256)
    assert [e.answer for e in examples] == ["1", "2", "3"]

    bad = dict(flat, **{"reward_model.ground_truth": [None, "2", "3"]})
    pq.write_table(pa.table(bad), str(tmp_path / "flat_bad.parquet"))
    with pytest.raises(ValueError, match=r"flat_bad.parquet: row 0: column 'reward_model.ground_truth'"):
        load_openr1(str(tmp_path / "flat_bad.parquet"), tokenizer, 256, 256)


def test_drop_and_truncation_counts(tmp_path, tokenizer):
    out = str(tmp_path / "g.parquet")
    write_openr1(varied_rows(40), out, "parquet")
    full, _ = load_openr1(out, tokenizer, 10**6, 10**6)
    prompt_lens = sorted(len(e.prompt_ids) for e in full)
    max_prompt = prompt_lens[len(prompt_lens) // 2]
    # One kept trace sits exactly at the boundary: trace + EOS == max_trace keeps its EOS.
    kept_full = [e for e in full if len(e.prompt_ids) <= max_prompt]
    max_trace = sorted(len(e.trace_ids) for e in kept_full)[len(kept_full) // 2]

    examples, stats = load_openr1(out, tokenizer, max_prompt, max_trace)
    expect_dropped = sum(n > max_prompt for n in prompt_lens)
    expect_truncated = sum(len(e.trace_ids) > max_trace for e in kept_full)  # trace + EOS does not fit
    assert 0 < expect_dropped < 40 and 0 < expect_truncated < len(kept_full)
    assert (stats.dropped_prompts, stats.truncated_traces, stats.kept) == (expect_dropped, expect_truncated,
                                                                            40 - expect_dropped)
    by_uid = {e.uid: e for e in full}
    for e in examples:
        assert len(e.prompt_ids) <= max_prompt and len(e.trace_ids) <= max_trace
        whole = by_uid[e.uid].trace_ids
        if len(whole) <= max_trace:
            assert e.trace_ids == whole and e.trace_ids[-1] == tokenizer.eos_token_id
        else:
            assert e.trace_ids == whole[:max_trace] and tokenizer.eos_token_id not in e.trace_ids
    assert any(len(e.trace_ids) == max_trace and e.trace_ids[-1] == tokenizer.eos_token_id for e in examples)
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        load_openr1(out, tokenizer, 0, 10)


def test_chat_think_prompt_does_not_repeat_think(tmp_path):
    from test_data_tokenizer import tiny_hf_tokenizer

    from megatron_red.data import HFTokenizer

    tok = HFTokenizer(tiny_hf_tokenizer(), template="chat-think")
    path = str(tmp_path / "t.jsonl")
    write_openr1([good_row(4)], path, "jsonl")
    (ex,), _ = load_openr1(path, tok, 512, 512)
    assert ex.prompt_text.endswith("<|im_start|>assistant\n<think>\n")
    assert ex.trace_text == "4+1=5\n</think>\n\n\\boxed{5}"
    assert ex.trace_ids == tok.encode(ex.trace_text) + [tok.eos_token_id]
