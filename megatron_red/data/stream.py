"""`PromptStream`: endless, seeded, resumable batches of prompts for the RED trainer.

Each epoch visits every example once in an order drawn from (seed, epoch); a batch that runs past the end of an
epoch is completed from the next one, so every batch has exactly `batch_size` examples. The state is three
integers (epoch, position, seed), which is all a checkpoint needs for a resumed run to see the same batches.
"""
from __future__ import annotations

import random
from typing import Iterator, Sequence

from megatron_red.data.openr1 import RedExample


class PromptStream:
    """Seeded shuffled batches of `examples`, epoch after epoch."""

    def __init__(self, examples: Sequence[RedExample], batch_size: int, seed: int = 0):
        if not examples:
            raise ValueError("PromptStream needs at least one example")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.examples = examples  # not copied: a memory-mapped dataset (data/cache.py) stays mapped
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        # A fresh RNG per epoch (not one advancing stream) makes the order a pure function of (seed, epoch).
        order = list(range(len(self.examples)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self) -> list[RedExample]:
        batch = []
        while len(batch) < self.batch_size:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(self.batch_size - len(batch), len(self._order) - self.position)
            batch.extend(self.examples[i] for i in self._order[self.position:self.position + take])
            self.position += take
        return batch

    def __iter__(self) -> Iterator[list[RedExample]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        n = state.get("num_examples", len(self.examples))
        if n != len(self.examples):
            raise ValueError(f"PromptStream state is for {n} examples, this stream has {len(self.examples)}")
        if not 0 <= state["position"] <= len(self.examples):
            raise ValueError(f"PromptStream state position {state['position']} out of range")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)
