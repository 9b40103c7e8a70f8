"""Inputs of the Megatron backend (`model.backend=megatron`): Hugging Face checkpoints and the fused-kernel switch.

Every rank reads only its TP x PP shard of the Hugging Face checkpoint: `load_hf_config` gives the config, and
`HFCheckpoint` (models/hf_checkpoint.py) the lazily opened weights that `policy.build_sharded_model` slices
(`weights.load_hf_weights`). Rollouts sample from those shards (`megatron_red.rollout.megatron`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_red.models.hf_checkpoint import is_hf_checkpoint


def load_hf_config(path: str | Path):
    """The transformers config of a local checkpoint directory (its weights are read lazily, see HFCheckpoint)."""
    from transformers import AutoConfig

    if not is_hf_checkpoint(path):
        raise ValueError(f"{path}: expected a Hugging Face checkpoint directory (config.json + *.safetensors)")
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def fused_kernel_enabled(mode: str) -> bool:
    """`model.fused_kernel` auto | on | off -> whether the LM-head log-probs go through the fused kernel."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"model.fused_kernel must be auto, on or off, got {mode!r}")
    if mode == "auto":
        from megatron_red.kernels import fused_kernel_available

        return torch.cuda.is_available() and fused_kernel_available(torch.device("cuda"))
    return mode == "on"
