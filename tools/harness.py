"""What the measuring tools share: their command line (the tool's docstring as help, `--out`), the CUDA check, timing
with the device synchronised around the measured call, the peak memory of a call, and a report printed line by line
and written to `--out`.

The tools run as scripts (`python tools/X.py`, torchrun), which puts this directory first on `sys.path`:
`from harness import ...`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def command_line(doc: str, out: str | None = "also write the Markdown report to this file") -> argparse.ArgumentParser:
    """A parser whose help is the tool's docstring `doc`, with `--out` (help `out`) unless `out` is None."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if out is not None:
        parser.add_argument("--out", default=None, help=out)
    return parser


def require_cuda(tool: str, hint: str = "") -> None:
    """Stop with a one-line message (no traceback) when torch sees no CUDA GPU."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{tool} needs a CUDA GPU (none is visible to torch); nothing was measured{hint}")


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for the device's queued work (CUDA; a no-op on the CPU, whose work is synchronous)."""
    device = torch.device("cuda" if device is None else device)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device | str | None = None):
    """(fn(), wall seconds), the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def with_peak_memory(fn):
    """(fn(), the peak of allocated CUDA memory during the call, what was allocated before it), in bytes."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated(), base


def median_ms(fn, reps: int | None = None, budget_ms: float = 600.0) -> float:
    """Median CUDA-event time of fn() in milliseconds after one warm-up call: `reps` timings, or as many as fit
    `budget_ms` (3 to 20) judged from one more call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def once() -> float:
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    if reps is None:
        reps = int(min(20, max(3, budget_ms / max(once(), 1e-3))))
    times = sorted(once() for _ in range(reps))
    return times[len(times) // 2]


class Report:
    """`report(line)` prints a line as it comes; `write()` puts every line into `path` (the tool's --out), if any."""

    def __init__(self, path: str | None):
        self.path, self.lines = path, []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def write(self) -> None:
        if self.path:
            Path(self.path).write_text("\n".join(self.lines) + "\n", encoding="utf-8")
            print(f"wrote {self.path}")
