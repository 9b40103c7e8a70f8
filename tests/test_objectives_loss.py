"""red_policy_loss and RedLossConfig against a float64 loop over rows and tokens with hand-derived gradients."""
import dataclasses
import math

import pytest
import torch

from megatron_red.objectives import (PRESETS, RedLossConfig, behaviour_mismatch, group_advantages, red_policy_loss,
                                     tis_weights)


def _reference(lp, old, adv, mask, offline, rbar, w, cfg, ent, num_sequences=None, num_tokens=None, behaviour=None):
    """Loss and d loss / d logprobs, token by token, in python floats. With cfg.tis_cap, each on-policy token's
    value and gradient are multiplied by the constant min(exp(old - behaviour), cap)."""
    B, T = len(lp), len(lp[0])
    lengths = [sum(mask[b]) for b in range(B)]
    n_seq = num_sequences if num_sequences is not None else max(sum(1 for n in lengths if n > 0), 1)
    n_tok = num_tokens if num_tokens is not None else max(sum(lengths), 1)
    eps, eps_high = cfg.clip_eps, cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
    J, grad = 0.0, [[0.0] * T for _ in range(B)]
    parts = {"on": 0.0, "off": 0.0, "nll": 0.0}
    for b in range(B):
        for t in range(T):
            if not mask[b][t]:
                continue
            if cfg.normalization == "sequence_mean":
                k = 1.0 / (lengths[b] * n_seq)
            elif cfg.normalization == "token_mean":
                k = 1.0 / n_tok
            else:
                k = 1.0 / (cfg.max_response_length * n_seq)
            x, A, H = lp[b][t], adv[b], ent[b][t]
            pi = math.exp(x)
            if not offline[b]:
                if not cfg.online_rl:
                    continue
                r = math.exp(x - old[b][t])
                c = cfg.srft_positive_coef * math.exp(H) if (cfg.srft and A > 0) else 1.0
                if cfg.tis_cap is not None:
                    c *= min(math.exp(old[b][t] - behaviour[b][t]), cfg.tis_cap)
                unclipped, clipped = r * A, min(max(r, 1 - eps), 1 + eps_high) * A
                value, dvalue = (unclipped, r * A) if unclipped <= clipped else (clipped, 0.0)
                parts["on"] += k * c * value
                grad[b][t] += k * c * dvalue
                continue
            if cfg.offline_in_group:
                shift, rb = cfg.policy_shift, rbar[b]
                if shift == "one":
                    r, dr = pi, pi
                elif shift == "on_policy":
                    r, dr = 1.0, 1.0
                else:
                    d = pi + (1 - pi) * rb if shift == "accuracy_aware" else pi + cfg.luffy_gamma
                    slope = (1 - rb) if shift == "accuracy_aware" else 1.0
                    r = pi / d
                    dr = r if cfg.detaches_pi_offline() else pi * (d - pi * slope) / d**2
                parts["off"] += k * w * r * A
                grad[b][t] += k * w * dr * A
            if cfg.sft_nll_coef > 0:
                c = cfg.sft_nll_coef * (math.exp(-H) if cfg.srft else 1.0)
                parts["nll"] += k * c * x
                grad[b][t] += k * c
    J = parts["on"] + parts["off"] + parts["nll"]
    return -J, [[-g for g in row] for row in grad], {key: -v for key, v in parts.items()}


def _batch(seed=0, B=6, T=7, dtype=torch.float64):
    """Rows: 4 on-policy + 2 offline, different lengths, one fully masked on-policy row, garbage in padding."""
    g = torch.Generator().manual_seed(seed)
    lp = torch.log(torch.rand(B, T, generator=g, dtype=dtype) * 0.9 + 0.05)
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)  # some ratios outside [0.8, 1.2]
    lengths = [7, 3, 0, 5, 6, 2]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    lp = torch.where(mask, lp, torch.full_like(lp, -float("inf")))  # padding logits may be anything
    is_offline = torch.tensor([False, False, False, False, True, True])
    old = torch.where(is_offline.unsqueeze(-1), torch.full_like(old, float("nan")), old)  # ignored on offline rows
    adv = torch.tensor([1.3, -0.7, 0.9, 0.4, 0.8, -1.1], dtype=dtype)
    rbar = torch.tensor([0.25, 0.25, 0.5, 0.5, 0.125, 0.75], dtype=dtype)
    ent = torch.rand(B, T, generator=g, dtype=dtype) * 2
    return lp, old, adv, mask, is_offline, rbar, ent


