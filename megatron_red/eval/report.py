"""Evaluation reports: a Markdown table laid out like the paper's Table 2, a JSON file, a per-problem dump."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from megatron_red.eval.benchmarks import BenchmarkSpec
from megatron_red.eval.cache import CacheStats
from megatron_red.eval.metrics import BenchmarkResult

OVERALL_NOTE = ("Overall = unweighted mean over the benchmarks of Acc and of LEN (as the paper's Table 2 Overall). "
                "Acc = avg@n (pass@1 for n = 1), in %; LEN = mean response length in tokens.")


@dataclass
class EvalReport:
    """What an evaluation produced: per-benchmark results, Table 2's Overall, cache bookkeeping, file paths."""

    model_id: str
    results: list[BenchmarkResult]
    overall: dict[str, float]
    specs: list[BenchmarkSpec]
    cache: CacheStats
    generated_samples: int
    files: dict[str, str] = field(default_factory=dict)


def to_markdown(report: EvalReport) -> str:
    """Table 2's layout (Acc / LEN per benchmark, then Overall) and a detail table per benchmark."""
    display = {s.name: s.display for s in report.specs}
    head = ["Model"] + [f"{display[r.name]} {col}" for r in report.results for col in ("Acc", "LEN")]
    head += ["Overall Acc", "Overall LEN"]
    row = [os.path.basename(os.path.normpath(report.model_id)) or report.model_id]
    for r in report.results:
        row += [f"{100 * r.accuracy:.2f}", f"{r.mean_length:.0f}"]
    row += [f"{100 * report.overall['accuracy']:.2f}", f"{report.overall['mean_length']:.0f}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |", "",
             OVERALL_NOTE, ""]
    lines += ["| Benchmark | metric | problems | n | Acc % | pass@k % | LEN mean | LEN median | truncated % | grading |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.results:
        pass_k = ", ".join(f"@{k}: {100 * v:.2f}" for k, v in r.pass_at.items())
        grading = ", ".join(f"{k} {v}" for k, v in sorted(r.reasons.items()))
        lines.append(f"| {display[r.name]} | {r.metric} | {r.num_problems} | {r.n} | {100 * r.accuracy:.2f} | "
                     f"{pass_k} | {r.mean_length:.1f} | {r.median_length:.1f} | {100 * r.truncation_rate:.1f} | "
                     f"{grading} |")
    return "\n".join(lines) + "\n"


def to_json(report: EvalReport, settings: dict) -> dict:
    """results.json: `settings` (the evaluation's `EvalConfig` as a dict) beside every benchmark's results."""
    return {
        "model": report.model_id,
        "config": settings,
        "benchmarks": {
            r.name: {**dataclasses.asdict(r), "pass_at": {str(k): v for k, v in r.pass_at.items()},
                     "sampling": {k: getattr(s, k) for k in ("n", "temperature", "top_p", "max_new_tokens")}}
            for r, s in zip(report.results, report.specs)
        },
        "overall": {**report.overall, "definition": OVERALL_NOTE},
        "cache": dataclasses.asdict(report.cache),
        "generated_samples": report.generated_samples,
    }


def write_reports(report: EvalReport, out_dir: str, settings: dict, dump_rows: list[dict] | None) -> dict[str, str]:
    """Writes results.md, results.json (with `settings`) and (when given rows) problems.jsonl into `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    files = {"markdown": os.path.join(out_dir, "results.md"), "json": os.path.join(out_dir, "results.json")}
    with open(files["markdown"], "w", encoding="utf-8") as f:
        f.write(to_markdown(report))
    with open(files["json"], "w", encoding="utf-8") as f:
        json.dump(to_json(report, settings), f, indent=2)
    if dump_rows is not None:
        files["problems"] = os.path.join(out_dir, "problems.jsonl")
        with open(files["problems"], "w", encoding="utf-8") as f:
            for row in dump_rows:
                f.write(json.dumps(row) + "\n")
    return files
