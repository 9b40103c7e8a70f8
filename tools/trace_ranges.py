"""The per-step traces of runs, as means over step ranges: the numbers behind docs/results.md's trace tables.

    python tools/trace_ranges.py [--ranges 0-100,100-300,300-600] RUN_DIR [RUN_DIR ...]

For each metric the `compare` figure draws (H_rl, H_sft, w, r_off, rollout accuracy, length, truncated fraction;
`megatron_red.trainer.report.DYNAMICS`) this prints its mean over the steps a < step <= b of each range, per run,
then per method (run directories named METHOD_seedN, as `compare` names them) the mean over its seeds. A metric a
method does not log (SFT has no rollouts) prints as "-". Arguments that are not directories (a glob such as
`runs/study/*_seed*` also matches the `dynamics_seed*.png` figures) are skipped.
"""
from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

from megatron_red.trainer.metrics import read_metrics
from megatron_red.trainer.report import DYNAMICS


def range_means(run_dir: str, ranges: list[tuple[int, int]]) -> dict[str, list[float | None]]:
    """Per metric key, its mean over each range's steps (None where the run logged none there)."""
    records = [r for r in read_metrics(run_dir) if not r.get("final") and isinstance(r.get("step"), int)]
    out = {}
    for key, _ in DYNAMICS:
        means = []
        for lo, hi in ranges:
            values = [r[key] for r in records if lo < r["step"] <= hi and isinstance(r.get(key), (int, float))]
            means.append(statistics.mean(values) if values else None)
        out[key] = means
    return out


def fmt(values: list[float | None]) -> str:
    return " / ".join("-" if v is None else f"{v:.3f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranges", default="0-100,100-300,300-600", help="step ranges a-b (a < step <= b)")
    parser.add_argument("run_dirs", nargs="+")
    args = parser.parse_args()
    ranges = [tuple(int(x) for x in part.split("-")) for part in args.ranges.split(",")]
    per_method: dict[str, list[dict]] = {}
    for run_dir in [d for d in args.run_dirs if Path(d).is_dir()]:
        means = range_means(run_dir, ranges)
        method = re.sub(r"_seed\d+$", "", Path(run_dir).name)
        per_method.setdefault(method, []).append(means)
        print(f"{run_dir}")
        for key, _ in DYNAMICS:
            print(f"  {key:22s} {fmt(means[key])}")
    print(f"\nmean over seeds, steps {args.ranges.replace(',', ' / ')}")
    for method, runs in per_method.items():
        print(f"{method} ({len(runs)} seeds)")
        for key, _ in DYNAMICS:
            cols = [[run[key][i] for run in runs if run[key][i] is not None] for i in range(len(ranges))]
            print(f"  {key:22s} {fmt([statistics.mean(c) if c else None for c in cols])}")


if __name__ == "__main__":
    main()
