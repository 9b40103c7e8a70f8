"""The Megatron backend in bfloat16, end to end on CPU: `RedTrainer` (RED with entropy regulation) at TP = 2 x PP = 2
with the megatron rollout engine, the distributed optimizer (fp32 master weights, fp32 gradient reduction) and
`rollout.offload_optimizer`, two steps, a checkpoint, the Hugging Face export and the final evaluation, against the
same run in float32 (four gloo processes; tests/megatron_compat.py redirects megatron-core's CUDA calls).

The bf16 engine samples from bf16 logits, so its tokens drift from the fp32 run's; to compare the updates, the
bf16 run's `infer` calls the bf16 engine (which must produce completions of its own: every rank of the group the
same ones) and then hands the trainer the fp32 run's completions of the same call. w is pinned to the fp32 run's
(w divides two relative entropy changes of ~1e-4 on this toy; bf16 entropies differ by ~1e-3), but the controller's
own w is recorded and checked against the logged entropies. Within bf16 tolerance: the step's losses, entropies,
gradient norm, and the exported weights, whose change over the run must be the fp32 run's to 10% (the change is
several bf16 ulps of the weights: fp32 master weights keep it).

fp16 is refused with an error naming `model.dtype` (it would need loss scaling): tests/test_model_families.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from test_megatron import hf_weights, read_hf_weights
from trainer_fixtures import read_lines, tiny_config

pytest.importorskip("megatron.core")

STEPS = 2
RUN = [f"trainer.steps={STEPS}", "trainer.save_every=2", "optim.lr=1e-3", "optim.warmup_steps=0",
       "model.backend=megatron", "model.tensor_model_parallel_size=2", "model.pipeline_model_parallel_size=2",
       "model.use_distributed_optimizer=true", "rollout.offload_optimizer=true", "trainer.eval_problems=4"]


def _run(run_dir: Path, student: str, dtype: str, replay: list | None, pinned_w: list | None):
    from megatron.core import parallel_state as ps

    from megatron_red.trainer.red_trainer import RedTrainer

    trainer = RedTrainer(tiny_config(run_dir, *RUN, f"model.path={student}", f"model.dtype={dtype}"), run_dir)
    verify = trainer.task.reward_fn  # reward variance for the toy (as in test_trainer_megatron)
    trainer.task.reward_fn = lambda texts, answers: [max(float(r), float(len(t) % 2 == 0))
                                                     for r, t in zip(verify(texts, answers), texts)]
    calls, own, computed_w = [], [], []
    infer = trainer.policy.infer

    def recorded_infer(prompts, n, params):
        out = infer(prompts, n, params)
        own.append([[c.token_ids for c in comps] for comps in out])
        if replay is None:
            calls.append(out)
            return out
        return replay[len(own) - 1]

    trainer.policy.infer = recorded_infer
    if pinned_w is not None:
        update = trainer.controller.update

        def pinned_update(h_rl, h_sft):
            computed_w.append(update(h_rl, h_sft))
            return pinned_w[trainer.step]

        trainer.controller.update = pinned_update
    dtype = next(trainer.policy.model.parameters()).dtype
    trainer.train()
    weights = {k: v.float().numpy() for k, v in hf_weights(trainer.policy).items()}
    masters = _master_weights(trainer.policy) if dtype == torch.bfloat16 else weights
    ps.destroy_model_parallel()
    return calls, own, computed_w, weights, masters, dtype


def _master_weights(policy) -> dict:
    """The distributed optimizer's fp32 master weights, as Hugging Face tensors: written into the (finished) run's
    model in place of its bf16 parameters, then exported. At DP = 1 each rank's shard of a parameter is all of it."""
    from megatron_red.models.megatron.weights import unwrap_model

    masters = {}
    for inner in policy.optimizer.chained_optimizers:
        for params, mains in zip(inner.model_float16_groups, inner.shard_fp32_from_float16_groups):
            masters.update({id(p): main for p, main in zip(params, mains)})
    for p in unwrap_model(policy.model).parameters():
        assert masters[id(p)].numel() == p.numel() and masters[id(p)].dtype == torch.float32
        p.data = masters[id(p)].detach().clone().view(p.shape)
    return {k: v.numpy() for k, v in hf_weights(policy).items()}


