"""The RL update of a rollout batch through `RedTrainer` on the Hugging Face backend at toy size, against float64
references computed from the step's own rows and the weights each optimiser step started from:

- several optimiser steps per rollout batch (`trainer.mini_batches_per_step` K = 2, E = 1, and
  `trainer.epochs_per_step` E = 2, K = 1): pi_old is the float64 forward of the weights that sampled, at the
  sampling temperature; H_rl, H_sft and w are the rollout batch's, and every optimiser step uses that w; optimiser
  step j trains the groups of its mini-batch (whole groups, in order; the same rows again in the second epoch),
  and its gradient is the float64 gradient of `red_policy_loss` of those rows at the weights step j started from,
  normalised with the mini-batch's counts; the weights after it are hand-written float64 AdamW (clipping, bias
  correction) applied to that gradient; the PPO clip acts (clip fraction > 0), with clip-higher's range;
- one optimiser step with entropy regulation: the offline rows are trained first with w factored out and their
  gradient scaled by w once their forward has given H_sft, yet the step's gradient is the float64 gradient of the
  whole batch's loss with that w;
- the learning-rate schedule counts optimiser steps (`optim.total_steps`' default and `train/lr`), and a resume
  with another K x E is refused.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from megatron_red.config import load_config
from megatron_red.models.optim import lr_multiplier
from megatron_red.objectives import red_policy_loss
from megatron_red.trainer import red_trainer
from megatron_red.trainer.red_trainer import RedTrainer
from trainer_fixtures import TINY_OVERRIDES, step_lines, tiny_config

# lr and clip ranges at which the toy's second optimiser step already sees ratios outside the clip range.
CLIPPED = ["optim.lr=1e-3", "optim.warmup_steps=0", "rollout.temperature=0.7",
           "algo.loss={clip_eps: 0.02, clip_eps_high: 0.04}"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("trainer_mini_batches")


def _trainer(root, name, *extra, resume=False) -> RedTrainer:
    run_dir = root / name
    trainer = RedTrainer(tiny_config(run_dir, *extra), run_dir, resume=resume)
    # The toy student never solves a problem; "even number of characters" or'ed into the verifier gives the groups
    # reward variance (as in test_trainer_e2e).
    verify = trainer.task.reward_fn
    trainer.task.reward_fn = lambda texts, answers: [max(float(r), float(len(t) % 2 == 0))
                                                     for r, t in zip(verify(texts, answers), texts)]
    return trainer


def _record(trainer, monkeypatch) -> dict:
    """Record the step's prepared batch and w, every forward/backward's rows, and at every optimiser step the
    weights, pre-clip gradients, Adam state and learning rate it started from."""
    rec = {"batches": [], "steps": []}
    policy = trainer.policy
    rollout_update = red_trainer.rollout_update

    def recording_update(policy_, batch, loss_cfg, w, *args, **kwargs):
        rec.update(batch=batch, w=w, loss_cfg=loss_cfg)
        return rollout_update(policy_, batch, loss_cfg, w, *args, **kwargs)

    train, optimizer_step = policy.get_loss_and_metrics, policy.optimizer_step

    def recording_train(batch, *args, **kwargs):
        rec["batches"].append(batch)
        return train(batch, *args, **kwargs)

    def recording_optimizer_step(lr_scale=1.0, advance_schedule=True):
        params = dict(policy.model.named_parameters())
        state = {}
        for name, p in params.items():
            s = policy.optimizer.state.get(p, {})
            state[name] = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in s.items()}
        rec["steps"].append({"weights": {n: p.detach().clone() for n, p in params.items()},
                             "grads": {n: p.grad.detach().clone() for n, p in params.items()},
                             "adam": state, "lr": policy.learning_rate * lr_scale})
        return optimizer_step(lr_scale, advance_schedule)

    monkeypatch.setattr(red_trainer, "rollout_update", recording_update)
    policy.get_loss_and_metrics = recording_train
    policy.optimizer_step = recording_optimizer_step
    return rec


def _model64(trainer, weights: dict) -> torch.nn.Module:
    model = copy.deepcopy(trainer.policy.model).double()
    model.load_state_dict({k: v.double() for k, v in weights.items()}, strict=False)
    return model


def _forward64(model, batch, temperature):
    """float64 log pi and full-vocabulary entropy at `temperature`, [B, L-1], row by row without padding (with
    gradient when the caller has it on)."""
    rows_lp, rows_ent = [], []
    for i in range(len(batch)):
        n = int(batch.attention_mask[i].sum())
        logp = torch.log_softmax(model(batch.input_ids[i:i + 1, :n]).logits[0, :-1] / temperature, -1)
        lp = logp.gather(-1, batch.input_ids[i, 1:n, None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
        pad = batch.loss_mask.shape[1] - (n - 1)
        rows_lp.append(torch.nn.functional.pad(lp, (0, pad)))
        rows_ent.append(torch.nn.functional.pad(ent, (0, pad)))
    mask = batch.loss_mask.double()
    return torch.stack(rows_lp) * mask, torch.stack(rows_ent) * mask


def _row_mean(values, batch, rows) -> float:
    mask = batch.loss_mask.double()
    counts = mask.sum(1)
    keep = rows & (counts > 0)
    return float(((values * mask).sum(1)[keep] / counts[keep]).mean())


def _gradient64(trainer, weights, batch, old64, loss_cfg, w, temperature) -> dict:
    """float64 gradient of `red_policy_loss` over `batch` (counts: this batch's) at `weights`."""
    model = _model64(trainer, weights)
    lp, ent = _forward64(model, batch, temperature)
    mask = batch.loss_mask
    loss, _ = red_policy_loss(lp, old64, batch.fields["advantages"].double(), mask, batch.fields["is_offline"],
                              batch.fields["group_accuracy"].double(), w, loss_cfg, entropy=ent,
                              num_sequences=int((mask.sum(1) > 0).sum()), num_tokens=mask.sum(),
                              behaviour_logprobs=batch.fields.get("behaviour_logprobs"))
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, loss.item()


def _assert_gradient(got: dict, want: dict) -> None:
    got_flat = torch.cat([got[n].double().flatten() for n in want])
    want_flat = torch.cat([want[n].flatten() for n in want])
    assert want_flat.norm() > 1e-3
    assert (got_flat - want_flat).norm() / want_flat.norm() < 1e-5


def _adamw64(step: dict, optim, decay: dict[str, bool]) -> dict:
    """Hand-written AdamW with global-norm clipping, in float64, from a recorded optimiser step."""
    grads = {n: g.double() for n, g in step["grads"].items()}
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    coef = min(1.0, optim.grad_clip / (norm + 1e-6))
    (b1, b2), lr, out = optim.betas, step["lr"], {}
    for name, p in step["weights"].items():
        g, state = grads[name] * coef, step["adam"][name]
        t = int(state["step"]) + 1 if state else 1
        m = b1 * (state["exp_avg"].double() if state else 0.0) + (1 - b1) * g
        v = b2 * (state["exp_avg_sq"].double() if state else 0.0) + (1 - b2) * g * g
        p = p.double() * (1 - lr * (optim.weight_decay if decay[name] else 0.0))
        out[name] = p - lr / (1 - b1 ** t) * m / ((v / (1 - b2 ** t)).sqrt() + optim.eps)
    return out


def _preset_controller(trainer, previous: dict) -> None:
    """As if the previous step's entropies had been 2x (RL) and 3x (SFT) the last logged ones: w = |dH_sft / dH_rl|
    about 4/3, far from both clip bounds, so float32 noise in the entropies moves it by ~1e-7 only."""
    trainer.controller.prev_h_rl = 2 * previous["entropy/H_rl"]
    trainer.controller.prev_h_sft = 3 * previous["entropy/H_sft"]


def _recorded_second_step(trainer, monkeypatch) -> tuple[dict, dict, tuple[float, float]]:
    """Step 0, the controller preset from it, then step 1 recorded: its metrics, what `_record` saw, and the
    controller's previous (H_rl, H_sft) that step 1's w is computed against."""
    first = trainer.red_step(trainer.stream.next_batch(), trainer.loss_config(0))
    trainer.step = 1
    _preset_controller(trainer, first)
    prev = (trainer.controller.prev_h_rl, trainer.controller.prev_h_sft)
    rec = _record(trainer, monkeypatch)
    return trainer.red_step(trainer.stream.next_batch(), trainer.loss_config(1)), rec, prev


def _w64(trainer_g: int, h_rl: float, h_sft: float, prev_rl: float, prev_sft: float) -> float:
    return min(max(abs(1 - h_sft / prev_sft) / abs(1 - h_rl / prev_rl), 1.0), float(trainer_g))


# Three prompts in two mini-batches: groups 0-1, then group 2 (8 rows, then 4: not half the rows each).
@pytest.mark.parametrize("mini_batches,epochs,prompts", [(2, 1, 3), (1, 2, 2)])
def test_optimizer_steps_of_a_rollout_batch_match_float64(root, monkeypatch, mini_batches, epochs, prompts):
    trainer = _trainer(root, f"k{mini_batches}_e{epochs}", *CLIPPED, f"trainer.mini_batches_per_step={mini_batches}",
                       f"trainer.epochs_per_step={epochs}", f"trainer.prompts_per_step={prompts}")
    metrics, rec, prev = _recorded_second_step(trainer, monkeypatch)
    final = {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters()}

    batch, w, loss_cfg, steps = rec["batch"], rec["w"], rec["loss_cfg"], rec["steps"]
    assert len(steps) == mini_batches * epochs == len(rec["batches"])  # w is known: one forward/backward each
    temperature = trainer.config.rollout.temperature
    with torch.no_grad():
        old64, ent64 = _forward64(_model64(trainer, steps[0]["weights"]), batch, temperature)
    # pi_old: the weights that sampled, at the sampling temperature (the forward-only pass before the first step).
    torch.testing.assert_close(batch.fields["old_logprobs"].double(), old64, atol=2e-5, rtol=0)
    offline = batch.fields["is_offline"]
    h_rl, h_sft = _row_mean(ent64, batch, ~offline), _row_mean(ent64, batch, offline)
    assert metrics["entropy/H_rl"] == pytest.approx(h_rl, rel=1e-5)
    assert metrics["entropy/H_sft"] == pytest.approx(h_sft, rel=1e-5)
    want_w = _w64(trainer.config.rollout.n, h_rl, h_sft, *prev)
    assert 1.1 < want_w < 2.9 and w == metrics["entropy/w"] == pytest.approx(want_w, rel=1e-5)

    groups = batch.fields["group"]
    first_of = [k * (prompts // mini_batches) + min(k, prompts % mini_batches) for k in range(mini_batches + 1)]
    blocks = [list(range(a, b)) for a, b in zip(first_of, first_of[1:])]
    assert [len(b) for b in blocks] == ([2, 1] if mini_batches == 2 else [2])
    decay = {n: p.dim() >= 2 for n, p in trainer.policy.model.named_parameters()}
    losses = []
    for j, (step, trained) in enumerate(zip(steps, rec["batches"])):
        rows = torch.tensor([int(g) in blocks[j % mini_batches] for g in groups])
        part = batch.select(rows.nonzero().squeeze(-1))
        assert torch.equal(trained.input_ids, part.input_ids)  # whole groups, in order, every epoch
        grads64, loss64 = _gradient64(trainer, step["weights"], part, part.fields["old_logprobs"].double(),
                                      loss_cfg, want_w, temperature)
        _assert_gradient(step["grads"], grads64)
        losses.append(loss64)
        after = steps[j + 1]["weights"] if j + 1 < len(steps) else final
        for name, p in _adamw64(step, trainer.config.optim, decay).items():
            torch.testing.assert_close(after[name].double(), p, atol=1e-6, rtol=0, msg=name)
    if epochs == 2:  # the same rows, at moved weights: the ratio is no longer 1
        name = next(iter(steps[0]["grads"]))
        assert not torch.equal(steps[0]["grads"][name], steps[1]["grads"][name])
    assert metrics["loss/loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    assert metrics["train/lr"] == pytest.approx(sum(s["lr"] for s in steps) / len(steps), rel=1e-12)
    # The clip acts from the second optimiser step on (the first one's ratio is exactly 1).
    assert 0 < metrics["loss/clip_fraction"] < 1 and metrics["loss/on_policy_ratio_mean"] != 1.0
    assert metrics["loss/num_on_policy_tokens"] + metrics["loss/num_offline_tokens"] == batch.loss_mask.sum()


def test_one_step_with_entropy_regulation_scales_the_offline_gradient_by_w(root, monkeypatch):
    trainer = _trainer(root, "k1_regulated", "optim.lr=1e-3", "optim.warmup_steps=0", "rollout.temperature=0.7")
    metrics, rec, prev = _recorded_second_step(trainer, monkeypatch)

    batch, (step,) = rec["batch"], rec["steps"]
    assert "old_logprobs" not in batch.fields  # no forward-only pass: pi_old is the update's own forward
    # The traces first (their forward gives H_sft), then the rollouts, after the gradient was scaled by w.
    assert [bool(b.fields["is_offline"].all()) for b in rec["batches"]] == [True, False]
    temperature = trainer.config.rollout.temperature
    with torch.no_grad():
        lp64, ent64 = _forward64(_model64(trainer, step["weights"]), batch, temperature)
    offline = batch.fields["is_offline"]
    h_rl, h_sft = _row_mean(ent64, batch, ~offline), _row_mean(ent64, batch, offline)
    assert metrics["entropy/H_rl"] == pytest.approx(h_rl, rel=1e-5)  # the engine's, while sampling
    assert metrics["entropy/H_sft"] == pytest.approx(h_sft, rel=1e-5)
    w = _w64(trainer.config.rollout.n, h_rl, h_sft, *prev)
    assert 1.1 < w < 2.9 and metrics["entropy/w"] == pytest.approx(w, rel=1e-5)
    grads64, loss64 = _gradient64(trainer, step["weights"], batch, lp64, rec["loss_cfg"], w, temperature)
    _assert_gradient(step["grads"], grads64)
    assert metrics["loss/loss"] == pytest.approx(loss64, rel=1e-4)


def test_the_schedule_counts_optimizer_steps(root):
    def total(*extra):
        return load_config(None, [*TINY_OVERRIDES, "trainer.steps=10", *extra]).optim.total_steps

    assert total() == 10 and total("trainer.mini_batches_per_step=2", "trainer.epochs_per_step=3") == 60
    # SFT-only steps take one optimiser step whatever K is. SFT->GRPO's GRPO stage is a new run whose schedule spans
    # its 10 steps of 4 (its SFT stage has one of its own, trainer/red_trainer.py).
    assert total("algo.method=sft_then_grpo", "trainer.mini_batches_per_step=2", "trainer.epochs_per_step=2") == 40
    assert total("algo.method=sft", "trainer.mini_batches_per_step=2") == 10
    assert total("trainer.mini_batches_per_step=2", "optim.total_steps=7") == 7
    for bad, key in (("trainer.mini_batches_per_step=3", "mini_batches_per_step"),  # 2 prompts per step
                     ("trainer.epochs_per_step=0", "epochs_per_step")):
        with pytest.raises(ValueError, match=key):
            load_config(None, [*TINY_OVERRIDES, bad])

    run = ["trainer.steps=2", "optim.warmup_steps=1", "trainer.mini_batches_per_step=2", "trainer.save_every=1"]
    trainer = _trainer(root, "schedule", *run)
    trainer.train()
    optim = trainer.config.optim
    assert optim.total_steps == 4 and trainer.policy.scheduler.last_epoch == 4
    rates = [optim.lr * lr_multiplier(s, optim) for s in range(4)]
    assert [line["train/lr"] for line in step_lines(trainer.run_dir)] == pytest.approx(
        [(rates[0] + rates[1]) / 2, (rates[2] + rates[3]) / 2], rel=1e-12)
    with pytest.raises(ValueError, match="2 optimiser steps per step, this run takes 4"):
        _trainer(root, "schedule", *run, "trainer.steps=3", "trainer.epochs_per_step=2", resume=True)
