"""OpenR1-Math-46k-8192-style datasets: one prompt, one offline teacher trace and a verifiable answer per row.

Schema (parquet or jsonl), as in the RED paper's training set:
  prompt        list of {role, content} messages (system + user);
  target        list with one assistant message whose content is the teacher trace, starting "<think>\\n";
  reward_model  {"ground_truth": str} (parquet: a struct column, or a flattened `reward_model.ground_truth`);
  data_source, ability, extra_info: optional.
`load_openr1` turns rows into `RedExample`s (token ids ready for the trainer); `write_openr1` writes rows.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from megatron_red.data.tokenizer import Tokenizer
from megatron_red.errors import ConfigError

FORMATS = ("parquet", "jsonl")


@dataclass
class RedExample:
    """One training/eval prompt with its offline trace.

    uid:         stable id ("<file stem>:<row>" for loaded files).
    prompt_ids:  token ids of the rendered prompt (chat template applied).
    trace_ids:   token ids of the offline trace that follows the prompt; ends with EOS unless truncated.
    answer:      ground truth for the verifier (a list holds accepted alternatives).
    difficulty:  integer difficulty where the source records one, else None.
    prompt_text: the rendered prompt.
    trace_text:  the trace text that trace_ids encode (before truncation).
    """

    uid: str
    prompt_ids: list[int]
    trace_ids: list[int]
    answer: str | list[str]
    difficulty: int | None
    prompt_text: str
    trace_text: str


@dataclass
class LoadStats:
    """What `load_openr1` kept and changed."""

    rows: int = 0               # rows read
    kept: int = 0               # examples returned
    dropped_prompts: int = 0    # prompts longer than max_prompt_tokens
    truncated_traces: int = 0   # traces cut to max_trace_tokens (these carry no EOS)
    skipped_malformed: int = 0  # malformed rows skipped because skip_malformed=True
    malformed_reasons: list[str] = field(default_factory=list)


def read_rows(path: str) -> list[dict[str, Any]]:
    """Rows of a parquet or jsonl file as plain dicts (format from the extension)."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.endswith(".jsonl") or path.endswith(".json"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    # Keep the row so that row numbers stay aligned; it is reported as malformed below.
                    rows.append({"__json_error__": f"invalid JSON on line {i + 1}: {e}"})
        return rows
    raise ValueError(f"{path}: unknown format (expected .parquet or .jsonl)")


def write_openr1(rows: Sequence[dict[str, Any]], out: str, fmt: str = "parquet") -> None:
    """Write schema rows to `out` as parquet (reward_model a struct column) or jsonl."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if fmt == "jsonl":
        with open(out, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(list(rows)), out)


class _Malformed(ValueError):
    def __init__(self, column: str, why: str):
        super().__init__(f"column {column!r}: {why}")
        self.column = column


def _messages(value: Any, column: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _Malformed(column, f"expected a non-empty list of {{role, content}} messages, got {type(value).__name__}")
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _Malformed(column, f"each message must be {{'role': str, 'content': str}}, got {m!r:.80}")
    return value


def _parse_row(row: dict[str, Any], require_trace: bool = True
               ) -> tuple[list[dict[str, str]], str, str | list[str], int | None]:
    """(prompt messages, trace text, answer, difficulty) of a row, or _Malformed. Without `require_trace`, a row
    with no `target` column (held-out files such as LUFFY's valid.all.parquet) has the empty trace."""
    if "__json_error__" in row:
        raise _Malformed("(json)", row["__json_error__"])
    has_trace = require_trace or row.get("target") is not None
    for column in ("prompt", "target") if has_trace else ("prompt",):
        if column not in row:
            raise _Malformed(column, "missing column")
    prompt = _messages(row["prompt"], "prompt")
    if not any(m["role"] == "user" for m in prompt):
        raise _Malformed("prompt", "no user message")
    trace = ""
    if has_trace:
        target = _messages(row["target"], "target")
        if len(target) != 1 or target[0]["role"] != "assistant":
            raise _Malformed("target", "expected exactly one assistant message")
        trace = target[0]["content"]
        if not trace.strip():
            raise _Malformed("target", "empty trace")

    if "reward_model" in row:
        reward_model = row["reward_model"]
        if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
            raise _Malformed("reward_model", "expected a struct with a 'ground_truth' field")
        answer, answer_column = reward_model["ground_truth"], "reward_model.ground_truth"
    elif "reward_model.ground_truth" in row:
        answer, answer_column = row["reward_model.ground_truth"], "reward_model.ground_truth"
    else:
        raise _Malformed("reward_model", "missing column")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer):
        pass
    elif not isinstance(answer, str) or not answer.strip():
        raise _Malformed(answer_column, f"expected a non-empty string (or list of strings), got {answer!r:.80}")

    extra = row.get("extra_info")
    difficulty = extra.get("difficulty") if isinstance(extra, dict) else None
    difficulty = difficulty if isinstance(difficulty, int) and not isinstance(difficulty, bool) else None
    return prompt, trace, answer, difficulty


