"""Sharded Hugging Face load and streaming export of the Megatron backend at TP=2 x PP=2 (CPU, gloo, fp32), on a
210 MB Qwen2 checkpoint saved by transformers in five safetensors shards with an index.

In one 4-rank spawn:
- load: every rank reads its shard straight from the checkpoint (`load_hf_weights`); each parameter must equal,
  bit for bit, the shard cut out of the whole in-memory state dict by this file's own closed form of the layouts
  (the "full load"), and the rank's peak host memory while building its stage and loading it must stay below 40%
  of the checkpoint;
- a checkpoint with a missing and a misshaped tensor is refused with both named, with their shapes;
- export: `save_hf_pretrained` streams the model into safetensors shards + index (written by rank 0), with every
  rank's peak host memory below a few tensors; `AutoModelForCausalLM.from_pretrained` of the export gives back the
  original weights bit for bit and the Megatron model's logits (1e-5).

Memory is measured as resident set size, from the kernel's own peak (VmHWM, reset through /proc/self/clear_refs
just before the measured phase) minus VmRSS before it. It counts anonymous memory (parameters, temporaries,
communication buffers) and the file-backed pages of the memory-mapped safetensors files this process touched, so
reading a whole tensor, or keeping files mapped, shows; the page cache shared by all ranks is counted per rank
as soon as a rank maps it, which over-states what a node needs. (tracemalloc would miss torch's allocations.)
The workers run with a fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_=128 KiB): by default glibc raises the
threshold after freeing a multi-MB block, so later tensors come from the heap and stay resident after they are
freed, and RSS then shows the allocator's retention (export peaks of ~10 tensors here) rather than live memory
(~3 tensors).
megatron-core's unconditional CUDA calls are redirected by tests/megatron_compat.py (no GPU here).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed

transformers = pytest.importorskip("transformers")
pytest.importorskip("megatron.core")

VOCAB = 2000  # not a multiple of 128 x TP: the padded rows of the vocabulary are exercised
TP, PP = 2, 2
MiB = 2**20


def _big_config():
    return transformers.Qwen2Config(hidden_size=512, num_hidden_layers=16, num_attention_heads=8,
                                    num_key_value_heads=4, intermediate_size=1536, vocab_size=VOCAB,
                                    max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
                                    tie_word_embeddings=False)


def _status_kib(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class PeakRSS:
    """Peak resident memory of a block above the resident memory before it (bytes), from the kernel's VmHWM."""

    def __enter__(self):
        self.before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak to the current resident set
        return self

    def __exit__(self, *exc):
        self.peak = (_status_kib("VmHWM") - self.before) * 1024


def _reset_supported() -> bool:
    try:
        with PeakRSS():
            pass
    except OSError:
        return False
    return True


