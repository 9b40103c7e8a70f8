"""Hugging Face checkpoint directories on disk: read lazily, written as a stream of tensors.

Reading (`HFCheckpoint`): a directory with `config.json` and either one `*.safetensors` file or several shards
named by `model.safetensors.index.json`. Tensors are sliced lazily (`safe_open(...).get_slice`), so a reader copies
the part of a tensor it needs without reading the rest of the file, and files are mapped only inside `open()`:
a rank's resident memory holds the pages of the tensors it is copying, not the checkpoint. `StateDictWeights`
gives an in-memory state dict the same interface (tests, models built in memory).

Writing (`write_hf_checkpoint`): tensors arrive one at a time in an order fixed in advance together with their
shapes and dtypes (`TensorSpec`), so the header of every shard is known before its first byte: tensors are
assigned to shards of at most `max_shard_bytes` in arrival order, each shard's header is written, then each
tensor's bytes go to their offset as the tensor arrives. The writer holds one tensor. The files are the
safetensors format (8-byte little-endian header length, JSON header of dtype / shape / data_offsets, raw
little-endian row-major data), which `safetensors` reads but has no streaming writer for; then
`model.safetensors.index.json` (written last: its presence marks a complete directory) and `config.json`.

Mixtures of experts: transformers 5 holds a layer's experts as two stacked tensors (`mlp.experts.gate_up_proj`
[experts, 2 x width, hidden], gate rows first, and `mlp.experts.down_proj` [experts, hidden, width]) but reads and
writes checkpoints in the released per-expert layout (`mlp.experts.{e}.gate_proj / up_proj / down_proj.weight`),
which the Megatron backend and other engines read too; `checkpoint_tensors` gives a state dict that layout, and
`save_state_dict` writes it.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from megatron_red.errors import ConfigError

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
# torch dtype -> safetensors dtype name
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def is_hf_checkpoint(path: str | Path) -> bool:
    """A directory with `config.json` and safetensors weights (an index, or `*.safetensors` files)."""
    path = Path(path)
    return (path / "config.json").is_file() and ((path / INDEX_FILE).is_file() or any(path.glob("*.safetensors")))


class HFCheckpoint:
    """The safetensors weights of a local Hugging Face checkpoint directory, opened lazily.

    path: the directory (single `*.safetensors` file, or shards listed by `model.safetensors.index.json`).
    """

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not (self.path / "config.json").is_file() or not files:
            raise ConfigError(f"{self.path}: expected a Hugging Face checkpoint directory "
                              f"(config.json + *.safetensors or {INDEX_FILE})")
        self._file: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        for name in files:
            file = self.path / name
            if not file.is_file():
                raise ValueError(f"{index} names {name}, which is missing")
            with safe_open(str(file), framework="pt") as f:  # reads the header only
                for key in f.keys():
                    self._file[key] = file
                    self._shape[key] = tuple(f.get_slice(key).get_shape())

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The stored shape of tensor `name`, None when the checkpoint has no such tensor."""
        return self._shape.get(name)

    def where(self, name: str) -> str:
        return str(self._file.get(name, self.path))

    @contextlib.contextmanager
    def open(self) -> Iterator[Callable[[str], object]]:
        """`get(name)` -> a lazily sliceable view of tensor `name` (index it with a tuple of slices); the files it
        maps stay open until the block ends."""
        from safetensors import safe_open

        with contextlib.ExitStack() as stack:
            handles = {}

            def get(name: str):
                file = self._file[name]
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
                return handles[file].get_slice(name)

            yield get


class StateDictWeights:
    """An in-memory state dict behind the `HFCheckpoint` interface."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.state_dict = state_dict

    def shape(self, name: str) -> tuple[int, ...] | None:
        tensor = self.state_dict.get(name)
        return None if tensor is None else tuple(tensor.shape)

    def where(self, name: str) -> str:
        return "the state dict"

    @contextlib.contextmanager
    def open(self) -> Iterator[Callable[[str], torch.Tensor]]:
        yield self.state_dict.__getitem__


def as_hf_weights(weights) -> HFCheckpoint | StateDictWeights:
    """A checkpoint directory (path), a state dict, or an object already offering `shape` / `open`."""
    if isinstance(weights, (str, os.PathLike)):
        return HFCheckpoint(weights)
    if isinstance(weights, dict):
        return StateDictWeights(weights)
    if hasattr(weights, "shape") and hasattr(weights, "open"):
        return weights
    raise TypeError(f"expected a checkpoint directory, a state dict or HFCheckpoint, got {type(weights).__name__}")


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its Hugging Face name, shape and dtype (as stored)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def _shard_plan(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(shard: list[TensorSpec]) -> tuple[bytes, dict[str, int]]:
    """The header bytes (length prefix included) and each tensor's absolute file offset. Tensors are laid out by
    decreasing item size, so every offset is a multiple of its tensor's item size (readers map them in place)."""
    header, offsets, position = {"__metadata__": {"format": "pt"}}, {}, 0
    for spec in sorted(shard, key=lambda s: -s.dtype.itemsize):
        if spec.dtype not in _ST_DTYPES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be written to safetensors")
        header[spec.name] = {"dtype": _ST_DTYPES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [position, position + spec.nbytes]}
        offsets[spec.name] = position
        position += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # the data starts 8-byte aligned
    start = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, {name: start + off for name, off in offsets.items()}


