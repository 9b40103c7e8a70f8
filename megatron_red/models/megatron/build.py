"""Inputs of the Megatron backend (`model.backend=megatron`): Hugging Face checkpoints and the fused-kernel switch.

Every rank loads the full Hugging Face checkpoint (config + safetensors) and keeps its TP x PP shard
(`policy.build_sharded_model`). Rollouts sample from those shards (`megatron_red.rollout.megatron`).
"""
from __future__ import annotations

from pathlib import Path

import torch


def load_hf_checkpoint(path: str | Path) -> tuple[object, dict[str, torch.Tensor]]:
    """(transformers config, full state dict on CPU) of a local checkpoint directory of `*.safetensors` files."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not (path / "config.json").exists() or not files:
        raise ValueError(f"{path}: expected a Hugging Face checkpoint directory (config.json + *.safetensors)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file), device="cpu"))
    return AutoConfig.from_pretrained(str(path), local_files_only=True), state


def fused_kernel_enabled(mode: str) -> bool:
    """`model.fused_kernel` auto | on | off -> whether the LM-head log-probs go through the fused kernel."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"model.fused_kernel must be auto, on or off, got {mode!r}")
    if mode == "auto":
        from megatron_red.kernels import fused_kernel_available

        return torch.cuda.is_available() and fused_kernel_available(torch.device("cuda"))
    return mode == "on"
