"""Reports: the dynamics figure (raw and smoothed per-step series, held-out accuracy over steps), the per-method
figure over seeds (mean and a mean ± std band), the comparison table and the premises check, drawn from metrics
files written by `MetricsLog`; every drawn number is checked against the metrics it came from."""
from __future__ import annotations

import statistics

import numpy as np
import pytest

from megatron_red.trainer.metrics import MetricsLog
from megatron_red.trainer.report import (DYNAMICS, GRPO_HARD_GAIN_MAX, LATENT_GRPO_GAIN_MIN, LATENT_TEACHER_PROB_MIN,
                                         LATENT_WARM_HARD, RED_LENGTH_MAX, RED_OVER_GRPO_MIN, SFT_HARD_MIN,
                                         WARM_HARD_MAX, claim_table, comparison_figure, comparison_table,
                                         dynamics_figure, plot_comparison, plot_runs, premises_table, seed_band,
                                         smooth, smoothing_window)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PANEL = {key: i for i, (key, _) in enumerate(DYNAMICS)}
STEPS = 60


def _write_run(run_dir, seed: int, offline: bool = True, on_policy: bool = True) -> dict:
    """A run's metrics: step-0 evaluation, STEPS per-step records (H_rl only when the method has rollouts, r_off
    only when it has an offline term), evaluations at steps 20 and 40, the final one at STEPS. Returns the values
    written."""
    rng = np.random.default_rng(seed)
    log = MetricsLog(run_dir, tensorboard=False)
    h_rl = (0.5 + 0.1 * rng.standard_normal(STEPS)).tolist()
    r_off = rng.uniform(0.2, 0.8, STEPS).tolist()
    evals = {0: (0.30, 0.05), 20: (0.35, 0.10), 40: (0.40, 0.2), STEPS: (0.5, 0.3 + 0.01 * seed)}
    log.log(0, {"eval/accuracy": evals[0][0], "eval/accuracy_hard": evals[0][1]})
    for step in range(1, STEPS + 1):
        record = {"entropy/H_rl": h_rl[step - 1] if on_policy else float("nan"), "loss/r_off_mean": r_off[step - 1] if offline else float("nan")}
        if step in evals and step != STEPS:
            record.update({"eval/accuracy": evals[step][0], "eval/accuracy_hard": evals[step][1]})
        log.log(step, record)
    log.log(STEPS, {"final": True, "eval/accuracy": evals[STEPS][0], "eval/accuracy_hard": evals[STEPS][1]})
    log.close()
    return {"h_rl": h_rl, "r_off": r_off, "evals": evals}


def _lines(ax):
    return [(list(line.get_xdata()), list(line.get_ydata()), line.get_linestyle()) for line in ax.lines]


def test_smooth_and_window():
    assert smooth([0.0, 3.0, 6.0, 3.0, 0.0], 3) == pytest.approx([1.5, 3.0, 4.0, 3.0, 1.5])
    line = [2.0 * i + 1.0 for i in range(30)]
    assert smooth(line, 7)[3:-3] == pytest.approx(line[3:-3])  # a centred mean keeps a straight line
    assert smooth([4.0] * 5, 5) == [4.0] * 5
    assert smooth([1.0, 2.0], 1) == [1.0, 2.0]
    assert [smoothing_window(n) for n in (1, 19, 40, 60, 600)] == [1, 1, 3, 3, 31]


def test_seed_band_uses_common_steps():
    steps, mean, std = seed_band([([0, 1, 2], [1.0, 2.0, 3.0]), ([1, 2, 3], [3.0, 6.0, 9.0])])
    assert steps == [1, 2]
    assert mean == pytest.approx([2.5, 4.5])
    assert std == pytest.approx([statistics.stdev([2.0, 3.0]), statistics.stdev([3.0, 6.0])])
    assert seed_band([([5], [1.0])]) == ([5], [1.0], [0.0])
    assert seed_band([]) == ([], [], [])