def _configs():
    out = [RedLossConfig.from_name(n) for n in PRESETS]
    red = RedLossConfig.red()
    out += [dataclasses.replace(red, normalization=n) for n in ("token_mean", "constant")]
    out += [dataclasses.replace(red, detach_pi_offline=False), dataclasses.replace(red, policy_shift="one")]
    # The accident issue 13 found: RED with LUFFY's shift swapped in keeps LUFFY's undetached denominator.
    out += [dataclasses.replace(red, policy_shift="luffy", max_response_length=11)]
    # DAPO's clip-higher: an upper clip range of its own (the RED authors' later code: 0.28 over 0.2).
    out += [dataclasses.replace(red, clip_eps_high=0.28), dataclasses.replace(RedLossConfig.grpo(), clip_eps_high=0.5)]
    return out


@pytest.mark.parametrize("cfg", _configs(), ids=lambda c: f"{c.name}-{c.policy_shift}-{c.normalization}-"
                         f"{'detach' if c.detaches_pi_offline() else 'grad'}")
def test_loss_and_gradient_match_float64_loop(cfg):
    lp, old, adv, mask, is_offline, rbar, ent = _batch()
    w = 2.5
    leaf = lp.clone().requires_grad_()
    loss, metrics = red_policy_loss(leaf, old, adv, mask, is_offline, rbar, w, cfg, entropy=ent)
    loss.backward()
    want, want_grad, parts = _reference(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(),
                                        is_offline.tolist(), rbar.tolist(), w, cfg, ent.tolist())
    assert loss.item() == pytest.approx(want, rel=1e-10, abs=1e-14)
    torch.testing.assert_close(leaf.grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-9, atol=1e-14)
    assert torch.isfinite(leaf.grad).all() and (leaf.grad[~mask] == 0).all()
    assert metrics["loss_on_policy"] == pytest.approx(parts["on"], rel=1e-10, abs=1e-14)
    assert metrics["loss_offline"] == pytest.approx(parts["off"], rel=1e-10, abs=1e-14)
    assert metrics["loss_nll"] == pytest.approx(parts["nll"], rel=1e-10, abs=1e-14)
    assert metrics["loss"] == pytest.approx(metrics["loss_on_policy"] + metrics["loss_offline"] + metrics["loss_nll"])
    assert metrics["sft_weight"] == w


@pytest.mark.parametrize("eps_high", [None, 0.4])
def test_metrics_match_reference_counts(eps_high):
    lp, old, adv, mask, is_offline, rbar, ent = _batch()
    cfg = dataclasses.replace(RedLossConfig.red(), clip_eps_high=eps_high)
    _, m = red_policy_loss(lp, old, adv, mask, is_offline, rbar, 1.0, cfg)
    upper = 1.2 if eps_high is None else 1 + eps_high
    above = 0  # tokens between the symmetric and the raised upper bound, with A > 0: clipped only without clip-higher
    on, off, clipped, ratio_sum, roff_sum = 0, 0, 0, 0.0, 0.0
    for b in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if not mask[b, t]:
                continue
            if is_offline[b]:
                off += 1
                pi = math.exp(lp[b, t].item())
                roff_sum += pi / (pi + (1 - pi) * rbar[b].item())
            else:
                on += 1
                r = math.exp(lp[b, t].item() - old[b, t].item())
                ratio_sum += r
                clipped += (r > upper and adv[b] > 0) or (r < 0.8 and adv[b] < 0)
                above += 1.2 < r <= 1.4 and adv[b] > 0
    assert clipped > 0 and above > 0  # the batch exercises clipping, and the raised upper bound changes it
    assert (m["num_on_policy_tokens"], m["num_offline_tokens"]) == (on, off)
    assert m["clip_fraction"] == pytest.approx(clipped / on)
    assert m["on_policy_ratio_mean"] == pytest.approx(ratio_sum / on)
    assert m["r_off_mean"] == pytest.approx(roff_sum / off)


def test_loss_gradient_matches_finite_differences_without_detach():
    # Ratios within the clip range (no kinks) so central differences are valid.
    lp, _, adv, mask, is_offline, rbar, ent = _batch(seed=3)
    lp = torch.where(mask, lp, torch.zeros_like(lp))
    old = lp + 0.05
    for cfg in (dataclasses.replace(RedLossConfig.red(), detach_pi_offline=False), RedLossConfig.luffy(),
                RedLossConfig.srft()):
        fn = lambda x: red_policy_loss(x, old, adv, mask, is_offline, rbar, 1.7, cfg, entropy=ent)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (lp.clone().requires_grad_(),))


