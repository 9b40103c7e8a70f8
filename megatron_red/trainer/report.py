"""Reports of finished runs: Figure-6-style dynamics plots, a Table-2-style comparison table, and the premises of
the built-in study.

`plot_runs` draws one line per run (raw per-step values faint, a moving average over them solid);
`plot_comparison` draws one line per method: the mean over its seeds, with mean ± std over seeds as a band.
Both show held-out accuracy (all and hard) at the evaluation steps, step 0 being the student before training.
`comparison_table` reports the final held-out numbers per method. `premises_table` checks the premises a regime of
the built-in task rests on (the paper's setting translated; data/builtin.py, REGIMES):
- `new_skill`: the student before training fails hard problems, GRPO alone does not learn them within the budget,
  SFT on the teacher traces alone does, in the teacher's long form;
- `latent_skill` (the paper's Table 2, where GRPO 31.96 < SFT 35.94 < SFT+GRPO 40.58): the student solves some hard
  problems and finds its teacher's tokens likely, GRPO improves on it, SFT more (at the teacher's length), and
  SFT->GRPO more than SFT.
`claim_table` checks the paper's claim on top of them for each mixed method (Table 2: RED extends beyond GRPO,
matches SFT, at a fraction of its length).
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from megatron_red.trainer.evaluate import IMPROBABLE
from megatron_red.trainer.metrics import read_metrics

# Per-step series: (metric key, panel title). Noisy, so drawn with a moving average over the raw values.
DYNAMICS = (("entropy/H_rl", "H_rl (on-policy entropy)"), ("entropy/H_sft", "H_sft (offline-trace entropy)"),
            ("entropy/w", "w = clip(|dH_sft / dH_rl|, 1, G)"), ("loss/r_off_mean", "r_off (mean, offline tokens)"),
            ("reward/accuracy", "rollout accuracy (verifier)"), ("response/mean_length", "rollout length (tokens)"),
            ("response/truncated", "rollouts truncated (fraction)"))
# Held-out evaluation, logged every `trainer.eval_every` steps, at step 0 and at the end: (key, line style).
HELDOUT = (("eval/accuracy", "-", "all"), ("eval/accuracy_hard", "--", "hard"))
HELDOUT_TITLE = "held-out accuracy (solid: all, dashed: hard)"

# Premise thresholds of the `new_skill` regime (see `premises_table`).
WARM_HARD_MAX = 0.10
"""(a) the student before training solves at most this fraction of hard held-out problems."""
GRPO_HARD_GAIN_MAX = 0.05
"""(b) GRPO's final hard accuracy exceeds the student's before training by at most this much."""
SFT_HARD_MIN = 0.40
"""(c) SFT's final hard accuracy is at least this ..."""
SFT_LENGTH_MIN = 0.8
"""... with responses at least this fraction of the teacher traces' mean length on the same problems
((c') of `latent_skill` too)."""
# Premise thresholds of the `latent_skill` regime.
LATENT_WARM_HARD = (0.10, 0.30)
"""(a') the student before training solves between these fractions of the hard held-out problems ..."""
LATENT_TEACHER_PROB_MIN = 0.3
"""... and gives its teacher's trace tokens on them a median probability of at least this."""
LATENT_GRPO_GAIN_MIN = 0.03
"""(b') GRPO's final hard accuracy exceeds the student's before training by at least this much."""
# The paper's claim translated (see `claim_table`).
RED_OVER_GRPO_MIN = 0.10
"""RED's final hard accuracy exceeds GRPO's by at least this much ..."""
RED_LENGTH_MAX = 0.8
"""... and is at least SFT's, with a mean response length of at most this fraction of SFT's."""


def smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average over `window` points (odd; shrinks at the ends, so every point keeps a value)."""
    half = window // 2
    out = []
    for i in range(len(values)):
        part = values[max(0, i - half): i + half + 1]
        out.append(sum(part) / len(part))
    return out


def smoothing_window(num_points: int) -> int:
    """About a twentieth of the run, odd, at least 1."""
    return max(1, num_points // 20) | 1


def series(records: list[dict], key: str, with_final: bool = False) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over a run's metric records; the final evaluation's record only if asked
    (it repeats the last step)."""
    pts = {}
    for r in records:
        if (with_final or not r.get("final")) and isinstance(r.get(key), (int, float)):
            pts[r["step"]] = float(r[key])
    steps = sorted(pts)
    return steps, [pts[s] for s in steps]


def heldout_series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Held-out accuracy over steps: step 0 (before training), every evaluation, the final one."""
    return series(records, key, with_final=True)


def seed_band(per_seed: list[tuple[list[int], list[float]]]) -> tuple[list[int], list[float], list[float]]:
    """(steps, mean, std) over seeds at the steps every seed has; std is 0 with one seed."""
    if not per_seed:
        return [], [], []
    common = sorted(set.intersection(*(set(steps) for steps, _ in per_seed)))
    lookup = [dict(zip(steps, values)) for steps, values in per_seed]
    means, stds = [], []
    for s in common:
        vals = [d[s] for d in lookup]
        means.append(statistics.mean(vals))
        stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return common, means, stds


def _axes_grid(num_panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = math.ceil(num_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    axes = list(axes.flat)
    for ax in axes[num_panels:]:
        ax.set_visible(False)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return plt, fig, axes[:num_panels], palette


def _legend(axes) -> None:
    """One legend, in the first panel, naming every run drawn in any panel (SFT has no H_rl, the first panel)."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    axes[0].legend(list(entries.values()), list(entries), fontsize=7)


def _finish(plt, fig, axes, out_png) -> Path:
    titles = [title for _, title in DYNAMICS] + [HELDOUT_TITLE]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def dynamics_figure(runs: dict[str, str | Path]):
    """The figure of `plot_runs`, returned open (matplotlib's pyplot module, figure, axes) for saving or checks."""
    plt, fig, axes, palette = _axes_grid(len(DYNAMICS) + 1)
    for i, (label, run_dir) in enumerate(runs.items()):
        records = read_metrics(run_dir)
        color = palette[i % len(palette)]  # one colour per run in every panel, even where a run has no series
        for ax, (key, _) in zip(axes, DYNAMICS):
            steps, values = series(records, key)
            if values:
                ax.plot(steps, values, color=color, linewidth=0.6, alpha=0.3)
                ax.plot(steps, smooth(values, smoothing_window(len(values))), color=color, linewidth=1.4,
                        label=label)
        for key, style, _ in HELDOUT:
            steps, values = heldout_series(records, key)
            if values:
                axes[-1].plot(steps, [100 * v for v in values], style, color=color, marker="o", markersize=3)
    _legend(axes)
    return plt, fig, axes


def plot_runs(runs: dict[str, str | Path], out_png: str | Path) -> Path:
    """Dynamics of one or more runs (label -> run directory): one panel per metric, one colour per run."""
    plt, fig, axes = dynamics_figure(runs)
    return _finish(plt, fig, axes, out_png)


