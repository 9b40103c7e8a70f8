"""Held-out accuracy of the student during and after training: the built-in task's test split, or OpenR1-format
prompts held out by `data.eval_fraction` / `data.eval_path`, graded by the task's `reward_fn` (math-verify).

Generation goes through the policy's actor hooks (`prepare_for_inference` / `infer` / `finish_inference`), like a
step's rollouts; each data-parallel replica generates its block of the problems, grades it once per model-parallel
group (the trainer's `grade`), and the per-problem results are gathered in problem order. Problem i is sampled with
a seed of its own (from the run's seed and i), so the report is the same whatever the number of replicas.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch

from megatron_red.rollout.base import SamplingParams
from megatron_red.distributed import DataParallel
from megatron_red.trainer.groups import Group, build_batch


def problem_seed(seed: int, index: int) -> int:
    """The sampling seed of held-out problem `index` (its position in the evaluated list) in a run of `seed`."""
    return int.from_bytes(hashlib.sha256(f"eval:{seed}:{index}".encode()).digest()[:7], "little")


def evaluate_heldout(policy, examples, grade: Callable[[list[list[int]], list], list[float]], *, n: int,
                     temperature: float, max_new_tokens: int, seed: int, dp: DataParallel | None = None,
                     hard_min_difficulty: int | None = None) -> dict:
    """avg@n accuracy over `examples` (and over the hard / easy ones and per difficulty `eval/accuracy_d{k}` when
    difficulties are known), the mean response length in tokens, and the teacher traces' mean length on the same
    problems (when they have traces).

    policy: the actor whose attached engine samples (module docstring); grade(token lists, answers) -> rewards.
    dp: this replica's place; its contiguous block of `examples` is the one it generates (none when there are
    fewer problems than replicas)."""
    dp = dp or DataParallel()
    indices = dp.shard(range(len(examples)), allow_empty=True)
    mine = [examples[i] for i in indices]
    results = []  # (accuracy, response lengths) of each of this replica's problems
    if mine:
        params = SamplingParams(temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens,
                                prompt_seeds=tuple(problem_seed(seed, i) for i in indices))
        policy.prepare_for_inference()
        try:
            completions = policy.infer([ex.prompt_ids for ex in mine], n, params)
        finally:
            policy.finish_inference()  # the engine's KV cache is not kept through training
        scores = grade([c.token_ids for comps in completions for c in comps],
                       [ex.answer for ex, comps in zip(mine, completions) for _ in comps])
        for k, comps in enumerate(completions):
            problem = scores[k * n:(k + 1) * n]
            results.append((sum(problem) / len(problem), [len(c.token_ids) for c in comps]))
    results = dp.gather(results)  # every problem's, in order
    per_problem = [accuracy for accuracy, _ in results]
    lengths = [length for _, problem in results for length in problem]
    out = {"eval/accuracy": sum(per_problem) / len(per_problem), "eval/mean_length": sum(lengths) / len(lengths),
           "eval/problems": len(examples)}
    traces = [len(ex.trace_ids) for ex in examples if ex.trace_ids]
    if traces:  # the teacher's length on the same problems: what imitating it fully would write
        out["eval/teacher_length"] = sum(traces) / len(traces)
    if hard_min_difficulty is not None:
        for name, keep in (("hard", lambda d: d >= hard_min_difficulty), ("easy", lambda d: d < hard_min_difficulty)):
            accs = [a for a, ex in zip(per_problem, examples) if ex.difficulty is not None and keep(ex.difficulty)]
            if accs:
                out[f"eval/accuracy_{name}"] = sum(accs) / len(accs)
        for level in sorted({ex.difficulty for ex in examples if ex.difficulty is not None}):
            accs = [a for a, ex in zip(per_problem, examples) if ex.difficulty == level]
            out[f"eval/accuracy_d{level}"] = sum(accs) / len(accs)  # per difficulty: what RL sharpens, what is new
        hard_lengths = [length for ex, (_, problem) in zip(examples, results)
                        if ex.difficulty is not None and ex.difficulty >= hard_min_difficulty for length in problem]
        if hard_lengths:
            out["eval/mean_length_hard"] = sum(hard_lengths) / len(hard_lengths)
    return out


IMPROBABLE = 0.1
"""A teacher token the student gives less than this probability counts as improbable (`teacher_token_probability`)."""


def teacher_token_probability(policy, examples, pad_token_id: int, micro_batch_size: int,
                              hard_min_difficulty: int | None = None) -> dict:
    """How likely the policy finds the teacher's traces of `examples`: the median, over every trace token, of the
    probability pi(token | prompt, trace so far) at temperature 1 (`eval/teacher_prob_median`), and the fraction
    of the tokens it gives less than IMPROBABLE (`eval/teacher_improbable_fraction`); the same over the hard
    problems' trace tokens (`..._hard`). The median shows how much of a trace the student could have written; the
    improbable tokens are what it would have to learn (and what Eq. 8 weighs least: r_off ~ pi / rbar)."""
    with_traces = [ex for ex in examples if ex.trace_ids]
    if not with_traces:
        return {}
    batch = build_batch([Group(ex.prompt_ids, trace_ids=ex.trace_ids) for ex in with_traces], offline_in_group=False,
                        std_normalize=False, pad_token_id=pad_token_id)
    logprobs, _ = policy.get_inference_log_probs(batch, micro_batch_size)
    probs = logprobs.double().exp()
    rows = {"": batch.loss_mask.bool()}
    if hard_min_difficulty is not None:
        hard = torch.tensor([ex.difficulty is not None and ex.difficulty >= hard_min_difficulty for ex in with_traces])
        if bool(hard.any()):
            rows["_hard"] = rows[""] & hard.unsqueeze(-1)
    out = {}
    for suffix, mask in rows.items():
        out[f"eval/teacher_prob_median{suffix}"] = float(probs[mask].median())
        out[f"eval/teacher_improbable_fraction{suffix}"] = float((probs[mask] < IMPROBABLE).double().mean())
    return out


def evaluate_before_training(trainer) -> dict:
    """Held-out evaluation of a fresh run's student before its first step, logged as step 0 (so that plots and
    reports show where training started). Returns {} for a resumed run or a task without a held-out split."""
    if trainer.step != 0:
        return {}
    metrics = trainer.evaluate()
    if metrics:
        trainer.log.log(0, metrics)
    return metrics


def describe_heldout(metrics: dict) -> str:
    """One line: accuracy all (hard, easy) in %, mean response length."""
    parts = f"{100 * metrics['eval/accuracy']:.1f}%"
    if "eval/accuracy_hard" in metrics and "eval/accuracy_easy" in metrics:
        parts += f" (hard {100 * metrics['eval/accuracy_hard']:.1f}%, easy {100 * metrics['eval/accuracy_easy']:.1f}%)"
    return parts + f", mean response length {metrics['eval/mean_length']:.1f} tokens"
