"""Atomic, resumable checkpoints: `RUN_DIR/checkpoints/step_NNNNNN/` plus a `latest` pointer, and Hugging Face exports.

A checkpoint is written into a temporary directory, flushed, then renamed into place, and only then does `latest`
move (itself replaced atomically). A crash while writing leaves at worst a stray `*.tmp` directory that nothing
reads (the next save removes it), so the newest checkpoint that `latest` names always loads whole.

Under torchrun the policy writes its shards collectively (Megatron: dist_checkpointing); global rank 0 writes
`trainer.pt` (with its RNG state), every other rank its own `rng_rank{R}.pt`, and rank 0 alone renames and moves
`latest` once every rank has written (the directory must be on a file system all ranks share). What the ranks
decide from the directory (which checkpoint to resume, its step and trainer state, whether the run's end must save)
is read by global rank 0 and broadcast, so ranks whose views of the shared file system lag cannot disagree. A
resume restores the CUDA RNG states of the GPUs that exist both in the checkpoint and in the process.

Every checkpoint also holds `hf_config/` (the model's config.json, with the training dtype, and the tokenizer), so
that `megatron-red export` can turn it into a Hugging Face model on its own; with `trainer.save_hf` it holds that
model too (`hf/`). Retention (`trainer.keep_last`): once a checkpoint is complete, all but the newest `keep_last`
complete ones are deleted (renamed to `*.tmp` first, so a kill mid-deletion leaves nothing that looks complete).
Before writing, the checkpoint's size is estimated and compared with the free space (`DiskSpaceError`).
"""
from __future__ import annotations

import copy
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from megatron_red.distributed import barrier, broadcast_from_main, global_rank, is_main_process
from megatron_red.errors import ConfigError

HF_DIR = "hf"
HF_CONFIG_DIR = "hf_config"
_STEP_DIR = re.compile(r"step_(\d+)")
# Free space required before a save, as a multiple of the estimated checkpoint size.
FREE_SPACE_MARGIN = 1.1


class DiskSpaceError(ConfigError):
    """Too little free space for the next checkpoint: trainer.out_dir's file system cannot hold what
    trainer.keep_last keeps."""


def rng_state() -> dict:
    """Python's, numpy's and torch's generator states, and one CUDA generator state per GPU this process sees."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`'s states. The CUDA states are restored for the GPUs that exist both in the checkpoint
    and in this process (a run may resume where more or fewer GPUs are visible per process: another node type,
    another CUDA_VISIBLE_DEVICES); when the counts differ a line says which were restored."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    saved = state.get("cuda", [])
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for device, cuda_state in enumerate(saved[:visible]):
        torch.cuda.set_rng_state(cuda_state, device)
    if len(saved) != visible:
        restored = min(len(saved), visible)
        print(f"[resume] rank {global_rank()}: the checkpoint holds the CUDA RNG states of {len(saved)} GPU(s), this "
              f"process sees {visible}: restored {f'those of GPUs 0-{restored - 1}' if restored else 'none'}",
              flush=True)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(run_dir: str | Path, step: int, policy, trainer_state: dict, tokenizer=None,
                    save_hf: bool = False, keep_last: int = 0) -> Path:
    """Write policy (via its `save_checkpoint`) and trainer state for `step`; returns the final directory.

    tokenizer: saved with the model's config into `hf_config/` (and `hf/`). save_hf: also write the Hugging Face
    export `hf/`. keep_last: complete checkpoints kept afterwards (0: all).
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    check_free_space(root, policy.checkpoint_nbytes(with_hf=save_hf))
    if is_main_process():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):  # saves are sequential: any leftover is from a save that died
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        tmp.mkdir()
    barrier()
    policy.save_checkpoint(str(tmp))
    if save_hf:
        save_hf_model(policy, tokenizer, tmp / HF_DIR, atomic=False)
    if is_main_process():
        _save_hf_config(policy, tokenizer, tmp / HF_CONFIG_DIR)
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
        prune_checkpoints(root, keep_last)
    barrier()
    return final


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints under `RUN_DIR/checkpoints`, oldest first."""
    root = Path(root)
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (none when 0). Each is first renamed out of the
    `step_N` namespace, so a kill during the deletion leaves only a `*.tmp` directory behind."""
    if keep_last == 0:
        return
    for old in complete_checkpoints(root)[:-keep_last]:
        doomed = old.with_name(old.name + ".tmp")
        os.rename(old, doomed)
        shutil.rmtree(doomed)