def _worker(rank, world_size, root, student):
    import megatron_compat
    megatron_compat.install()
    root = Path(root)
    calls, _, _, weights32, _, dtype32 = _run(root / "fp32", student, "float32", None, None)
    pinned_w = [line["entropy/w"] for line in read_lines(root / "fp32")[:-1]] if rank == 0 else None
    import torch.distributed as dist
    holder = [pinned_w]
    dist.broadcast_object_list(holder, src=0)
    _, own, computed_w, weights16, masters, dtype16 = _run(root / "bf16", student, "bfloat16", calls, holder[0])
    return weights32, weights16, masters, own, computed_w, (str(dtype32), str(dtype16))


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    from megatron_red.trainer.build import build_task, warmed_up_student

    root = tmp_path_factory.mktemp("megatron_bf16")
    config = tiny_config(root / "student")
    return str(warmed_up_student(config, build_task(config), root / ".cache"))


def test_bf16_red_steps_at_tp2_pp2_match_fp32(tmp_path, student):
    results = run_distributed(_worker, 4, str(tmp_path), student, timeout_s=900)
    weights32, weights16, masters, own, computed_w, dtypes = results[0]
    assert dtypes == ("torch.float32", "torch.bfloat16")
    # Every rank of the group sampled the same bf16 completions (the engine's checksum also checks it), and the
    # bf16 engine did generate: two rollouts and the final evaluation.
    assert all(r[3] == own for r in results) and len(own) == STEPS + 1
    assert all(len(tokens) > 0 for call in own for comps in call for tokens in comps)

    fp32, bf16 = read_lines(tmp_path / "fp32"), read_lines(tmp_path / "bf16")
    for a, b in zip(fp32[:-1], bf16[:-1]):
        for key in ("loss/loss", "loss/loss_on_policy", "loss/loss_offline", "train/grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=3e-2, abs=1e-3), (a["step"], key)
        for key in ("entropy/H_rl", "entropy/H_sft"):
            assert b[key] == pytest.approx(a[key], rel=1e-2), (a["step"], key)
        assert b["entropy/w"] == a["entropy/w"] and b["tokens/step"] == a["tokens/step"]
        assert b["mismatch/logprob_abs_mean"] < 0.05  # fp32 rollouts scored by the bf16 trainer
    from megatron_red.objectives import EntropyRatioController

    controller = EntropyRatioController(3)
    assert computed_w == pytest.approx([controller.update(line["entropy/H_rl"], line["entropy/H_sft"])
                                        for line in bf16[:-1]], rel=1e-12)
    assert bf16[-1]["final"] and fp32[-1]["eval/problems"] == bf16[-1]["eval/problems"] == 4

    # The fp32 master weights moved as the fp32 run's weights did, to bf16 precision: Adam's first steps move each
    # weight by about +-lr, the sign of its gradient, and the few gradients smaller than the bf16 noise flip (a
    # relative error of 0.15 is a cosine of 0.99 between the two updates). The bf16 weights are the masters
    # rounded, and the masters hold what the rounding drops.
    start = read_hf_weights(student)

    def norm(diffs) -> float:
        return math.sqrt(sum(float((d.double() ** 2).sum()) for d in diffs))

    w32, w16, main = ({k: torch.from_numpy(v) for k, v in w.items()} for w in (weights32, weights16, masters))
    moved = norm(w32[k] - start[k].float() for k in start)
    error = norm(main[k] - w32[k] for k in start)
    assert moved > 1e-2 and error < 0.15 * moved, (moved, error)
    assert all(torch.equal(w16[k], main[k].bfloat16().float()) for k in start)
    assert not all(torch.equal(w16[k], main[k]) for k in start)
    # The run's checkpoint and Hugging Face export were written in bf16.
    exported = read_hf_weights(tmp_path / "bf16" / "hf")
    assert {v.dtype for v in exported.values()} == {torch.bfloat16}
    assert (tmp_path / "bf16" / "checkpoints" / "latest").read_text().strip() == "step_000002"
