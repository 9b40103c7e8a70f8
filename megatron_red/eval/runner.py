"""The evaluation loop: prompts -> cached, resumable generation -> grading -> metrics -> report files."""
from __future__ import annotations

import dataclasses
import os
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from megatron_red.errors import ConfigError
from megatron_red.eval.benchmarks import BenchmarkSpec, Problem, load_benchmark, resolve_benchmarks
from megatron_red.eval.cache import CachedSample, CacheStats, GenerationCache, fingerprint
from megatron_red.eval.metrics import overall, summarize_benchmark
from megatron_red.eval.prompting import PromptStyle, load_system_prompt, prompt_ids
from megatron_red.eval.report import EvalReport, write_reports
from megatron_red.rewards import GraderPool, grade_math_detailed
from megatron_red.rollout.base import RolloutEngine, SamplingParams

CACHE_FILE = "generations.jsonl"


@dataclass
class EvalConfig:
    """One evaluation run. Fields left None take each benchmark's protocol value (see benchmarks.BENCHMARKS).

    model_id:            identifies the model in cache fingerprints and reports (its checkpoint path).
    out_dir:             where the cache, results.json, results.md and problems.jsonl go; rerunning into the
                         same directory resumes from the cache.
    suite:               named set of benchmarks ("red-paper": the paper's six).
    benchmarks:          subset of the suite by name; None = the whole suite.
    data_dir:            directory with the benchmark files and the system prompt.
    n:                   samples per problem for every benchmark (overrides 32 / 1).
    temperature:         sampling temperature override.
    top_p:               nucleus threshold override.
    max_new_tokens:      generation budget override.
    limit:               evaluate only the first `limit` problems of each benchmark.
    batch_size:          sequences (prompts x samples) per engine call.
    prompt_style:        "chat-think" (chat template + the `<think>` system prompt), "chat", or "plain".
    system_prompt_file:  file with the system prompt; None = luffy_system_prompt.txt in data_dir.
    dump_problems:       also write problems.jsonl with every sample's text, score and grading reason.
    seed:                base seed; each engine call gets a seed derived from it and the call's first sample.
    grade_timeout_s:     hard time-out per graded answer.
    progress:            show a progress bar.
    """

    model_id: str
    out_dir: str
    suite: str = "red-paper"
    benchmarks: list[str] | None = None
    data_dir: str = os.path.join("..", "shared", "data", "eval")
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    limit: int | None = None
    batch_size: int = 64
    prompt_style: PromptStyle = "chat-think"
    system_prompt_file: str | None = None
    dump_problems: bool = False
    seed: int = 0
    grade_timeout_s: float = 5.0
    progress: bool = True


def effective_specs(config: EvalConfig) -> list[BenchmarkSpec]:
    """The benchmarks to run with the config's overrides applied."""
    overrides = {k: getattr(config, k) for k in ("n", "temperature", "top_p", "max_new_tokens")
                 if getattr(config, k) is not None}
    if overrides.get("n", 1) < 1 or overrides.get("max_new_tokens", 1) < 1:
        raise ConfigError(f"n and max_new_tokens must be >= 1, got {overrides}")
    return [dataclasses.replace(s, **overrides) for s in resolve_benchmarks(config.suite, config.benchmarks)]


def _call_seed(base: int, benchmark: str, idx: int, sample: int) -> int:
    # Stable across runs and resumes (unlike hash()), so a rerun of the same call draws the same seed.
    return (base + zlib.crc32(f"{benchmark}:{idx}:{sample}".encode())) % (2**31)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="sample", desc="eval generate", disable=not enabled,
                dynamic_ncols=True)


