"""The streaming safetensors writer and the lazy checkpoint reader (models/hf_checkpoint.py), against the
`safetensors` library itself: files written one tensor at a time must read back with `safetensors.torch.load_file`
exactly, split into shards by size, with every tensor aligned to its item size; the reader must give the same
slices as the tensors for a single-file checkpoint without index and for a sharded one."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_red.models.hf_checkpoint import (INDEX_FILE, HFCheckpoint, TensorSpec, write_hf_checkpoint,
                                               write_safetensors)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 5, generator=g),
            "b.odd_bf16": torch.randn(7, generator=g).to(torch.bfloat16),  # 14 bytes: misaligns what follows
            "c.half": torch.randn(2, 3, generator=g).to(torch.float16),
            "d.ids": torch.arange(4),
            "e.big": torch.randn(40, 10, generator=g)}


def _config():
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       intermediate_size=16, vocab_size=10)


def test_streamed_shards_read_back_with_safetensors(tmp_path):
    tensors = _tensors()
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    write_hf_checkpoint(tmp_path, _config(), specs, iter(tensors.items()), max_shard_bytes=200)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    files = sorted(set(index["weight_map"].values()))
    # 60 + 14 + 12 + 32 bytes fit one 200-byte shard; the 1600-byte tensor gets its own.
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert index["weight_map"]["e.big"] == files[1]
    read = {k: v for f in files for k, v in load_file(tmp_path / f).items()}
    assert read.keys() == tensors.keys()
    for k, v in tensors.items():
        assert read[k].dtype == v.dtype and torch.equal(read[k], v), k
    for f in files:  # every tensor starts at a multiple of its item size
        raw = (tmp_path / f).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        assert (8 + n) % 8 == 0
        for name, meta in json.loads(raw[8:8 + n]).items():
            if name != "__metadata__":
                assert meta["data_offsets"][0] % tensors[name].element_size() == 0, name
    assert (tmp_path / "config.json").is_file()


def test_stream_must_follow_the_plan(tmp_path):
    tensors = _tensors()
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    with pytest.raises(RuntimeError, match="gave 'e.big' where 'a.weight' was planned"):
        write_safetensors(tmp_path, specs, reversed(list(tensors.items())))
    with pytest.raises(RuntimeError, match="a.weight: shape"):
        write_safetensors(tmp_path, specs, [("a.weight", torch.zeros(5, 3))])


def test_reader_single_file_and_sharded(tmp_path):
    tensors = _tensors()
    single = tmp_path / "single"
    single.mkdir()
    save_file(tensors, single / "model.safetensors")
    _config().save_pretrained(single)
    sharded = tmp_path / "sharded"
    write_hf_checkpoint(sharded, _config(), [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()],
                        tensors.items(), max_shard_bytes=100)
    for path in (single, sharded):
        checkpoint = HFCheckpoint(path)
        assert checkpoint.shape("e.big") == (40, 10) and checkpoint.shape("missing") is None
        with checkpoint.open() as get:
            assert torch.equal(get("e.big")[(slice(8, 16), slice(None))], tensors["e.big"][8:16])
            assert torch.equal(get("e.big")[(slice(None), slice(5, 10))], tensors["e.big"][:, 5:10])
            assert torch.equal(get("b.odd_bf16")[(slice(2, 5),)], tensors["b.odd_bf16"][2:5])
    shards = sorted(set(json.loads((sharded / INDEX_FILE).read_text())["weight_map"].values()))
    assert len(shards) == 3
    (sharded / shards[1]).unlink()
    with pytest.raises(ValueError, match=f"{shards[1]}, which is missing"):
        HFCheckpoint(sharded)
