"""Is RED's w a signal or batch noise? Statistics of w = clip(|dH_sft / dH_rl|, 1, G) over a run, against a null.

    python tools/w_noise.py RUN_DIR [RUN_DIR ...]

w is recomputed every step from H_rl and H_sft, batch means over that step's prompts (Eq. 9-11, no smoothing, as
the authors' code). If the entropies only fluctuated around a trend, the relative changes dH would be batch noise
and w a random draw from the ratio of two noise magnitudes. For each run this prints the fraction of steps at the
clip bounds (w = 1, w = G), the mean of w, its lag-1 autocorrelation, and the same for the null: the run's own
H_rl and H_sft series shuffled in time (trend removed, noise kept), fed through the same controller. A w that is
signal differs from its null; a w that is noise looks like it.
"""
from __future__ import annotations

import random
import statistics
import sys

from megatron_red.objectives import EntropyRatioController
from megatron_red.trainer.metrics import read_metrics


def w_series(h_rl: list[float], h_sft: list[float], group_size: int) -> list[float]:
    controller = EntropyRatioController(group_size)
    return [controller.update(r, s) for r, s in zip(h_rl, h_sft)][1:]  # step 1 is w = 1 by definition


def describe(w: list[float], group_size: int) -> str:
    mean = statistics.mean(w)
    var = statistics.pvariance(w)
    lag1 = (sum((a - mean) * (b - mean) for a, b in zip(w, w[1:])) / (len(w) - 1) / var) if var > 0 else 0.0
    at_one = sum(v == 1.0 for v in w) / len(w)
    at_g = sum(v == float(group_size) for v in w) / len(w)
    return f"w=1 {100 * at_one:5.1f}%  w=G {100 * at_g:5.1f}%  mean {mean:5.2f}  lag-1 autocorrelation {lag1:+.2f}"


def main(run_dirs: list[str]) -> None:
    for run_dir in run_dirs:
        records = [r for r in read_metrics(run_dir) if not r.get("final")]
        rows = [(r["entropy/H_rl"], r["entropy/H_sft"]) for r in records
                if isinstance(r.get("entropy/H_rl"), float) and isinstance(r.get("entropy/H_sft"), float)]
        if len(rows) < 3:
            print(f"{run_dir}: no H_rl / H_sft series (not an offline-in-group method?)")
            continue
        import yaml

        with open(f"{run_dir}/config.yaml", encoding="utf-8") as f:
            group_size = yaml.safe_load(f)["rollout"]["n"]
        h_rl, h_sft = [r for r, _ in rows], [s for _, s in rows]
        logged = [r["entropy/w"] for r in records if isinstance(r.get("entropy/w"), float)][1:]
        print(f"{run_dir} ({len(rows)} steps, G = {group_size})")
        print(f"  logged w              {describe(logged, group_size)}")
        nulls = []
        for seed in range(20):
            order = list(range(len(rows)))
            random.Random(seed).shuffle(order)
            nulls += w_series([h_rl[i] for i in order], [h_sft[i] for i in order], group_size)
        print(f"  null (H shuffled x20) {describe(nulls, group_size)}")
        for name, h in (("H_rl", h_rl), ("H_sft", h_sft)):
            changes = [abs(1 - b / a) for a, b in zip(h, h[1:]) if a > 0]
            print(f"  {name}: mean {statistics.mean(h):.4f}, step-to-step relative change median "
                  f"{statistics.median(changes):.3f}, first-to-last {h[-1] / h[0] - 1:+.2f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