def write_safetensors(directory: str | Path, specs: list[TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]],
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict[str, str]:
    """Write `tensors` (name, tensor) — exactly `specs`, in their order — into `model-0000i-of-0000n.safetensors`
    shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own) and return the weight map.
    Tensors are cast to their spec's dtype and moved to the CPU one at a time."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names in the export plan")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards = _shard_plan(specs, max_shard_bytes)
    weight_map: dict[str, str] = {}
    stream = iter(tensors)
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offsets = _header(shard)
        with open(directory / file_name, "wb") as f:
            f.write(header)
            f.truncate(len(header) + sum(s.nbytes for s in shard))
            for spec in shard:
                name, tensor = next(stream, (None, None))
                if name != spec.name:
                    raise RuntimeError(f"export stream gave {name!r} where {spec.name!r} was planned")
                tensor = tensor.detach().to(device="cpu", dtype=spec.dtype).contiguous()
                if tuple(tensor.shape) != spec.shape:
                    raise RuntimeError(f"{name}: shape {tuple(tensor.shape)} != planned {spec.shape}")
                f.seek(offsets[name])
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
                del tensor
                weight_map[name] = file_name
            f.flush()
            os.fsync(f.fileno())
    if next(stream, None) is not None:
        raise RuntimeError("export stream gave more tensors than planned")
    return weight_map


def write_hf_checkpoint(directory: str | Path, hf_config, specs: list[TensorSpec],
                        tensors: Iterable[tuple[str, torch.Tensor]],
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """`config.json` (with `dtype` set to the weights' dtype), the safetensors shards and, last, the index."""
    directory = Path(directory)
    weight_map = write_safetensors(directory, specs, tensors, max_shard_bytes)
    config = copy.deepcopy(hf_config)
    dtypes = {s.dtype for s in specs if s.dtype.is_floating_point}
    if len(dtypes) == 1:
        config.dtype = dtypes.pop()
    config.save_pretrained(str(directory))
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    tmp = directory / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, directory / INDEX_FILE)
    return directory


_STACKED_EXPERTS = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def checkpoint_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` with transformers' stacked expert tensors split into the per-expert checkpoint tensors (module
    docstring; views, no copy); every other entry as it is, in order."""
    out = {}
    for name, tensor in state_dict.items():
        match = _STACKED_EXPERTS.match(name)
        if match is None:
            out[name] = tensor
            continue
        for e in range(tensor.shape[0]):
            prefix = f"{match['prefix']}.{e}."
            if match["kind"] == "down_proj":
                out[prefix + "down_proj.weight"] = tensor[e]
            else:
                gate, up = tensor[e].chunk(2, dim=0)
                out[prefix + "gate_proj.weight"], out[prefix + "up_proj.weight"] = gate, up
    return out


def unique_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` without the entries that alias an earlier one (a tied LM head is saved once, as HF does)."""
    seen, out = set(), {}
    for name, tensor in state_dict.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tensor.stride())
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out


def save_state_dict(state_dict: dict[str, torch.Tensor], hf_config, directory: str | Path,
                    dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """An in-memory model's state dict as a Hugging Face checkpoint directory (the layout `write_hf_checkpoint`
    gives a Megatron export: same shards, same index; experts one by one, `checkpoint_tensors`)."""
    tensors = unique_tensors(checkpoint_tensors(state_dict))
    specs = [TensorSpec(name, tuple(t.shape), dtype or t.dtype) for name, t in tensors.items()]
    return write_hf_checkpoint(directory, hf_config, specs, tensors.items(), max_shard_bytes)
