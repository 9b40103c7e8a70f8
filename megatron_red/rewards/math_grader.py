"""Verifiable math reward: math-verify in a pool of worker processes with a hard time-out per item.

math-verify bounds its own work with `signal.alarm`, which only works on a process's main thread, and some
answers (power towers such as `9^{9^{9^{9}}}`) keep sympy busy for a long time. So every item is graded in a
worker process: the worker arms one interval timer around the whole item (parse gold, parse answer, verify),
and the parent kills the worker if no result arrives by the item's deadline, replacing it with a fresh one.
A kill or a crash costs that item (score 0, reason "timeout" / "worker_crash"), never the call.

The pool is module-level, started on first use, reused across calls and closed at exit.
"""
from __future__ import annotations

import atexit
import collections
import functools
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from megatron_red.rewards.extraction import answer_text, clean_text, gold_text

Reason = Literal["correct", "wrong", "no_answer", "timeout", "invalid_text", "worker_crash", "unparsable_gold"]
REASONS: tuple[str, ...] = (
    "correct", "wrong", "no_answer", "timeout", "invalid_text", "worker_crash", "unparsable_gold",
)

# Test hook (tests/test_rewards.py): a worker started while this variable is set exits abruptly (os._exit) when
# handed a response equal to its value, standing in for a segfault inside sympy.
CRASH_TEXT_ENV = "MEGATRON_RED_GRADER_CRASH_TEXT"


@dataclass(frozen=True)
class Grade:
    """One graded response: `score` is 1.0 or 0.0, `reason` one of REASONS."""

    score: float
    reason: Reason


def count_reasons(grades: Iterable[Grade]) -> collections.Counter[str]:
    """How many grades had each reason, e.g. Counter({'wrong': 5, 'correct': 3, 'timeout': 1})."""
    return collections.Counter(g.reason for g in grades)


# ---------------------------------------------------------------- worker side


class _ItemTimeout(BaseException):
    """Raised by the worker's timer; a BaseException so math-verify's `except Exception` cannot swallow it."""


def _on_alarm(signum, frame):
    raise _ItemTimeout


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    from math_verify import parse

    parsed = parse(gold_text(gold), parsing_timeout=None)
    # A gold that yields only math-verify's raw-string fallback was not understood; comparing strings against it
    # would reward echoes of a broken gold, so it counts as unparsable (the authors' code scored these 1).
    return parsed if any(not isinstance(p, str) for p in parsed) else None


def _grade_item(response: str, golds: tuple[str, ...]) -> tuple[float, str]:
    from math_verify import parse, verify

    parsed_golds = [p for p in (_parse_gold(g) for g in golds) if p is not None]
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


def _worker_main(conn) -> None:
    import math_verify  # noqa: F401  (import before reporting ready, so item deadlines exclude start-up)

    # Time-outs are ours (one timer per item); silence math-verify's warning that its own are disabled.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    signal.signal(signal.SIGALRM, _on_alarm)
    crash_text = os.environ.get(CRASH_TEXT_ENV)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        index, response, golds, soft_timeout_s = task
        if crash_text is not None and response == crash_text:
            os._exit(70)
        try:
            signal.setitimer(signal.ITIMER_REAL, soft_timeout_s)
            result = _grade_item(response, golds)
        except _ItemTimeout:
            result = (0.0, "timeout")
        except Exception:  # a sympy/parser bug on one answer must not take the worker down
            result = (0.0, "wrong")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        conn.send((index,) + result)


# ---------------------------------------------------------------- parent side


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: mp_connection.Connection
    ready: bool = False
    started_at: float = 0.0


