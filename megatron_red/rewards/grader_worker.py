"""The math-grading worker process: `python -m megatron_red.rewards.grader_worker FD`.

It reads (index, response, golds, soft_timeout_s) tasks from the connection on file descriptor FD and answers
(index, score, reason). One interval timer bounds each whole item (parse gold, parse answer, verify); math-verify's
own `signal.alarm` time-outs are switched off because they would cancel that timer. The parent owns the hard
deadline and kills a worker that misses it (e.g. stuck inside C code, where a Python signal handler cannot run).

Started as its own interpreter (not through multiprocessing) so that the parent's `__main__` is never re-imported
and nothing of the parent (CUDA context, threads) is inherited.
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from multiprocessing.connection import Connection

from megatron_red.rewards.extraction import answer_text, gold_text

# Test hook (tests/test_rewards.py): a worker started while this variable is set exits abruptly (os._exit) when
# handed a response equal to its value, standing in for a segfault inside sympy.
CRASH_TEXT_ENV = "MEGATRON_RED_GRADER_CRASH_TEXT"


class ItemTimeout(BaseException):
    """Raised by the item timer; a BaseException so math-verify's `except Exception` cannot swallow it."""


def _on_alarm(signum, frame):
    raise ItemTimeout


@functools.lru_cache(maxsize=4096)
def parse_gold(gold: str):
    """math-verify's parse of a gold answer, or None when it yields no mathematical object."""
    from math_verify import parse

    parsed = parse(gold_text(gold), parsing_timeout=None)
    # A gold that yields only math-verify's raw-string fallback was not understood; comparing strings against it
    # would reward echoes of a broken gold, so it counts as unparsable (the authors' code scored such golds 1).
    return parsed if any(not isinstance(p, str) for p in parsed) else None


def grade_item(response: str, golds: tuple[str, ...]) -> tuple[float, str]:
    """(score, reason) of one response against its accepted golds, without any time limit."""
    from math_verify import parse, verify

    parsed_golds = [p for p in (parse_gold(g) for g in golds) if p is not None]
    if not parsed_golds:
        return 0.0, "unparsable_gold"
    answer = answer_text(response)
    if answer is None:
        return 0.0, "no_answer"
    pred = parse(answer, parsing_timeout=None)
    if not pred:
        return 0.0, "no_answer"
    # verify(gold, pred): gold first, the function is not symmetric.
    if any(verify(g, pred, timeout_seconds=None) for g in parsed_golds):
        return 1.0, "correct"
    return 0.0, "wrong"


def serve(conn: Connection) -> None:
    import math_verify  # noqa: F401  (imported before reporting ready, so item deadlines exclude start-up)

    # Time-outs are ours; silence math-verify's warning that its own are disabled.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    signal.signal(signal.SIGALRM, _on_alarm)
    crash_text = os.environ.get(CRASH_TEXT_ENV)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            index, response, golds, soft_timeout_s = conn.recv()
        except (EOFError, OSError):  # the parent closed the pool or died
            return
        if crash_text is not None and response == crash_text:
            os._exit(70)
        try:
            signal.setitimer(signal.ITIMER_REAL, soft_timeout_s)
            result = grade_item(response, golds)
        except ItemTimeout:
            result = (0.0, "timeout")
        except Exception:  # a parser bug on one answer must not take the worker down; it is not a match
            result = (0.0, "wrong")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        conn.send((index,) + result)


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))
