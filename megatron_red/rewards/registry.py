"""Reward functions by name, for the trainer: each maps (responses, golds) to one float per response."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from megatron_red.rewards.math_grader import grade_math

RewardFn = Callable[[Sequence[str], Sequence], list[float]]

_REWARD_FNS: dict[str, RewardFn] = {"math": grade_math}


def register_reward_fn(name: str, fn: RewardFn) -> None:
    """Makes `fn` available as `get_reward_fn(name)`; an existing name is an error, not a silent override."""
    if name in _REWARD_FNS:
        raise ValueError(f"reward function {name!r} is already registered")
    _REWARD_FNS[name] = fn


def get_reward_fn(name: str) -> RewardFn:
    """The reward function registered as `name` ("math": math-verify answer checking)."""
    try:
        return _REWARD_FNS[name]
    except KeyError:
        raise ValueError(f"unknown reward function {name!r}; known: {sorted(_REWARD_FNS)}") from None
