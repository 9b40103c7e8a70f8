"""Overlong reward shaping (DAPO, "soft overlong punishment"), as the RED authors' released code adds it.

A response of L tokens under a generation limit L_max, with a buffer of B tokens before the limit, gets
    0                                   if L <= L_max - B
    -penalty * (L - (L_max - B)) / B    if L_max - B < L <= L_max      (linear, -penalty at the limit)
    -penalty                            if L > L_max                   (an offline trace longer than the limit)
on top of the verifier's accuracy reward. The authors use L_max = 8192, B = 2000, penalty 1, on every sample of the
group, the offline trace included; here the trace is shaped only with `rewards.overlong_penalize_trace` (config.py
says why). The shaped reward (accuracy + penalty) feeds the group advantages, and so dynamic sampling's signal rule
(non-zero advantages); every accuracy (rbar of Eq. 8, all-fail tests, evaluation) stays the verifier's.
"""
from __future__ import annotations


def overlong_penalty(num_tokens: int, max_new_tokens: int, buffer: int, penalty: float = 1.0) -> float:
    """The (non-positive) overlong penalty of a sample of `num_tokens` tokens; 0 when `buffer` is 0 (off)."""
    if buffer <= 0:
        return 0.0
    if not 0 < buffer <= max_new_tokens:
        raise ValueError(f"the overlong buffer ({buffer} tokens) must lie within the generation limit "
                         f"({max_new_tokens} tokens)")
    excess = num_tokens - (max_new_tokens - buffer)
    if excess <= 0:
        return 0.0
    return -penalty * min(excess / buffer, 1.0)
