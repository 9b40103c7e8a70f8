"""The generation cache: one JSONL line per (benchmark, problem idx, sample idx), appended as samples finish.

Each line carries a fingerprint of what produced it (model path, sampling parameters, prompt token ids), so a line
written by another model, another sampling setup or another prompt is detected as foreign and not used. The
number of samples n is deliberately not in the fingerprint: a cache drawn with n = 32 serves a run with n = 4.
A line that does not parse (e.g. the truncated last line of an interrupted run) is counted as corrupt.
Corrupt, foreign and duplicate lines are reported (counted, and warned about), never used.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class CachedSample:
    """One generated response: its text, length in tokens and whether it ended on EOS."""

    benchmark: str
    idx: int
    sample: int
    fingerprint: str
    text: str
    num_tokens: int
    finished: bool


@dataclass
class CacheStats:
    """What loading the cache found: usable lines, and lines reported and skipped."""

    used: int = 0
    unused: int = 0  # valid lines for problems or samples this run does not ask for
    corrupt: int = 0
    foreign: int = 0
    duplicate: int = 0
    corrupt_lines: list[int] = field(default_factory=list)
    foreign_lines: list[int] = field(default_factory=list)


def fingerprint(model_id: str, temperature: float, top_p: float, max_new_tokens: int, prompt: list[int]) -> str:
    """A short hash of everything that determines a sample's distribution, except n and the seed."""
    blob = json.dumps([model_id, float(temperature), float(top_p), int(max_new_tokens), list(prompt)])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def _parse_line(line: str) -> CachedSample | None:
    try:
        row = json.loads(line)
        sample = CachedSample(
            benchmark=row["benchmark"], idx=row["idx"], sample=row["sample"], fingerprint=row["fingerprint"],
            text=row["text"], num_tokens=row["num_tokens"], finished=row["finished"],
        )
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    types_ok = (
        isinstance(sample.benchmark, str) and isinstance(sample.idx, int) and isinstance(sample.sample, int)
        and isinstance(sample.fingerprint, str) and isinstance(sample.text, str)
        and isinstance(sample.num_tokens, int) and isinstance(sample.finished, bool)
    )
    return sample if types_ok else None


class GenerationCache:
    """Append-only JSONL cache at `path`."""

    def __init__(self, path: str):
        self.path = path

    def load(self, expected: dict[tuple[str, int], str], n: dict[str, int]) -> tuple[
        dict[tuple[str, int, int], CachedSample], CacheStats
    ]:
        """Usable samples keyed by (benchmark, idx, sample).

        expected: fingerprint wanted for each (benchmark, problem idx) of this run.
        n:        samples per problem wanted for each benchmark.
        """
        found: dict[tuple[str, int, int], CachedSample] = {}
        stats = CacheStats()
        if not os.path.exists(self.path):
            return found, stats
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                sample = _parse_line(line)
                if sample is None:
                    stats.corrupt += 1
                    stats.corrupt_lines.append(line_no)
                    continue
                want = expected.get((sample.benchmark, sample.idx))
                if want is None or not 0 <= sample.sample < n.get(sample.benchmark, 0):
                    stats.unused += 1
                elif sample.fingerprint != want:
                    stats.foreign += 1
                    stats.foreign_lines.append(line_no)
                elif (sample.benchmark, sample.idx, sample.sample) in found:
                    stats.duplicate += 1
                else:
                    found[(sample.benchmark, sample.idx, sample.sample)] = sample
                    stats.used += 1
        if stats.corrupt or stats.foreign or stats.duplicate:
            warnings.warn(
                f"generation cache {self.path}: skipped {stats.corrupt} corrupt line(s) "
                f"{stats.corrupt_lines[:10]}, {stats.foreign} foreign line(s) (other model, sampling or prompt) "
                f"{stats.foreign_lines[:10]}, {stats.duplicate} duplicate(s); those samples are regenerated",
                stacklevel=2,
            )
        return found, stats

    def append(self, samples: list[CachedSample]) -> None:
        """Appends and flushes to disk, so an interruption loses at most the batch in flight."""
        if not samples:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a+b") as f:
            # A run killed mid-write leaves a last line without its newline; start a fresh line after it.
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write("".join(json.dumps(asdict(s)) + "\n" for s in samples).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
