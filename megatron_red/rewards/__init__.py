"""Verifiable rewards: math answer checking (math-verify in worker processes with hard time-outs), a registry, and
DAPO's overlong reward shaping."""
from megatron_red.rewards.math_grader import (
    REASONS,
    Grade,
    GraderPool,
    close_grader,
    configure_grader,
    count_reasons,
    get_grader_pool,
    grade_math,
    grade_math_detailed,
)
from megatron_red.rewards.overlong import overlong_penalty
from megatron_red.rewards.registry import get_reward_fn, register_reward_fn

__all__ = [
    "REASONS",
    "Grade",
    "GraderPool",
    "close_grader",
    "configure_grader",
    "count_reasons",
    "get_grader_pool",
    "get_reward_fn",
    "grade_math",
    "grade_math_detailed",
    "overlong_penalty",
    "register_reward_fn",
]
