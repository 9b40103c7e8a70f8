"""Rewards are graded once per model-parallel group and shared (issue 10), on the Megatron backend at TP = 2 over
gloo (CPU, fp32), in one RED step at rollout temperature 0.7:

- the reward function runs on the group's source rank only, once per completion and once per offline trace;
- rank 1's grader "times out" on everything it is given (every score 0, as math-verify's pool scores a time-out),
  yet both ranks build the same rewards and advantages — the rank that grades decides for the group;
- the Megatron forward honours the temperature: pi (pi_old is the update's own forward), H_rl and H_sft against
  a float64 Hugging Face reference on the step's own tokens at T = 0.7, and the engine's behaviour log-probs agree
  with pi_old.

megatron-core's unconditional CUDA calls are redirected by tests/megatron_compat.py (no GPU here).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from trainer_fixtures import tiny_config

pytest.importorskip("megatron.core")


def _worker(rank, world_size, run_dir, student):
    import megatron_compat
    megatron_compat.install()
    from megatron.core import parallel_state as ps

    from megatron_red.trainer import red_trainer

    config = tiny_config(Path(run_dir), "model.backend=megatron", f"model.path={student}",
                         "model.tensor_model_parallel_size=2", "model.use_distributed_optimizer=false",
                         "rollout.temperature=0.7")
    trainer = red_trainer.RedTrainer(config, Path(run_dir))
    verify, graded = trainer.task.reward_fn, []

    def reward_fn(texts, answers):
        graded.extend(texts)
        if rank == 1:
            return [0.0] * len(texts)  # every item of this rank's grading timed out
        # "An even number of characters" or'ed in gives groups signal (the toy student never solves a problem).
        return [max(float(r), float(len(t) % 2 == 0)) for r, t in zip(verify(texts, answers), texts)]

    trainer.task.reward_fn = reward_fn
    parts, micro, train = [], [], trainer.policy.get_loss_and_metrics

    def recording(batch, micro_batch_size, loss_fn, temperature=1.0):
        def recording_loss(logprobs, entropy, mb):  # the log-probs the loss is given: pi, and pi_old detached
            micro.append({"lp": logprobs.detach().clone(), "ids": mb.input_ids, "attn": mb.attention_mask,
                          "mask": mb.loss_mask})
            return loss_fn(logprobs, entropy, mb)

        parts.append((batch, temperature))
        return train(batch, micro_batch_size, recording_loss, temperature)

    trainer.policy.get_loss_and_metrics = recording
    metrics = trainer.red_step(trainer.dp.shard(trainer.stream.next_batch()), trainer.loss_config(0))
    ps.destroy_model_parallel()
    # The step's rows as the update received them (the traces first, then the on-policy rows).
    tensors = {k: torch.cat([getattr(b, k) for b, _ in parts]) for k in ("input_ids", "attention_mask", "loss_mask")}
    tensors.update({k: torch.cat([b.fields[k] for b, _ in parts]) for k in parts[0][0].fields})
    # numpy, not torch tensors: a tensor sent through the result queue is shared through this process, which may
    # have exited by the time the parent reads it.
    return {"graded": len(graded), "metrics": metrics, "temperatures": [t for _, t in parts],
            **{k: v.numpy() for k, v in tensors.items()},
            "micro": [{k: v.numpy() for k, v in m.items()} for m in micro]}


def _as_tensors(result: dict) -> dict:
    return {k: torch.from_numpy(v) if hasattr(v, "dtype") else v for k, v in result.items()}


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    from megatron_red.trainer.build import build_task, warmed_up_student

    root = tmp_path_factory.mktemp("trainer_grading")
    config = tiny_config(root / "student")
    return str(warmed_up_student(config, build_task(config), root / ".cache"))


def test_rewards_graded_once_per_model_parallel_group(tmp_path, student):
    rank0, rank1 = (_as_tensors(r) for r in run_distributed(_worker, 2, str(tmp_path / "tp2"), student))
    is_offline = rank0["is_offline"]
    completions, traces = int((~is_offline).sum()), int(is_offline.sum())
    assert (completions, traces) == (2 * 3, 2)
    # One grading per completion and per trace, on the source rank only.
    assert rank0["graded"] == completions + traces and rank1["graded"] == 0
    assert rank0["rewards"][~is_offline].max() == 1.0 and rank0["rewards"][is_offline].min() == 1.0
    for key in ("rewards", "advantages", "group_accuracy", "is_offline", "behaviour_logprobs", "input_ids"):
        assert torch.equal(rank1[key], rank0[key]), key
    assert rank0["advantages"].abs().max() > 0
    assert rank0["metrics"]["reward/mean"] == rank1["metrics"]["reward/mean"] > 0

    # pi_old and H_rl at the sampling temperature, against float64 on the step's tokens.
    from megatron_red.models.megatron import load_hf_config
    from megatron_red.batch import masked_row_mean
    from test_megatron import read_hf_weights
    from transformers import AutoModelForCausalLM

    assert rank0["temperatures"] == rank1["temperatures"] == [0.7, 0.7]  # on-policy rows, then the traces
    hf_config, state = load_hf_config(student), read_hf_weights(student)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float64)
    model.load_state_dict({k: v.double() for k, v in state.items()}, strict=False)
    model.tie_weights()

    def float64_logprobs_entropy(input_ids, attention_mask, loss_mask):
        lp64 = torch.zeros(loss_mask.shape, dtype=torch.float64)
        ent64 = torch.zeros_like(lp64)
        with torch.no_grad():
            for i in range(len(lp64)):
                n = int(attention_mask[i].sum())
                logp = torch.log_softmax(model(input_ids[i:i + 1, :n]).logits[0, :-1] / 0.7, -1)
                lp64[i, :n - 1] = logp.gather(-1, input_ids[i, 1:n, None]).squeeze(-1)
                ent64[i, :n - 1] = -(logp.exp() * logp).sum(-1)
        return lp64 * loss_mask, ent64 * loss_mask

    # pi (pi_old is its detached value) of every micro-batch the loss was given, on the weights that sampled.
    assert rank0["micro"]
    for m in rank0["micro"]:
        m = {k: torch.from_numpy(v) for k, v in m.items()}
        lp64, _ = float64_logprobs_entropy(m["ids"], m["attn"], m["mask"])
        torch.testing.assert_close(m["lp"].double() * m["mask"], lp64, atol=2e-5, rtol=0)
    _, ent64 = float64_logprobs_entropy(rank0["input_ids"], rank0["attention_mask"], rank0["loss_mask"])
    mask = rank0["loss_mask"]
    assert rank0["metrics"]["entropy/H_rl"] == pytest.approx(masked_row_mean(ent64, mask, ~is_offline), rel=1e-5)
    assert rank0["metrics"]["entropy/H_sft"] == pytest.approx(masked_row_mean(ent64, mask, is_offline), rel=1e-5)
    # The engine (megatron-core's, on the same fp32 shards) sampled at 0.7: behaviour = trainer log-probs.
    assert rank0["metrics"]["mismatch/logprob_abs_max"] < 1e-5