def test_dynamics_figure_draws_the_metrics(tmp_path):
    red = _write_run(tmp_path / "red", seed=0)
    _write_run(tmp_path / "grpo", seed=1, offline=False)
    _write_run(tmp_path / "sft", seed=2, on_policy=False)
    plt, fig, axes = dynamics_figure({"red": tmp_path / "red", "grpo": tmp_path / "grpo", "sft": tmp_path / "sft"})
    try:
        steps = list(range(1, STEPS + 1))
        red_raw, red_smooth = _lines(axes[PANEL["entropy/H_rl"]])[:2]
        assert red_raw[0] == red_smooth[0] == steps
        assert red_raw[1] == pytest.approx(red["h_rl"])
        assert red_smooth[1] == pytest.approx(smooth(red["h_rl"], smoothing_window(STEPS)))
        assert len(axes[PANEL["entropy/H_rl"]].lines) == 4  # red and grpo, raw and smoothed; sft has no H_rl
        # The legend names every run, also sft, which the first panel (H_rl) does not draw.
        assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["red", "grpo", "sft"]
        # GRPO has no offline term: its r_off (NaN, logged as null) draws nothing.
        r_off_lines = _lines(axes[PANEL["loss/r_off_mean"]])
        assert len(r_off_lines) == 4 and r_off_lines[0][1] == pytest.approx(red["r_off"])
        # Held-out accuracy: step 0, the evaluations, the final one; all solid, hard dashed, in %.
        heldout = _lines(axes[-1])
        assert len(heldout) == 6
        (x_all, y_all, style_all), (x_hard, y_hard, style_hard) = heldout[:2]
        assert x_all == x_hard == sorted(red["evals"])
        assert y_all == pytest.approx([100 * red["evals"][s][0] for s in x_all])
        assert y_hard == pytest.approx([100 * red["evals"][s][1] for s in x_all])
        assert (style_all, style_hard) == ("-", "--")
    finally:
        plt.close(fig)
    png = plot_runs({"red": tmp_path / "red"}, tmp_path / "out" / "dynamics.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_comparison_figure_draws_the_seed_mean_and_band(tmp_path):
    seeds = [_write_run(tmp_path / f"red_seed{s}", seed=s) for s in range(3)]
    plt, fig, axes = comparison_figure({"red": [tmp_path / f"red_seed{s}" for s in range(3)]})
    try:
        window = smoothing_window(STEPS)
        per_seed = np.array([smooth(s["h_rl"], window) for s in seeds])
        ax = axes[PANEL["entropy/H_rl"]]
        (x, y, _), = _lines(ax)
        assert x == list(range(1, STEPS + 1))
        assert y == pytest.approx(per_seed.mean(axis=0).tolist())
        assert ax.get_legend_handles_labels()[1] == ["red (3 seeds)"]
        band = ax.collections[0].get_paths()[0].vertices[:, 1]
        std = per_seed.std(axis=0, ddof=1)
        assert band.min() == pytest.approx((per_seed.mean(axis=0) - std).min())
        assert band.max() == pytest.approx((per_seed.mean(axis=0) + std).max())
        hard = [line for line in _lines(axes[-1]) if line[2] == "--"][0]
        finals = [100 * s["evals"][STEPS][1] for s in seeds]
        assert hard[0][-1] == STEPS and hard[1][-1] == pytest.approx(statistics.mean(finals))
    finally:
        plt.close(fig)
    png = plot_comparison({"red": [tmp_path / "red_seed0", tmp_path / "red_seed1"]}, tmp_path / "mean.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


def _eval(acc, hard, easy=0.5, length=20.0, teacher=100.0):
    return {"eval/accuracy": acc, "eval/accuracy_hard": hard, "eval/accuracy_easy": easy, "eval/mean_length": length,
            "eval/mean_length_hard": length + 5, "eval/teacher_length": teacher}


def _verdicts(table: str) -> list[str]:
    return [line.split("|")[-2].strip() for line in table.splitlines()[2:]]


def test_premises_table_verdicts():
    warm = [_eval(0.3, 0.05), _eval(0.3, 0.08), _eval(0.3, WARM_HARD_MAX)]
    grpo = [_eval(0.3, 0.05 + GRPO_HARD_GAIN_MAX - 0.01), _eval(0.3, 0.08), _eval(0.3, 0.11)]
    sft = [_eval(0.6, SFT_HARD_MIN + 0.01, length=81.0), _eval(0.6, 0.5, length=90.0), _eval(0.6, 0.5, length=85.0)]
    table = premises_table("new_skill", warm, {"grpo": grpo, "sft": sft})
    assert _verdicts(table) == ["holds (3/3 seeds)"] * 3
    assert "hard 7.7 ± 2.5%" in table  # (a): mean ± std of 5, 8, 10
    # One seed breaks each premise: too good a start, GRPO learning hard problems, SFT short of the teacher.
    warm[1] = _eval(0.3, 0.12)
    grpo[0] = _eval(0.3, 0.05 + GRPO_HARD_GAIN_MAX + 0.01)
    sft[2] = _eval(0.6, 0.5, length=79.0)
    assert _verdicts(premises_table("new_skill", warm, {"grpo": grpo, "sft": sft})) == ["FAILS (2/3 seeds)"] * 3
    assert _verdicts(premises_table("new_skill", warm, {})) == ["FAILS (2/3 seeds)", "not run", "not run"]


def test_latent_skill_premises_table_verdicts():
    low, high = LATENT_WARM_HARD

    def warm(hard, prob):
        return {**_eval(0.5, hard), "eval/teacher_prob_median_hard": prob}

    initial = [warm(low, LATENT_TEACHER_PROB_MIN), warm(0.2, 0.9), warm(high, 0.5)]
    grpo = [_eval(0.5, low + LATENT_GRPO_GAIN_MIN + 0.001), _eval(0.5, 0.25), _eval(0.5, 0.40)]
    sft = [_eval(0.6, 0.5, length=81.0), _eval(0.6, 0.26, length=90.0), _eval(0.6, 0.6, length=85.0)]
    sft_then_grpo = [_eval(0.7, 0.51), _eval(0.7, 0.3), _eval(0.7, 0.65)]
    finals = {"grpo": grpo, "sft": sft, "sft_then_grpo": sft_then_grpo}
    table = premises_table("latent_skill", initial, finals)
    assert _verdicts(table) == ["holds (3/3 seeds)"] * 4
    assert "teacher's tokens on hard problems 0.567 ± 0.306" in table  # mean ± std of 0.3, 0.9, 0.5
    # One seed breaks each premise: the teacher's tokens unlikely, GRPO short of the gain, SFT below GRPO,
    # SFT->GRPO below SFT.
    initial[1] = warm(0.2, LATENT_TEACHER_PROB_MIN - 0.01)
    grpo[0] = _eval(0.5, low + LATENT_GRPO_GAIN_MIN - 0.001)
    sft[1] = _eval(0.6, 0.24, length=90.0)
    sft_then_grpo[2] = _eval(0.7, 0.6)
    assert _verdicts(premises_table("latent_skill", initial, finals)) == ["FAILS (2/3 seeds)"] * 4
    initial[1] = warm(high + 0.01, 0.9)  # too good a start
    assert _verdicts(premises_table("latent_skill", initial, {}))[0] == "FAILS (2/3 seeds)"
    with pytest.raises(ValueError, match="no premises for regime"):
        premises_table("other", initial, finals)


def test_claim_table_verdicts():
    grpo = [_eval(0.3, 0.05), _eval(0.3, 0.10)]
    sft = [_eval(0.6, 0.40, length=100.0), _eval(0.6, 0.45, length=80.0)]
    red = [_eval(0.5, 0.05 + RED_OVER_GRPO_MIN + 0.30, length=RED_LENGTH_MAX * 100.0 - 1),
           _eval(0.5, 0.46, length=40.0)]
    table = claim_table({"red": red}, grpo, sft)
    assert _verdicts(table) == ["holds (2/2 seeds)"] * 3
    assert "hard - GRPO hard: 38.0 ± 2.8 points" in table  # 45 - 5 and 46 - 10
    assert "length / SFT length: 0.65 ± 0.21" in table  # 79 / 100 and 40 / 80
    # Seed 1 of a second candidate breaks each part: 9 points over GRPO, below SFT's hard accuracy, longer than
    # 0.8 x SFT's length.
    other = [red[0], _eval(0.5, 0.10 + RED_OVER_GRPO_MIN - 0.01, length=RED_LENGTH_MAX * 80.0 + 1)]
    table = claim_table({"red": red, "luffy": other}, grpo, sft)
    assert _verdicts(table) == ["holds (2/2 seeds)"] * 3 + ["FAILS (1/2 seeds)"] * 3
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["red"] * 3 + ["luffy"] * 3
    assert _verdicts(claim_table({"luffy": other}, [], sft)) == ["not run", "FAILS (1/2 seeds)", "FAILS (1/2 seeds)"]


def test_comparison_table_rows():
    table = comparison_table({"red": [_eval(0.5, 0.4), _eval(0.7, 0.6)]}, initial=[_eval(0.3, 0.05)])
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()[2:]]
    assert rows[0] == ["student before training (step 0)", "1", "30.0", "5.0", "50.0", "20.0", "25.0"]
    assert rows[1][:4] == ["red", "2", f"60.0 ± {100 * statistics.stdev([0.5, 0.7]):.1f}",
                           f"50.0 ± {100 * statistics.stdev([0.4, 0.6]):.1f}"]