def load_openr1(
    path: str | Sequence[str],
    tokenizer: Tokenizer,
    max_prompt_tokens: int,
    max_trace_tokens: int,
    skip_malformed: bool = False,
    require_trace: bool = True,
) -> tuple[list[RedExample], LoadStats]:
    """Load OpenR1-schema file(s) into tokenized `RedExample`s.

    The prompt is rendered with `tokenizer.render_prompt(messages)`, so the row's own system prompt is used.
    When the rendered prompt already ends with "<think>\\n" (chat-think template) and the trace starts with it,
    the trace's copy is dropped so that prompt + trace holds the teacher's text exactly once.
    Prompts longer than max_prompt_tokens are dropped. The trace gets EOS appended when trace + EOS fits in
    max_trace_tokens, so the policy learns where a finished answer stops; a longer trace is cut to
    max_trace_tokens with no EOS, since appending one would teach stopping mid-reasoning.
    A malformed row raises ValueError naming file, row (0-based) and column, or is counted and skipped when
    skip_malformed=True. require_trace=False accepts rows without a `target` (held-out prompts): their trace is empty.
    """
    if max_prompt_tokens < 1 or max_trace_tokens < 1:
        raise ValueError(f"max_prompt_tokens and max_trace_tokens must be >= 1, got {max_prompt_tokens}, {max_trace_tokens}")
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    stats = LoadStats()
    parsed: list[tuple[str, str, str, str | list[str], int | None]] = []
    for p in paths:
        p = str(p)
        stem = os.path.basename(p).split(".")[0]
        for i, row in enumerate(read_rows(p)):
            stats.rows += 1
            try:
                messages, trace, answer, difficulty = _parse_row(row, require_trace)
            except _Malformed as e:
                message = f"{p}: row {i}: {e}"
                if not skip_malformed:
                    raise ConfigError(message) from None
                stats.skipped_malformed += 1
                stats.malformed_reasons.append(message)
                continue
            prompt_text = tokenizer.render_prompt(messages)
            if prompt_text.endswith("<think>\n") and trace.startswith("<think>\n"):
                trace = trace[len("<think>\n"):]
            parsed.append((f"{stem}:{i}", prompt_text, trace, answer, difficulty))

    prompt_ids_all = tokenizer.encode_batch([x[1] for x in parsed])
    trace_ids_all = tokenizer.encode_batch([x[2] for x in parsed])
    examples = []
    for (uid, prompt_text, trace, answer, difficulty), prompt_ids, trace_ids in zip(parsed, prompt_ids_all, trace_ids_all):
        if len(prompt_ids) > max_prompt_tokens:
            stats.dropped_prompts += 1
            continue
        if not trace and not require_trace:
            trace_ids = []  # a held-out prompt without a trace
        elif len(trace_ids) + 1 <= max_trace_tokens:
            trace_ids = trace_ids + [tokenizer.eos_token_id]
        else:
            trace_ids = trace_ids[:max_trace_tokens]
            stats.truncated_traces += 1
        examples.append(RedExample(uid, prompt_ids, trace_ids, answer, difficulty, prompt_text, trace))
    stats.kept = len(examples)
    return examples, stats
