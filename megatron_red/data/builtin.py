"""The built-in task of the embedded default: multi-step arithmetic word problems with a verbose teacher.

A problem is a short story ("Sam has 7 apples. He gets 5 more. He gives away 3. He multiplies them by 2. ...") whose answer is reached
by chaining `steps` operations (add, subtract, or multiply by 2-3) with every intermediate value in
0..max_value, so a tiny model can do each computation digit by digit. `steps` is the difficulty knob.

Two solution styles share one compact step notation ("7+5=12.", no spaces, so a number costs only its digits):
- the student's warm-up format: only the steps, then "The answer is N." (used on EASY problems only, so the
  warmed-up student behaves like a weak base model that solves short chains and fails long ones);
- the teacher's trace, for every problem: the same steps plus R1-style redundancy ("Wait, let me verify: ..."
  passages that recompute a step, a restatement before the answer). Imitating it teaches long chains, while its
  redundant passages make responses longer: the recall/extend trade-off RED studies.
`grade` checks the integer in the last "answer is N" statement exactly.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from megatron_red.data.openr1 import RedExample
from megatron_red.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from megatron_red.errors import ConfigError

# (name, pronoun) pairs and countable items the stories draw from; few of each keeps the vocabulary tiny.
PEOPLE = (("Sam", "He"), ("Tom", "He"), ("Ann", "She"), ("Mia", "She"))
ITEMS = ("apples", "pens", "cards", "eggs")
MULTIPLIERS = (2, 3)
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
WARMUP_FORMATS = ("concise", "steps")
_ANSWER = re.compile(r"answer is\s*(-?\d+)\b(?!\.\d)")


# Named regimes of the task: knob values that `BuiltinTaskConfig.for_regime` applies under the user's own keys.
REGIMES: dict[str, dict] = {
    # The student never saw a chain longer than `warmup_max_steps`: the teacher's skill on hard problems is new to
    # it (docs/calibration.md). SFT learns it; RL from the student's own samples cannot.
    "new_skill": {},
    # A small part of the warm-up holds chains of 3-4 operations: the student solves some 4-operation problems (that
    # skill is latent, as the paper's 1.5B math students half-know their teacher's reasoning, and RL can sharpen
    # it) but not 5-6 (new: only the teacher shows them). docs/calibration.md, L1-L3.
    "latent_skill": {"warmup_long_fraction": 0.03, "warmup_long_max_steps": 4},
}
# The regime a config gets when it names none (`for_regime`): the one where RED ends above the student it starts from
# and the paper's premises hold (docs/results.md, issue 25). The dataclass's own field defaults are `new_skill`'s.
DEFAULT_REGIME = "latent_skill"


@dataclass
class BuiltinTaskConfig:
    """Knobs of the built-in task. The field defaults are the `new_skill` regime; configs go through `for_regime`,
    which starts from DEFAULT_REGIME."""

    regime: str = "new_skill"       # the named regime (REGIMES) whose knob values `for_regime` starts from; the
                                    # study's premises depend on it (trainer/report.py)
    seed: int = 0                   # seeds problem generation, the split and the teacher's verbosity choices
    num_train: int = 4000           # training problems (each with a teacher trace); may repeat, never a test problem
    num_test: int = 200             # held-out problems: distinct, and disjoint from train by (start, operations)
    num_warmup: int = 4000          # warm-up solutions, drawn afresh from the easy problems (never a test problem)
    min_steps: int = 1              # fewest operations in a problem
    max_steps: int = 6              # most operations in a problem; difficulties are spread evenly in between
    hard_min_steps: int = 4         # a problem is "hard" when steps >= this
    warmup_max_steps: int = 2       # warm-up SFT data uses problems with steps <= this ...
    warmup_long_fraction: float = 0.0  # ... except this fraction of it, drawn from the longer chains (up to
                                       # warmup_long_max_steps): a student with partial exposure to them, whose
                                       # skill on those is latent rather than absent
    warmup_long_max_steps: int | None = None  # the longest chains of that fraction (None: max_steps)
    max_value: int = 30             # every start/intermediate/final value lies in 0..max_value
    max_start: int = 12             # the starting amount is drawn from 2..max_start
    max_operand: int = 5            # add/subtract operands are drawn from 1..max_operand
    distinct_operations: bool = True  # no operation (sentence) repeats within a story: a repeated sentence makes
                                      # "the sentence after the one just copied" ambiguous to the student
    verify_probability: float = 0.5  # chance the teacher re-checks each step ("Wait, let me verify: ...")
    restate: bool = True            # the teacher copies each operation's sentence before its step
    warmup_format: str = "concise"  # warm-up solutions: "concise" = the teacher's form without its re-checks,
                                    # "steps" = only the steps, then the answer
    vocab_size: int = 256           # SentencePiece vocabulary (closed task text: no byte fallback)

    def __post_init__(self):
        if self.regime not in REGIMES:
            raise ValueError(f"unknown data.builtin.regime {self.regime!r}; valid: {', '.join(REGIMES)}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if not self.min_steps <= self.warmup_max_steps < self.hard_min_steps <= self.max_steps:
            raise ValueError(
                "need min_steps <= warmup_max_steps < hard_min_steps <= max_steps, got "
                f"{self.min_steps}, {self.warmup_max_steps}, {self.hard_min_steps}, {self.max_steps}"
            )
        if self.num_train < 1 or self.num_test < 1 or self.num_warmup < 1:
            raise ValueError("num_train, num_test and num_warmup must be >= 1, got "
                             f"{self.num_train}, {self.num_test}, {self.num_warmup}")
        if not 2 <= self.max_start <= self.max_value or self.max_operand < 1:
            raise ValueError("need 2 <= max_start <= max_value and max_operand >= 1")
        if self.warmup_format not in WARMUP_FORMATS:
            raise ValueError(f"unknown warmup_format {self.warmup_format!r}; valid: {', '.join(WARMUP_FORMATS)}")
        if not 0.0 <= self.warmup_long_fraction <= 1.0:
            raise ValueError(f"warmup_long_fraction must be in [0, 1], got {self.warmup_long_fraction}")
        if self.warmup_long_max_steps is not None and not (
                self.warmup_max_steps < self.warmup_long_max_steps <= self.max_steps):
            raise ValueError(f"need warmup_max_steps < warmup_long_max_steps <= max_steps, got "
                             f"{self.warmup_max_steps}, {self.warmup_long_max_steps}, {self.max_steps}")
        if not 0.0 <= self.verify_probability <= 1.0:
            raise ValueError(f"verify_probability must be in [0, 1], got {self.verify_probability}")

    @classmethod
    def for_regime(cls, **overrides) -> "BuiltinTaskConfig":
        """The config of regime `overrides["regime"]` (default DEFAULT_REGIME): its knob values, then `overrides`."""
        regime = overrides.setdefault("regime", DEFAULT_REGIME)
        if regime not in REGIMES:
            raise ValueError(f"unknown data.builtin.regime {regime!r}; valid: {', '.join(REGIMES)}")
        return cls(**{**REGIMES[regime], **overrides})


@dataclass(frozen=True)
class BuiltinProblem:
    """The structured record of one problem: start value and operations; `text` is the story."""

    uid: str
    name: str
    pronoun: str
    item: str
    start: int
    ops: tuple[tuple[str, int], ...]  # ("add" | "sub" | "mul", operand)
    answer: int
    text: str

    @property
    def steps(self) -> int:
        return len(self.ops)

    def chain(self) -> list[tuple[int, str, int, int]]:
        """(left, op, operand, result) for each step."""
        out, value = [], self.start
        for op, k in self.ops:
            result = value + k if op == "add" else value - k if op == "sub" else value * k
            out.append((value, op, k, result))
            value = result
        return out


def _step(left: int, op: str, k: int, result: int) -> str:
    return f"{left}{SYMBOL[op]}{k}={result}."


def operation_sentence(pronoun: str, op: str, k: int) -> str:
    """The story's sentence for one operation."""
    if op == "add":
        return f"{pronoun} gets {k} more."
    if op == "sub":
        return f"{pronoun} gives away {k}."
    return f"{pronoun} multiplies them by {k}."


