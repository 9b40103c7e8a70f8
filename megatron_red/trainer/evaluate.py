"""Held-out accuracy of the student during and after training: the built-in task's test split, or OpenR1-format
prompts held out by `data.eval_fraction` / `data.eval_path`, graded by the task's `reward_fn` (math-verify)."""
from __future__ import annotations

from megatron_red.rollout.base import SamplingParams


def evaluate_heldout(engine, tokenizer, examples, reward_fn, *, n: int, temperature: float, max_new_tokens: int,
                     seed: int, hard_min_difficulty: int | None = None) -> dict:
    """avg@n accuracy over `examples` (and over the hard / easy ones when difficulties are known) and the mean
    response length in tokens."""
    params = SamplingParams(temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed)
    completions = engine.generate([ex.prompt_ids for ex in examples], n, params)
    per_problem, lengths = [], []
    for ex, comps in zip(examples, completions):
        texts = [tokenizer.decode(c.token_ids) for c in comps]
        scores = reward_fn(texts, [ex.answer] * len(texts))
        per_problem.append(sum(scores) / len(scores))
        lengths += [len(c.token_ids) for c in comps]
    out = {"eval/accuracy": sum(per_problem) / len(per_problem), "eval/mean_length": sum(lengths) / len(lengths),
           "eval/problems": len(examples)}
    if hard_min_difficulty is not None:
        for name, keep in (("hard", lambda d: d >= hard_min_difficulty), ("easy", lambda d: d < hard_min_difficulty)):
            accs = [a for a, ex in zip(per_problem, examples) if ex.difficulty is not None and keep(ex.difficulty)]
            if accs:
                out[f"eval/accuracy_{name}"] = sum(accs) / len(accs)
        hard_lengths = [len(c.token_ids) for ex, comps in zip(examples, completions)
                        if ex.difficulty is not None and ex.difficulty >= hard_min_difficulty for c in comps]
        if hard_lengths:
            out["eval/mean_length_hard"] = sum(hard_lengths) / len(hard_lengths)
    return out
