"""The built-in task: answers re-derived by parsing each story independently of the generator, disjoint splits,
teacher traces that are correct, checked arithmetic, longer than warm-up solutions, and grade() edge cases."""
import dataclasses
import re

import pytest

from megatron_red.data import BuiltinTask, BuiltinTaskConfig, grade
from megatron_red.data.builtin import DEFAULT_REGIME, teacher_trace

CONFIG = BuiltinTaskConfig(seed=5, num_train=600, num_test=120, num_warmup=300)
OPERATION = r"(?:He|She) (?:gets \d+ more|gives away \d+|multiplies them by \d+)\."
RECHECK = r"Wait, let me verify: (" + OPERATION + r" (\S+)) Yes\."


@pytest.fixture(scope="module")
def task():
    return BuiltinTask(CONFIG)


def solve_story(text):
    """Independent evaluator: read the story sentence by sentence; returns (answer, number of steps, values)."""
    sentences = re.findall(r"[^.?]+[.?]", text)
    value = int(re.fullmatch(r"\s*\w+ has (\d+) \w+\.", sentences[0]).group(1))
    values, steps = [value], 0
    for s in sentences[1:-1]:
        if m := re.fullmatch(r"\s*(?:He|She) gets (\d+) more\.", s):
            value += int(m.group(1))
        elif m := re.fullmatch(r"\s*(?:He|She) gives away (\d+)\.", s):
            value -= int(m.group(1))
        elif m := re.fullmatch(r"\s*(?:He|She) multiplies them by (\d+)\.", s):
            value *= int(m.group(1))
        else:
            raise AssertionError(f"unparsed sentence {s!r}")
        steps += 1
        values.append(value)
    assert re.fullmatch(r"\s*How many \w+ does \w+ have now\?", sentences[-1])
    return value, steps, values


def check_arithmetic(trace):
    """Every 'a op b = c.' in a trace is true; returns the list of steps as strings."""
    steps = re.findall(r"(\d+)([+\-*])(\d+)=(\d+)\.", trace)
    for a, op, b, c in steps:
        a, b, c = int(a), int(b), int(c)
        assert {"+": a + b, "-": a - b, "*": a * b}[op] == c, trace
    return ["%s%s%s=%s." % s for s in steps]


def test_answers_difficulty_and_value_range(task):
    for problem, example in zip(task.train_problems + task.test_problems, task.train_examples + task.test_examples):
        answer, steps, values = solve_story(problem.text)
        assert example.answer == str(answer) and example.difficulty == steps == problem.steps
        assert all(0 <= v <= CONFIG.max_value for v in values)
        assert problem.text in example.prompt_text
    difficulties = {e.difficulty for e in task.test_examples}
    assert difficulties == set(range(CONFIG.min_steps, CONFIG.max_steps + 1))
    hard = [e for e in task.test_examples if task.is_hard(e)]
    assert hard and all(e.difficulty >= CONFIG.hard_min_steps for e in hard)


def test_splits_disjoint_and_deterministic(task):
    def key(text):  # the math content of a story: numbers and operation words, names/items stripped
        return tuple(re.findall(r"\d+|more|away|multiplies", text))

    train = {key(p.text) for p in task.train_problems}
    test = {key(p.text) for p in task.test_problems}
    warmup = {key(e.prompt_text) for e in task.warmup_examples()}
    assert len(task.train_problems) == CONFIG.num_train and len(test) == CONFIG.num_test
    assert not train & test and not warmup & test
    assert len({e.uid for e in task.train_examples + task.test_examples}) == CONFIG.num_train + CONFIG.num_test

    again = BuiltinTask(CONFIG)
    assert again.tokenizer.model_proto == task.tokenizer.model_proto
    assert [(e.prompt_ids, e.trace_ids) for e in again.train_examples] == \
           [(e.prompt_ids, e.trace_ids) for e in task.train_examples]
    other = BuiltinTask(BuiltinTaskConfig(seed=6, num_train=600, num_test=120))
    assert [p.text for p in other.test_problems] != [p.text for p in task.test_problems]


