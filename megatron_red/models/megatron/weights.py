"""Hugging Face <-> Megatron weight conversion for Qwen2 / Llama / Qwen3 and the Qwen3-MoE / Qwen2-MoE mixtures of
experts, with tensor, pipeline and expert sharding.

Megatron fuses and shards some projections differently from Hugging Face:

- `linear_qkv` stacks q, k and v per query group: for each of the G key/value groups, that group's H/G query
  heads, then its key head, then its value head. Tensor parallelism splits the groups, so each rank's shard is
  a contiguous run of whole groups.
- `linear_fc1` holds the SwiGLU gate and up projections; each TP rank's shard is [gate_r; up_r], so the
  unsharded layout is [gate_0; up_0; gate_1; up_1; ...] — it depends on TP.
- The embedding and (untied) LM head are padded with zero rows to the padded vocabulary and split by rows.
- Row-parallel projections (`linear_proj`, `linear_fc2`) are split along their input dimension.
- Mixtures of experts: the router (`mlp.router.weight`, [experts, hidden]) is Hugging Face's `mlp.gate.weight`,
  whole on every rank. The experts are split over the EP ranks: EP rank e holds experts e * n .. (e + 1) * n - 1
  (n = experts / EP) as its local experts 0 .. n - 1, `mlp.experts.local_experts.{i}.linear_fc1/fc2.weight` in the
  local spec (megatron's `SequentialMLP`) or `mlp.experts.linear_fc1/fc2.weight{i}` in Transformer Engine's grouped
  GEMM (`TEGroupedMLP`); each is Hugging Face's `mlp.experts.{e * n + i}.gate_proj / up_proj / down_proj.weight` (the
  released checkpoints' per-expert layout, which transformers' own `save_pretrained` writes), TP-split like a dense
  MLP. Qwen2-MoE's shared expert (`mlp.shared_experts.linear_fc1/fc2.weight`) is `mlp.shared_expert.*` split like a
  dense MLP, its gate (`mlp.shared_experts.gate_weight`, [1, hidden]) `mlp.shared_expert_gate.weight`, whole.

`shard_layout` states, for one TP rank's shard of one Megatron parameter, which slices of which HF tensors it is
made of (`Copy`: `shard[local] <-> hf_tensor[hf]`). Both directions use it:

- Load (`load_hf_weights`): each rank copies exactly its slices out of the (lazily opened) checkpoint straight
  into its parameters, so a rank reads its shard of its pipeline stage's tensors and never the rest. Row-parallel
  weights are column slices, which touch every row of the stored tensor: those pages are mapped for the one
  tensor being copied, then released.
- Export (`HFExport`): per parameter, the TP shards are gathered on TP rank 0 of the owning stage (and, for an
  expert, of each EP rank), which fills the HF tensors from each rank's copies and sends them to the writer (TP
  rank 0 of the first stage of EP rank 0); the writer receives one tensor at a time. No rank holds more than a few
  tensors.

Pipeline stages own disjoint layers, addressed by each layer's global `layer_number`. Data-parallel replicas hold
the same weights and need no communication; with EP, the EP ranks of one expert-data-parallel replica (data-parallel
ranks e + EP * r, e < EP) together hold one copy of the experts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_red.distributed import group_size_and_rank
from megatron_red.errors import ConfigError
from megatron_red.models.hf_checkpoint import TensorSpec
from megatron_red.models.megatron.model import HFArchitecture

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# Megatron per-layer parameter -> HF per-layer parameter, for the tensors that map one to one.
_LAYER_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",  # Transformer Engine spec
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",  # Transformer Engine spec
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    # Qwen3's per-head RMSNorm gains (head_dim wide): every TP rank holds the whole vector.
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    # Mixtures of experts: the router, Qwen2-MoE's shared expert and its gate.
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.shared_experts.linear_fc2.weight": "mlp.shared_expert.down_proj.weight",
    "mlp.shared_experts.gate_weight": "mlp.shared_expert_gate.weight",
}
# Megatron model-level parameter -> HF parameter, one to one.
_GLOBAL_DIRECT = {"decoder.final_layernorm.weight": "model.norm.weight"}
# Vocabulary-parallel tables: padded to the padded vocabulary, split by rows.
_VOCAB = {"embedding.word_embeddings.weight": "model.embed_tokens.weight", "output_layer.weight": "lm_head.weight"}
# Fused q/k/v (weight and bias): HF name pattern with "{}" = q, k, v.
_QKV = {"self_attention.linear_qkv.weight": "self_attn.{}_proj.weight",
        "self_attention.linear_qkv.bias": "self_attn.{}_proj.bias"}
# Fused SwiGLU input projection: (gate, up).
_GATE_UP = {"mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
            "mlp.shared_experts.linear_fc1.weight": ("mlp.shared_expert.gate_proj.weight",
                                                     "mlp.shared_expert.up_proj.weight")}
# An expert's MLP (local spec: SequentialMLP; Transformer Engine: TEGroupedMLP): its local index and which linear.
_EXPERT = re.compile(r"^mlp\.experts\.(?:local_experts\.(?P<local>\d+)\.linear_fc(?P<fc>[12])\.weight"
                     r"|linear_fc(?P<te_fc>[12])\.weight(?P<te_local>\d+))$")

Index = tuple[slice, ...]


@dataclass(frozen=True)
class Copy:
    """One piece of a TP shard: `shard[local]` holds `hf_tensor(hf_name)[hf]` (same shape)."""

    hf_name: str
    hf: Index
    local: Index


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _global_layer_numbers(model) -> dict[int, int]:
    """Local layer index -> 0-based global layer index (pipeline stages own consecutive layers)."""
    return {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}


def _split_name(name: str, layer_map: dict[int, int]) -> tuple[str, int | None]:
    match = _LAYER.match(name)
    if match is None:
        return name, None
    return match.group(2), layer_map[int(match.group(1))]


def partition_dim(param: torch.Tensor) -> int | None:
    """The dimension along which TP splits `param`; None when every TP rank holds all of it."""
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def _along(ndim: int, dim: int, start: int, stop: int) -> Index:
    index = [slice(None)] * ndim
    index[dim] = slice(start, stop)
    return tuple(index)


def is_expert(name: str) -> bool:
    """Whether the (layer-relative) Megatron parameter `name` belongs to one of the experts the EP ranks split."""
    return _EXPERT.match(name) is not None


def shard_layout(name: str, layer: int | None, local_shape: tuple[int, ...], split_dim: int | None,
                 arch: HFArchitecture, tp: int, tp_rank: int,
                 expert_offset: int = 0) -> tuple[dict[str, tuple[int, ...]], list[Copy]]:
    """(shape of each HF tensor involved, the copies that make up TP rank `tp_rank`'s shard) for the Megatron
    parameter `name` of global layer `layer` (None: not in a layer), whose shard has `local_shape` and is split
    along `split_dim` (None: not split). An expert's parameter belongs to global expert `expert_offset` + its local
    index (`expert_offset` = EP rank x experts per EP rank). Vocabulary padding rows are in no copy (they are
    zero)."""
    ndim = len(local_shape)
    expert = _EXPERT.match(name) if layer is not None else None
    if expert is not None:  # expert g's MLP is a dense MLP under model.layers.{layer}.mlp.experts.{g}
        g = expert_offset + int(expert["local"] if expert["local"] is not None else expert["te_local"])
        name = f"mlp.linear_fc{expert['fc'] or expert['te_fc']}.weight"

    def rename(hf_name: str) -> str:
        """A layer-relative name of the tables, for an expert under its `mlp.experts.{g}`."""
        return hf_name if expert is None else hf_name.replace("mlp.", f"mlp.experts.{g}.", 1)

    whole = (slice(None),) * ndim
    if layer is None and name in _VOCAB:
        hf_name = "model.embed_tokens.weight" if name == "output_layer.weight" and arch.tie_word_embeddings \
            else _VOCAB[name]
        rows = local_shape[0]
        start, stop = tp_rank * rows, min((tp_rank + 1) * rows, arch.vocab_size)
        copies = [Copy(hf_name, _along(ndim, 0, start, stop), _along(ndim, 0, 0, stop - start))] if stop > start \
            else []
        return {hf_name: (arch.vocab_size, *local_shape[1:])}, copies
    prefix = "" if layer is None else f"model.layers.{layer}."
    if layer is not None and name in _QKV:
        g, d = arch.num_query_groups, arch.head_dim
        per_group = arch.num_attention_heads // g
        local_groups = g // tp
        q, k, v = (prefix + _QKV[name].format(x) for x in "qkv")
        rest = local_shape[1:]
        copies = []
        for i in range(local_groups):
            group, base = tp_rank * local_groups + i, i * (per_group + 2) * d
            copies += [Copy(q, _along(ndim, 0, group * per_group * d, (group + 1) * per_group * d),
                            _along(ndim, 0, base, base + per_group * d)),
                       Copy(k, _along(ndim, 0, group * d, (group + 1) * d),
                            _along(ndim, 0, base + per_group * d, base + (per_group + 1) * d)),
                       Copy(v, _along(ndim, 0, group * d, (group + 1) * d),
                            _along(ndim, 0, base + (per_group + 1) * d, base + (per_group + 2) * d))]
        return {q: (g * per_group * d, *rest), k: (g * d, *rest), v: (g * d, *rest)}, copies
    if layer is not None and name in _GATE_UP:
        gate, up = (prefix + rename(x) for x in _GATE_UP[name])
        rows = local_shape[0] // 2
        full = (rows * tp, *local_shape[1:])
        return {gate: full, up: full}, [Copy(gate, _along(ndim, 0, tp_rank * rows, (tp_rank + 1) * rows),
                                             _along(ndim, 0, 0, rows)),
                                        Copy(up, _along(ndim, 0, tp_rank * rows, (tp_rank + 1) * rows),
                                             _along(ndim, 0, rows, 2 * rows))]
    table = _GLOBAL_DIRECT if layer is None else _LAYER_DIRECT
    if name not in table:
        where = name if layer is None else f"decoder.layers.*.{name}"
        raise KeyError(f"no Hugging Face tensor maps to Megatron parameter {where}")
    hf_name = prefix + rename(table[name])
    if split_dim is None:
        return {hf_name: tuple(local_shape)}, [Copy(hf_name, whole, whole)]
    size = local_shape[split_dim]
    full = tuple(n * tp if i == split_dim else n for i, n in enumerate(local_shape))
    return {hf_name: full}, [Copy(hf_name, _along(ndim, split_dim, tp_rank * size, (tp_rank + 1) * size), whole)]


def _numel(index: Index, shape: tuple[int, ...]) -> int:
    n = 1
    for s, size in zip(index, shape):
        n *= len(range(*s.indices(size)))
    return n


def _expert_offset(arch: HFArchitecture, ep: int, ep_rank: int) -> int:
    """The global index of local expert 0 on EP rank `ep_rank` of `ep`: each holds a contiguous run of experts."""
    return ep_rank * (arch.num_experts // ep)


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, weights, arch: HFArchitecture, tp_group: dist.ProcessGroup | None,
                    ep_group: dist.ProcessGroup | None = None) -> None:
    """Copy this rank's shard of every parameter of the (possibly wrapped) Megatron `model` out of `weights`
    (`HFCheckpoint` or `StateDictWeights`, see models/hf_checkpoint.py), reading only the slices it owns (of a
    mixture of experts, the experts of this rank of the expert-parallel group `ep_group`).

    Every tensor is checked before any is read; a missing or misshaped one raises a ValueError naming the
    tensor, the expected and the found shape.
    """
    model = unwrap_model(model)
    tp, tp_rank = group_size_and_rank(tp_group)
    offset = _expert_offset(arch, *group_size_and_rank(ep_group))
    layer_map = _global_layer_numbers(model)
    plan, problems = [], []
    for full_name, param in model.named_parameters():
        name, layer = _split_name(full_name, layer_map)
        shapes, copies = shard_layout(name, layer, tuple(param.shape), partition_dim(param), arch, tp, tp_rank,
                                      offset)
        for hf_name, expected in shapes.items():
            found = weights.shape(hf_name)
            if found is None:
                problems.append(f"{hf_name}: missing (expected shape {expected})")
            elif found != expected:
                problems.append(f"{hf_name}: expected shape {expected}, found {found} in {weights.where(hf_name)}")
        plan.append((param, copies))
    if problems:
        raise ConfigError(f"the Hugging Face checkpoint does not fit the model ({len(problems)} tensor(s)):\n  "
                          + "\n  ".join(dict.fromkeys(problems)))
    for param, copies in plan:
        if sum(_numel(c.local, tuple(param.shape)) for c in copies) < param.numel():
            param.zero_()  # vocabulary padding rows
        with weights.open() as get:  # one parameter's files mapped at a time
            for c in copies:
                param[c.local].copy_(get(c.hf_name)[c.hf])


@dataclass
class _Entry:
    """One parameter of the export plan, known to every rank of the model-parallel group."""

    name: str                       # local parameter name on its stage
    relative: str                   # its name in its layer (or in the model, outside the layers)
    layer: int | None               # its global layer index; None outside the layers
    shape: tuple[int, ...]          # the TP shard's shape
    split: int | None               # the dimension TP splits; None when whole on every TP rank
    dtype: torch.dtype
    expert: bool                    # an expert's: every EP rank holds its own experts under this name


class HFExport:
    """Streams the HF weights of a TP x PP (x EP)-sharded model: iterate it on every rank of one model replica (the
    TP x PP ranks sharing a data-parallel rank; with experts, the TP x PP x EP ranks of data-parallel ranks
    0 .. EP - 1); TP rank 0 of the first stage of EP rank 0 (`is_writer`) receives `(name, tensor)` pairs in the
    order of `specs`, every other rank yields nothing and only serves its shards.

    Per parameter: the owning stage gathers its TP shards on its TP rank 0 (`dist.gather`), which builds the HF
    tensors (`shard_layout` inverted) and, unless it is the writer, sends them to the writer point to point. A
    dense parameter is sent by EP rank 0 (the other EP ranks hold the same weights); an expert's by every EP rank,
    in EP-rank order. A tied LM head is exported once, as the embedding.

    `every_rank=True` streams the same pairs to every rank of the replica instead (a colocated rollout engine's
    refit, rollout/vllm_engine.py): the owning stage all-gathers its TP shards, each of its TP ranks builds the HF
    tensors, an expert's are broadcast over the EP group from the EP rank that holds it, and every tensor over the
    pipeline group to the same TP (and EP) rank of every other stage. Every rank then holds one parameter's TP
    shards and its HF tensors at a time.
    """

    def __init__(self, model: torch.nn.Module, arch: HFArchitecture, tp_group: dist.ProcessGroup | None,
                 pp_group: dist.ProcessGroup | None, ep_group: dist.ProcessGroup | None = None,
                 every_rank: bool = False):
        self.model = unwrap_model(model)
        self.arch = arch
        self.tp_group, self.pp_group, self.ep_group = tp_group, pp_group, ep_group
        self.tp, self.tp_rank = group_size_and_rank(tp_group)
        self.pp, self.stage = group_size_and_rank(pp_group)
        self.ep, self.ep_rank = group_size_and_rank(ep_group)
        self.every_rank = every_rank
        self.is_writer = every_rank or (self.tp_rank == 0 and self.stage == 0 and self.ep_rank == 0)
        # The global rank of this TP rank at every (EP rank, stage): on TP rank 0, where the writer receives from
        # and (at EP rank 0, stage 0) the writer; the other TP ranks only take part in their stage's gathers.
        by_stage = ([dist.get_global_rank(pp_group, s) for s in range(self.pp)] if self.pp > 1
                    else [dist.get_rank() if dist.is_initialized() else 0])
        self.ranks = [by_stage]
        if self.ep > 1:
            self.ranks = [None] * self.ep
            dist.all_gather_object(self.ranks, by_stage, group=ep_group)
        self.writer = self.ranks[0][0]
        layer_map = _global_layer_numbers(self.model)
        self._params = dict(self.model.named_parameters())
        entries = []
        for full_name, param in self._params.items():
            name, layer = _split_name(full_name, layer_map)
            if name == "output_layer.weight" and arch.tie_word_embeddings:
                continue  # the last stage's copy of the tied embedding
            entries.append(_Entry(full_name, name, layer, tuple(param.shape), partition_dim(param), param.dtype,
                                  layer is not None and is_expert(name)))
        self.stages: list[list[_Entry]] = [entries]
        if self.pp > 1:  # every stage learns the others' plans (names and shapes only)
            self.stages = [None] * self.pp
            dist.all_gather_object(self.stages, entries, group=pp_group)

    def _layout(self, entry: _Entry, ep_rank: int, tp_rank: int = 0):
        """`shard_layout` of `entry` on (EP rank, TP rank)."""
        return shard_layout(entry.relative, entry.layer, entry.shape, entry.split, self.arch, self.tp, tp_rank,
                            _expert_offset(self.arch, self.ep, ep_rank))

    def _specs(self, entry: _Entry, ep_rank: int) -> list[TensorSpec]:
        """The HF tensors `entry` becomes on EP rank `ep_rank` (an expert's: that rank's experts)."""
        return [TensorSpec(n, s, entry.dtype) for n, s in self._layout(entry, ep_rank)[0].items()]

    @property
    def specs(self) -> list[TensorSpec]:
        """Every HF tensor of the model, in the order the writer receives them."""
        return [spec for entries in self.stages for entry in entries
                for ep_rank in (range(self.ep) if entry.expert else [0]) for spec in self._specs(entry, ep_rank)]

    def _hf_tensors(self, entry: _Entry) -> Iterator[torch.Tensor]:
        """Collective over this stage's TP group (the gather runs when iteration starts): on TP rank 0 (on every TP
        rank with `every_rank`), the HF tensors of `entry` (this EP rank's) one at a time, each built from every
        rank's shard; nothing on the other ranks."""
        param = self._params[entry.name].detach()
        shards = [param]
        if entry.split is not None and self.tp > 1:
            if self.every_rank:
                shards = [torch.empty_like(param) for _ in range(self.tp)]
                dist.all_gather(shards, param.contiguous(), group=self.tp_group)
            else:
                shards = [torch.empty_like(param) for _ in range(self.tp)] if self.tp_rank == 0 else None
                dist.gather(param.contiguous(), shards, dst=dist.get_global_rank(self.tp_group, 0),
                            group=self.tp_group)
        if self.tp_rank != 0 and not self.every_rank:
            return
        copies = [self._layout(entry, self.ep_rank, rank)[1] for rank in range(len(shards))]
        for spec in self._specs(entry, self.ep_rank):
            tensor = param.new_zeros(spec.shape)
            for shard, rank_copies in zip(shards, copies):
                for c in rank_copies:
                    if c.hf_name == spec.name:
                        tensor[c.hf] = shard[c.local]
            yield tensor
            del tensor  # before the next one is built: one HF tensor alive at a time

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.every_rank:
            yield from self._to_every_rank()
            return
        device = next(iter(self._params.values())).device
        for stage, entries in enumerate(self.stages):
            for entry in entries:
                owners = range(self.ep) if entry.expert else [0]  # the EP ranks whose copy is written
                if stage == self.stage and self.ep_rank in owners:
                    for spec, tensor in zip(self._specs(entry, self.ep_rank), self._hf_tensors(entry)):
                        if self.is_writer:
                            yield spec.name, tensor
                        else:
                            dist.send(tensor, dst=self.writer)
                        del tensor
                if not self.is_writer:
                    continue
                for ep_rank in owners:
                    if (stage, ep_rank) == (self.stage, self.ep_rank):
                        continue  # the writer's own, yielded above
                    for spec in self._specs(entry, ep_rank):
                        tensor = torch.empty(spec.shape, dtype=spec.dtype, device=device)
                        dist.recv(tensor, src=self.ranks[ep_rank][stage])
                        yield spec.name, tensor
                        del tensor

    def _to_every_rank(self) -> Iterator[tuple[str, torch.Tensor]]:
        device = next(iter(self._params.values())).device
        for stage, entries in enumerate(self.stages):
            for entry in entries:
                # A dense parameter: this EP rank's own copy; an expert's: every EP rank's experts in turn.
                for owner in (range(self.ep) if entry.expert else [self.ep_rank]):
                    specs = self._specs(entry, owner)
                    tensors = self._hf_tensors(entry) if (stage, owner) == (self.stage, self.ep_rank) else (
                        torch.empty(spec.shape, dtype=spec.dtype, device=device) for spec in specs)
                    for spec, tensor in zip(specs, tensors):
                        if entry.expert and self.ep > 1 and stage == self.stage:
                            dist.broadcast(tensor, src=self.ranks[owner][stage], group=self.ep_group)
                        if self.pp > 1:
                            dist.broadcast(tensor, src=self.ranks[self.ep_rank][stage], group=self.pp_group)
                        yield spec.name, tensor
                        del tensor
