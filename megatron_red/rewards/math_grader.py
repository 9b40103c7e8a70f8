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
import multiprocessing.connection as mp_connection
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from megatron_red.rewards.extraction import clean_text

Reason = Literal["correct", "wrong", "no_answer", "timeout", "invalid_text", "worker_crash", "unparsable_gold"]
REASONS: tuple[str, ...] = (
    "correct", "wrong", "no_answer", "timeout", "invalid_text", "worker_crash", "unparsable_gold",
)
# The directory holding the megatron_red package, so workers import the same code as the parent.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class Grade:
    """One graded response: `score` is 1.0 or 0.0, `reason` one of REASONS."""

    score: float
    reason: Reason


def count_reasons(grades: Iterable[Grade]) -> collections.Counter[str]:
    """How many grades had each reason, e.g. Counter({'wrong': 5, 'correct': 3, 'timeout': 1})."""
    return collections.Counter(g.reason for g in grades)


# ---------------------------------------------------------------- parent side


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: mp_connection.Connection
    ready: bool = False
    started_at: float = 0.0


class GraderPool:
    """A fixed number of grading processes, each a fresh interpreter (safe next to CUDA and threads in the parent)."""

    def __init__(self, num_workers: int, start_timeout_s: float = 180.0):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.start_timeout_s = start_timeout_s
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.restarts = 0  # workers replaced after a time-out or crash, over the pool's life

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def _spawn(self) -> _Worker:
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        process = subprocess.Popen(
            [sys.executable, "-m", "megatron_red.rewards.grader_worker", str(child_sock.fileno())],
            pass_fds=(child_sock.fileno(),), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        )
        child_sock.close()
        return _Worker(process, mp_connection.Connection(parent_sock.detach()), started_at=time.monotonic())

    def _replace(self, slot: int) -> None:
        old = self._workers[slot]
        old.conn.close()
        if old.process.poll() is None:
            old.process.kill()
        old.process.wait(timeout=5.0)
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
                    if worker.process.poll() is not None:  # died while idle: not any item's fault
                        self._replace(slot)
                        continue
                    index = pending.popleft()
                    response, golds = items[index]
                    try:
                        worker.conn.send((index, response, golds, soft_timeout_s))
                    except OSError:  # died since the check above
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
                        f"a math-grading worker died while starting (exit code {worker.process.wait()}); "
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
            try:
                worker.process.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait(timeout=2.0)
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
