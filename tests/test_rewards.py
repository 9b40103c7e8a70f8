"""Math reward: answer extraction, math-verify grading in worker processes, time-outs, crashes, pool reuse.

The expected grades are the mathematical truth of each pair (written down by hand), not math-verify's output.
"""
import math
import os
import re
import signal
import time

import pytest

from megatron_red.rewards import (
    REASONS,
    GraderPool,
    configure_grader,
    count_reasons,
    get_grader_pool,
    get_reward_fn,
    grade_math,
    grade_math_detailed,
    register_reward_fn,
)
from megatron_red.rewards.extraction import answer_text, last_boxed
from megatron_red.rewards.grader_worker import CRASH_TEXT_ENV
from shared_files import EVAL_DATA, needs_shared

POWER_TOWER = "\\boxed{9^{9^{9^{9}}}}"


@pytest.fixture(scope="module", autouse=True)
def two_workers():
    configure_grader(2)  # tests share two cores
    yield
    configure_grader(2)


# (response, gold, expected reason)
CASES = [
    ("The answer is \\boxed{142}.", "142.0", "correct"),
    ("So we get $\\boxed{\\frac12}$", "0.5", "correct"),
    ("\\boxed{336}", "336^\\circ", "correct"),
    ("Hence \\boxed{x=2}.", "2", "correct"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", "correct"),
    ("\\boxed{p-q}", "p - q", "correct"),
    ("no boxes, but the final answer is $7$", "7", "correct"),
    ("\\boxed{143}", "142.0", "wrong"),
    ("\\boxed{4.6667}", "\\frac{14}{3}", "wrong"),  # float_rounding: 4 decimals do not equal 14/3
    ("\\boxed{3}", "336^\\circ", "wrong"),
    ("\\boxed{q-p}", "p - q", "wrong"),
    # Only the last box counts: several boxes would otherwise become a set {2, 3}.
    ("first \\boxed{2}, then corrected: \\boxed{3}", "3", "correct"),
    ("first \\boxed{3}, then corrected: \\boxed{2}", "3", "wrong"),
    # Text after </think> is the answer; a box inside the thought is not.
    ("<think>maybe \\boxed{5}</think> The answer is \\boxed{6}", "6", "correct"),
    ("<think>maybe \\boxed{6}</think> The answer is \\boxed{5}", "6", "wrong"),
    ("<think>it is \\boxed{6}</think>", "6", "no_answer"),
    ("", "6", "no_answer"),
    ("   \n", "6", "no_answer"),
    ("I do not know.", "6", "no_answer"),
    ("\\boxed{}", "6", "no_answer"),
    ("}{)(\\frac{{{ %%% \\boxed{", "6", "no_answer"),
    (b"\xff\xfe\\boxed{6}", "6", "invalid_text"),  # not UTF-8
    ("\\boxed{6}\x00", "6", "invalid_text"),
    ("\\boxed{6}\ud800", "6", "invalid_text"),  # lone surrogate
    (b"\\boxed{6}", "6", "correct"),  # valid UTF-8 bytes are text
    ("\\boxed{E_{1},E_{2}}", "E_{1},E_{2}", "unparsable_gold"),  # never 1 for a gold math-verify cannot read
    ("\\boxed{1}", "", "unparsable_gold"),
    # Python-style scientific golds (as Minerva copies write them) are numbers, not expressions in Euler's e.
    ("\\boxed{6 \\times 10^{13}}", "6e13", "correct"),
    ("\\boxed{2.55 \\times 10^{-10}}", "2.55e-10", "correct"),
    ("\\boxed{4.5 \\times 10^{33}}", "4.5e33", "correct"),
    ("\\boxed{-3.2 \\cdot 10^{5}}", "-3.2E+05", "correct"),
    ("\\boxed{60000000000000}", "6e13", "correct"),
    ("The answer is $6 \\times 10^{13}$.", "6e13", "correct"),
    ("\\boxed{6e13}", "6e13", "correct"),
    ("\\boxed{6e13}", "6 \\times 10^{13}", "correct"),  # the same form in a prediction is the same number
    ("\\boxed{6 \\times 10^{12}}", "6e13", "wrong"),
    ("\\boxed{2.56 \\times 10^{-10}}", "2.55e-10", "wrong"),
    ("\\boxed{6}", "6e13", "wrong"),
    ("\\boxed{78e}", "6e13", "wrong"),  # 6 * e * 13, the reading math-verify gives the bare gold
    # Golds that merely contain an e are untouched.
    ("\\boxed{2e}", "2e", "correct"),
    ("\\boxed{e^{2}}", "e^2", "correct"),
    ("\\boxed{20}", "2e", "wrong"),
    ("\\boxed{2e + 1}", "2e + 1", "correct"),
    ("\\boxed{3}", "2e + 1", "wrong"),
]


def test_grading_cases():
    responses = [c[0] for c in CASES]
    golds = [c[1] for c in CASES]
    grades = grade_math_detailed(responses, golds, timeout_s=5.0)
    got = [g.reason for g in grades]
    expected = [c[2] for c in CASES]
    mismatches = [(c[0], c[1], e, g) for c, e, g in zip(CASES, expected, got) if e != g]
    assert not mismatches, mismatches
    assert [g.score for g in grades] == [1.0 if e == "correct" else 0.0 for e in expected]
    assert grade_math(responses, golds) == [g.score for g in grades]
    counts = count_reasons(grades)
    assert set(counts) <= set(REASONS)
    assert counts["correct"] == expected.count("correct")


def test_accepted_alternatives():
    # Minerva idx 10 accepts 0.01 and 0.02; idx 17 accepts 6630.65 and 6630.
    responses = ["\\boxed{0.02}", "\\boxed{0.02}", "\\boxed{6630}", "\\boxed{6631}"]
    golds = [["0.01", "0.02"], "0.01", ("6630.65", "6630"), ["6630.65", "6630"]]
    assert grade_math(responses, golds) == [1.0, 0.0, 1.0, 0.0]


@needs_shared
def test_python_style_minerva_golds_accept_the_same_number_in_latex():
    """LUFFY's copy of Minerva writes golds as Python floats (`4.5e33`), deepscaler's copy of the same problems mostly
    as LaTeX (`4.5 \\times 10^{33}`). The LaTeX gold, answered as a prediction, must be graded correct against the
    Python-style gold exactly when the two are the same number (compared here as Python floats)."""
    from megatron_red.eval import BENCHMARKS, load_benchmark, load_problems

    latex_gold = {p.problem: p.golds[0] for p in load_benchmark(BENCHMARKS["minerva"], str(EVAL_DATA))}
    python_style = re.compile(r"[0-9.]+e-?[0-9]+")
    latex_number = re.compile(r"(-?[0-9.]+)\s*(?:\\times\s*10\^\{?(-?[0-9]+)\}?)?")
    pairs = []  # (LaTeX prediction, Python-style gold, same number)
    for problem in load_problems(str(EVAL_DATA / "luffy_valid.all.parquet"), "minerva"):
        gold, latex = problem.golds[0], latex_gold[problem.problem]
        number = latex_number.fullmatch(latex)
        if python_style.fullmatch(gold) and number:
            value = float(number[1]) * 10.0 ** int(number[2] or 0)
            pairs.append((latex, gold, math.isclose(value, float(gold), rel_tol=1e-12)))
    # 49 such pairs; in 3 the two copies disagree (e.g. 2.45e6 against 7.353 \times 10^{14}).
    assert (len(pairs), sum(same for *_, same in pairs)) == (49, 46)
    grades = grade_math([f"\\boxed{{{latex}}}" for latex, _, _ in pairs], [gold for _, gold, _ in pairs])
    assert [(latex, gold) for (latex, gold, same), g in zip(pairs, grades) if g != same] == []


def test_extraction_helpers():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1} and a truncated \\boxed{2") == "1"
    assert last_boxed("\\boxed 7 apples") == "7"
    assert last_boxed("nothing") is None
    assert answer_text("<think>x</think>\\boxed{1}\\boxed{2}") == "\\boxed{2}"


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        grade_math(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="non-empty list"):
        grade_math(["a"], [[]])
    with pytest.raises(ValueError, match="str or bytes"):
        grade_math([None], ["1"])
    assert grade_math([], []) == []


def test_pathological_answer_times_out_within_budget():
    timeout_s, slack_s = 1.0, 1.5
    grade_math(["\\boxed{1}"], ["1"])  # workers up, so start-up is not timed
    start = time.monotonic()
    grades = grade_math_detailed([POWER_TOWER, "\\boxed{2}"], ["2", "2"], timeout_s=timeout_s)
    elapsed = time.monotonic() - start
    assert grades[0].score == 0.0 and grades[0].reason == "timeout"
    assert grades[1].reason == "correct"
    assert elapsed < timeout_s + slack_s, elapsed


def test_pool_is_reused_across_calls():
    pool = get_grader_pool()
    grade_math(["\\boxed{1}"], ["1"])
    pids = pool.worker_pids()
    restarts = pool.restarts
    assert len(pids) == 2
    assert grade_math(["\\boxed{1}", "\\boxed{2}", "\\boxed{3}"], ["1", "2", "4"]) == [1.0, 1.0, 0.0]
    assert get_grader_pool() is pool and pool.worker_pids() == pids and pool.restarts == restarts


def test_worker_crash_costs_only_that_item(monkeypatch):
    crash = "please crash the grading worker"
    monkeypatch.setenv(CRASH_TEXT_ENV, crash)  # read by workers at start-up
    pool = GraderPool(2)
    try:
        responses = ["\\boxed{1}", crash, "\\boxed{2}", crash, "\\boxed{5}"]
        grades = grade_math_detailed(responses, ["1", "1", "2", "1", "4"], pool=pool)
        assert [g.reason for g in grades] == ["correct", "worker_crash", "correct", "worker_crash", "wrong"]
        assert pool.restarts == 2
        assert grade_math(["\\boxed{3}"], ["3"], pool=pool) == [1.0]
    finally:
        pool.close()


def test_unresponsive_worker_is_killed_and_replaced():
    # A stopped process ignores the worker's own timer, as a worker stuck inside C code would: the parent's
    # hard deadline must kill and replace it.
    pool = GraderPool(1)
    try:
        assert grade_math(["\\boxed{1}"], ["1"], pool=pool) == [1.0]
        (pid,) = pool.worker_pids()
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        grades = grade_math_detailed(["\\boxed{1}"], ["1"], timeout_s=1.0, pool=pool)
        assert grades[0].reason == "timeout" and time.monotonic() - start < 2.5
        assert pool.restarts == 1 and pool.worker_pids() != [pid]
        assert grade_math(["\\boxed{1}"], ["1"], pool=pool) == [1.0]
    finally:
        pool.close()


def test_reward_registry():
    assert get_reward_fn("math") is grade_math
    with pytest.raises(ValueError, match="unknown reward function"):
        get_reward_fn("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_reward_fn("math", grade_math)


def test_worker_killed_while_idle_is_replaced_without_losing_an_item():
    pool = GraderPool(1)
    try:
        assert grade_math(["\\boxed{1}"], ["1"], pool=pool) == [1.0]
        (pid,) = pool.worker_pids()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pool._workers[0].process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # wait until the kill has landed
        assert [g.reason for g in grade_math_detailed(["\\boxed{2}"], ["2"], pool=pool)] == ["correct"]
        assert pool.restarts == 1
    finally:
        pool.close()
