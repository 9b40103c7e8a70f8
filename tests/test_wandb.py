"""The Weights & Biases logger in offline mode: a tiny run crashes after step 3 (checkpoint at step 2) and is resumed;
both segments are written under the run directory with one W&B run id, and their history equals metrics.jsonl.

Needs the `wandb` extra (pip install 'megatron_red[wandb]'); the W&B test skips without it. The offline .wandb files
are read with a minimal reader of their record log (LevelDB log format: 7-byte record headers in 32 KiB blocks, each
record a `wandb_internal_pb2.Record`), since wandb >= 0.19 ships no Python reader.
"""
from __future__ import annotations

import json

import pytest

from megatron_red import config as config_module
from megatron_red.errors import ConfigError
from megatron_red.trainer.metrics import read_metrics
from trainer_fixtures import tiny_config


def test_a_project_without_wandb_installed_is_a_clear_error(monkeypatch, tmp_path):
    """Refused when the config is loaded (on every rank, before any of them waits for another)."""
    monkeypatch.setattr(config_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"trainer.wandb_project='p' needs wandb: pip install .*\[wandb\]"):
        tiny_config(tmp_path / "run", "trainer.wandb_project=p")


def _records(path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _segment(run_file):
    """(run id, {step: {key: value}}, config) of one offline .wandb file."""
    run_id, history, config = None, {}, {}
    for record in _records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "history":
            items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = items
    return run_id, history, config


def test_offline_run_is_written_and_resume_continues_the_same_run_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'megatron_red[wandb]')")
    from megatron_red.trainer.red_trainer import RedTrainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "red"
    config = tiny_config(run_dir, "trainer.steps=4", "trainer.save_every=2", "trainer.eval_every=0",
                         "trainer.wandb_project=megatron-red-test")
    trainer = RedTrainer(config, run_dir)
    log = trainer.log.log

    def crash_after_step_3(step, values):
        log(step, values)
        if step == 3:
            raise KeyboardInterrupt("killed between checkpoints")
    trainer.log.log = crash_after_step_3
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.log.wandb_run.finish()  # what the killed process's exit would flush
    first_id = (run_dir / "wandb_run_id").read_text().strip()

    RedTrainer(config, run_dir, resume=True).train()
    assert (run_dir / "wandb_run_id").read_text().strip() == first_id

    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{first_id}.wandb" for f in files)
    (id1, history1, config1), (id2, history2, _) = map(_segment, files)
    assert id1 == id2 == first_id
    assert config1["algo"]["method"] == "red" and config1["trainer"]["wandb_project"] == "megatron-red-test"
    assert sorted(history1) == [1, 2, 3] and sorted(history2) == [3, 4]
    # The values are the logged metrics: those of metrics.jsonl (which holds the resumed run's step 3, a replay of
    # the first one's; only wall times differ).
    lines = {line["step"]: line for line in read_metrics(run_dir) if not line.get("final")}
    final = next(line for line in read_metrics(run_dir) if line.get("final"))
    for history in (history1, history2):
        for step, values in history.items():
            expected = {k: v for k, v in lines[step].items() if k != "step" and not k.startswith("time/")
                        and isinstance(v, (int, float)) and not isinstance(v, bool)}
            assert "reward/mean" in expected and "loss/loss" in expected
            assert {k: values[k] for k in expected} == pytest.approx(expected, rel=1e-12), step
    assert history2[4]["eval/accuracy"] == pytest.approx(final["eval/accuracy"], rel=1e-12)
