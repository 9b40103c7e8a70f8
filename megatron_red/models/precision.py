"""The dtypes a run may name (`model.dtype`), and the `auto` rule: one table for every backend."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` = bfloat16 on CUDA, float32 elsewhere; otherwise a name of `DTYPES`."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r} is not a dtype; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The `DTYPES` name of `dtype`."""
    return next(name for name, value in DTYPES.items() if value == dtype)
