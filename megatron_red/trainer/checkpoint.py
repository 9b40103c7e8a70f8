"""Atomic, resumable checkpoints: `RUN_DIR/checkpoints/step_NNNNNN/` plus a `latest` pointer.

A checkpoint is written into a temporary directory, flushed, then renamed into place, and only then does `latest`
move (itself replaced atomically). A crash while writing leaves at worst a stray `*.tmp` directory that nothing
reads, so the newest checkpoint that `latest` names always loads whole.

Under torchrun the policy writes its shards collectively (Megatron: dist_checkpointing); global rank 0 writes
`trainer.pt` (with its RNG state), every other rank its own `rng_rank{R}.pt`, and rank 0 alone renames and moves
`latest` once every rank has written (the directory must be on a file system all ranks share).
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from megatron_red.trainer.distributed import barrier, global_rank, is_main_process


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(run_dir: str | Path, step: int, policy, trainer_state: dict) -> Path:
    """Write policy (via its `save_checkpoint`) and trainer state for `step`; returns the final directory."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if is_main_process():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    policy.save_checkpoint(str(tmp))
    if is_main_process():
        torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / "trainer.pt")
        _fsync_tree(tmp)
    else:
        rank_rng = tmp / _rank_rng_file(global_rank())
        torch.save(rng_state(), rank_rng)
        with open(rank_rng, "rb") as f:
            os.fsync(f.fileno())
    barrier()
    if is_main_process():
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        pointer_tmp = root / "latest.tmp"
        pointer_tmp.write_text(final.name)
        with open(pointer_tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(pointer_tmp, root / "latest")
    barrier()
    return final


def _rank_rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "trainer.pt").exists():
        raise FileNotFoundError(f"{pointer} names {path}, which has no trainer.pt")
    return path


def load_checkpoint(path: Path, policy) -> dict:
    """Restore the policy and the RNG states; return the trainer state (with `step`)."""
    policy.load_checkpoint(str(path))
    state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    rng = state.pop("rng")
    rank_rng = path / _rank_rng_file(global_rank())
    if not is_main_process() and rank_rng.exists():  # absent when resuming on more ranks than were saved
        rng = torch.load(rank_rng, map_location="cpu", weights_only=False)
    set_rng_state(rng)
    return state