def _reference_shard(full_name, param, hf, arch, tp, tp_rank, layer_of):
    """The full load: the unsharded Megatron tensor built from whole HF tensors (layouts as the weights.py
    docstring states them), then this rank's chunk along the parameter's partition dimension."""
    import torch.nn.functional as F

    from megatron_red.models.megatron.model import padded_vocab_size

    name = full_name
    p = ""
    if full_name.startswith("decoder.layers."):
        local, name = full_name[len("decoder.layers."):].split(".", 1)
        p = f"model.layers.{layer_of[int(local)]}."
    pad = padded_vocab_size(arch.vocab_size, tp) - arch.vocab_size
    direct = {"input_layernorm.weight": "input_layernorm.weight", "pre_mlp_layernorm.weight":
              "post_attention_layernorm.weight", "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
              "mlp.linear_fc2.weight": "mlp.down_proj.weight", "decoder.final_layernorm.weight": "model.norm.weight"}
    if name == "embedding.word_embeddings.weight":
        full = F.pad(hf["model.embed_tokens.weight"], (0, 0, 0, pad))
    elif name == "output_layer.weight":
        full = F.pad(hf["lm_head.weight"], (0, 0, 0, pad))
    elif name in direct:
        full = hf[p + direct[name]]
    elif name.startswith("self_attention.linear_qkv."):
        kind = name.rsplit(".", 1)[1]
        g, d = arch.num_query_groups, arch.head_dim
        q, k, v = (hf[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv")
        rest = q.shape[1:]
        full = torch.cat([q.reshape(g, -1, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1)
        full = full.reshape(-1, *rest)
    elif name == "mlp.linear_fc1.weight":
        gates = hf[p + "mlp.gate_proj.weight"].chunk(tp)
        ups = hf[p + "mlp.up_proj.weight"].chunk(tp)
        full = torch.cat([t for pair in zip(gates, ups) for t in pair])
    else:
        raise KeyError(full_name)
    if getattr(param, "tensor_model_parallel", False):
        full = full.chunk(tp, dim=param.partition_dim)[tp_rank]
    return full


def _megatron_logits(model, input_ids):
    """Test-only forward through the two stages by hand (stage 0's hidden states sent point to point): the
    full-vocabulary logits [b, L, V] (gathered over TP) on the last stage, None on the first."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    b, length = input_ids.shape
    position_ids = torch.arange(length).expand_as(input_ids)
    pp_group, stage = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_rank()
    with torch.no_grad():
        if stage > 0:
            hidden = torch.empty(length, b, model.config.hidden_size)
            dist.recv(hidden, src=dist.get_global_rank(pp_group, stage - 1), group=pp_group)
            model.set_input_tensor(hidden)
        out = model(input_ids, position_ids, None)
        if stage < PP - 1:
            dist.send(out.contiguous(), dst=dist.get_global_rank(pp_group, stage + 1), group=pp_group)
            return None
        parts = [torch.empty_like(out) for _ in range(TP)]
        dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        return torch.cat(parts, dim=-1)[..., :VOCAB]


def _worker(rank, world_size, checkpoint, out, input_ids):
    import megatron_compat
    megatron_compat.install()
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    from megatron_red.models.hf_checkpoint import HFCheckpoint, StateDictWeights
    from megatron_red.models.megatron import load_hf_config
    from megatron_red.models.megatron.model import HFArchitecture
    from megatron_red.models.megatron.policy import MegatronConfig, build_sharded_model, save_hf_pretrained
    from megatron_red.models.megatron.weights import load_hf_weights

    torch.set_num_threads(1)
    hf_config = load_hf_config(checkpoint)
    arch = HFArchitecture.from_hf_config(hf_config)
    config = MegatronConfig(tensor_model_parallel_size=TP, pipeline_model_parallel_size=PP, dtype="float32")
    with PeakRSS() as build:
        _, model, _ = build_sharded_model(hf_config, None, config)
    with PeakRSS() as load:
        load_hf_weights(model, HFCheckpoint(checkpoint), arch, ps.get_tensor_model_parallel_group())
    built = (load.before - build.before) * 1024  # resident growth of building the stage (its parameters)
    out_info = {"build_and_load": max(build.peak, built + load.peak), "load": load.peak}

    # Bitwise against the full load (memory-mapped: only this stage's tensors are paged in).
    hf = {k: v for file in sorted(Path(checkpoint).glob("*.safetensors")) for k, v in load_file(file).items()}
    tp_rank = ps.get_tensor_model_parallel_rank()
    layer_of = {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
    out_info["mismatches"] = [name for name, param in model.named_parameters()
                              if not torch.equal(param, _reference_shard(name, param, hf, arch, TP, tp_rank,
                                                                         layer_of))]
    out_info["num_params"] = sum(1 for _ in model.named_parameters())
    out_info["shard"] = sum(p.numel() * p.element_size() for p in model.parameters())

    # A missing and a misshaped tensor of this stage are named with their shapes.
    first = layer_of[0]
    broken = dict(hf)
    del broken[f"model.layers.{first}.mlp.up_proj.weight"]
    broken[f"model.layers.{first}.self_attn.k_proj.bias"] = torch.zeros(7)
    try:
        load_hf_weights(model, StateDictWeights(broken), arch, ps.get_tensor_model_parallel_group())
        out_info["error"] = None
    except ValueError as e:
        out_info["error"] = str(e)
    del hf, broken

    logits = _megatron_logits(model, input_ids)
    out_info["logits"] = None if logits is None else logits.numpy()

    with PeakRSS() as export:
        save_hf_pretrained(model, hf_config, out, max_shard_bytes=64 * MiB)
    out_info["export"] = export.peak
    out_info["stage"], out_info["tp_rank"] = ps.get_pipeline_model_parallel_rank(), tp_rank
    ps.destroy_model_parallel()
    dist.barrier()
    return out_info


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_big_config()).float()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases too, so every tensor's mapping shows
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("big_qwen2")
    model.save_pretrained(path, max_shard_size="50MB")
    return path, model


def test_sharded_load_and_streaming_export_tp2_pp2(big_checkpoint, tmp_path, monkeypatch):
    if not _reset_supported():
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    checkpoint, hf_model = big_checkpoint
    assert (checkpoint / "model.safetensors.index.json").exists()
    files = sorted(p.name for p in checkpoint.glob("*.safetensors"))
    assert len(files) >= 4  # a multi-file checkpoint
    hf_state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    checkpoint_bytes = sum(v.numel() * v.element_size() for v in hf_state.values())
    largest = max(v.numel() * v.element_size() for v in hf_state.values())
    assert checkpoint_bytes >= 200e6

    input_ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    out = tmp_path / "export"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # see the module docstring
    results = run_distributed(_worker, TP * PP, str(checkpoint), str(out), input_ids, timeout_s=600)

    print(f"\ncheckpoint {checkpoint_bytes / MiB:.1f} MiB in {len(files)} files, "
          f"largest tensor {largest / MiB:.1f} MiB")
    print("rank stage tp | shard MiB | build+load MiB (% of checkpoint) | export MiB")
    for rank, r in enumerate(results):
        print(f"{rank:4d} {r['stage']:5d} {r['tp_rank']:2d} | {r['shard'] / MiB:9.1f} | "
              f"{r['build_and_load'] / MiB:8.1f} ({100 * r['build_and_load'] / checkpoint_bytes:4.1f}%) | "
              f"{r['export'] / MiB:6.1f}")
    for rank, r in enumerate(results):
        assert r["num_params"] > 0 and r["mismatches"] == [], (rank, r["mismatches"])
        # Its shard (a quarter of the layers, half of a vocabulary table) plus about one tensor.
        assert r["build_and_load"] < 0.4 * checkpoint_bytes, rank
        # Built without initialisation, the parameters become resident as the load writes them.
        assert r["load"] < r["shard"] + 2 * largest, rank
        # Export: a parameter's gathered shards (and gloo's staging copy of them), one HF tensor at a time.
        assert r["export"] < 5 * largest, rank
        layer = {0: 0, 1: 8}[r["stage"]]
        assert f"model.layers.{layer}.mlp.up_proj.weight: missing (expected shape (1536, 512))" in r["error"]
        assert (f"model.layers.{layer}.self_attn.k_proj.bias: expected shape (256,), found (7,)"
                in r["error"]), r["error"]

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(hf_state)  # lm_head included: the head is not tied
    assert len(set(index["weight_map"].values())) == 4  # 64 MiB shards
    assert index["metadata"]["total_size"] == checkpoint_bytes
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for k, v in exported.state_dict().items():
        assert torch.equal(v, hf_state[k]), k
    with torch.no_grad():
        want = hf_model(input_ids).logits
        got = exported(input_ids).logits
    assert torch.equal(got, want)
    last_stage = [r for r in results if r["stage"] == PP - 1]
    assert len(last_stage) == TP
    for r in last_stage:
        torch.testing.assert_close(torch.from_numpy(r["logits"]), got, atol=1e-5, rtol=0)
    assert want.abs().max() > 0.1  # logits well above the tolerance
