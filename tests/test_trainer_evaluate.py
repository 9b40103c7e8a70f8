"""Held-out evaluation (`evaluate_heldout`): avg@n accuracy over all, hard, easy and each difficulty, response and
teacher lengths, against values counted by hand from a scripted actor and verifier (nothing else is faked: the
function only needs the actor hooks and a grading function)."""
from __future__ import annotations

import pytest

from megatron_red.data.openr1 import RedExample
from megatron_red.rollout.base import Completion
from megatron_red.trainer.evaluate import evaluate_heldout


class ScriptedActor:
    """The policy's actor hooks; problem i's (prompt [i]) j-th sample has i + j + 1 tokens."""

    def prepare_for_inference(self):
        pass

    def finish_inference(self):
        pass

    def infer(self, prompts, n, params):
        return [[Completion([7] * (i + j + 1), [0.0] * (i + j + 1), True, [0.0] * (i + j + 1)) for j in range(n)]
                for [i] in prompts]


def test_accuracy_by_split_and_difficulty():
    difficulties = [1, 2, 4, 4, 5, 6]
    examples = [RedExample(uid=str(i), prompt_ids=[i], trace_ids=[3] * (10 + i), answer="0", difficulty=d,
                           prompt_text="", trace_text="")
                for i, d in enumerate(difficulties)]
    # The verifier accepts an even length.
    out = evaluate_heldout(ScriptedActor(), examples, lambda ids, answers: [float(len(t) % 2 == 0) for t in ids],
                           n=3, temperature=0.6, max_new_tokens=16, seed=0, hard_min_difficulty=4)
    # Problem i's samples have lengths i+1, i+2, i+3: two of three even for odd i, one of three for even i.
    per_problem = [1 / 3, 2 / 3, 1 / 3, 2 / 3, 1 / 3, 2 / 3]
    assert out["eval/accuracy"] == pytest.approx(sum(per_problem) / 6)
    assert out["eval/accuracy_easy"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert out["eval/accuracy_hard"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 3 + 2 / 3) / 4)
    assert {k: v for k, v in out.items() if k.startswith("eval/accuracy_d")} == pytest.approx(
        {"eval/accuracy_d1": 1 / 3, "eval/accuracy_d2": 2 / 3, "eval/accuracy_d4": 0.5, "eval/accuracy_d5": 1 / 3,
         "eval/accuracy_d6": 2 / 3})
    assert out["eval/mean_length"] == pytest.approx(sum(i + 2 for i in range(6)) / 6)  # mean of i+1..i+3 is i+2
    assert out["eval/mean_length_hard"] == pytest.approx((4 + 5 + 6 + 7) / 4)
    assert out["eval/teacher_length"] == pytest.approx(sum(10 + i for i in range(6)) / 6)
    assert out["eval/problems"] == 6
