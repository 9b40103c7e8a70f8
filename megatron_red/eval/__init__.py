"""Benchmark evaluation: the RED paper's six math benchmarks, avg@k / pass@k / response length, Table-2 report.

Entry points: `evaluate(engine, tokenizer, EvalConfig(...))` and the `megatron-red eval` command
(megatron_red.eval.command).
"""
from megatron_red.eval.benchmarks import (
    BENCHMARKS,
    SUITES,
    BenchmarkSpec,
    Problem,
    load_benchmark,
    load_problems,
    resolve_benchmarks,
)
from megatron_red.eval.cache import GenerationCache, fingerprint
from megatron_red.eval.metrics import BenchmarkResult, avg_at_k, overall, pass_at_k, summarize_benchmark
from megatron_red.eval.report import EvalReport
from megatron_red.eval.runner import EvalConfig, evaluate

__all__ = [
    "BENCHMARKS",
    "SUITES",
    "BenchmarkResult",
    "BenchmarkSpec",
    "EvalConfig",
    "EvalReport",
    "GenerationCache",
    "Problem",
    "avg_at_k",
    "evaluate",
    "fingerprint",
    "load_benchmark",
    "load_problems",
    "overall",
    "pass_at_k",
    "resolve_benchmarks",
    "summarize_benchmark",
]
