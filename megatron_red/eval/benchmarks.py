"""Math benchmarks: the RED paper's six test sets, their evaluation protocol, and loaders for jsonl and parquet.

Two file layouts are read:
  * jsonl with `problem`, `answer` (and optionally `idx`, `data_source`, and `answers`, a list of accepted
    alternatives, as in the Minerva file with LaTeX golds);
  * LUFFY's `valid.all.parquet`: `data_source`, `prompt` (chat messages; the user turn is the problem),
    `reward_model.ground_truth`, `extra_info.index`. AIME24/AIME25/AMC rows are repeated x32 there (its way of
    computing avg@32); repeats are dropped, since n samples per problem are drawn here instead.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

from megatron_red.errors import ConfigError


@dataclass(frozen=True)
class Problem:
    """One test problem: `golds` holds every accepted answer (usually one)."""

    idx: int
    problem: str
    golds: tuple[str, ...]
    data_source: str


@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark and how it is evaluated.

    name:            the key used on the command line (`--benchmarks math500,aime24`).
    display:         column title in the report (the paper's Table 2 names).
    file:            jsonl file in the data directory.
    luffy_source:    its `data_source` in LUFFY's valid.all.parquet, used when the jsonl file is absent.
    n:               samples per problem (32 gives avg@32; 1 gives pass@1).
    temperature:     sampling temperature.
    top_p:           nucleus sampling threshold.
    max_new_tokens:  generation budget per sample.
    """

    name: str
    display: str
    file: str
    luffy_source: str
    n: int
    temperature: float = 0.6
    top_p: float = 1.0
    max_new_tokens: int = 8192


# RED paper, "Evaluation": avg@32 at temperature 0.6 for AIME24/25 and AMC, pass@1 for the others; 8192 new tokens.
# The paper does not give pass@1's temperature; 0.6 with one sample, as in LUFFY's validation, is used.
BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("aime24", "AIME24", "aime24.jsonl", "aime", n=32),
        BenchmarkSpec("aime25", "AIME25", "aime25.jsonl", "aime25", n=32),
        BenchmarkSpec("amc", "AMC", "amc.jsonl", "amc", n=32),
        BenchmarkSpec("math500", "MATH500", "math500.jsonl", "math", n=1),
        BenchmarkSpec("minerva", "Minerva", "minerva_latex.jsonl", "minerva", n=1),
        BenchmarkSpec("olympiadbench", "Olympiad", "olympiadbench.jsonl", "olympiad_bench", n=1),
    )
}

SUITES: dict[str, tuple[str, ...]] = {
    "red-paper": ("aime24", "aime25", "amc", "math500", "minerva", "olympiadbench"),
}

LUFFY_PARQUET_NAMES = ("valid.all.parquet", "luffy_valid.all.parquet")


def resolve_benchmarks(suite: str = "red-paper", names: str | list[str] | None = None) -> list[BenchmarkSpec]:
    """The suite's benchmarks, or the subset named (comma-separated string or list), in the suite's order."""
    if suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; known: {sorted(SUITES)}")
    if names is None:
        return [BENCHMARKS[n] for n in SUITES[suite]]
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    wanted = [n for n in wanted if n]
    unknown = [n for n in wanted if n not in BENCHMARKS]
    if unknown or not wanted:
        raise ConfigError(f"unknown benchmark(s) {unknown or names!r}; known: {list(BENCHMARKS)}")
    return [BENCHMARKS[n] for n in dict.fromkeys(wanted)]


def _problem_from_json(row: dict, line_no: int, path: str) -> Problem:
    if "problem" not in row or ("answer" not in row and "answers" not in row):
        raise ConfigError(f"{path}:{line_no}: a row needs `problem` and `answer` (or `answers`)")
    golds = row.get("answers") or [row["answer"]]
    if isinstance(golds, str):
        golds = [golds]
    if "answer" in row and row["answer"] not in golds:
        golds = [row["answer"], *golds]
    return Problem(
        idx=int(row.get("idx", line_no - 1)),
        problem=str(row["problem"]),
        golds=tuple(str(g) for g in golds),
        data_source=str(row.get("data_source", "")),
    )


def load_jsonl_problems(path: str) -> list[Problem]:
    problems = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                problems.append(_problem_from_json(json.loads(line), line_no, path))
    return problems


def load_luffy_parquet(path: str, data_source: str | None = None) -> list[Problem]:
    """Problems from LUFFY's valid.all.parquet (optionally one data_source), repeated rows dropped."""
    import pyarrow.parquet as pq

    problems, seen = [], set()
    for row_no, row in enumerate(pq.read_table(path).to_pylist()):
        if data_source is not None and row["data_source"] != data_source:
            continue
        user_turns = [m["content"] for m in row["prompt"] if m["role"] == "user"]
        if not user_turns:
            raise ConfigError(f"{path}: row {row_no} has no user message")
        gold = row["reward_model"]["ground_truth"]
        key = (row["data_source"], user_turns[-1], gold)
        if key in seen:
            continue
        seen.add(key)
        extra = row.get("extra_info") or {}
        problems.append(Problem(
            idx=int(extra.get("index", len(problems))),
            problem=user_turns[-1],
            golds=(gold,) if isinstance(gold, str) else tuple(gold),
            data_source=row["data_source"],
        ))
    return problems


def load_problems(path: str, data_source: str | None = None) -> list[Problem]:
    """Problems from a .jsonl or .parquet (LUFFY layout) file."""
    if path.endswith(".parquet"):
        return load_luffy_parquet(path, data_source)
    if path.endswith(".jsonl"):
        return load_jsonl_problems(path)
    raise ConfigError(f"{path}: expected a .jsonl or .parquet file")


def load_benchmark(spec: BenchmarkSpec, data_dir: str, limit: int | None = None) -> list[Problem]:
    """The benchmark's problems from `data_dir` (its jsonl file, else LUFFY's parquet), the first `limit` of them."""
    jsonl = os.path.join(data_dir, spec.file)
    if os.path.exists(jsonl):
        problems = load_jsonl_problems(jsonl)
    else:
        parquet = next((os.path.join(data_dir, p) for p in LUFFY_PARQUET_NAMES
                        if os.path.exists(os.path.join(data_dir, p))), None)
        if parquet is None:
            raise ConfigError(
                f"benchmark {spec.name!r}: neither {jsonl} nor one of {LUFFY_PARQUET_NAMES} in {data_dir}")
        if spec.name == "minerva":
            warnings.warn("Minerva from LUFFY's parquet: its Python-style golds (e.g. 4.5e33) are often mis-graded "
                          "by math-verify; prefer a jsonl with LaTeX golds", stacklevel=2)
        problems = load_luffy_parquet(parquet, spec.luffy_source)
    if not problems:
        raise ConfigError(f"benchmark {spec.name!r}: no problems found in {data_dir}")
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit must be >= 1, got {limit}")
        problems = problems[:limit]
    return problems