@pytest.mark.parametrize("normalization", ["sequence_mean", "token_mean", "constant"])
def test_micro_batches_with_global_counts_sum_to_full_batch(normalization):
    lp, old, adv, mask, is_offline, rbar, ent = _batch(seed=4)
    cfg = dataclasses.replace(RedLossConfig.srft(), normalization=normalization, max_response_length=9)
    full_leaf = lp.clone().requires_grad_()
    full, _ = red_policy_loss(full_leaf, old, adv, mask, is_offline, rbar, 3.0, cfg, entropy=ent)
    full.backward()
    num_sequences = int((mask.sum(-1) > 0).sum())
    num_tokens = int(mask.sum())
    parts_leaf = lp.clone().requires_grad_()
    total = 0.0
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):  # uneven splits, one holding the empty row
        loss, _ = red_policy_loss(parts_leaf[rows], old[rows], adv[rows], mask[rows], is_offline[rows], rbar[rows],
                                  3.0, cfg, entropy=ent[rows], num_sequences=num_sequences, num_tokens=num_tokens)
        total = total + loss
    total.backward()
    assert total.item() == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(parts_leaf.grad, full_leaf.grad, rtol=1e-12, atol=1e-15)


def test_rbar_to_zero_through_the_loss():
    """One offline row with rbar = 0: the detached pi_offline gives the imitation gradient -w*A/|o| per token;
    differentiating pi_offline (authors' code) leaves no gradient."""
    lp = torch.log(torch.tensor([[0.2, 0.5, 0.7]], dtype=torch.float64))
    args = (lp, torch.tensor([True]), torch.tensor([1.5], dtype=torch.float64))
    grads = {}
    for detach in (True, False):
        leaf = args[0].clone().requires_grad_()
        cfg = dataclasses.replace(RedLossConfig.red(), detach_pi_offline=detach)
        loss, m = red_policy_loss(leaf, leaf.detach(), args[2], torch.ones(1, 3, dtype=torch.bool), args[1],
                                  torch.zeros(1, dtype=torch.float64), 2.0, cfg)
        loss.backward()
        grads[detach] = leaf.grad
        assert m["r_off_mean"] == pytest.approx(1.0)
    torch.testing.assert_close(grads[True], torch.full((1, 3), -2.0 * 1.5 / 3, dtype=torch.float64))
    assert grads[False].abs().max().item() == 0.0