def check_free_space(root: Path, nbytes: int) -> None:
    """Collective: raise `DiskSpaceError` on every rank when the file system holding `root` has less than
    FREE_SPACE_MARGIN x `nbytes` free (global rank 0 checks: the run directory is shared)."""
    message = None
    if is_main_process():
        probe = root if root.exists() else root.parent
        probe.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(probe).free
        if free < FREE_SPACE_MARGIN * nbytes:
            message = (f"not enough free space to save a checkpoint under {root}: it needs about "
                       f"{nbytes / 2**30:.2f} GiB (estimated from the parameter and optimiser sizes, plus "
                       f"{FREE_SPACE_MARGIN - 1:.0%}) and {free / 2**30:.2f} GiB are free. Free disk space, lower "
                       f"trainer.keep_last, turn trainer.save_hf off, or move trainer.out_dir")
    message = broadcast_from_main(message)
    if message:
        raise DiskSpaceError(message)


def _param_dtype(policy) -> torch.dtype:
    return next(policy.model.parameters()).dtype


def _save_hf_config(policy, tokenizer, directory: Path) -> None:
    """config.json (its `dtype`: the parameters' dtype, which a Megatron export rebuilds the model with) and the
    tokenizer: what an export needs besides the weights."""
    config = copy.deepcopy(policy.hf_config)
    config.dtype = _param_dtype(policy)
    config.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save(str(directory))


def save_hf_model(policy, tokenizer, directory: str | Path, atomic: bool = True, dtype=None) -> Path:
    """Collective: the policy as a Hugging Face model directory (safetensors shards + index + config.json) with
    the tokenizer. `atomic`: written next to `directory` and renamed over it once complete."""
    directory = Path(directory)
    target = directory.with_name(directory.name + ".tmp") if atomic else directory
    if is_main_process() and target.exists():
        shutil.rmtree(target)
    barrier()
    policy.save_pretrained(str(target), dtype=dtype)
    if is_main_process():
        if tokenizer is not None:
            tokenizer.save(str(target))
        if atomic:
            _fsync_tree(target)
            if directory.exists():
                shutil.rmtree(directory)
            os.rename(target, directory)
    barrier()
    return directory


def _rank_rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def _on_main(read):
    """`read()` evaluated by global rank 0 alone and its result (or the error it raised) given to every rank.

    Why: a decision that sends ranks into a collective (load a checkpoint, save a final one) must be the same on
    every rank, and ranks on different nodes can see a shared file system differently for a while (NFS attribute
    caching): ranks deciding on their own views could disagree and hang."""
    answer = None
    if is_main_process():
        try:
            answer = (read(), None)
        except Exception as err:  # noqa: BLE001 - raised again on every rank below
            answer = (None, err)
    value, error = broadcast_from_main(answer)
    if error is not None:
        raise error
    return value


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `RUN_DIR/checkpoints/latest` names, or None. Collective under torch.distributed: global rank 0
    reads the pointer (`_on_main`)."""
    def read():
        pointer = Path(run_dir) / "checkpoints" / "latest"
        if not pointer.exists():
            return None
        path = pointer.parent / pointer.read_text().strip()
        if not (path / "trainer.pt").exists():
            raise FileNotFoundError(f"{pointer} names {path}, which has no trainer.pt")
        return path

    return _on_main(read)


def needs_final_save(run_dir: str | Path, step: int, save_every: int) -> bool:
    """Whether the end of a run must write a checkpoint: its last step was not saved, or it has none. Collective:
    decided on global rank 0."""
    return bool(step % save_every) or latest_checkpoint(run_dir) is None


def _trainer_state(path: Path) -> dict:
    return torch.load(Path(path) / "trainer.pt", map_location="cpu", weights_only=False)


def saved_step(path: Path) -> int:
    """The step a checkpoint was written at (before its policy state is loaded). Collective: read on rank 0."""
    return _on_main(lambda: _trainer_state(path)["step"])


def load_checkpoint(path: Path, policy) -> dict:
    """Restore the policy and the RNG states; return the trainer state (with `step`). Collective: the trainer
    state is read on global rank 0 and broadcast; every other rank reads its own RNG state file."""
    policy.load_checkpoint(str(path))
    state = _on_main(lambda: _trainer_state(path))
    rng = state.pop("rng")
    rank_rng = path / _rank_rng_file(global_rank())
    if not is_main_process() and rank_rng.exists():  # absent when resuming on more ranks than were saved
        rng = torch.load(rank_rng, map_location="cpu", weights_only=False)
    set_rng_state(rng)
    return state
