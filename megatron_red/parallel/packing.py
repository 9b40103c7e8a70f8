"""Micro-batches as the model sees them: right-padded rows, or rows packed into one THD sequence by a token budget.

A step's rows (rollouts and offline traces) have very different lengths: one 8k-token trace beside seven 2k-token
rollouts. Padded micro-batches spend most of their compute on padding; packing concatenates the rows' real tokens
into one sequence of at most `max_tokens` tokens (first-fit-decreasing over the row lengths), with `cu_seqlens`
marking where each row starts so that attention never crosses a row boundary (megatron-core `PackedSeqParams`,
THD layout). Positions restart at 0 in every row, so each row is computed exactly as it would be alone.

Either way the LM head runs only where the loss mask is 1: `head_positions` index the flattened [S * B] hidden
states of the last stage (S = sequence, B = batch; B = 1 packed), and `targets` are the tokens they predict.
The loss function still receives the rows right-padded ([b, L-1] log-probs, the rows' `SequenceBatch`), so losses,
metrics and global-count normalisation are the same whether or not rows are packed.

Sequence parallelism splits the sequence dimension over the tensor-parallel ranks, so it must be a multiple of TP
(`multiple`): a packed sequence gets a last segment of padding tokens (its own segment: nothing attends across
it), a padded batch extra padding columns.

Mixtures of experts: the rows' recorded experts (the batch field `routed_experts`, [b, L-1, layers, k], position t
of each row at index t; parallel/routing.py) are laid out in the model's token order too: [S * B] of the padded
[S, B] activations (sequence-major), or the packed sequence's [T]; -1 where nothing was recorded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_red.batch import NOT_RECORDED, SequenceBatch
from megatron_red.errors import ConfigError


@dataclass
class ModelMicroBatch:
    """One micro-batch in the layout the model runs.

    rows:          the rows, right-padded and trimmed ([b, L]); the loss function receives them.
    input_ids:     [b, S] (padded) or [1, T] (packed) token ids fed to the model.
    position_ids:  same shape; positions restart at 0 in every packed row.
    cu_seqlens:    packed only: [segments + 1] int32 offsets of the rows (and a trailing padding segment) in the
                   packed sequence; None for padded rows.
    max_seqlen:    longest segment (packed) or S (padded).
    head_positions:[n] indices into the flattened [S * B] last-stage hidden states where the loss mask is 1.
    targets:       [n] the token each of those positions predicts.
    routing:       [S * B or T, layers, k] the recorded experts of every position in the model's token order (-1:
                   none), or None when the rows carry none.
    """

    rows: SequenceBatch
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None
    max_seqlen: int
    head_positions: torch.Tensor
    targets: torch.Tensor
    routing: torch.Tensor | None = None

    def to(self, device: torch.device) -> "ModelMicroBatch":
        move = (lambda t: None if t is None else t.to(device))
        return ModelMicroBatch(self.rows.to(device), move(self.input_ids), move(self.position_ids),
                               move(self.cu_seqlens), self.max_seqlen, move(self.head_positions),
                               move(self.targets), move(self.routing))

    def packed_seq_params(self):
        """megatron-core `PackedSeqParams` (THD) of a packed micro-batch, None for padded rows."""
        if self.cu_seqlens is None:
            return None
        from megatron.core.packed_seq_params import PackedSeqParams

        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                               max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen)


def row_lengths(batch: SequenceBatch) -> list[int]:
    """Real tokens of each right-padded row (at least 1: an empty row still occupies one position)."""
    return batch.attention_mask.sum(dim=1).clamp_min(1).tolist()


def token_budget_groups(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """First-fit-decreasing: row indices grouped so that each group's lengths sum to at most `max_tokens`.
    Rows are placed longest first, each into the first group with room; groups are listed in creation order."""
    if max_tokens < 1:
        raise ValueError(f"trainer.max_tokens_per_micro_batch must be >= 1 to pack rows, got {max_tokens}")
    longest = max(lengths, default=0)
    if longest > max_tokens:
        raise ConfigError(f"a row of {longest} tokens does not fit trainer.max_tokens_per_micro_batch={max_tokens}; "
                          f"raise the budget to at least {longest}")
    groups: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for g, total in enumerate(used):
            if total + lengths[i] <= max_tokens:
                groups[g].append(i)
                used[g] += lengths[i]
                break
        else:
            groups.append([i])
            used.append(lengths[i])
    return groups


def micro_batch_rows(batch: SequenceBatch, micro_batch_size: int,
                     max_tokens: int = 0) -> list[torch.Tensor]:
    """Row indices of each micro-batch: `micro_batch_size` rows of similar length (`SequenceBatch.micro_batch_rows`,
    `max_tokens` = 0), or the token-budget groups of `token_budget_groups`."""
    if max_tokens:
        return [torch.tensor(g) for g in token_budget_groups(row_lengths(batch), max_tokens)]
    return batch.micro_batch_rows(micro_batch_size)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def model_tokens(rows: SequenceBatch, packed: bool, multiple: int = 1) -> int:
    """Positions the model runs for `rows` as one micro-batch (what every MoE router sees): b x the padded width,
    or the packed sequence's length (`padded_micro_batch` / `packed_micro_batch`)."""
    if packed:
        return _round_up(sum(row_lengths(rows)), multiple)
    rows = rows.trimmed()
    return len(rows) * _round_up(rows.input_ids.shape[1], multiple)