def short_solution(problem: BuiltinProblem) -> str:
    """The "steps" warm-up format: only the steps, then the answer."""
    return " ".join([_step(*s) for s in problem.chain()] + [f"The answer is {problem.answer}."])


def teacher_trace(problem: BuiltinProblem, verify_probability: float, seed: int, restate: bool = True) -> str:
    """The teacher's verbose, correct trace; its re-checks are drawn from (seed, uid), so it is deterministic.
    With `restate`, each step is preceded by a copy of its operation's sentence from the story."""
    rng = random.Random(f"{seed}:teacher:{problem.uid}")
    parts = [f"{problem.name} starts with {problem.start} {problem.item}."]
    for left, op, k, result in problem.chain():
        sentence = f"{operation_sentence(problem.pronoun, op, k)} " if restate else ""
        parts.append(sentence + _step(left, op, k, result))
        if rng.random() < verify_probability:
            parts.append(f"Wait, let me verify: {sentence}{_step(left, op, k, result)} Yes.")
    parts.append(f"So {problem.name} has {problem.answer} {problem.item}. The answer is {problem.answer}.")
    return " ".join(parts)


def grade(response_text: str, answer: str | int) -> float:
    """1.0 when the last "answer is N" states the integer `answer` exactly, else 0.0."""
    matches = _ANSWER.findall(response_text)
    try:
        return float(bool(matches) and int(matches[-1]) == int(answer))
    except (TypeError, ValueError):
        return 0.0