def evaluate(engine: RolloutEngine, tokenizer, config: EvalConfig, pool: GraderPool | None = None,
             writer: bool = True, share: Callable[[object], object] | None = None) -> EvalReport | None:
    """Generates what the cache lacks, grades everything, writes the reports and returns them.

    With a model-parallel engine every rank calls this and they generate together: `share` hands every rank the
    writer's object (a broadcast), so all work from the writer's cache; only the `writer` appends to the cache,
    grades, writes and returns the report (the others return None).
    """
    if config.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {config.batch_size}")
    specs = effective_specs(config)
    system_prompt = None
    if config.prompt_style == "chat-think":
        system_prompt = load_system_prompt(config.system_prompt_file or config.data_dir)

    problems: dict[str, list[Problem]] = {}
    prompts: dict[tuple[str, int], list[int]] = {}
    expected: dict[tuple[str, int], str] = {}
    for spec in specs:
        problems[spec.name] = load_benchmark(spec, config.data_dir, config.limit)
        for p in problems[spec.name]:
            ids = prompt_ids(tokenizer, p.problem, config.prompt_style, system_prompt)
            prompts[(spec.name, p.idx)] = ids
            expected[(spec.name, p.idx)] = fingerprint(
                config.model_id, spec.temperature, spec.top_p, spec.max_new_tokens, ids)

    cache = GenerationCache(os.path.join(config.out_dir, CACHE_FILE))
    done, stats = cache.load(expected, {s.name: s.n for s in specs}) if writer else ({}, CacheStats())
    if share is not None:
        keys = share(set(done) if writer else None)
        done = done if writer else dict.fromkeys(keys)

    # Work: problems grouped by how many samples they still lack (all n, except after a partial interruption).
    work: dict[tuple[str, tuple[int, ...]], list[Problem]] = defaultdict(list)
    for spec in specs:
        for p in problems[spec.name]:
            missing = tuple(j for j in range(spec.n) if (spec.name, p.idx, j) not in done)
            if missing:
                work[(spec.name, missing)].append(p)
    total = sum(s.n * len(problems[s.name]) for s in specs)
    generated = 0
    spec_by_name = {s.name: s for s in specs}
    bar = _progress(total, len(done), config.progress and writer)
    tokens, start = 0, time.monotonic()
    try:
        for (name, missing), todo in work.items():
            spec = spec_by_name[name]
            per_call = max(1, config.batch_size // len(missing))
            for lo in range(0, len(todo), per_call):
                chunk = todo[lo:lo + per_call]
                params = SamplingParams(temperature=spec.temperature, top_p=spec.top_p,
                                        max_new_tokens=spec.max_new_tokens,
                                        seed=_call_seed(config.seed, name, chunk[0].idx, missing[0]))
                outputs = engine.generate([prompts[(name, p.idx)] for p in chunk], len(missing), params)
                if len(outputs) != len(chunk) or any(len(o) != len(missing) for o in outputs):
                    raise RuntimeError(f"engine returned the wrong number of completions for {name}")
                new = []
                for p, completions in zip(chunk, outputs):
                    for j, c in zip(missing, completions):
                        new.append(CachedSample(
                            benchmark=name, idx=p.idx, sample=j, fingerprint=expected[(name, p.idx)],
                            text=tokenizer.decode(c.token_ids, skip_special_tokens=True),
                            num_tokens=len(c.token_ids), finished=bool(c.finished),
                        ))
                if writer:
                    cache.append(new)
                for s in new:
                    done[(s.benchmark, s.idx, s.sample)] = s
                    tokens += s.num_tokens
                generated += len(new)
                bar.update(len(new))
                bar.set_postfix(tok_s=f"{tokens / max(time.monotonic() - start, 1e-9):.0f}")
    finally:
        bar.close()
    if not writer:
        return None

    results, dump_rows = [], []
    for spec in specs:
        probs = problems[spec.name]
        samples = [[done[(spec.name, p.idx, j)] for j in range(spec.n)] for p in probs]
        grades = grade_math_detailed(
            [s.text for row in samples for s in row],
            [p.golds for p in probs for _ in range(spec.n)],
            timeout_s=config.grade_timeout_s, pool=pool,
        )
        scores = [[g.score for g in grades[i * spec.n:(i + 1) * spec.n]] for i in range(len(probs))]
        results.append(summarize_benchmark(
            spec.name, scores,
            [[s.num_tokens for s in row] for row in samples],
            [[s.finished for s in row] for row in samples],
            [g.reason for g in grades],
        ))
        if config.dump_problems:
            for i, (p, row) in enumerate(zip(probs, samples)):
                dump_rows.append({
                    "benchmark": spec.name, "idx": p.idx, "problem": p.problem, "golds": list(p.golds),
                    "n": spec.n, "correct": int(sum(scores[i])),
                    "samples": [{"text": s.text, "score": g.score, "reason": g.reason, "num_tokens": s.num_tokens,
                                 "finished": s.finished}
                                for s, g in zip(row, grades[i * spec.n:(i + 1) * spec.n])],
                })
    report = EvalReport(config.model_id, results, overall(results), specs, stats, generated)
    report.files = write_reports(report, config.out_dir, dataclasses.asdict(config),
                                 dump_rows if config.dump_problems else None)
    return report