def comparison_figure(runs: dict[str, list[str | Path]]):
    """The figure of `plot_comparison`, returned open (pyplot, figure, axes)."""
    plt, fig, axes, palette = _axes_grid(len(DYNAMICS) + 1)
    for i, (method, run_dirs) in enumerate(runs.items()):
        records = [read_metrics(d) for d in run_dirs]
        color = palette[i % len(palette)]
        label = f"{method} ({len(run_dirs)} seed{'s' if len(run_dirs) > 1 else ''})"
        panels = [(ax, key, True) for ax, (key, _) in zip(axes, DYNAMICS)]
        panels += [(axes[-1], key, False) for key, _, _ in HELDOUT]
        for ax, key, per_step in panels:
            per_seed = []
            for recs in records:
                steps, values = series(recs, key) if per_step else heldout_series(recs, key)
                if values:
                    per_seed.append((steps, smooth(values, smoothing_window(len(values))) if per_step else values))
            steps, mean, std = seed_band(per_seed)
            if not steps:
                continue
            scale = 1.0 if per_step else 100.0
            style = "-" if per_step else dict((k, s) for k, s, _ in HELDOUT)[key]
            ax.plot(steps, [scale * m for m in mean], style, color=color, linewidth=1.4,
                    marker=None if per_step else "o", markersize=3, label=label if per_step else None)
            ax.fill_between(steps, [scale * (m - s) for m, s in zip(mean, std)],
                            [scale * (m + s) for m, s in zip(mean, std)], color=color, alpha=0.2, linewidth=0)
    _legend(axes)
    return plt, fig, axes


def plot_comparison(runs: dict[str, list[str | Path]], out_png: str | Path) -> Path:
    """Per method (-> its run directories, one per seed): mean over seeds, mean ± std over seeds as a band."""
    plt, fig, axes = comparison_figure(runs)
    return _finish(plt, fig, axes, out_png)


def final_metrics(run_dir: str | Path) -> dict:
    finals = [r for r in read_metrics(run_dir) if r.get("final")]
    return finals[-1] if finals else {}


def initial_metrics(run_dir: str | Path) -> dict:
    """The held-out evaluation of the student before training (the record of step 0), or {}."""
    starts = [r for r in read_metrics(run_dir) if r.get("step") == 0 and "eval/accuracy" in r]
    return starts[-1] if starts else {}


