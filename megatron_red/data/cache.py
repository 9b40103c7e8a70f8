"""Tokenise an OpenR1-format file once: an on-disk, memory-mapped copy of its `RedExample`s that every rank reads.

`load_openr1` renders and tokenises every row: for OpenR1-Math-46k-8192 (46k prompts, traces of up to 8192 tokens)
that is minutes of tokenizer time and several GB of Python integers in each process. `build_cache` runs it once and
writes the examples as flat arrays; `MappedExamples` maps them read-only, so the ranks of a node share one copy in
the page cache and a `RedExample` is built only when it is indexed.

A cache directory (`cache_path`: "<file stem>-<key>" under the cache root) holds
  tokens.npy  int32 [T]      each example's prompt ids, then its trace ids
  index.npy   int64 [N, 6]   token offset, prompt length, trace length, text offset, prompt-text bytes, trace bytes
  text.bin    UTF-8          each example's prompt text, then its trace text
  meta.json   uid, answer and difficulty of each example; the load statistics; the inputs of the key
It is written under a temporary name and renamed into place, so a reader sees all of it or none of it, and two
builders racing on a shared file system leave one complete copy.

The key hashes the data file's name, size and modification time (ns), the tokenizer's `fingerprint()` and the load
options. Size and modification time rather than a content hash, so that finding the cache never reads the file
(a content hash would make every rank of every node read all of it on every start, which the cache exists to avoid);
the cost is that a rewrite keeping both the size and the nanosecond modification time is not noticed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Sequence, overload

import numpy as np

from megatron_red.data.openr1 import LoadStats, RedExample, load_openr1
from megatron_red.data.tokenizer import Tokenizer

CACHE_VERSION = 1


def cache_path(root: str | Path, path: str, tokenizer: Tokenizer, **options) -> Path:
    """Where the cache of `load_openr1(path, tokenizer, **options)` lives under `root`."""
    return Path(root) / f"{Path(path).name.split('.')[0]}-{_key(path, tokenizer, options)[:16]}"


def _key_inputs(path: str, tokenizer: Tokenizer, options: dict) -> dict:
    stat = os.stat(path)
    return {"version": CACHE_VERSION, "file": Path(path).name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "tokenizer": tokenizer.fingerprint(), "options": dict(sorted(options.items()))}


def _key(path: str, tokenizer: Tokenizer, options: dict) -> str:
    return hashlib.sha256(json.dumps(_key_inputs(path, tokenizer, options), sort_keys=True).encode()).hexdigest()


def build_cache(directory: str | Path, path: str, tokenizer: Tokenizer, **options) -> LoadStats:
    """Tokenise `path` with `load_openr1(path, tokenizer, **options)` and write its cache to `directory`."""
    directory = Path(directory)
    examples, stats = load_openr1(path, tokenizer, **options)
    tmp = directory.with_name(f"{directory.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = np.zeros((len(examples), 6), dtype=np.int64)
    token_offset = text_offset = 0
    with open(tmp / "text.bin", "wb") as text_file:
        for row, ex in enumerate(examples):
            prompt_text, trace_text = ex.prompt_text.encode(), ex.trace_text.encode()
            index[row] = (token_offset, len(ex.prompt_ids), len(ex.trace_ids), text_offset, len(prompt_text),
                          len(trace_text))
            token_offset += len(ex.prompt_ids) + len(ex.trace_ids)
            text_offset += len(prompt_text) + len(trace_text)
            text_file.write(prompt_text + trace_text)
    tokens = np.concatenate([np.zeros(0, dtype=np.int32)] +
                            [np.asarray(ex.prompt_ids + ex.trace_ids, dtype=np.int32) for ex in examples])
    np.save(tmp / "tokens.npy", tokens)
    np.save(tmp / "index.npy", index)
    meta = {"examples": [[ex.uid, ex.answer, ex.difficulty] for ex in examples], "stats": asdict(stats),
            "key": _key_inputs(path, tokenizer, options)}
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        tmp.rename(directory)
    except OSError:  # another builder finished first; both copies are identical
        shutil.rmtree(tmp, ignore_errors=True)
    return stats


class MappedExamples(Sequence[RedExample]):
    """The `RedExample`s of a cache directory, memory-mapped; `rows` selects and orders a subset."""

    def __init__(self, directory: str | Path, rows: Sequence[int] | None = None):
        self.directory = Path(directory)
        self._tokens = np.load(self.directory / "tokens.npy", mmap_mode="r")
        self._index = np.load(self.directory / "index.npy", mmap_mode="r")
        self._text = np.memmap(self.directory / "text.bin", dtype=np.uint8, mode="r") \
            if os.path.getsize(self.directory / "text.bin") else np.zeros(0, dtype=np.uint8)
        meta = json.loads((self.directory / "meta.json").read_text())
        self._meta = meta["examples"]
        self.stats = LoadStats(**meta["stats"])
        self.rows = list(range(len(self._meta))) if rows is None else [int(r) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, i: int) -> RedExample: ...

    @overload
    def __getitem__(self, i: slice) -> list[RedExample]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = self.rows[i]
        start, prompt_len, trace_len, text_start, prompt_bytes, trace_bytes = (int(v) for v in self._index[row])
        ids = self._tokens[start:start + prompt_len + trace_len].tolist()
        text = bytes(self._text[text_start:text_start + prompt_bytes + trace_bytes])
        uid, answer, difficulty = self._meta[row]
        return RedExample(uid, ids[:prompt_len], ids[prompt_len:], answer, difficulty,
                          text[:prompt_bytes].decode(), text[prompt_bytes:].decode())

    def select(self, rows: Sequence[int]) -> "MappedExamples":
        """The examples at positions `rows` of this sequence, over the same files."""
        return MappedExamples(self.directory, [self.rows[r] for r in rows])

    def prompt_digests(self) -> list[bytes]:
        """sha256 of each example's prompt token ids (int32 bytes), without building the examples."""
        digests = []
        for row in self.rows:
            start, prompt_len = int(self._index[row, 0]), int(self._index[row, 1])
            digests.append(hashlib.sha256(np.ascontiguousarray(self._tokens[start:start + prompt_len])).digest())
        return digests


def heldout_split(prompt_digests: Sequence[bytes], fraction: float) -> tuple[list[int], list[int]]:
    """(train positions, held-out positions) holding out `fraction` of the distinct prompts.

    The held-out prompts are those whose digests sort first: the split depends on neither the file's row order nor
    the run's seed, and copies of one prompt are always on the same side. At least one prompt is held out when
    `fraction` > 0, and at least one is left for training.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.eval_fraction must be in [0, 1), got {fraction}")
    distinct = sorted(set(prompt_digests))
    count = 0 if fraction == 0 else min(max(1, round(fraction * len(distinct))), len(distinct) - 1)
    held = set(distinct[:count])
    train = [i for i, d in enumerate(prompt_digests) if d not in held]
    heldout = [i for i, d in enumerate(prompt_digests) if d in held]
    return train, heldout
