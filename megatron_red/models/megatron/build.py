"""Inputs of the Megatron backend (`model.backend=megatron`): Hugging Face checkpoints.

Every rank reads only its TP x PP shard of the Hugging Face checkpoint: `load_hf_config` gives the config, and
`HFCheckpoint` (models/hf_checkpoint.py) the lazily opened weights that `policy.build_sharded_model` slices
(`weights.load_hf_weights`). Rollouts sample from those shards (`megatron_red.rollout.megatron`).
"""
from __future__ import annotations

from pathlib import Path

from megatron_red.errors import ConfigError
from megatron_red.models.hf_checkpoint import is_hf_checkpoint


def load_hf_config(path: str | Path):
    """The transformers config of a local checkpoint directory (its weights are read lazily, see HFCheckpoint)."""
    from transformers import AutoConfig

    if not is_hf_checkpoint(path):
        raise ConfigError(f"{path}: expected a Hugging Face checkpoint directory (config.json + *.safetensors)")
    return AutoConfig.from_pretrained(str(path), local_files_only=True)
