"""Dynamic entropy regulation: the weight w of the offline term from the entropy changes of RL and SFT (Eq. 9-11).

Each step the trainer measures H_rl (mean token entropy of the on-policy samples) and H_sft (of the offline
traces) and calls `update`; the returned w multiplies the offline term of the loss (Eq. 10). When RL entropy
barely moves, RL has little room to explore and w grows so the offline traces widen it; when it moves a lot,
w falls back to 1.
"""
from __future__ import annotations

import math


class EntropyRatioController:
    """w_t = clip(|dH_sft / dH_rl|, 1, G) with dH = |1 - H_t / H_{t-1}| (Eq. 9, 11); w = 1 on the first step.

    group_size: G, the number of on-policy samples per prompt (the upper clip).

    Edge rules (none of them yields inf or NaN):
      - dH_rl = 0: w = G if dH_sft > 0 else 1 (the authors' code turns the resulting inf into G).
      - H_{t-1} = 0: the relative change is unbounded, so dH = inf if H_t > 0 and 0 if H_t = 0. An infinite
        dH_rl means RL entropy moved, so w = 1; an infinite dH_sft with a finite, nonzero dH_rl gives w = G.
      - A non-finite H_rl or H_sft (a failed measurement) leaves the state untouched and returns the previous w
        (1.0 before any valid step); a negative entropy is a ValueError.
    After each valid update `last_delta_rl`, `last_delta_sft` and `last_weight` hold the step's values for logging.
    """

    def __init__(self, group_size: int):
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1 (the number of on-policy samples per prompt), got {group_size}")
        self.group_size = int(group_size)
        self.prev_h_rl: float | None = None
        self.prev_h_sft: float | None = None
        self.last_delta_rl = 0.0
        self.last_delta_sft = 0.0
        self.last_weight = 1.0

    @staticmethod
    def _relative_change(h: float, h_prev: float) -> float:
        if h_prev == 0.0:
            return math.inf if h > 0.0 else 0.0
        return abs(1.0 - h / h_prev)

    def _weight(self, delta_rl: float, delta_sft: float) -> float:
        if delta_rl == 0.0:
            return float(self.group_size) if delta_sft > 0.0 else 1.0
        if math.isinf(delta_rl):
            return 1.0
        return min(max(delta_sft / delta_rl, 1.0), float(self.group_size))

    def update(self, h_rl: float, h_sft: float) -> float:
        """Record this step's entropies (floats or 0-dim tensors) and return its weight w."""
        h_rl, h_sft = float(h_rl), float(h_sft)
        if not (math.isfinite(h_rl) and math.isfinite(h_sft)):
            return self.last_weight
        if h_rl < 0.0 or h_sft < 0.0:
            raise ValueError(f"entropies must be >= 0, got h_rl={h_rl}, h_sft={h_sft}")
        if self.prev_h_rl is None:
            weight, delta_rl, delta_sft = 1.0, 0.0, 0.0
        else:
            delta_rl = self._relative_change(h_rl, self.prev_h_rl)
            delta_sft = self._relative_change(h_sft, self.prev_h_sft)
            weight = self._weight(delta_rl, delta_sft)
        self.prev_h_rl, self.prev_h_sft = h_rl, h_sft
        self.last_delta_rl, self.last_delta_sft, self.last_weight = delta_rl, delta_sft, weight
        return weight

    def state_dict(self) -> dict:
        return {
            "group_size": self.group_size,
            "prev_h_rl": self.prev_h_rl,
            "prev_h_sft": self.prev_h_sft,
            "last_delta_rl": self.last_delta_rl,
            "last_delta_sft": self.last_delta_sft,
            "last_weight": self.last_weight,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["group_size"] != self.group_size:
            raise ValueError(f"checkpoint has group_size {state['group_size']}, this controller {self.group_size}")
        self.prev_h_rl = state["prev_h_rl"]
        self.prev_h_sft = state["prev_h_sft"]
        self.last_delta_rl = state["last_delta_rl"]
        self.last_delta_sft = state["last_delta_sft"]
        self.last_weight = state["last_weight"]