class BuiltinTask:
    """Generated train/test problems, their teacher traces, warm-up data, tokenizer and grader."""

    def __init__(self, config: BuiltinTaskConfig | None = None):
        self.config = config = config or BuiltinTaskConfig()
        rng = random.Random(f"{config.seed}:problems")
        # Test first, so that the held-out split is balanced over difficulties whatever num_train is. Test problems
        # are distinct; training problems only avoid them (short chains have few distinct problems: they repeat).
        self.test_keys: set[tuple] = set()
        levels = range(config.min_steps, config.max_steps + 1)
        self.test_problems = self._generate(rng, config.num_test, "test", levels, distinct=True)
        self.train_problems = self._generate(rng, config.num_train, "train", levels, distinct=False)
        self.traces = {p.uid: teacher_trace(p, config.verify_probability, config.seed, config.restate)
                       for p in self.train_problems + self.test_problems}

        texts = []
        for p in self.train_problems:
            texts += [f"Question: {p.text}\nAnswer:", self.traces[p.uid], short_solution(p)]
        # Every value 0..max_value is one token, so each arithmetic fact is a lookup the tiny student can learn;
        # the multi-step chaining, not digit arithmetic, is what makes a problem hard. After a space a number is one
        # token too ("▁5"): split as "▁" + "5", every number of a story would follow the same token, and copying
        # an operand from the story (what the teacher's restatements ask for) would be ambiguous to attention.
        numbers = [str(v) for v in range(config.max_value + 1)]
        numbers += ["\u2581" + n for n in numbers]
        self.tokenizer: SentencePieceTokenizer = train_sentencepiece(texts, config.vocab_size, byte_fallback=False,
                                                                     user_defined_symbols=numbers)
        self.train_examples = [self._example(p, self.traces[p.uid]) for p in self.train_problems]
        self.test_examples = [self._example(p, self.traces[p.uid]) for p in self.test_problems]

    def _generate(self, rng: random.Random, count: int, split: str, levels: range,
                  distinct: bool) -> list[BuiltinProblem]:
        """`count` problems, difficulties cycling through `levels`, none of them a test problem; with `distinct`,
        each is recorded as a test problem."""
        c = self.config
        levels = list(levels)
        out = []
        for i in range(count):
            steps = levels[i % len(levels)]
            for _ in range(10_000):
                start = rng.randint(2, c.max_start)
                ops, value = [], start
                for _ in range(steps):
                    candidates = {
                        "add": range(1, min(c.max_operand, c.max_value - value) + 1),
                        "sub": range(1, min(c.max_operand, value) + 1),
                        "mul": [m for m in MULTIPLIERS if value >= 1 and value * m <= c.max_value],
                    }
                    candidates = {op: [k for k in ks if not (c.distinct_operations and (op, k) in ops)]
                                  for op, ks in candidates.items()}
                    available = [op for op in ("add", "sub", "mul") if candidates[op]]
                    if not available:
                        break
                    op = rng.choice(available)
                    k = rng.choice(candidates[op])
                    value = value + k if op == "add" else value - k if op == "sub" else value * k
                    ops.append((op, k))
                if len(ops) < steps:
                    continue
                key = (start, tuple(ops))
                if key not in self.test_keys:
                    break
            else:
                raise ConfigError(f"cannot draw {count} distinct {steps}-step problems; lower num_test")
            if distinct:
                self.test_keys.add(key)
            name, pronoun = rng.choice(PEOPLE)
            item = rng.choice(ITEMS)
            out.append(BuiltinProblem(f"builtin-{split}-{i}", name, pronoun, item, start, tuple(ops), value,
                                      self._story(name, pronoun, item, start, ops)))
        rng.shuffle(out)
        return out

    @staticmethod
    def _story(name: str, pronoun: str, item: str, start: int, ops: list[tuple[str, int]]) -> str:
        sentences = [f"{name} has {start} {item}."] + [operation_sentence(pronoun, op, k) for op, k in ops]
        sentences.append(f"How many {item} does {name} have now?")
        return " ".join(sentences)

    def _example(self, problem: BuiltinProblem, trace: str) -> RedExample:
        prompt = self.tokenizer.render_prompt(problem.text)
        return RedExample(
            uid=problem.uid,
            prompt_ids=self.tokenizer.encode(prompt),
            trace_ids=self.tokenizer.encode(trace) + [self.tokenizer.eos_token_id],
            answer=str(problem.answer),
            difficulty=problem.steps,
            prompt_text=prompt,
            trace_text=trace,
        )

    def is_hard(self, example: RedExample) -> bool:
        return example.difficulty is not None and example.difficulty >= self.config.hard_min_steps

    def grade(self, response_text: str, answer: str | int) -> float:
        return grade(response_text, answer)

    def warmup_problems(self) -> list[BuiltinProblem]:
        """`num_warmup` fresh problems, never a test problem: easy ones (steps <= warmup_max_steps), and a
        `warmup_long_fraction` of longer ones (up to warmup_long_max_steps), in random order."""
        c = self.config
        rng = random.Random(f"{c.seed}:warmup")
        num_long = round(c.num_warmup * c.warmup_long_fraction)
        problems = self._generate(rng, c.num_warmup - num_long, "warmup",
                                  range(c.min_steps, c.warmup_max_steps + 1), distinct=False)
        if num_long:
            longest = c.warmup_long_max_steps or c.max_steps
            problems += self._generate(rng, num_long, "warmup-long", range(c.warmup_max_steps + 1, longest + 1),
                                       distinct=False)
            rng.shuffle(problems)
        return problems

    def warmup_examples(self) -> list[RedExample]:
        """Short correct solutions of the warm-up problems: the SFT data that makes the student a weak base model."""
        c = self.config
        solution = (short_solution if c.warmup_format == "steps" else
                    lambda p: teacher_trace(p, 0.0, c.seed, c.restate))
        return [self._example(p, solution(p)) for p in self.warmup_problems()]
