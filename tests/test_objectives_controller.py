"""EntropyRatioController (Eq. 9-11) against the formula written out here, its edge rules and exact resume."""
import copy
import json
import math

import pytest
import torch

from megatron_red.objectives import EntropyRatioController


def _reference_weights(h_rl, h_sft, g):
    """w_t = clip(|dH_sft / dH_rl|, 1, G), dH = |1 - H_t / H_{t-1}|, w_0 = 1 (entropies > 0, dH_rl != 0)."""
    out = [1.0]
    for t in range(1, len(h_rl)):
        d_rl = abs(1 - h_rl[t] / h_rl[t - 1])
        d_sft = abs(1 - h_sft[t] / h_sft[t - 1])
        out.append(min(max(d_sft / d_rl, 1.0), g))
    return out


def test_weights_follow_eq_9_to_11():
    h_rl = [0.80, 0.70, 0.69, 0.75, 0.40, 0.41]
    h_sft = [0.50, 0.52, 0.45, 0.50, 0.51, 0.30]
    want = _reference_weights(h_rl, h_sft, 7)
    ctrl = EntropyRatioController(group_size=7)
    got = [ctrl.update(a, b) for a, b in zip(h_rl, h_sft)]
    assert got == pytest.approx(want, rel=1e-12)
    assert 1.0 in got[1:] and 7.0 in got and any(1.0 < w < 7.0 for w in got)  # both clips and the interior
    assert ctrl.last_delta_rl == pytest.approx(abs(1 - 0.41 / 0.40))
    assert ctrl.last_delta_sft == pytest.approx(abs(1 - 0.30 / 0.51))
    assert ctrl.last_weight == got[-1]


def test_tensor_inputs_are_accepted():
    ctrl = EntropyRatioController(4)
    assert ctrl.update(torch.tensor(0.5), torch.tensor(0.5)) == 1.0
    assert ctrl.update(torch.tensor(0.4), torch.tensor(0.3)) == pytest.approx(2.0)


def test_zero_rl_change_gives_group_size_or_one():
    ctrl = EntropyRatioController(7)
    ctrl.update(0.5, 0.5)
    assert ctrl.update(0.5, 0.4) == 7.0  # dH_rl = 0, dH_sft > 0
    assert ctrl.update(0.5, 0.4) == 1.0  # both unchanged


def test_zero_previous_entropy_rules():
    ctrl = EntropyRatioController(5)
    ctrl.update(0.0, 0.2)
    assert ctrl.update(0.3, 0.1) == 1.0  # dH_rl = inf: RL moved
    assert ctrl.last_delta_rl == math.inf
    ctrl = EntropyRatioController(5)
    ctrl.update(0.3, 0.0)
    assert ctrl.update(0.2, 0.1) == 5.0  # dH_sft = inf, dH_rl finite
    ctrl = EntropyRatioController(5)
    ctrl.update(0.0, 0.0)
    assert ctrl.update(0.0, 0.0) == 1.0  # nothing moved


def test_non_finite_entropy_is_skipped_and_negative_rejected():
    ctrl = EntropyRatioController(7)
    assert ctrl.update(float("nan"), 0.5) == 1.0  # before any valid step
    assert ctrl.update(0.5, 0.5) == 1.0  # still the first valid step
    w = ctrl.update(0.45, 0.40)
    assert ctrl.update(float("inf"), 0.3) == w
    # The skipped step did not move H_{t-1}: the next update is relative to (0.45, 0.40).
    assert ctrl.update(0.44, 0.41) == pytest.approx(min(max(abs(1 - 0.41 / 0.40) / abs(1 - 0.44 / 0.45), 1), 7))
    with pytest.raises(ValueError, match=">= 0"):
        ctrl.update(-0.1, 0.3)
    with pytest.raises(ValueError, match="group_size"):
        EntropyRatioController(0)


def test_resume_continues_exactly():
    h = [(0.8, 0.5), (0.7, 0.52), (0.69, 0.45), (0.75, 0.46), (0.4, 0.47), (0.41, 0.3)]
    full = EntropyRatioController(7)
    want = [full.update(*x) for x in h]
    first = EntropyRatioController(7)
    got = [first.update(*x) for x in h[:3]]
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as plain data
    resumed = EntropyRatioController(7)
    resumed.load_state_dict(copy.deepcopy(state))
    assert (resumed.last_weight, resumed.last_delta_rl, resumed.last_delta_sft) == (
        first.last_weight, first.last_delta_rl, first.last_delta_sft)
    got += [resumed.update(*x) for x in h[3:]]
    assert got == want
    with pytest.raises(ValueError, match="group_size"):
        EntropyRatioController(3).load_state_dict(state)
