"""Checkpoint retention (`trainer.keep_last`) and the free-space check before a save.

A run saving every step with keep_last=2 is SIGKILLed while writing its step-4 checkpoint: exactly the two newest
complete checkpoints (steps 2 and 3) must remain, `latest` naming step 3, with the half-written one left as a
`*.tmp` directory. Resumed to step 6, the run must again hold exactly steps 5 and 6 and no `*.tmp`. The size
estimate the free-space check uses must match what a save writes.
"""
from __future__ import annotations

import collections
import os
import signal
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from trainer_fixtures import TINY_OVERRIDES, tiny_config

RUN = ["trainer.steps=6", "trainer.save_every=1", "trainer.keep_last=2", "trainer.eval_problems=2"]


def _complete(run_dir: Path) -> list[str]:
    from megatron_red.trainer.checkpoint import complete_checkpoints

    return [p.name for p in complete_checkpoints(run_dir / "checkpoints")]


def _killed_while_saving_step_4(run_dir: str) -> None:
    from megatron_red.trainer.red_trainer import RedTrainer

    trainer = RedTrainer(tiny_config(Path(run_dir), *RUN), run_dir)
    save = trainer.policy.save_checkpoint

    def save_or_die(path):
        if trainer.step == 4:
            (Path(path) / "policy.pt").write_bytes(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        save(path)

    trainer.policy.save_checkpoint = save_or_die
    trainer.train()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("retention")


def test_keep_last_across_a_kill_during_a_save(root):
    from megatron_red.cli import main

    run_dir = root / "killed"
    proc = mp.get_context("spawn").Process(target=_killed_while_saving_step_4, args=(str(run_dir),))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == -signal.SIGKILL
    checkpoints = run_dir / "checkpoints"
    assert _complete(run_dir) == ["step_000002", "step_000003"]
    assert (checkpoints / "latest").read_text() == "step_000003"
    assert (checkpoints / "step_000004.tmp" / "policy.pt").read_bytes() == b"half a checkpoint"

    assert main(["train", "--resume", str(run_dir)]) == 0
    assert _complete(run_dir) == ["step_000005", "step_000006"]
    assert (checkpoints / "latest").read_text() == "step_000006"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_000005", "step_000006"]
    for name in _complete(run_dir):
        assert {"policy.pt", "trainer.pt", "hf_config"} <= {p.name for p in (checkpoints / name).iterdir()}


def test_prune_keeps_the_newest(tmp_path):
    from megatron_red.trainer.checkpoint import prune_checkpoints

    for name in ["step_000010", "step_000009", "step_1000000", "step_000011", "notes"]:
        (tmp_path / name).mkdir()
    prune_checkpoints(tmp_path, 0)  # 0 keeps everything
    assert len(list(tmp_path.iterdir())) == 5
    prune_checkpoints(tmp_path, 2)  # by step number, not by name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "step_000011", "step_1000000"]


def test_free_space_check(root, monkeypatch, capsys):
    from megatron_red.cli import main
    from megatron_red.trainer import checkpoint
    from megatron_red.trainer.red_trainer import RedTrainer

    run_dir = root / "estimate"
    trainer = RedTrainer(tiny_config(run_dir, "trainer.steps=1"), run_dir)
    trainer.train()  # one step: the optimiser state exists
    written = (run_dir / "checkpoints" / "step_000001" / "policy.pt").stat().st_size
    estimate = trainer.policy.checkpoint_nbytes()
    assert 0.9 * written < estimate <= written  # the tensors' bytes; torch.save adds a little
    assert trainer.policy.checkpoint_nbytes(with_hf=True) > estimate

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(10**12, 10**12, estimate))
    full = root / "full_disk"
    assert main(["train", *TINY_OVERRIDES, "trainer.steps=1", f"trainer.out_dir={full}"]) == 2
    err = capsys.readouterr().err
    assert "not enough free space to save a checkpoint" in err and "trainer.keep_last" in err, err
    assert not (full / "checkpoints" / "step_000001").exists() and not list((full / "checkpoints").glob("*.tmp"))