def test_teacher_traces_correct_verbose_and_tokenized(task):
    tok = task.tokenizer
    for problem, ex in zip(task.train_problems, task.train_examples):
        assert task.grade(ex.trace_text, ex.answer) == 1.0
        assert tok.decode(ex.trace_ids) == ex.trace_text and ex.trace_ids[-1] == tok.eos_token_id
        assert ex.prompt_ids == tok.encode(ex.prompt_text) and tok.decode(ex.prompt_ids) == ex.prompt_text
        steps = check_arithmetic(ex.trace_text)
        # Re-checks ("Wait, let me verify: ...") repeat a step already taken, with its sentence.
        for recheck in re.findall(RECHECK, ex.trace_text):
            assert steps.count(recheck[1]) >= 2 and ex.trace_text.count(recheck[0]) >= 2
        assert len(steps) - len(re.findall("Wait, let me verify", ex.trace_text)) == problem.steps
        # Each new step follows a copy of its operation's sentence from the story, in the story's order.
        story = re.findall(OPERATION, problem.text)
        new_steps = re.findall(r"\d+[-+*]\d+=\d+\.", re.sub(RECHECK, "", ex.trace_text))
        assert len(story) == len(new_steps) == problem.steps
        position = 0
        for sentence, step in zip(story, new_steps):
            position = ex.trace_text.index(f"{sentence} {step}", position) + 1
    lengths = {d: [len(e.trace_ids) for e in task.train_examples if e.difficulty == d] for d in (1, CONFIG.max_steps)}
    assert sum(lengths[CONFIG.max_steps]) / len(lengths[CONFIG.max_steps]) < 150
    assert max(len(e.prompt_ids) for e in task.train_examples + task.test_examples) <= 64
    assert any("Wait, let me verify" in e.trace_text for e in task.train_examples)


def test_teacher_without_restatement(task):
    for problem in task.train_problems[:50]:
        verbose = teacher_trace(problem, CONFIG.verify_probability, CONFIG.seed, restate=True)
        plain = teacher_trace(problem, CONFIG.verify_probability, CONFIG.seed, restate=False)
        assert not re.findall(OPERATION, plain)
        assert re.sub(OPERATION + " ", "", verbose) == plain  # the same trace, re-checks included, minus the copies


def test_warmup_is_easy_short_and_correct(task):
    warmup = task.warmup_examples()
    assert len(warmup) == CONFIG.num_warmup
    assert {e.difficulty for e in warmup} == set(range(CONFIG.min_steps, CONFIG.warmup_max_steps + 1))
    # The teacher's trace of each warm-up problem, written for comparison only.
    teacher = {p.uid: task._example(p, teacher_trace(p, CONFIG.verify_probability, CONFIG.seed))
               for p in task.warmup_problems()}
    for ex in warmup:
        assert ex.difficulty <= CONFIG.warmup_max_steps
        assert grade(ex.trace_text, ex.answer) == 1.0
        steps = check_arithmetic(ex.trace_text)
        assert len(steps) == ex.difficulty and "Wait" not in ex.trace_text
        assert ex.prompt_ids == teacher[ex.uid].prompt_ids
        # The "concise" format is the teacher's trace without its re-checks.
        assert ex.trace_text == re.sub(" " + RECHECK, "", teacher[ex.uid].trace_text)


def test_warmup_steps_format():
    task = BuiltinTask(BuiltinTaskConfig(seed=5, num_train=60, num_test=30, num_warmup=50, warmup_format="steps"))
    for ex, problem in zip(task.warmup_examples(), task.warmup_problems()):
        steps = check_arithmetic(ex.trace_text)
        assert len(steps) == problem.steps and grade(ex.trace_text, ex.answer) == 1.0
        # Only the steps and the answer: "7+5=12. 12*2=24. The answer is 24."
        assert ex.trace_text == " ".join(steps + [f"The answer is {ex.answer}."])


