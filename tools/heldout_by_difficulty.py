"""Held-out accuracy per difficulty over training: the built-in study's recall / extend table.

    python tools/heldout_by_difficulty.py [--levels 4,5,6] RUN_DIR [RUN_DIR ...]

For each method (run directories named METHOD_seedN, as `compare` names them) and each evaluation step, the mean over
its seeds of `eval/accuracy_d{k}` (the share of the held-out k-operation problems solved, avg@n) for every level k
asked, and of the hard accuracy and the mean response length; step 0 is the warmed-up student. On the latent-skill
regime, RL can sharpen the 4-operation problems the student half-solves, while 5 and 6 operations are what only the
teacher shows it. Arguments that are not directories are skipped.
"""
from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

from megatron_red.trainer.metrics import read_metrics


def evaluations(run_dir: str) -> dict[int, dict]:
    """Step -> the held-out evaluation logged at that step (the final one for the last step)."""
    return {r["step"]: r for r in read_metrics(run_dir) if "eval/accuracy" in r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="4,5,6", help="difficulties (operations) to print")
    parser.add_argument("run_dirs", nargs="+")
    args = parser.parse_args()
    keys = [f"eval/accuracy_d{k}" for k in args.levels.split(",")] + ["eval/accuracy_hard", "eval/mean_length"]
    per_method: dict[str, list[dict[int, dict]]] = {}
    for run_dir in [d for d in args.run_dirs if Path(d).is_dir()]:
        per_method.setdefault(re.sub(r"_seed\d+$", "", Path(run_dir).name), []).append(evaluations(run_dir))
    names = [k.removeprefix("eval/accuracy_").removeprefix("eval/") for k in keys]
    print("| method | seeds | step | " + " | ".join(names) + " |")
    print("|---" * (len(keys) + 3) + "|")
    for method, runs in per_method.items():
        for step in sorted(set.intersection(*(set(r) for r in runs))):
            cells = []
            for key in keys:
                values = [r[step][key] for r in runs if isinstance(r[step].get(key), (int, float))]
                scale = 1.0 if key == "eval/mean_length" else 100.0
                cells.append(f"{scale * statistics.mean(values):.1f}" if values else "-")
            print(f"| {method} | {len(runs)} | {step} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
