"""group_advantages, accuracy_aware_pi_offline and offline_ratio against float64 loops and hand-derived gradients."""
import math

import pytest
import torch

from megatron_red.objectives import accuracy_aware_pi_offline, group_advantages, offline_ratio


def _reference_advantages(rows, std_normalize, eps):
    out = []
    for row in rows:
        n = len(row)
        mean = sum(row) / n
        if all(r == row[0] for r in row):
            out.append([0.0] * n)
            continue
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / (n - 1))
        out.append([(r - mean) / (std + eps) if std_normalize else r - mean for r in row])
    return out


@pytest.mark.parametrize("std_normalize", [True, False])
def test_group_advantages_match_float64_loop(std_normalize):
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(5, 8, generator=g, dtype=torch.float64)
    rewards[1] = 1.0  # all correct
    rewards[2] = 0.0  # all wrong
    rewards[3] = (torch.rand(8, generator=g) > 0.5).double()
    rewards[3, 0], rewards[3, 1] = 1.0, 0.0  # a binary group with both outcomes
    got = group_advantages(rewards, std_normalize=std_normalize, eps=1e-6)
    want = torch.tensor(_reference_advantages(rewards.tolist(), std_normalize, 1e-6), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[1], torch.zeros(8, dtype=torch.float64))
    assert torch.equal(got[2], torch.zeros(8, dtype=torch.float64))


def test_group_advantages_uniform_groups_are_exact_zeros():
    # 0.1 * 3 / 3 != 0.1 in floating point: the uniform rule must still give exact zeros, not rounding noise.
    rewards = torch.tensor([[0.1, 0.1, 0.1], [0.7, 0.7, 0.7]], dtype=torch.float32)
    out = group_advantages(rewards)
    assert torch.equal(out, torch.zeros_like(out))
    single = group_advantages(torch.tensor([[1.0], [0.0]]))
    assert torch.equal(single, torch.zeros(2, 1))
    assert group_advantages(torch.tensor([[1, 0, 0]])).dtype == torch.float32  # integer rewards are accepted


def test_group_advantages_rejects_flat_rewards():
    with pytest.raises(ValueError, match="num_groups, group_size"):
        group_advantages(torch.ones(8))


def test_accuracy_aware_pi_offline_is_eq8():
    pi = torch.tensor([[0.1, 0.5, 0.9], [0.0, 1.0, 0.3]], dtype=torch.float64)
    rbar = torch.tensor([0.25, 0.0], dtype=torch.float64)
    got = accuracy_aware_pi_offline(pi, rbar)
    for b in range(2):
        for t in range(3):
            p, r = pi[b, t].item(), rbar[b].item()
            assert got[b, t].item() == pytest.approx(p + (1 - p) * r, abs=1e-15)


def _reference_ratio_and_grad(lp, rbar, shift, gamma, detach):
    """r_off and d r_off / d log pi for one token, derived by hand."""
    pi = math.exp(lp)
    if shift == "one":
        return pi, pi
    if shift == "on_policy":
        return 1.0, 1.0
    d = pi + (1 - pi) * rbar if shift == "accuracy_aware" else pi + gamma
    r = pi / d
    if detach:  # r = exp(lp - sg(log d)): d r / d lp = r
        return r, r
    # d/dlp (pi / d) = pi * (d - pi * d'(pi)) / d^2, with d'(pi) = 1 - rbar or 1.
    slope = (1 - rbar) if shift == "accuracy_aware" else 1.0
    return r, pi * (d - pi * slope) / d**2


@pytest.mark.parametrize("shift", ["accuracy_aware", "one", "on_policy", "luffy"])
@pytest.mark.parametrize("detach", [True, False])
def test_offline_ratio_values_and_gradients(shift, detach):
    g = torch.Generator().manual_seed(1)
    lp = torch.log(torch.rand(3, 4, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    rbar = torch.tensor([0.0, 0.375, 1.0], dtype=torch.float64)
    coef = torch.randn(3, 4, generator=g, dtype=torch.float64)
    r = offline_ratio(lp, rbar, shift, luffy_gamma=0.1, detach_pi_offline=detach)
    (grad,) = torch.autograd.grad((r * coef).sum(), lp)
    for b in range(3):
        for t in range(4):
            want_r, want_g = _reference_ratio_and_grad(lp[b, t].item(), rbar[b].item(), shift, 0.1, detach)
            assert r[b, t].item() == pytest.approx(want_r, rel=1e-12)
            assert grad[b, t].item() == pytest.approx(coef[b, t].item() * want_g, rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("shift", ["accuracy_aware", "luffy", "one"])
def test_offline_ratio_undetached_gradient_matches_finite_differences(shift):
    g = torch.Generator().manual_seed(2)
    lp = torch.log(torch.rand(2, 3, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    rbar = torch.tensor([0.2, 0.8], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: offline_ratio(x, rbar, shift, 0.1, False), (lp,))


def test_rbar_to_zero_detach_imitates_and_undetached_vanishes():
    """rbar -> 0: with the detached pi_offline r_off -> 1 and the gradient is grad log pi (imitation of the trace);
    differentiating pi_offline makes r_off a constant 1 and the gradient vanish (the authors' code)."""
    lp = torch.log(torch.tensor([[0.3, 0.6]], dtype=torch.float64)).requires_grad_()
    for rbar_value in (0.0, 1e-9):
        rbar = torch.tensor([rbar_value], dtype=torch.float64)
        (g_detach,) = torch.autograd.grad(offline_ratio(lp, rbar, "accuracy_aware", detach_pi_offline=True).sum(), lp)
        (g_full,) = torch.autograd.grad(offline_ratio(lp, rbar, "accuracy_aware", detach_pi_offline=False).sum(), lp)
        torch.testing.assert_close(g_detach, torch.ones_like(g_detach), rtol=1e-7, atol=0)
        assert g_full.abs().max().item() < 1e-8


def test_offline_ratio_extreme_probabilities_stay_finite():
    # pi underflows to 0 (log pi = -200 in float32) and pi rounds to 1 (log pi = 0): no NaN in value or gradient.
    lp = torch.tensor([[-200.0, 0.0, -1e-9]], dtype=torch.float32)
    for rbar in (0.0, 0.5, 1.0):
        for detach in (True, False):
            for shift in ("accuracy_aware", "luffy", "one", "on_policy"):
                x = lp.clone().requires_grad_()
                r = offline_ratio(x, torch.tensor([rbar]), shift, 0.1, detach)
                (grad,) = torch.autograd.grad(r.sum(), x)
                assert torch.isfinite(r).all() and torch.isfinite(grad).all(), (rbar, detach, shift)
                assert (r <= 1.0 + 1e-6).all()
    with pytest.raises(ValueError, match="accuracy_aware"):
        offline_ratio(lp, torch.tensor([0.5]), "pi")
