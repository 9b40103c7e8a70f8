"""Evaluation metrics: avg@k, unbiased pass@k, response length and truncation, per benchmark and overall."""
from __future__ import annotations

import collections
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms the huge binomials.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(scores: Sequence[float]) -> float:
    """avg@k of one problem: the mean score of its k samples."""
    if not scores:
        raise ValueError("avg@k needs at least one sample")
    return sum(scores) / len(scores)


def default_ks(n: int) -> list[int]:
    """The k reported for pass@k: powers of two up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


@dataclass
class BenchmarkResult:
    """Metrics of one benchmark.

    accuracy:         mean over problems of avg@n (for n = 1 this is pass@1) — Table 2's "Acc" (as a fraction).
    pass_at:          unbiased pass@k per k, mean over problems.
    mean_length:      mean response length in tokens over all samples — Table 2's "LEN".
    median_length:    median response length in tokens.
    truncation_rate:  fraction of samples cut at max_new_tokens (no EOS).
    reasons:          how many samples got each grading reason.
    """

    name: str
    metric: str
    num_problems: int
    n: int
    accuracy: float
    pass_at: dict[int, float]
    mean_length: float
    median_length: float
    truncation_rate: float
    reasons: dict[str, int] = field(default_factory=dict)


def summarize_benchmark(
    name: str,
    scores: Sequence[Sequence[float]],
    lengths: Sequence[Sequence[int]],
    finished: Sequence[Sequence[bool]],
    reasons: Sequence[str] = (),
) -> BenchmarkResult:
    """Metrics from per-problem lists of per-sample scores (0/1), lengths and finished flags."""
    if not scores:
        raise ValueError(f"benchmark {name!r} has no problems to summarise")
    n = len(scores[0])
    if any(len(s) != n for s in scores):
        raise ValueError(f"benchmark {name!r}: every problem needs the same number of samples ({n})")
    flat_lengths = [x for ls in lengths for x in ls]
    flat_finished = [x for fs in finished for x in fs]
    correct = [round(sum(s)) for s in scores]
    return BenchmarkResult(
        name=name,
        metric=f"avg@{n}" if n > 1 else "pass@1",
        num_problems=len(scores),
        n=n,
        accuracy=sum(avg_at_k(s) for s in scores) / len(scores),
        pass_at={k: sum(pass_at_k(n, c, k) for c in correct) / len(correct) for k in default_ks(n)},
        mean_length=sum(flat_lengths) / len(flat_lengths),
        median_length=float(statistics.median(flat_lengths)),
        truncation_rate=sum(not f for f in flat_finished) / len(flat_finished),
        reasons=dict(collections.Counter(reasons)),
    )


def overall(results: Sequence[BenchmarkResult]) -> dict[str, float]:
    """Table 2's "Overall": the unweighted mean of the benchmarks' accuracies and of their mean lengths."""
    if not results:
        raise ValueError("no benchmark results")
    return {
        "accuracy": sum(r.accuracy for r in results) / len(results),
        "mean_length": sum(r.mean_length for r in results) / len(results),
    }
