"""AdamW with linear warm-up then cosine decay, and gradient-norm clipping, shared by every policy backend.

The schedule is a pure function of the step (`lr_multiplier`), so a backend that builds its own optimiser
(megatron-core's distributed optimiser) can reuse it unchanged and a resumed run lands on the same value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (defaults: the paper's RED run, notes.md).

    lr:            peak learning rate (paper: 2e-6 for RED / GRPO, 5e-5 for the SFT baseline).
    betas:         Adam (beta1, beta2); the authors use (0.9, 0.95).
    weight_decay:  decoupled AdamW decay, applied to matrices only (not to biases and norm gains); the paper
                   does not state it, 0.01 is verl's actor default.
    eps:           Adam epsilon.
    warmup_steps:  optimiser steps of linear warm-up from lr/warmup_steps to lr (0: none).
    total_steps:   optimiser step at which the cosine decay reaches min_lr_ratio * lr (0: constant lr after
                   warm-up). A run's default (`load_config`) is its optimiser steps: trainer.steps x
                   trainer.mini_batches_per_step x trainer.epochs_per_step, one per SFT-only step.
    min_lr_ratio:  floor of the cosine decay as a fraction of lr (paper: cosine to 0.1x).
    grad_clip:     max global L2 norm of the gradient (paper: 1.0); <= 0 disables clipping (the norm is still reported).
    """

    lr: float = 2e-6
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 0
    total_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or self.total_steps < 0:
            raise ValueError(f"warmup_steps and total_steps must be >= 0, got {self.warmup_steps}, {self.total_steps}")
        if self.total_steps and self.total_steps < self.warmup_steps:
            raise ValueError(f"total_steps ({self.total_steps}) must be >= warmup_steps ({self.warmup_steps})")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def lr_multiplier(step: int, config: OptimConfig) -> float:
    """Fraction of the peak lr used by optimiser step `step` (0-based): linear warm-up, then cosine to min_lr_ratio."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.total_steps == 0:
        return 1.0
    decay_steps = max(config.total_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decay, vectors (biases, norm gains) do not."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]], config: OptimConfig,
                    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `named_params` and its warm-up/cosine scheduler (call `scheduler.step()` after each step)."""
    optimizer = torch.optim.AdamW(param_groups(named_params, config.weight_decay), lr=config.lr,
                                  betas=config.betas, eps=config.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config))
    return optimizer, scheduler


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Scale gradients so their global L2 norm is at most `max_norm` (no-op if <= 0); return the pre-clip norm."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm)
