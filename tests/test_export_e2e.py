"""A usable model out of every run, for both backends, on the built-in task at toy size: `train` writes
`RUN_DIR/hf` (and `hf/` into each checkpoint with `trainer.save_hf`), `megatron-red export` turns a checkpoint into
the same Hugging Face directory, and `megatron-red eval --model` takes the run directory, a checkpoint or the
export. Every export must load with `AutoModelForCausalLM.from_pretrained` and hold exactly the trained weights.

The Megatron run trains at PP=2 under a 2-rank gloo world (megatron-core's CUDA calls redirected by
tests/megatron_compat.py), then the same world exports its checkpoint at TP=2: dist_checkpointing reshards it and
the streamed export must equal the run's own `hf/`; so must `megatron-red export` run as a plain command (one
process, TP = PP = 1, no redirection).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from shared_files import EVAL_DATA, needs_shared
from test_megatron import read_hf_weights
from trainer_fixtures import cli, tiny_config

transformers = pytest.importorskip("transformers")

RUN = ["trainer.steps=2", "trainer.save_every=1", "trainer.eval_problems=2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("export_e2e")


def _eval(model: str, out: Path) -> dict:
    from megatron_red.eval.command import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", model, "--out", str(out), "--benchmarks", "math500",
                              "--data-dir", str(EVAL_DATA), "--limit", "2", "--max-new-tokens", "8",
                              "--prompt-style", "plain", "--device", "cpu", "--grade-workers", "1", "--no-progress"])
    assert run(args) == 0
    return json.loads((out / "results.json").read_text())


def _assert_hf_dir(path: Path, weights: dict[str, torch.Tensor]) -> None:
    """`path` is a complete export (shards + index + config + tokenizer) that loads with exactly `weights`."""
    from megatron_red.data.tokenizer import load_tokenizer

    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(weights) - {"lm_head.weight"}  # the tied head is stored once
    assert all((path / f).is_file() for f in index["weight_map"].values())
    assert load_tokenizer(str(path)).vocab_size > 0
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    state = model.state_dict()
    assert set(state) == set(weights)
    for k, v in weights.items():
        assert torch.equal(state[k], v), k


@needs_shared  # the eval benchmarks
def test_hf_backend_train_export_eval(root):
    from megatron_red.cli import main
    from megatron_red.trainer.build import warmed_up_student
    from megatron_red.trainer.red_trainer import RedTrainer

    run_dir = root / "hf_run"
    trainer = RedTrainer(tiny_config(run_dir, *RUN, "trainer.keep_last=1", "trainer.save_hf=true"), run_dir)
    trainer.train()
    weights = {k: v.detach().clone() for k, v in trainer.policy.model.state_dict().items()}
    start = read_hf_weights(warmed_up_student(trainer.config, trainer.task, root / ".cache"))  # cached
    assert max((weights[k] - start[k]).abs().max().item() for k in start) > 0  # training moved the weights

    _assert_hf_dir(run_dir / "hf", weights)
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_000002"]  # keep_last=1
    _assert_hf_dir(checkpoints / "step_000002" / "hf", weights)  # trainer.save_hf

    exported = root / "hf_export"
    assert main(["export", str(run_dir), "--out", str(exported)]) == 0
    _assert_hf_dir(exported, weights)
    halved = root / "hf_export_bf16"
    assert main(["export", str(checkpoints / "step_000002"), "--out", str(halved), "--dtype", "bfloat16"]) == 0
    _assert_hf_dir(halved, {k: v.to(torch.bfloat16).float() for k, v in weights.items()})
    assert json.loads((halved / "config.json").read_text())["dtype"] == "bfloat16"

    from_run = _eval(str(run_dir), root / "eval_run")
    assert from_run["model"] == os.path.realpath(run_dir / "hf")
    shutil.rmtree(checkpoints / "step_000002" / "hf")  # now the checkpoint itself must be exported for eval
    from_checkpoint = _eval(str(checkpoints / "step_000002"), root / "eval_checkpoint")
    assert (root / "eval_checkpoint" / "model" / "model.safetensors.index.json").is_file()
    assert from_checkpoint["benchmarks"] == from_run["benchmarks"]  # same weights, same seeds


def _megatron_worker(rank, world_size, run_dir, export_dir):
    import megatron_compat
    megatron_compat.install()
    from megatron.core import parallel_state as ps

    from megatron_red.trainer.export import export_checkpoint, resolve_hf_model
    from megatron_red.trainer.red_trainer import RedTrainer
    from test_megatron import hf_weights

    run_dir = Path(run_dir)
    config = tiny_config(run_dir, *RUN, "model.backend=megatron", "model.pipeline_model_parallel_size=2",
                         "trainer.keep_last=2")
    trainer = RedTrainer(config, run_dir)
    trainer.train()
    weights = {k: v.numpy() for k, v in hf_weights(trainer.policy).items()}
    ps.destroy_model_parallel()
    export_checkpoint(run_dir, export_dir, tp=2, pp=1)  # resharded from the PP=2 checkpoint
    ps.destroy_model_parallel()
    # What `eval --engine megatron --model CHECKPOINT` does under torchrun with a checkpoint that has no hf/.
    resolved = resolve_hf_model(run_dir / "checkpoints" / "step_000002", Path(export_dir + "_resolved"), tp=2, pp=1)
    assert resolved == Path(export_dir + "_resolved")
    ps.destroy_model_parallel()
    return weights


@needs_shared  # the eval benchmarks
def test_megatron_backend_train_export_eval(root):
    run_dir, exported = root / "megatron_run", root / "megatron_export"
    weights = run_distributed(_megatron_worker, 2, str(run_dir), str(exported))[0]
    weights = {k: torch.from_numpy(v) for k, v in weights.items()}
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]  # tied: what from_pretrained shows
    _assert_hf_dir(run_dir / "hf", weights)
    _assert_hf_dir(exported, weights)
    _assert_hf_dir(root / "megatron_export_resolved", weights)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_000001", "step_000002"]
    # The command as a user runs it without torchrun: a world of one process at TP = PP = 1, plain CPU.
    single = root / "megatron_export_single"
    result = cli("export", str(run_dir / "checkpoints" / "step_000002"), "--out", str(single))
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_hf_dir(single, weights)

    result = _eval(str(run_dir), root / "eval_megatron")
    assert result["model"] == os.path.realpath(run_dir / "hf")
    assert result["benchmarks"]["math500"]["num_problems"] == 2