@pytest.mark.parametrize("longest", [None, 4])
def test_warmup_long_fraction_draws_that_share_from_the_longer_chains(longest):
    config = BuiltinTaskConfig(seed=5, num_train=60, num_test=30, num_warmup=200, warmup_long_fraction=0.1,
                               warmup_long_max_steps=longest)
    task = BuiltinTask(config)
    steps = [p.steps for p in task.warmup_problems()]
    long = [s for s in steps if s > config.warmup_max_steps]
    assert len(long) == 20 and set(long) == set(range(config.warmup_max_steps + 1, (longest or config.max_steps) + 1))
    assert steps != sorted(steps)  # mixed into the easy ones, not appended
    test_keys = {(p.start, p.ops) for p in task.test_problems}
    assert all((p.start, p.ops) not in test_keys for p in task.warmup_problems())
    # Without a long fraction, the warm-up data is the regime-independent easy set it always was.
    plain = BuiltinTask(dataclasses.replace(config, warmup_long_fraction=0.0))
    assert [p.steps for p in plain.warmup_problems()] == [p.steps for p in BuiltinTask(BuiltinTaskConfig(
        seed=5, num_train=60, num_test=30, num_warmup=200)).warmup_problems()]
    assert max(p.steps for p in plain.warmup_problems()) <= config.warmup_max_steps


def test_regimes_set_defaults_under_the_users_keys():
    from megatron_red.data.builtin import REGIMES

    latent = BuiltinTaskConfig.for_regime(regime="latent_skill", seed=3)
    assert latent.seed == 3 and all(getattr(latent, k) == v for k, v in REGIMES["latent_skill"].items())
    assert BuiltinTaskConfig.for_regime(regime="latent_skill", warmup_long_fraction=0.5).warmup_long_fraction == 0.5
    assert BuiltinTaskConfig.for_regime(regime="new_skill") == BuiltinTaskConfig()  # the field defaults
    assert BuiltinTaskConfig.for_regime() == BuiltinTaskConfig.for_regime(regime=DEFAULT_REGIME)
    with pytest.raises(ValueError, match="unknown data.builtin.regime"):
        BuiltinTaskConfig.for_regime(regime="other")


@pytest.mark.parametrize("response, answer, expected", [
    ("3+4=7. The answer is 7.", "7", 1.0),
    ("3+4=7. The answer is 7.", 7, 1.0),
    ("3+4=8. The answer is 8.", "7", 0.0),                      # wrong number
    ("3+4=7.", "7", 0.0),                                        # no answer statement
    ("@@ ⁇ 7 7 7", "7", 0.0),                                    # garbage
    ("", "7", 0.0),
    ("The answer is 7. Wait. The answer is 8.", "7", 0.0),       # the last statement counts
    ("The answer is 8. No, the answer is 7.", "7", 1.0),
    ("The answer is 70.", "7", 0.0),
    ("The answer is 7.5.", "7", 0.0),
    ("The answer is -3.", "-3", 1.0),
    ("The answer is 7.", "seven", 0.0),                          # non-integer gold never matches
])
def test_grade_edge_cases(response, answer, expected):
    assert grade(response, answer) == expected


def test_config_validation():
    with pytest.raises(ValueError, match="warmup_max_steps"):
        BuiltinTaskConfig(warmup_max_steps=4, hard_min_steps=4)
    with pytest.raises(ValueError, match="min_steps"):
        BuiltinTaskConfig(min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="warmup_format"):
        BuiltinTaskConfig(warmup_format="long")
    with pytest.raises(ValueError, match="verify_probability"):
        BuiltinTaskConfig(verify_probability=1.5)
    with pytest.raises(ValueError, match="warmup_long_fraction"):
        BuiltinTaskConfig(warmup_long_fraction=1.5)
    with pytest.raises(ValueError, match="warmup_long_max_steps"):
        BuiltinTaskConfig(warmup_long_max_steps=2)
    with pytest.raises(ValueError, match="distinct"):
        BuiltinTask(BuiltinTaskConfig(num_test=5000, max_steps=4, hard_min_steps=3, max_start=3))