def padded_micro_batch(rows: SequenceBatch, multiple: int = 1) -> ModelMicroBatch:
    """`rows` right-padded to their longest row (rounded up to `multiple` columns)."""
    rows = rows.trimmed()
    b, length = rows.input_ids.shape
    width = _round_up(length, multiple)
    input_ids = torch.nn.functional.pad(rows.input_ids, (0, width - length))
    position_ids = torch.arange(width).unsqueeze(0).expand(b, width)
    row, t = rows.loss_mask.bool().nonzero(as_tuple=True)  # row-major, the order masked_scatter fills
    routing = _positions_routing(rows, width)
    if routing is not None:  # [b, S, ...] -> the activations' sequence-major [S * b, ...]
        routing = routing.transpose(0, 1).reshape(width * b, *routing.shape[2:])
    return ModelMicroBatch(rows, input_ids, position_ids, None, width, *_head_inputs(rows, t * b + row, row, t),
                           routing)


def packed_micro_batch(rows: SequenceBatch, multiple: int = 1) -> ModelMicroBatch:
    """`rows`' real tokens concatenated into one [1, T] sequence with `cu_seqlens` (T rounded up to `multiple`)."""
    rows = rows.trimmed()
    lengths = row_lengths(rows)
    total = sum(lengths)
    pad = _round_up(total, multiple) - total
    segments = lengths + ([pad] if pad else [])
    input_ids = torch.cat([rows.input_ids[i, :n] for i, n in enumerate(lengths)]
                          + [rows.input_ids.new_zeros(pad)]).unsqueeze(0)
    position_ids = torch.cat([torch.arange(n) for n in segments]).unsqueeze(0)
    cu_seqlens = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(segments).cumsum(0)
    row, t = rows.loss_mask.bool().nonzero(as_tuple=True)
    routing = _positions_routing(rows, rows.input_ids.shape[1])
    if routing is not None:
        routing = torch.cat([routing[i, :n] for i, n in enumerate(lengths)]
                            + [routing.new_full((pad, *routing.shape[2:]), NOT_RECORDED)])
    return ModelMicroBatch(rows, input_ids, position_ids, cu_seqlens, max(segments),
                           *_head_inputs(rows, cu_seqlens[row].long() + t, row, t), routing)


def _positions_routing(rows: SequenceBatch, width: int) -> torch.Tensor | None:
    """The rows' recorded experts per position, [b, width, layers, k] (-1 past the recorded positions), or None."""
    recorded = rows.fields.get("routed_experts")
    if recorded is None:
        return None
    out = recorded.new_full((recorded.shape[0], width, *recorded.shape[2:]), NOT_RECORDED)
    out[:, :recorded.shape[1]] = recorded
    return out


def _head_inputs(rows: SequenceBatch, positions: torch.Tensor, row: torch.Tensor,
                 t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(head positions, targets). A micro-batch without loss tokens still sends one position through the head: the
    loss must depend on the last stage's output for the pipeline's backward pass (its value is never used)."""
    if len(positions) == 0:
        return torch.zeros(1, dtype=torch.long), rows.input_ids[:1, 1]
    return positions, rows.input_ids[row, t + 1]
