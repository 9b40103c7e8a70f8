"""Reports of finished runs: Figure-6-style dynamics plots (H_rl, H_sft, w) and a Table-2-style comparison."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from megatron_red.trainer.metrics import read_metrics

DYNAMICS = (("entropy/H_rl", "H_rl (on-policy entropy)"), ("entropy/H_sft", "H_sft (offline-trace entropy)"),
            ("entropy/w", "w = clip(|dH_sft / dH_rl|, 1, G)"), ("reward/mean", "rollout reward"),
            ("response/mean_length", "response length (tokens)"))


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if not r.get("final") and isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def plot_runs(runs: dict[str, str | Path], out_png: str | Path) -> Path:
    """One panel per dynamics metric, one line per run (label -> run directory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DYNAMICS), figsize=(4.2 * len(DYNAMICS), 3.4))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, run_dir) in enumerate(runs.items()):
        records = read_metrics(run_dir)
        color = palette[i % len(palette)]  # one colour per run in every panel, even where a run has no series
        for ax, (key, title) in zip(axes, DYNAMICS):
            steps, values = _series(records, key)
            if values:
                ax.plot(steps, values, label=label, linewidth=1.2, color=color)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def final_metrics(run_dir: str | Path) -> dict:
    finals = [r for r in read_metrics(run_dir) if r.get("final")]
    return finals[-1] if finals else {}


def _fmt(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def comparison_table(results: dict[str, list[dict]]) -> str:
    """Markdown table: method -> held-out accuracy (all / hard / easy, %) and mean response length, mean ± std
    over seeds."""
    lines = ["| method | seeds | acc (%) | acc hard (%) | acc easy (%) | length (tokens) | length hard |",
             "|---|---|---|---|---|---|---|"]
    for method, finals in results.items():
        col = lambda k: [f.get(k) for f in finals]  # noqa: E731
        lines.append(f"| {method} | {len(finals)} | {_fmt(col('eval/accuracy'), 100)} | "
                     f"{_fmt(col('eval/accuracy_hard'), 100)} | {_fmt(col('eval/accuracy_easy'), 100)} | "
                     f"{_fmt(col('eval/mean_length'))} | {_fmt(col('eval/mean_length_hard'))} |")
    return "\n".join(lines) + "\n"