def _fmt(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _row(name: str, finals: list[dict]) -> str:
    col = lambda k: [f.get(k) for f in finals]  # noqa: E731
    return (f"| {name} | {len(finals)} | {_fmt(col('eval/accuracy'), 100)} | {_fmt(col('eval/accuracy_hard'), 100)} "
            f"| {_fmt(col('eval/accuracy_easy'), 100)} | {_fmt(col('eval/mean_length'))} "
            f"| {_fmt(col('eval/mean_length_hard'))} |")


TABLE_HEAD = ["| method | seeds | acc (%) | acc hard (%) | acc easy (%) | length (tokens) | length hard |",
              "|---|---|---|---|---|---|---|"]


def comparison_table(results: dict[str, list[dict]], initial: list[dict] | None = None) -> str:
    """Markdown table: method -> held-out accuracy (all / hard / easy, %) and mean response length, mean ± std
    over seeds; first, when given, the student before training (one record per seed)."""
    lines = list(TABLE_HEAD)
    if initial:
        lines.append(_row("student before training (step 0)", initial))
    lines += [_row(method, finals) for method, finals in results.items()]
    return "\n".join(lines) + "\n"


def _verdict(checks: list[bool]) -> str:
    """A premise or claim over seeds: it holds when it holds for every seed; "not run" without any seed."""
    if not checks:
        return "not run"
    return f"{'holds' if all(checks) else 'FAILS'} ({sum(checks)}/{len(checks)} seeds)"


def _hard(records: list[dict]) -> list[float]:
    return [r.get("eval/accuracy_hard", math.nan) for r in records]


def _measured(records: list[dict]) -> str:
    """hard x% (all y%, n tokens) over seeds."""
    return (f"hard {_fmt(_hard(records), 100)}% (all {_fmt([r.get('eval/accuracy') for r in records], 100)}%, "
            f"{_fmt([r.get('eval/mean_length') for r in records])} tokens)")


def premises_table(regime: str, initial: list[dict], finals: dict[str, list[dict]]) -> str:
    """The premises of the built-in task's `regime` over seeds: `initial` is the student before training per seed,
    `finals` the final evaluations per method (aligned by seed; a method not run is missing or empty)."""
    if regime == "latent_skill":
        return latent_premises_table(initial, finals.get("grpo", []), finals.get("sft", []),
                                     finals.get("sft_then_grpo", []))
    if regime == "new_skill":
        return new_skill_premises_table(initial, finals.get("grpo", []), finals.get("sft", []))
    raise ValueError(f"no premises for regime {regime!r}; valid: new_skill, latent_skill")


def _long_form(sft: dict) -> bool:
    return sft.get("eval/mean_length", 0.0) >= SFT_LENGTH_MIN * sft.get("eval/teacher_length", math.inf)


def new_skill_premises_table(initial: list[dict], grpo: list[dict], sft: list[dict]) -> str:
    """The `new_skill` regime's premises over seeds (lists aligned by seed; GRPO's / SFT's may be empty):
    (a) the student before training fails hard problems: hard accuracy <= WARM_HARD_MAX;
    (b) GRPO alone stays near it: final hard accuracy - (a)'s <= GRPO_HARD_GAIN_MAX;
    (c) SFT on the teacher traces alone learns them: final hard accuracy >= SFT_HARD_MIN, at a mean length of at
        least SFT_LENGTH_MIN x the teacher's on the same problems.
    A premise holds when it holds for every seed."""
    a = [h <= WARM_HARD_MAX for h in _hard(initial)]
    b = [g - w <= GRPO_HARD_GAIN_MAX for g, w in zip(_hard(grpo), _hard(initial))]
    c = [r.get("eval/accuracy_hard", 0.0) >= SFT_HARD_MIN and _long_form(r) for r in sft]
    teacher = [r.get("eval/teacher_length") for r in initial]
    prob = [r.get("eval/teacher_prob_median_hard") for r in initial]
    improbable = [r.get("eval/teacher_improbable_fraction_hard") for r in initial]
    lines = ["| premise | measured | condition | verdict |", "|---|---|---|---|",
             f"| (a) student before training fails hard problems | {_measured(initial)}, easy "
             f"{_fmt([r.get('eval/accuracy_easy') for r in initial], 100)}%; median probability of the teacher's "
             f"tokens on hard problems {_fmt(prob, digits=3)}, {_fmt(improbable, 100)}% of them below "
             f"{IMPROBABLE:g} | hard <= {100 * WARM_HARD_MAX:.0f}% | {_verdict(a)} |",
             f"| (b) GRPO alone stays near (a) | {_measured(grpo)} | hard - (a) <= {100 * GRPO_HARD_GAIN_MAX:.0f} "
             f"points | {_verdict(b)} |",
             f"| (c) SFT alone learns the teacher's skill, in its long form | {_measured(sft)}; teacher "
             f"{_fmt(teacher)} tokens | hard >= {100 * SFT_HARD_MIN:.0f}%, length >= {SFT_LENGTH_MIN:g} x teacher's "
             f"| {_verdict(c)} |"]
    return "\n".join(lines) + "\n"


def latent_premises_table(initial: list[dict], grpo: list[dict], sft: list[dict], sft_then_grpo: list[dict]) -> str:
    """The `latent_skill` regime's premises over seeds (lists aligned by seed; a method's may be empty), the
    paper's Table 2 translated:
    (a') the student before training solves some hard problems (hard accuracy within LATENT_WARM_HARD) and finds
         its teacher's tokens on them likely (median probability >= LATENT_TEACHER_PROB_MIN);
    (b') GRPO improves on it: final hard accuracy - (a')'s >= LATENT_GRPO_GAIN_MIN;
    (c') SFT improves more: final hard accuracy > GRPO's, at a mean length of at least SFT_LENGTH_MIN x the
         teacher's;
    (d') SFT->GRPO improves on SFT: final hard accuracy > SFT's.
    A premise holds when it holds for every seed."""
    low, high = LATENT_WARM_HARD
    prob = [r.get("eval/teacher_prob_median_hard", math.nan) for r in initial]
    improbable = [r.get("eval/teacher_improbable_fraction_hard") for r in initial]
    a = [low <= h <= high and p >= LATENT_TEACHER_PROB_MIN for h, p in zip(_hard(initial), prob)]
    b = [g - w >= LATENT_GRPO_GAIN_MIN for g, w in zip(_hard(grpo), _hard(initial))]
    c = [s.get("eval/accuracy_hard", 0.0) > g and _long_form(s) for s, g in zip(sft, _hard(grpo))]
    d = [m > s for m, s in zip(_hard(sft_then_grpo), _hard(sft))]
    teacher = [r.get("eval/teacher_length") for r in initial]
    lines = ["| premise | measured | condition | verdict |", "|---|---|---|---|",
             f"| (a') student before training solves some hard problems, its teacher's tokens likely "
             f"| {_measured(initial)}; median probability of the teacher's tokens on hard problems "
             f"{_fmt(prob, digits=3)}, {_fmt(improbable, 100)}% of them below {IMPROBABLE:g} "
             f"| {100 * low:.0f}% <= hard <= {100 * high:.0f}%, median >= "
             f"{LATENT_TEACHER_PROB_MIN:g} | {_verdict(a)} |",
             f"| (b') GRPO improves on (a') | {_measured(grpo)} | hard - (a') >= {100 * LATENT_GRPO_GAIN_MIN:.0f} "
             f"points | {_verdict(b)} |",
             f"| (c') SFT improves more, in the teacher's form | {_measured(sft)}; teacher {_fmt(teacher)} tokens "
             f"| hard > (b')'s, length >= {SFT_LENGTH_MIN:g} x teacher's | {_verdict(c)} |",
             f"| (d') SFT->GRPO improves on SFT | {_measured(sft_then_grpo)} | hard > (c')'s | {_verdict(d)} |"]
    return "\n".join(lines) + "\n"


CLAIM_BASELINES = ("grpo", "sft")
"""Methods the claim compares with; every other method of a comparison is a candidate."""


def claim_table(candidates: dict[str, list[dict]], grpo: list[dict], sft: list[dict]) -> str:
    """The paper's claim (Table 2: RED 41.6 vs GRPO 32.0 and SFT 35.9, at ~45% of SFT's length) translated to the
    final held-out numbers, per candidate method and seed (lists aligned by seed): its hard accuracy >= GRPO's +
    RED_OVER_GRPO_MIN, its hard accuracy >= SFT's, its mean length <= RED_LENGTH_MAX x SFT's. A part holds when it
    holds for every seed; "not run" where a method is missing."""
    def key(records: list[dict], k: str) -> list[float]:
        return [r.get(k, math.nan) for r in records]

    hard, length = "eval/accuracy_hard", "eval/mean_length"
    lines = ["| method | claim | measured | condition | verdict |", "|---|---|---|---|---|"]
    for name, finals in candidates.items():
        gain = [r - g for r, g in zip(key(finals, hard), key(grpo, hard))]
        lead = [r - s for r, s in zip(key(finals, hard), key(sft, hard))]
        ratio = [r / s for r, s in zip(key(finals, length), key(sft, length))]
        lines += [f"| {name} | extends beyond GRPO | hard - GRPO hard: {_fmt(gain, 100)} points "
                  f"| >= {100 * RED_OVER_GRPO_MIN:.0f} points | {_verdict([d >= RED_OVER_GRPO_MIN for d in gain])} |",
                  f"| {name} | matches SFT's skill | hard - SFT hard: {_fmt(lead, 100)} points | >= 0 "
                  f"| {_verdict([d >= 0 for d in lead])} |",
                  f"| {name} | shorter than SFT | length / SFT length: {_fmt(ratio, digits=2)} "
                  f"| <= {RED_LENGTH_MAX:g} | {_verdict([q <= RED_LENGTH_MAX for q in ratio])} |"]
    return "\n".join(lines) + "\n"