class GraderPool:
    """A fixed number of grading processes (spawned, so safe next to CUDA and threads in the parent)."""

    def __init__(self, num_workers: int, start_timeout_s: float = 180.0):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.start_timeout_s = start_timeout_s
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.restarts = 0  # workers replaced after a time-out or crash, over the pool's life

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_worker_main, args=(child_conn,), daemon=True, name="math-grader")
        process.start()
        child_conn.close()
        return _Worker(process, parent_conn, started_at=time.monotonic())

    def _replace(self, slot: int) -> None:
        old = self._workers[slot]
        old.conn.close()
        if old.process.is_alive():
            old.process.kill()
        old.process.join(timeout=5.0)
        self._workers[slot] = self._spawn()
        self.restarts += 1

    def grade(self, items: Sequence[tuple[str, tuple[str, ...]]], timeout_s: float) -> list[Grade]:
        """Grades (response, golds) pairs; each item gets at most `timeout_s` seconds of a worker."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        # The worker gives up a little before the parent's hard deadline, so most time-outs keep the worker.
        soft_timeout_s = max(0.05, timeout_s - min(0.5, 0.2 * timeout_s))
        with self._lock:
            while len(self._workers) < self.num_workers:
                self._workers.append(self._spawn())
            results: list[Grade | None] = [None] * len(items)
            pending = deque(range(len(items)))
            busy: dict[int, tuple[int, float]] = {}  # slot -> (item index, deadline)
            while pending or busy:
                for slot, worker in enumerate(self._workers):
                    if not pending or not worker.ready or slot in busy:
                        continue
                    index = pending.popleft()
                    response, golds = items[index]
                    try:
                        worker.conn.send((index, response, golds, soft_timeout_s))
                    except (BrokenPipeError, OSError):  # died while idle: not this item's fault
                        pending.appendleft(index)
                        self._replace(slot)
                        continue
                    busy[slot] = (index, time.monotonic() + timeout_s)
                self._wait_and_collect(busy, results)
            return results  # type: ignore[return-value]

    def _wait_and_collect(self, busy: dict[int, tuple[int, float]], results: list[Grade | None]) -> None:
        now = time.monotonic()
        watched = {w.conn: slot for slot, w in enumerate(self._workers) if slot in busy or not w.ready}
        wait_s = min((deadline for _, deadline in busy.values()), default=now + 1.0) - now
        for conn in mp_connection.wait(list(watched), timeout=max(0.0, wait_s)):
            slot = watched[conn]
            worker = self._workers[slot]
            try:
                message = conn.recv()
            except (EOFError, OSError):
                if slot in busy:
                    index, _ = busy.pop(slot)
                    results[index] = Grade(0.0, "worker_crash")
                elif not worker.ready:
                    raise RuntimeError(
                        f"a math-grading worker died while starting (exit code {worker.process.exitcode}); "
                        "check that math-verify imports in a fresh interpreter"
                    )
                self._replace(slot)
                continue
            if not worker.ready:
                worker.ready = True
                continue
            index, score, reason = message
            busy.pop(slot)
            results[index] = Grade(float(score), reason)
        now = time.monotonic()
        for slot, (index, deadline) in list(busy.items()):
            if now >= deadline:
                busy.pop(slot)
                results[index] = Grade(0.0, "timeout")
                self._replace(slot)
        if not busy and all(not w.ready for w in self._workers):
            oldest = min(w.started_at for w in self._workers)
            if now - oldest > self.start_timeout_s:
                raise RuntimeError(f"no math-grading worker became ready within {self.start_timeout_s:.0f} s")

    def close(self) -> None:
        for worker in self._workers:
            worker.conn.close()  # the worker sees EOF and returns
        for worker in self._workers:
            worker.process.join(timeout=2.0)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=2.0)
        self._workers = []


_pool: GraderPool | None = None
_pool_size: int = min(4, os.cpu_count() or 1)


def configure_grader(num_workers: int) -> None:
    """Sets the size of the shared grading pool (default min(4, cpu count)); a running pool is closed first."""
    global _pool_size
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    close_grader()
    _pool_size = num_workers


def get_grader_pool() -> GraderPool:
    """The shared pool, started on first use."""
    global _pool
    if _pool is None:
        _pool = GraderPool(_pool_size)
    return _pool


def close_grader() -> None:
    global _pool
    if _pool is not None:
        _pool.close()
        _pool = None


atexit.register(close_grader)


def _normalise_golds(golds: Sequence[str | Sequence[str]], n: int) -> list[tuple[str, ...]]:
    if len(golds) != n:
        raise ValueError(f"got {n} responses but {len(golds)} golds")
    out = []
    for i, gold in enumerate(golds):
        alternatives = (gold,) if isinstance(gold, str) else tuple(gold)
        if not alternatives or not all(isinstance(a, str) for a in alternatives):
            raise ValueError(f"gold {i} must be a string or a non-empty list of strings, got {gold!r}")
        out.append(alternatives)
    return out


def grade_math_detailed(
    responses: Sequence[str | bytes],
    golds: Sequence[str | Sequence[str]],
    timeout_s: float = 5.0,
    pool: GraderPool | None = None,
) -> list[Grade]:
    """Grades each response against its gold (a string or a list of accepted alternatives), with reasons."""
    alternatives = _normalise_golds(golds, len(responses))
    grades: list[Grade | None] = [None] * len(responses)
    items, positions = [], []
    for i, response in enumerate(responses):
        text = clean_text(response)
        if text is None:
            grades[i] = Grade(0.0, "invalid_text")
        else:
            items.append((text, alternatives[i]))
            positions.append(i)
    if items:
        for i, grade in zip(positions, (pool or get_grader_pool()).grade(items, timeout_s)):
            grades[i] = grade
    return grades  # type: ignore[return-value]


def grade_math(
    responses: Sequence[str | bytes],
    golds: Sequence[str | Sequence[str]],
    timeout_s: float = 5.0,
    pool: GraderPool | None = None,
) -> list[float]:
    """1.0 for each response whose final answer math-verify accepts against its gold, else 0.0."""
    return [g.score for g in grade_math_detailed(responses, golds, timeout_s=timeout_s, pool=pool)]
