"""Convert problem/solution jsonl files (e.g. GSM8K, AIME) into the OpenR1-Math-46k-8192 schema.

Each input row is a JSON object with a string `problem` and `solution` and a string or number `answer` (rows lacking
one, or with one empty, are skipped and counted); an integer `year` is kept in extra_info. A line that is not JSON, or
a row with a value of the wrong type, stops the conversion with `error: FILE: line N: ...` (exit code 2). The output
row is:
  prompt        [system: the OpenR1 <think> system prompt, user: problem]
  target        [assistant: "<think>\\n" + solution + "\\n</think>\\n\\n" + "The final answer is \\boxed{answer}."]
  reward_model  {"ground_truth": answer, "style": "rule"}
  data_source   the input file's stem; ability "math"; extra_info {index, split, year}

  python tools/prepare_data.py ../shared/data/train/gsm8k_train.jsonl --out data/gsm8k.parquet --limit 1000
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

from megatron_red.data.openr1 import FORMATS, write_openr1
from megatron_red.errors import ConfigError

DEFAULT_SYSTEM_PROMPT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "eval", "luffy_system_prompt.txt"
)
REQUIRED = ("problem", "solution", "answer")
# The types each required field may have (bool is an int in Python, but not an answer).
_TYPES = {"problem": (str,), "solution": (str,), "answer": (str, int, float)}


@dataclass
class PrepareStats:
    """Rows read, written and skipped, per input file."""

    written: int = 0
    per_file: dict[str, int] = field(default_factory=dict)
    skipped: int = 0  # rows lacking a non-empty problem/solution/answer


def read_row(line: str, path: str, line_no: int) -> dict | None:
    """The row on line `line_no` of `path`, or None when it lacks a non-empty required field (skipped and counted).
    Raises ConfigError naming the file, the line and what is wrong when the line is not a JSON object or a field
    has the wrong type."""
    where = f"{path}: line {line_no}"
    try:
        row = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not valid JSON: {err.msg.removesuffix(' at')} at column {err.colno}") from None
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected a JSON object with {', '.join(REQUIRED)}, got {type(row).__name__}")
    for key, types in _TYPES.items():
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            expected = " or ".join("a number" if t is not str else "a string" for t in types[:2])
            raise ConfigError(f"{where}: '{key}' must be {expected}, got {type(value).__name__} {value!r:.60}")
    if not all(row.get(k) is not None and str(row[k]).strip() for k in REQUIRED):
        return None
    return row


def convert_row(row: dict, index: int, source: str, system_prompt: str) -> dict:
    """One input row as an OpenR1-schema row."""
    answer = str(row["answer"]).strip()
    trace = f"<think>\n{row['solution'].strip()}\n</think>\n\nThe final answer is \\boxed{{{answer}}}."
    return {
        "data_source": source,
        "prompt": [{"role": "system", "content": system_prompt}, {"role": "user", "content": row["problem"].strip()}],
        "target": [{"role": "assistant", "content": trace}],
        "ability": "math",
        "reward_model": {"ground_truth": answer, "style": "rule"},
        "extra_info": {"index": index, "split": "train", "year": row.get("year") if isinstance(row.get("year"), int) else None},
    }


def prepare(inputs: list[str], out: str, fmt: str = "parquet", limit: int | None = None,
            system_prompt_path: str = DEFAULT_SYSTEM_PROMPT, verbose: bool = False) -> PrepareStats:
    """Convert `inputs` (jsonl) into one OpenR1-schema file `out`; `limit` caps the rows taken from each input."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    with open(system_prompt_path, encoding="utf-8") as f:
        system_prompt = f.read().strip()
    stats, rows = PrepareStats(), []
    for path in inputs:
        source = os.path.basename(path).split(".")[0]
        taken = 0
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if limit is not None and taken >= limit:
                    break
                if not line.strip():
                    continue
                row = read_row(line, path, line_no)
                if row is None:
                    stats.skipped += 1
                    continue
                rows.append(convert_row(row, taken, source, system_prompt))
                taken += 1
                if verbose and taken % 1000 == 0:
                    print(f"  {source}: {taken} rows")
        stats.per_file[source] = taken
        if verbose:
            print(f"read {path}: {taken} rows")
    write_openr1(rows, out, fmt)
    stats.written = len(rows)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="jsonl files with problem, solution, answer fields")
    parser.add_argument("--out", required=True, help="output file (.parquet or .jsonl)")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="parquet", help="output format")
    parser.add_argument("--limit", type=int, default=None, help="take at most this many rows from each input")
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                        help="file holding the system prompt (default: the OpenR1 <think> prompt in shared/data/eval)")
    args = parser.parse_args(argv)
    try:
        stats = prepare(args.inputs, args.out, args.fmt, args.limit, args.system_prompt, verbose=True)
    except ConfigError as err:  # bad input, named; anything else keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{'source':<32} {'rows':>8}")
    for source, n in stats.per_file.items():
        print(f"{source:<32} {n:>8}")
    print(f"wrote {stats.written} rows to {args.out} ({args.fmt}); skipped {stats.skipped} incomplete rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
