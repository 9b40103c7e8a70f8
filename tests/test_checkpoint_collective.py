"""What a resume reads from the run directory is decided once, and restores what exists (issue 33).

- RNG states: a checkpoint written by a process that saw 2 GPUs resumes in one that sees 1, and the other way
  round. No GPU here: the CUDA generator calls are stand-ins for a fake GPU count (torch.cuda.is_available /
  device_count / get_rng_state_all / set_rng_state, the last raising IndexError for a GPU that does not exist, as
  torch's does); everything else is the real `trainer.checkpoint` save and load, Python / numpy / torch states
  included.
- Decisions from the shared file system (three gloo processes): the views of ranks 1 and 2 lag (they look at
  copies of the run from before its newest checkpoint and from before any, as nodes with stale NFS attributes
  would), yet every rank resumes the same checkpoint at the same step, agrees whether the run's end must save, and
  agrees that a Megatron checkpoint is one.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from dist_utils import run_distributed
from megatron_red.trainer import checkpoint


class _FakeGPUs:
    """CUDA generator states of `count` fake GPUs: state i is a distinct byte tensor; restores are recorded."""

    def __init__(self, monkeypatch, count: int):
        self.count, self.restored = count, {}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.state(i) for i in range(count)])
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)

    @staticmethod
    def state(device: int) -> torch.Tensor:
        return torch.full((16,), 10 + device, dtype=torch.uint8)

    def set_rng_state(self, state, device=0):
        if int(device) >= self.count:
            raise IndexError(f"list index out of range (GPU {device} of {self.count})")
        self.restored[int(device)] = state.clone()


class _Policy:
    """The policy interface `trainer.checkpoint` uses, holding one tensor (not a model: the RNG states matter)."""

    def __init__(self):
        self.model = torch.nn.Linear(2, 2)
        self.hf_config = transformers.Qwen2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                  num_key_value_heads=1, intermediate_size=8, vocab_size=16)

    def checkpoint_nbytes(self, with_hf=False):
        return 1024

    def save_checkpoint(self, directory):
        torch.save(self.model.state_dict(), Path(directory) / "policy.pt")

    def load_checkpoint(self, directory):
        self.model.load_state_dict(torch.load(Path(directory) / "policy.pt"))


@pytest.mark.parametrize("saved_gpus,visible_gpus", [(2, 1), (1, 2), (2, 0)])
def test_resume_with_another_gpu_count_restores_what_exists(tmp_path, monkeypatch, capsys, saved_gpus, visible_gpus):
    with monkeypatch.context() as saving:
        _FakeGPUs(saving, saved_gpus)
        random.seed(1), np.random.seed(1), torch.manual_seed(1)
        path = checkpoint.save_checkpoint(tmp_path, 3, _Policy(), {"stream": "s"})
        want = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)  # the resumed process starts elsewhere
    gpus = _FakeGPUs(monkeypatch, visible_gpus)
    state = checkpoint.load_checkpoint(path, _Policy())
    assert state["step"] == 3 and state["stream"] == "s"
    assert (random.random(), np.random.rand(), torch.rand(1)) == want
    restored = min(saved_gpus, visible_gpus)
    assert sorted(gpus.restored) == list(range(restored))
    assert all(torch.equal(gpus.restored[i], _FakeGPUs.state(i)) for i in range(restored))
    out = capsys.readouterr().out
    assert (f"the checkpoint holds the CUDA RNG states of {saved_gpus} GPU(s), this process sees {visible_gpus}: "
            f"restored {'those of GPUs 0-0' if restored else 'none'}") in out


def test_same_gpu_count_restores_every_gpu_silently(tmp_path, monkeypatch, capsys):
    _FakeGPUs(monkeypatch, 2)
    path = checkpoint.save_checkpoint(tmp_path, 1, _Policy(), {})
    gpus = _FakeGPUs(monkeypatch, 2)
    checkpoint.load_checkpoint(path, _Policy())
    assert sorted(gpus.restored) == [0, 1] and "RNG states" not in capsys.readouterr().out


def _decisions(rank, world_size, views: list[str]):
    """Rank r looks at the run through `views[r]`."""
    from megatron_red.models.megatron.checkpoint import _check_checkpoint

    run_dir = Path(views[rank])
    latest = checkpoint.latest_checkpoint(run_dir)
    step = checkpoint.saved_step(latest)
    _check_checkpoint(str(run_dir / "checkpoints" / "step_000004"))
    return str(latest), step, checkpoint.needs_final_save(run_dir, 4, save_every=2)


def test_ranks_with_a_lagging_view_of_the_run_take_rank_0s_decisions(tmp_path):
    fresh, stale, empty = tmp_path / "run", tmp_path / "stale_view", tmp_path / "empty_view"
    empty.mkdir()
    for step in (2, 4):
        checkpoint.save_checkpoint(fresh, step, _Policy(), {})
        if step == 2:
            shutil.copytree(fresh, stale)
    (fresh / "checkpoints" / "step_000004" / "trainer_state.pt").touch()  # what a Megatron checkpoint holds
    # What ranks 1 and 2 would decide alone: another checkpoint, or none (then a final save, which would hang).
    assert checkpoint.latest_checkpoint(stale).name == "step_000002" and checkpoint.latest_checkpoint(empty) is None
    ranks = run_distributed(_decisions, 3, [str(fresh), str(stale), str(empty)])
    assert ranks == [(str(fresh / "checkpoints" / "step_000004"), 4, False)] * 3