def test_all_correct_and_all_wrong_groups_give_no_policy_gradient():
    """End to end: group rewards -> advantages -> loss. Uniform groups (rbar 1 or 0) have zero advantages, so
    their rows get no gradient; the mixed group does."""
    G = 3
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    adv = group_advantages(rewards).reshape(-1)
    rbar = rewards.mean(-1).repeat_interleave(G + 1)
    is_offline = torch.tensor([i % (G + 1) == 0 for i in range(12)])  # the trace is the group's first member
    g = torch.Generator().manual_seed(5)
    lp = torch.log(torch.rand(12, 4, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    loss, _ = red_policy_loss(lp, lp.detach(), adv, torch.ones(12, 4, dtype=torch.bool), is_offline, rbar, 4.0,
                              RedLossConfig.red())
    loss.backward()
    assert (lp.grad[:8] == 0).all()
    assert (lp.grad[8:].abs() > 0).all()


def test_fully_masked_batch_is_zero_not_nan():
    lp = torch.full((2, 3), -float("inf"), dtype=torch.float64, requires_grad=True)
    for name in PRESETS:
        loss, m = red_policy_loss(lp, lp.detach(), torch.ones(2, dtype=torch.float64), torch.zeros(2, 3),
                                  torch.tensor([False, True]), torch.zeros(2), 1.0, RedLossConfig.from_name(name),
                                  entropy=torch.zeros(2, 3, dtype=torch.float64))
        (grad,) = torch.autograd.grad(loss, lp)
        assert loss.item() == 0.0 and all(math.isfinite(v) for v in m.values()) and (grad == 0).all()


def test_presets_and_from_name():
    assert [RedLossConfig.from_name(n).name for n in PRESETS] == list(PRESETS)
    red = RedLossConfig.red()
    assert (red.policy_shift, red.entropy_regulation, red.offline_in_group, red.detaches_pi_offline(),
            red.normalization, red.clip_eps) == ("accuracy_aware", True, True, True, "sequence_mean", 0.2)
    assert RedLossConfig.red_entropy_only().policy_shift == "on_policy"
    assert RedLossConfig.red_entropy_only().entropy_regulation
    assert not RedLossConfig.red_policy_shift_only().entropy_regulation
    assert not RedLossConfig.grpo().offline_in_group
    luffy = RedLossConfig.luffy()
    assert (luffy.policy_shift, luffy.std_normalize, luffy.detaches_pi_offline()) == ("luffy", False, False)
    sft = RedLossConfig.sft()
    assert (sft.online_rl, sft.offline_in_group, sft.sft_nll_coef) == (False, False, 1.0)
    with pytest.raises(ValueError, match="red_policy_shift_only"):
        RedLossConfig.from_name("ppo")
    with pytest.raises(ValueError, match="accuracy_aware"):
        RedLossConfig(policy_shift="pi")
    with pytest.raises(ValueError, match="sequence_mean"):
        RedLossConfig(normalization="mean")


def test_sft_preset_is_plain_token_mean_nll():
    lp, _, _, mask, _, _, _ = _batch(seed=6)
    offline = torch.ones(lp.shape[0], dtype=torch.bool)
    loss, _ = red_policy_loss(lp, lp, torch.zeros(lp.shape[0]), mask, offline, torch.zeros(lp.shape[0]), 1.0,
                              RedLossConfig.sft())
    assert loss.item() == pytest.approx(-lp[mask].mean().item(), rel=1e-12)


def test_bad_inputs_raise():
    lp, old, adv, mask, is_offline, rbar, ent = _batch()
    with pytest.raises(ValueError, match="entropy"):
        red_policy_loss(lp, old, adv, mask, is_offline, rbar, 1.0, RedLossConfig.srft())
    with pytest.raises(ValueError, match="advantages"):
        red_policy_loss(lp, old, adv[:3], mask, is_offline, rbar, 1.0, RedLossConfig.red())
    with pytest.raises(ValueError, match="response_mask"):
        red_policy_loss(lp, old, adv, mask[:, :2], is_offline, rbar, 1.0, RedLossConfig.red())
    with pytest.raises(ValueError, match="sft_weight"):
        red_policy_loss(lp, old, adv, mask, is_offline, rbar, float("nan"), RedLossConfig.red())


def test_srft_field_and_preset_share_a_name():
    assert RedLossConfig().srft is False
    assert RedLossConfig.srft().srft is True
    assert dataclasses.replace(RedLossConfig.srft(), name="x").srft is True


# ------------------------------------------------------------------------------ LUFFY's detach rule (issue 13)


@pytest.mark.parametrize("cfg", [RedLossConfig(policy_shift="luffy"),
                                 dataclasses.replace(RedLossConfig.red(), policy_shift="luffy"),
                                 RedLossConfig.luffy()], ids=["field", "red_with_luffy_shift", "preset"])
def test_luffy_shift_has_luffys_gradient_however_it_is_configured(cfg):
    """f(pi) = pi / (pi + gamma): d f / d log pi = pi * gamma / (pi + gamma)^2, which needs the denominator's
    gradient. The detached denominator would give f itself, pi / (pi + gamma)."""
    pi, gamma = 0.3, cfg.luffy_gamma
    leaf = torch.tensor([[math.log(pi)]], dtype=torch.float64, requires_grad=True)
    cfg = dataclasses.replace(cfg, normalization="token_mean", entropy_regulation=False)
    loss, _ = red_policy_loss(leaf, leaf.detach(), torch.tensor([1.0], dtype=torch.float64),
                              torch.ones(1, 1, dtype=torch.bool), torch.tensor([True]),
                              torch.zeros(1, dtype=torch.float64), 1.0, cfg)
    loss.backward()
    assert leaf.grad.item() == pytest.approx(-pi * gamma / (pi + gamma) ** 2, rel=1e-12)


def test_luffy_shift_with_a_detached_denominator_is_refused():
    with pytest.raises(ValueError, match="not LUFFY's shaping"):
        RedLossConfig(policy_shift="luffy", detach_pi_offline=True)
    with pytest.raises(ValueError, match="not LUFFY's shaping"):
        dataclasses.replace(RedLossConfig.luffy(), detach_pi_offline=True)
    # The other shifts keep their explicit choice; None is the shift's own rule.
    assert not RedLossConfig(detach_pi_offline=False).detaches_pi_offline()
    assert RedLossConfig().detaches_pi_offline() and RedLossConfig(policy_shift="one").detaches_pi_offline()


# ------------------------------------------------------------------- truncated importance sampling, mismatch


def _behaviour(old, seed=11):
    """Engine log-probs near pi_old, with one token far below it (ratio e^3, beyond any cap used here)."""
    g = torch.Generator().manual_seed(seed)
    behaviour = old + 0.5 * torch.randn(old.shape, generator=g, dtype=old.dtype)
    behaviour[0, 1] = old[0, 1] - 3.0
    return behaviour


@pytest.mark.parametrize("cfg", [dataclasses.replace(RedLossConfig.red(), tis_cap=2.0),
                                 dataclasses.replace(RedLossConfig.grpo(), tis_cap=1.5),
                                 dataclasses.replace(RedLossConfig.srft(), tis_cap=1.2)], ids=lambda c: c.name)
def test_tis_loss_and_gradient_match_float64_loop(cfg):
    lp, old, adv, mask, is_offline, rbar, ent = _batch()
    behaviour = _behaviour(old)
    leaf = lp.clone().requires_grad_()
    loss, metrics = red_policy_loss(leaf, old, adv, mask, is_offline, rbar, 2.5, cfg, entropy=ent,
                                    behaviour_logprobs=behaviour)
    loss.backward()
    want, want_grad, parts = _reference(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), is_offline.tolist(),
                                        rbar.tolist(), 2.5, cfg, ent.tolist(), behaviour=behaviour.tolist())
    assert loss.item() == pytest.approx(want, rel=1e-10, abs=1e-14)
    assert metrics["loss_on_policy"] == pytest.approx(parts["on"], rel=1e-10, abs=1e-14)
    torch.testing.assert_close(leaf.grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-9, atol=1e-14)
    # The weights' metrics over the on-policy tokens, and the cap binds on some of them.
    weights = [min(math.exp(old[b, t].item() - behaviour[b, t].item()), cfg.tis_cap)
               for b in range(lp.shape[0]) for t in range(lp.shape[1]) if mask[b, t] and not is_offline[b]]
    assert metrics["tis_weight_mean"] == pytest.approx(sum(weights) / len(weights), rel=1e-12)
    assert metrics["tis_capped_fraction"] == pytest.approx(sum(x == cfg.tis_cap for x in weights) / len(weights))
    assert 0 < metrics["tis_capped_fraction"] < 1


def test_tis_weights_respect_the_cap_and_carry_no_gradient():
    old = torch.tensor([[0.0, -1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    behaviour = torch.tensor([[0.0, -3.0, -float("inf"), -0.4]], dtype=torch.float64)
    weights = tis_weights(old, behaviour, 2.0)
    assert weights.tolist() == [[1.0, 2.0, 2.0, pytest.approx(math.exp(-0.1), rel=1e-12)]]
    assert not weights.requires_grad


def test_tis_off_or_without_mismatch_leaves_the_loss_unchanged():
    lp, old, adv, mask, is_offline, rbar, ent = _batch(seed=2)
    red = RedLossConfig.red()
    results = []
    for cfg, behaviour in ((red, None), (red, _behaviour(old)), (dataclasses.replace(red, tis_cap=2.0), old)):
        leaf = lp.clone().requires_grad_()
        loss, _ = red_policy_loss(leaf, old, adv, mask, is_offline, rbar, 1.5, cfg, behaviour_logprobs=behaviour)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def test_tis_needs_behaviour_logprobs_and_a_positive_cap():
    lp, old, adv, mask, is_offline, rbar, _ = _batch()
    with pytest.raises(ValueError, match="behaviour_logprobs"):
        red_policy_loss(lp, old, adv, mask, is_offline, rbar, 1.0, RedLossConfig(tis_cap=2.0))
    with pytest.raises(ValueError, match="tis_cap"):
        RedLossConfig(tis_cap=0.0)


def test_behaviour_mismatch_against_a_loop():
    lp, old, _, mask, is_offline, _, _ = _batch()
    behaviour = _behaviour(old)
    on_policy = mask & ~is_offline.unsqueeze(-1)
    deltas = [abs(old[b, t].item() - behaviour[b, t].item()) for b in range(lp.shape[0]) for t in range(lp.shape[1])
              if on_policy[b, t]]
    total, worst, outside, tokens = behaviour_mismatch(old, behaviour, on_policy).tolist()
    assert total == pytest.approx(sum(deltas), rel=1e-12) and worst == pytest.approx(max(deltas), rel=1e-12)
    assert outside == sum(math.exp(d) > 2.0 for d in deltas) > 0 and tokens == len(deltas)
    assert behaviour_mismatch(old, old, on_policy).tolist() == [0.0, 0.0, 0.0, len(deltas)]
